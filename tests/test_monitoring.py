"""k-NN monitor: scores the target encoder, never changes the training, and keeps the best encoder."""

import pytest
import torch
from conftest import tiny_config
from transformers.trainer_utils import get_last_checkpoint

from modeling_ijepa import IJepaForPreTraining
from modeling_ijepa.data import IJepaPretrainingCollator, default_image_processor, load_digits_dataset
from modeling_ijepa.masking import MultiBlockMaskSampler
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
    mask_sampler = MultiBlockMaskSampler.from_config(config, seed=0)
    trainer = IJepaTrainer(
        model=IJepaForPreTraining(config),
        args=IJepaTrainingArguments(**values),
        train_dataset=load_digits_dataset(48)["train"].select(range(64)),
        data_collator=IJepaPretrainingCollator(mask_sampler, default_image_processor(48)),
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
    accuracy = first["knn_accuracy"]  # binomial standard error over the 40 query images
    assert first["knn_accuracy_stderr"] == pytest.approx((accuracy * (1 - accuracy) / 40) ** 0.5)


def test_monitor_accuracy_is_the_knn_accuracy_of_pooled_features(monitor):
    from modeling_ijepa.evaluation import knn_accuracy

    encoder = IJepaForPreTraining(tiny_config()).get_encoder().eval()
    with torch.no_grad():
        train = encoder(pixel_values=monitor.train_pixels.float()).last_hidden_state.mean(dim=1)
        query = encoder(pixel_values=monitor.eval_pixels.float()).last_hidden_state.mean(dim=1)
    expected = knn_accuracy(train, monitor.train_labels, query, monitor.eval_labels, k=5)
    assert monitor.evaluate(encoder)["knn_accuracy"] == pytest.approx(expected, abs=1e-9)


def test_the_digits_monitor_never_reads_the_test_split():
    """The monitor picks the saved encoder: on the embedded digits it splits their training images, like a folder's."""
    train, evaluation = load_knn_monitor_datasets(image_size=48)
    assert (len(train), len(evaluation)) == (960, 240)
    digits = load_digits_dataset(48).cast_column("image", evaluation.features["image"])  # undecoded: PNG bytes
    assert len(digits["train"]) == 1200 and len(digits["test"]) == 597
    training_images = {image["bytes"] for image in digits["train"]["image"]}
    assert all(image["bytes"] in training_images for image in [*train["image"], *evaluation["image"]])


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

    def __init__(self, monitor: KnnMonitor, scores: list[float], stderr: float | None = None):
        self.eval_dataset = monitor.eval_dataset
        self.scores = list(scores)
        self.stderr = stderr

    def evaluate(self, encoder, device=None, autocast=None) -> dict[str, float]:
        scores = {"knn_accuracy": self.scores.pop(0), "knn_seconds": 0.0}
        if self.stderr is not None:
            scores["knn_accuracy_stderr"] = self.stderr
        return scores


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


@pytest.mark.parametrize(
    ("rule", "scores", "chosen"),
    [
        ("best", [0.60, 0.62, 0.58], 4),
        ("latest_within_stderr", [0.60, 0.62, 0.58], 6),  # 0.58 is within 0.05 of 0.62: the later one is kept
    ],
)
def test_best_model_rule_picks_the_latest_checkpoint_within_a_standard_error(tmp_path, monitor, rule, scores, chosen):
    trainer = _trainer(
        tmp_path,
        knn_monitor=_ScriptedMonitor(monitor, scores, stderr=0.05),
        save_total_limit=2,
        metric_for_best_model="knn_accuracy",
        load_best_model_at_end=True,
        best_model_rule=rule,
    )
    trainer.train()
    assert trainer.state.best_model_checkpoint == str(tmp_path / f"checkpoint-{chosen}")
    assert trainer.state.best_metric == scores[chosen // 2 - 1]
    logged = [e["eval_knn_accuracy_stderr"] for e in trainer.state.log_history if "eval_knn_accuracy" in e]
    assert logged == [0.05] * 3
    kept = IJepaForPreTraining.from_pretrained(tmp_path / f"checkpoint-{chosen}").state_dict()
    for name, value in trainer.model.state_dict().items():
        torch.testing.assert_close(value, kept[name], rtol=0, atol=0, msg=name)


def test_choose_checkpoint_rules():
    from modeling_ijepa.monitoring import choose_checkpoint

    scores = {2: (0.70, 0.05), 4: (0.66, 0.05), 6: (0.50, 0.05)}
    assert choose_checkpoint(scores, "best") == 2
    assert choose_checkpoint(scores, "latest_within_stderr") == 4  # 0.66 is within 0.05 of 0.70, 0.50 is not
    assert choose_checkpoint({2: (0.6, 0.0), 4: (0.6, 0.0)}, "best") == 2  # ties: the first, as the Trainer does
    assert choose_checkpoint({2: (0.6, 0.0), 4: (0.6, 0.0)}, "latest_within_stderr") == 4
    losses = {2: (1.0, 0.1), 4: (0.8, 0.1), 6: (0.85, 0.1), 8: (0.95, 0.1)}  # lower is better
    assert choose_checkpoint(losses, "best", greater_is_better=False) == 4
    assert choose_checkpoint(losses, "latest_within_stderr", greater_is_better=False) == 6
    with pytest.raises(ValueError, match="must be one of"):
        choose_checkpoint(scores, "smoothest")


def test_best_model_rule_reads_the_scores_of_the_log_history(tmp_path, monitor):
    """After a resume the earlier scores come back with the log history, and the rule compares with them."""
    trainer = _trainer(
        tmp_path, knn_monitor=monitor, metric_for_best_model="knn_accuracy", best_model_rule="latest_within_stderr"
    )
    trainer.state.log_history = [{"eval_knn_accuracy": 0.8, "eval_knn_accuracy_stderr": 0.02, "step": 2}]
    trainer.state.global_step = 4
    assert not trainer._determine_best_metric({"eval_knn_accuracy": 0.77, "eval_knn_accuracy_stderr": 0.02}, None)
    assert trainer._determine_best_metric({"eval_knn_accuracy": 0.79, "eval_knn_accuracy_stderr": 0.02}, None)
    assert (trainer.state.best_metric, trainer.state.best_global_step) == (0.79, 4)
    with pytest.raises(KeyError, match="eval_knn_accuracy_stderr"):
        trainer._determine_best_metric({"eval_knn_accuracy": 0.79}, None)


def test_bad_best_model_rules_are_refused(tmp_path):
    with pytest.raises(ValueError, match="best_model_rule must be one of"):
        IJepaTrainingArguments(output_dir=str(tmp_path), best_model_rule="smoothest")
    with pytest.raises(ValueError, match="set metric_for_best_model too"):
        IJepaTrainingArguments(output_dir=str(tmp_path), best_model_rule="latest_within_stderr")


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
