"""IJepaTrainer: schedules against hand-computed values, EMA once per optimiser step, exact resume, atomic saves."""

import math
import os

import pytest
import torch
from conftest import tiny_config
from transformers import TrainerCallback
from transformers.trainer_utils import get_last_checkpoint

from modeling_ijepa import IJepaForPreTraining
from modeling_ijepa.data import IJepaPretrainingCollator, default_image_processor, load_digits_dataset
from modeling_ijepa.masking import MultiBlockMaskSampler
from modeling_ijepa.monitoring import effective_rank
from modeling_ijepa.optimization import ijepa_ema_momentum, ijepa_learning_rate, ijepa_weight_decay
from modeling_ijepa.trainer import IJepaTrainer, IJepaTrainingArguments


# ------------------------------------------------------------------------------------------------------------------
# Schedules
# ------------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "step, expected",
    [
        (0, 2e-4),
        (5, 2e-4 + 0.5 * 8e-4),  # half-way through the linear warm-up
        (10, 1e-3),  # warm-up done: cosine starts at the peak
        (55, 1e-6 + (1e-3 - 1e-6) * 0.5),  # half-way through the cosine
        (100, 1e-6),
    ],
)
def test_learning_rate_schedule(step, expected):
    assert ijepa_learning_rate(step, 100, 10, 2e-4, 1e-3, 1e-6) == pytest.approx(expected, rel=1e-12)


@pytest.mark.parametrize(
    "step, expected",
    [(0, 0.04), (25, 0.4 - 0.36 * 0.5 * (1 + math.cos(math.pi / 4))), (50, 0.22), (100, 0.4), (150, 0.4)],
)
def test_weight_decay_schedule(step, expected):
    assert ijepa_weight_decay(step, 100, 0.04, 0.4) == pytest.approx(expected, rel=1e-12)


@pytest.mark.parametrize("update, expected", [(0, 0.996), (50, 0.998), (100, 1.0), (200, 1.0)])
def test_ema_momentum_schedule(update, expected):
    assert ijepa_ema_momentum(update, 100, 0.996, 1.0) == pytest.approx(expected, rel=1e-12)


def test_effective_rank():
    torch.manual_seed(0)
    rank_one = torch.randn(64, 1) @ torch.randn(1, 16)
    assert effective_rank(rank_one) == pytest.approx(1.0, abs=1e-3)
    isotropic = torch.linalg.qr(torch.randn(64, 16))[0] * 8.0  # 16 equal singular values (before centring)
    assert 14.0 < effective_rank(isotropic) <= 16.0


# ------------------------------------------------------------------------------------------------------------------
# Trainer on real images (the embedded digits), tiny model
# ------------------------------------------------------------------------------------------------------------------
def _digits(n: int = 64):
    return load_digits_dataset(48)["train"].select(range(n))


def _collator(config, seed: int = 0) -> IJepaPretrainingCollator:
    return IJepaPretrainingCollator(MultiBlockMaskSampler.from_config(config, seed=seed), default_image_processor(48))


def _args(tmp_path, **overrides) -> IJepaTrainingArguments:
    values = dict(
        output_dir=str(tmp_path),
        per_device_train_batch_size=8,
        max_steps=6,
        learning_rate=1e-3,
        start_lr=2e-4,
        final_lr=1e-6,
        warmup_steps=2,
        logging_steps=1,
        save_strategy="no",
        report_to="none",
        seed=0,
        dataloader_drop_last=True,
        use_cpu=True,
        disable_tqdm=True,
    )
    values.update(overrides)
    return IJepaTrainingArguments(**values)


def _trainer(tmp_path, callbacks=(), model=None, **overrides) -> IJepaTrainer:
    torch.manual_seed(0)
    config = tiny_config()
    model = model or IJepaForPreTraining(config)
    trainer = IJepaTrainer(
        model=model, args=_args(tmp_path, **overrides), train_dataset=_digits(), data_collator=_collator(config)
    )
    for callback in callbacks:
        trainer.add_callback(callback)
    return trainer


class _Recorder(TrainerCallback):
    """Reads the optimiser's LR / weight decay at the start of each optimiser step."""

    def __init__(self):
        self.lrs, self.wds = [], []

    def on_step_begin(self, args, state, control, optimizer=None, **kwargs):
        if state.global_step not in [s for s, _ in self.lrs]:
            groups = optimizer.param_groups
            self.lrs.append((state.global_step, groups[0]["lr"]))
            self.wds.append((state.global_step, [g["weight_decay"] for g in groups]))


