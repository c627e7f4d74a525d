"""k-NN monitor: scores the target encoder, never changes the training, and keeps the best encoder."""

import pytest
import torch
from conftest import tiny_config
from transformers.trainer_utils import get_last_checkpoint

from modeling_ijepa import IJepaForPreTraining
from modeling_ijepa.data import IJepaPretrainingCollator, default_image_processor, load_digits_dataset
from modeling_ijepa.masking import IJepaMaskCollator
from modeling_ijepa.monitoring import KnnMonitor, load_knn_monitor_datasets
from modeling_ijepa.trainer import IJepaTrainer, IJepaTrainingArguments


@pytest.fixture(scope="module")
def monitor() -> KnnMonitor:
    train, evaluation = load_knn_monitor_datasets(image_size=48)
    return KnnMonitor(
        train, evaluation, default_image_processor(48), k=5, batch_size=32, max_train_samples=80, max_eval_samples=40
    )


def _weights(model) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _trainer(output_dir, knn_monitor=None, callbacks=(), eval_dataset=None, **overrides) -> IJepaTrainer:
    torch.manual_seed(0)
    config = tiny_config()
    values = dict(
        output_dir=str(output_dir),
        per_device_train_batch_size=8,
        max_steps=6,
        warmup_steps=2,
        logging_steps=1,
        save_strategy="steps",
        save_steps=2,
        report_to="none",
        seed=0,
        dataloader_drop_last=True,
        use_cpu=True,
        disable_tqdm=True,
    )
    if knn_monitor is not None:
        values.update(eval_strategy="steps", eval_steps=2)
    values.update(overrides)
    mask_collator = IJepaMaskCollator.from_config(config, seed=0)
    trainer = IJepaTrainer(
        model=IJepaForPreTraining(config),
        args=IJepaTrainingArguments(**values),
        train_dataset=load_digits_dataset(48)["train"].select(range(64)),
        data_collator=IJepaPretrainingCollator(mask_collator, default_image_processor(48)),
        eval_dataset=eval_dataset,
        knn_monitor=knn_monitor,
    )
    for callback in callbacks:
        trainer.add_callback(callback)
    return trainer


def test_monitor_subsets_and_scores_deterministically_without_touching_the_rng(monitor):
    assert (len(monitor.train_labels), len(monitor.eval_labels)) == (80, 40)
    assert monitor.train_pixels.shape == (80, 3, 48, 48) and monitor.train_pixels.dtype == torch.float16
    encoder = IJepaForPreTraining(tiny_config()).get_encoder().train()
    state = torch.get_rng_state()
    first = monitor.evaluate(encoder)
    assert torch.equal(torch.get_rng_state(), state)
    assert encoder.training  # restored after the evaluation in eval mode
    assert 0.0 <= first["knn_accuracy"] <= 1.0
    assert monitor.evaluate(encoder)["knn_accuracy"] == first["knn_accuracy"]


def test_monitor_accuracy_is_the_knn_accuracy_of_pooled_features(monitor):
    from modeling_ijepa.evaluation import knn_accuracy

    encoder = IJepaForPreTraining(tiny_config()).get_encoder().eval()
    with torch.no_grad():
        train = encoder(pixel_values=monitor.train_pixels.float()).last_hidden_state.mean(dim=1)
        query = encoder(pixel_values=monitor.eval_pixels.float()).last_hidden_state.mean(dim=1)
    expected = knn_accuracy(train, monitor.train_labels, query, monitor.eval_labels, k=5)
    assert monitor.evaluate(encoder)["knn_accuracy"] == pytest.approx(expected, abs=1e-9)


def test_bad_monitor_settings_are_refused():
    train, evaluation = load_knn_monitor_datasets(image_size=48)
    with pytest.raises(ValueError, match="k must be at least 1"):
        KnnMonitor(train, evaluation, default_image_processor(48), k=0)
    with pytest.raises(ValueError, match="needs a reference folder"):
        load_knn_monitor_datasets(eval_dir="/tmp/somewhere")


def test_evaluation_changes_nothing_in_training_and_resume_stays_exact(tmp_path, monitor):
    from transformers import TrainerCallback

    class Kill(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            if state.global_step == 3:
                raise KeyboardInterrupt("simulated kill")

    reference = _trainer(tmp_path / "plain")
    reference.train()
    expected = _weights(reference.model)

    killed = _trainer(tmp_path / "monitored", knn_monitor=monitor, callbacks=[Kill()])
    with pytest.raises(KeyboardInterrupt):
        killed.train()
    resumed = _trainer(tmp_path / "monitored", knn_monitor=monitor)
    resumed.train(resume_from_checkpoint=get_last_checkpoint(str(tmp_path / "monitored")))
    scores = [e["eval_knn_accuracy"] for e in resumed.state.log_history if "eval_knn_accuracy" in e]
    assert len(scores) == 3  # steps 2 (restored from the checkpoint's state), 4 and 6
    got = _weights(resumed.model)
    for key in expected:  # evaluations between steps leave every weight as in the unmonitored run
        torch.testing.assert_close(got[key], expected[key], rtol=0, atol=0, msg=key)


class _ScriptedMonitor:
    """A monitor whose k-NN accuracy at successive evaluations is given in advance."""

    def __init__(self, monitor: KnnMonitor, scores: list[float]):
        self.eval_dataset = monitor.eval_dataset
        self.scores = list(scores)

    def evaluate(self, encoder, device=None, autocast=None) -> dict[str, float]:
        return {"knn_accuracy": self.scores.pop(0), "knn_seconds": 0.0}


def test_best_encoder_by_knn_accuracy_is_kept_at_the_end(tmp_path, monitor):
    trainer = _trainer(
        tmp_path,
        knn_monitor=_ScriptedMonitor(monitor, [0.5, 0.9, 0.3]),
        save_total_limit=2,
        metric_for_best_model="knn_accuracy",
        load_best_model_at_end=True,
    )
    trainer.train()
    assert trainer.state.best_model_checkpoint == str(tmp_path / "checkpoint-4")
    assert trainer.state.best_metric == 0.9
    assert sorted(p.name for p in tmp_path.glob("checkpoint-*")) == ["checkpoint-4", "checkpoint-6"]
    best = IJepaForPreTraining.from_pretrained(tmp_path / "checkpoint-4").state_dict()
    last = IJepaForPreTraining.from_pretrained(tmp_path / "checkpoint-6").state_dict()
    for name, value in trainer.model.state_dict().items():
        torch.testing.assert_close(value, best[name], rtol=0, atol=0, msg=name)
    assert not torch.equal(best["target_encoder.layernorm.weight"], last["target_encoder.layernorm.weight"])


def test_monitor_and_eval_dataset_are_exclusive(tmp_path, monitor):
    with pytest.raises(ValueError, match="not both"):
        _trainer(tmp_path, knn_monitor=monitor, eval_dataset=monitor.eval_dataset)


def test_a_folder_without_class_sub_folders_is_named(tmp_path):
    from PIL import Image

    from modeling_ijepa.monitoring import UnlabelledMonitorImagesError

    for index in range(4):
        Image.new("RGB", (16, 16), (index * 40, 0, 0)).save(tmp_path / f"{index}.png")
    with pytest.raises(UnlabelledMonitorImagesError, match=f"{tmp_path} has no labels"):
        load_knn_monitor_datasets(train_dir=str(tmp_path), image_size=16)