def test_optimizer_groups_and_schedules_under_gradient_accumulation(tmp_path, monkeypatch):
    momentums = []
    original = IJepaForPreTraining.update_target_encoder

    def record(self, momentum):
        momentums.append(momentum)
        return original(self, momentum)

    monkeypatch.setattr(IJepaForPreTraining, "update_target_encoder", record)
    recorder = _Recorder()
    trainer = _trainer(tmp_path, callbacks=[recorder], gradient_accumulation_steps=2, per_device_train_batch_size=4)
    trainer.train()
    total = 6

    # EMA: exactly one update per optimiser step (not per micro-batch), momentum linear 0.996 -> 1.
    assert momentums == pytest.approx([0.996 + k * 0.004 / total for k in range(total)], rel=1e-12)
    # LR and weight decay used by optimiser step k (1-based), as set before that step.
    assert [lr for _, lr in recorder.lrs] == pytest.approx(
        [ijepa_learning_rate(k, total, 2, 2e-4, 1e-3, 1e-6) for k in range(1, total + 1)], rel=1e-9
    )
    for k, (step, (decay, no_decay)) in enumerate(recorder.wds, start=1):
        assert decay == pytest.approx(ijepa_weight_decay(k, total, 0.04, 0.4), rel=1e-12)
        assert no_decay == 0.0

    # Optimiser: no target-encoder or fixed parameters; no decay on biases, norms and other 1-D parameters.
    model = trainer.model
    optimised = {id(p) for group in trainer.optimizer.param_groups for p in group["params"]}
    assert not any(id(p) in optimised for p in model.target_encoder.parameters())
    names = {id(p): n for n, p in model.named_parameters()}
    decayed = [names[id(p)] for p in trainer.optimizer.param_groups[0]["params"]]
    not_decayed = [names[id(p)] for p in trainer.optimizer.param_groups[1]["params"]]
    assert all(model.get_parameter(n).ndim >= 2 for n in decayed)
    assert any("bias" in n for n in not_decayed) and any("layernorm" in n for n in not_decayed)
    assert "predictor.mask_token" in not_decayed or "predictor.mask_token" in decayed
    assert len(optimised) == sum(p.requires_grad for p in model.parameters())


def test_logs_schedules_and_collapse_monitors(tmp_path):
    trainer = _trainer(tmp_path, max_steps=2)
    trainer.train()
    logged = [entry for entry in trainer.state.log_history if "loss" in entry]
    assert len(logged) == 2
    for key in (
        "learning_rate",
        "weight_decay",
        "ema_momentum",
        "context_tokens",
        "target_tokens",
        "target_feature_std",
        "pooled_effective_rank",
        "skipped_images",
    ):
        assert key in logged[-1], key
    assert logged[-1]["target_feature_std"] > 0.1  # a fresh model is far from collapse
    assert logged[-1]["skipped_images"] == 0


def test_target_encoder_follows_ema_of_encoder(tmp_path):
    trainer = _trainer(tmp_path, max_steps=1, warmup_steps=0)
    model = trainer.model
    before = {n: p.detach().clone() for n, p in model.target_encoder.named_parameters()}
    trainer.train()
    encoder = dict(model.encoder.named_parameters())
    for name, parameter in model.target_encoder.named_parameters():
        if not parameter.is_floating_point() or "position" in name:
            continue
        expected = 0.996 * before[name] + 0.004 * encoder[name].detach()
        torch.testing.assert_close(parameter.detach(), expected, rtol=0, atol=1e-6)


class _Kill(TrainerCallback):
    def __init__(self, at_step: int):
        self.at_step = at_step

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == self.at_step:
            raise KeyboardInterrupt("simulated kill")


def _weights(model) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def test_exact_resume_after_a_kill(tmp_path):
    common = dict(max_steps=6, save_strategy="steps", save_steps=2)
    reference = _trainer(tmp_path / "straight", **common)
    reference.train()
    expected = _weights(reference.model)

    killed = _trainer(tmp_path / "killed", callbacks=[_Kill(3)], **common)
    with pytest.raises(KeyboardInterrupt):
        killed.train()
    last = get_last_checkpoint(str(tmp_path / "killed"))
    assert last.endswith("checkpoint-2")

    resumed = _trainer(tmp_path / "killed", **common)
    resumed.train(resume_from_checkpoint=last)
    got = _weights(resumed.model)
    assert expected.keys() == got.keys()
    for key in expected:  # encoder, predictor and target encoder all identical to the uninterrupted run
        torch.testing.assert_close(got[key], expected[key], rtol=0, atol=1e-6, msg=key)


def test_interrupted_save_keeps_previous_checkpoint(tmp_path, monkeypatch):
    trainer = _trainer(tmp_path, max_steps=4, save_strategy="steps", save_steps=2)
    original = IJepaTrainer._save_optimizer_and_scheduler
    calls = []

    def crash_on_second_save(self, output_dir):
        calls.append(output_dir)
        if len(calls) == 2:
            raise KeyboardInterrupt("killed while writing the optimizer state")
        return original(self, output_dir)

    monkeypatch.setattr(IJepaTrainer, "_save_optimizer_and_scheduler", crash_on_second_save)
    with pytest.raises(KeyboardInterrupt):
        trainer.train()
    assert sorted(os.listdir(tmp_path)) == ["checkpoint-2", "tmp-checkpoint-4"]
    assert get_last_checkpoint(str(tmp_path)).endswith("checkpoint-2")
    # The previous checkpoint is complete and resumable.
    monkeypatch.setattr(IJepaTrainer, "_save_optimizer_and_scheduler", original)
    resumed = _trainer(tmp_path, max_steps=4, save_strategy="steps", save_steps=2)
    resumed.train(resume_from_checkpoint=get_last_checkpoint(str(tmp_path)))
    assert resumed.state.global_step == 4
    assert os.path.isdir(tmp_path / "checkpoint-4")


class _NaNAtCall(IJepaForPreTraining):
    """Returns a NaN loss on its `nan_call`-th forward."""

    nan_call = 3

    def forward(self, *args, **kwargs):
        self.calls = getattr(self, "calls", 0) + 1
        output = super().forward(*args, **kwargs)
        if self.calls == self.nan_call:
            output.loss = output.loss * float("nan")
        return output


def test_non_finite_loss_stops_before_the_optimizer_step(tmp_path):
    torch.manual_seed(0)
    model = _NaNAtCall(tiny_config())
    trainer = _trainer(tmp_path, model=model, save_strategy="steps", save_steps=2)
    with pytest.raises(FloatingPointError, match="loss became nan at step 2"):
        trainer.train()
    assert all(torch.isfinite(p).all() for p in model.parameters())
    assert get_last_checkpoint(str(tmp_path)).endswith("checkpoint-2")
    # The kept checkpoint holds the weights of the last good step.
    reloaded = IJepaForPreTraining.from_pretrained(get_last_checkpoint(str(tmp_path)))
    for name, value in reloaded.state_dict().items():
        torch.testing.assert_close(value, model.state_dict()[name], rtol=0, atol=0, msg=name)


def test_exact_resume_on_a_stream(tmp_path):
    """Streams have no random access: on resume the consumed batches are re-read (and re-collated), then training
    goes on."""

    def streamed_trainer(output_dir, callbacks=()):
        torch.manual_seed(0)
        config = tiny_config()
        stream = _digits(48).to_iterable_dataset(num_shards=4).shuffle(seed=0, buffer_size=16)
        trainer = IJepaTrainer(
            model=IJepaForPreTraining(config),
            args=_args(output_dir, max_steps=8, save_strategy="steps", save_steps=4),
            train_dataset=stream,
            data_collator=_collator(config),
        )
        for callback in callbacks:
            trainer.add_callback(callback)
        return trainer

    reference = streamed_trainer(tmp_path / "straight")
    reference.train()  # 48 images / 8 per batch: crosses an epoch boundary (reshuffled) at step 6
    expected = _weights(reference.model)

    killed = streamed_trainer(tmp_path / "killed", callbacks=[_Kill(6)])
    with pytest.raises(KeyboardInterrupt):
        killed.train()
    resumed = streamed_trainer(tmp_path / "killed")
    resumed.train(resume_from_checkpoint=get_last_checkpoint(str(tmp_path / "killed")))
    got = _weights(resumed.model)
    for key in expected:
        torch.testing.assert_close(got[key], expected[key], rtol=0, atol=1e-6, msg=key)


@pytest.mark.parametrize("option", [{"activation_checkpointing": True}, {"bf16": True}], ids=["checkpointing", "bf16"])
def test_memory_and_precision_options_follow_the_fp32_run(tmp_path, option, cpu_with_bf16):
    # bf16 on CPU is refused without native bf16; the tiny model costs little even on reference kernels.
    reference = _trainer(tmp_path / "fp32", max_steps=2)
    reference.train()
    other = _trainer(tmp_path / "other", max_steps=2, **option)
    other.train()
    losses = [[e["loss"] for e in t.state.log_history if "loss" in e] for t in (reference, other)]
    tolerance = 1e-6 if "activation_checkpointing" in option else 2e-2
    assert losses[1] == pytest.approx(losses[0], abs=tolerance)
