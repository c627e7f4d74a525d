"""The benchmark's reference (a re-statement of the authors' step) must compute what our model computes."""

import pytest
import torch
from conftest import tiny_config
from torch.utils.flop_counter import FlopCounterMode

from benchmarks.benchmark_step import our_optimizer, our_train_step, step_flops
from benchmarks.reference_ijepa import (
    ReferenceMaskCollator,
    official_masks,
    reference_forward,
    reference_from_ours,
    reference_loss,
    reference_optimizer,
    reference_train_step,
)
from modeling_ijepa import IJepaForPreTraining
from modeling_ijepa.masking import MultiBlockMaskSampler


def _model_and_batch(batch_size: int = 3, **overrides):
    config = tiny_config(**overrides)
    model = IJepaForPreTraining(config).train()
    # Different encoder and target weights, so that a swapped copy would show.
    with torch.no_grad():
        for parameter in model.target_encoder.parameters():
            parameter.add_(0.05 * torch.randn_like(parameter))
    collator = MultiBlockMaskSampler.from_config(config, seed=1)
    context_indices, target_indices = collator.sample_masks(batch_size, collator.next_generator())
    batch = {
        "pixel_values": torch.randn(batch_size, 3, config.image_size, config.image_size),
        "context_indices": context_indices,
        "target_indices": target_indices,
    }
    return model, batch


def _block_major(tensor: torch.Tensor) -> torch.Tensor:
    """Ours `(batch, blocks, num_target, width)` in the official order `(blocks * batch, num_target, width)`."""
    return tensor.transpose(0, 1).flatten(0, 1)


def test_reference_loss_equals_ours_on_same_weights_batch_and_masks():
    model, batch = _model_and_batch()
    reference = reference_from_ours(model)
    masks_enc, masks_pred = official_masks(batch["context_indices"], batch["target_indices"])
    with torch.no_grad():
        ours = model(**batch)
        loss = reference_loss(reference, batch["pixel_values"], masks_enc, masks_pred)
    assert ours.loss.item() > 0.0
    assert loss.item() == pytest.approx(ours.loss.item(), abs=1e-6)


def test_reference_context_predictions_and_targets_equal_ours():
    # The loss barely depends on the predictor at init (its output projection is small): compare the tensors.
    model, batch = _model_and_batch()
    reference = reference_from_ours(model)
    masks_enc, masks_pred = official_masks(batch["context_indices"], batch["target_indices"])
    with torch.no_grad():
        ours = model(**batch)
        predictions, targets = reference_forward(reference, batch["pixel_values"], masks_enc, masks_pred)
        context = reference.encoder(batch["pixel_values"], masks_enc)
    torch.testing.assert_close(context, ours.context_hidden_state, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(predictions, _block_major(ours.predictions), atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(targets, _block_major(ours.targets), atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("module", ["encoder", "predictor", "target_encoder"])
def test_reference_outputs_differ_when_one_attention_weight_differs(module):
    model, batch = _model_and_batch()
    reference = reference_from_ours(model)
    blocks = reference.predictor.predictor_blocks if module == "predictor" else getattr(reference, module).blocks
    masks_enc, masks_pred = official_masks(batch["context_indices"], batch["target_indices"])
    with torch.no_grad():
        # A random change of the last value-projection row (a constant one would vanish: LayerNorm outputs sum to 0).
        blocks[0].attn.qkv.weight[-1].add_(torch.randn(blocks[0].attn.qkv.weight.size(1)))
        ours = model(**batch)
        predictions, targets = reference_forward(reference, batch["pixel_values"], masks_enc, masks_pred)
        context = reference.encoder(batch["pixel_values"], masks_enc)
    theirs, expected = {
        "encoder": (context, ours.context_hidden_state),
        "predictor": (predictions, _block_major(ours.predictions)),
        "target_encoder": (targets, _block_major(ours.targets)),
    }[module]
    assert (theirs - expected).abs().max() > 1e-3


def test_training_steps_of_reference_and_ours_stay_equal():
    """Optimiser and EMA are equivalent too: after two steps the third loss still agrees."""
    model, batch = _model_and_batch()
    reference = reference_from_ours(model)
    masks_enc, masks_pred = official_masks(batch["context_indices"], batch["target_indices"])
    our_opt = our_optimizer(model, torch.device("cpu"))
    ref_opt = reference_optimizer(reference)
    momentum = 0.9  # far from 1 so that an EMA mistake changes the targets
    for _ in range(3):
        ours = our_train_step(model, model, our_opt, batch, momentum, bf16=False)
        theirs = reference_train_step(reference, ref_opt, batch["pixel_values"], masks_enc, masks_pred, momentum)
        assert theirs == pytest.approx(ours, abs=1e-5)
    target_ours = model.target_encoder.layers[0].attention.q_proj.weight
    target_theirs = reference.target_encoder.blocks[0].attn.qkv.weight[: target_ours.size(0)]
    torch.testing.assert_close(target_theirs, target_ours, atol=1e-6, rtol=1e-5)


def test_analytic_flops_match_counted_forward_flops():
    model, batch = _model_and_batch(batch_size=2)
    config = model.config
    num_blocks, num_target = batch["target_indices"].shape[1:]
    expected = step_flops(config, 2, batch["context_indices"].size(1), num_blocks, num_target)
    reference = reference_from_ours(model)
    masks_enc, masks_pred = official_masks(batch["context_indices"], batch["target_indices"])
    counter = FlopCounterMode(display=False)
    with torch.no_grad(), counter:
        reference_loss(reference, batch["pixel_values"], masks_enc, masks_pred)
    assert counter.get_total_flops() == expected["target"] + expected["context"] + expected["predictor"]
    assert expected["step"] == expected["target"] + 3 * (expected["context"] + expected["predictor"])


def test_reference_mask_sampler_gives_official_format_without_overlap():
    config = tiny_config()
    collator = ReferenceMaskCollator.from_config(config)
    masks_enc, masks_pred = collator.sample_masks(5, torch.Generator().manual_seed(0))
    assert len(masks_enc) == 1 and len(masks_pred) == config.num_target_blocks
    assert masks_enc[0].shape[0] == 5 and masks_enc[0].size(1) > config.min_context_patches
    for image in range(5):
        context = set(masks_enc[0][image].tolist())
        targets = {index for mask in masks_pred for index in mask[image].tolist()}
        assert not context & targets


def test_bf16_attention_on_cpu_takes_the_explicit_path(monkeypatch):
    """CPU flash attention is slow in bf16, so the model uses matmul + softmax there and SDPA in fp32."""
    calls = []
    original = torch.nn.functional.scaled_dot_product_attention
    monkeypatch.setattr(
        torch.nn.functional, "scaled_dot_product_attention", lambda *a, **k: calls.append(1) or original(*a, **k)
    )
    model, batch = _model_and_batch()
    with torch.no_grad():
        fp32_loss = model(**batch).loss
        assert len(calls) > 0
        calls.clear()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            bf16_loss = model(**batch).loss
    assert calls == []
    assert bf16_loss.item() == pytest.approx(fp32_loss.item(), rel=0.05)


def test_bf16_explicit_attention_matches_fp32_sdpa_with_gradients():
    """The bf16 CPU path (scaled query, bf16 softmax) computes attention and its input gradient like fp32 SDPA."""
    from modeling_ijepa.modeling_ijepa import IJepaSelfAttention

    config = tiny_config(hidden_size=64, num_attention_heads=4)
    attention = IJepaSelfAttention(config, config.hidden_size, config.num_attention_heads)
    hidden_states = torch.randn(3, 50, config.hidden_size)
    results = {}
    for dtype in ("fp32", "bf16"):
        inputs = hidden_states.clone().requires_grad_(True)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=dtype == "bf16"):
            output, _ = attention(inputs)
        output.float().pow(2).sum().backward()
        results[dtype] = (output.float().detach(), inputs.grad)
    (out32, grad32), (out16, grad16) = results["fp32"], results["bf16"]
    assert out16.dtype == torch.float32 and not torch.equal(out16, out32)  # bf16 really ran
    assert (out16 - out32).norm() / out32.norm() < 2e-2
    assert (grad16 - grad32).norm() / grad32.norm() < 3e-2


# The smallest end-to-end run of benchmark_step.py: the micro model, one step, short collator and matmul-peak probes.
SMOKE_RUN = [
    "--device", "cpu", "--models", "vit_micro_patch4_48", "--batch_size", "2", "--steps", "1",
    "--collator_seconds", "0.05", "--peak_size", "128",
]  # fmt: skip


def test_benchmark_script_runs_end_to_end_and_reports_every_column(capsys, cpu_with_bf16):
    from benchmarks.benchmark_step import main

    main(SMOKE_RUN)
    out = capsys.readouterr().out
    assert "|diff|" in out and "same weights, batch and masks" in out
    assert "skipped" not in out
    rows = [line.split() for line in out.splitlines() if line.startswith("vit_micro_patch4_48 ")]
    assert [row[1:3] for row in rows] == [["ours", "fp32"], ["reference", "fp32"], ["ours", "bf16"]]
    for row in rows:
        images_per_second, ms_per_step, peak_mib = float(row[3]), float(row[4]), float(row[5].replace(",", ""))
        assert images_per_second > 0 and ms_per_step > 0
        # The memory step counts at least the parameters and optimiser state of the micro model (~1M parameters,
        # 4 MiB in fp32).
        assert peak_mib > 1
        assert 0 < float(row[-1].rstrip("%")) < 1000
    summary = [line for line in out.splitlines() if line.startswith("vit_micro_patch4_48: ours/reference")]
    assert len(summary) == 1 and "ours bf16/fp32 speed-up" in summary[0] and "ours fp32 MFU" in summary[0]
    assert "mask collator" in out


def test_benchmark_skips_bf16_on_a_cpu_without_it_and_says_why(capsys, cpu_without_bf16, monkeypatch):
    from benchmarks import benchmark_step

    measured = []
    original = benchmark_step.matmul_peak
    monkeypatch.setattr(
        benchmark_step, "matmul_peak", lambda d, dtype, *a, **k: measured.append(dtype) or original(d, dtype, *a, **k)
    )
    benchmark_step.main(SMOKE_RUN)
    out = capsys.readouterr().out
    assert "bf16 skipped: this CPU has no native bf16" in out and "400x the time of fp32" in out
    rows = [line.split() for line in out.splitlines() if line.startswith("vit_micro_patch4_48 ")]
    assert [row[1:3] for row in rows] == [["ours", "fp32"], ["reference", "fp32"]]
    assert measured and set(measured) == {torch.float32}  # no bf16 matmul was run, not even for the peak


def test_benchmark_refuses_a_bf16_only_run_on_a_cpu_without_it(capsys, cpu_without_bf16):
    from benchmarks.benchmark_step import parse_args

    with pytest.raises(SystemExit):
        parse_args(["--device", "cpu", "--dtype", "bf16"])
    assert "--dtype bf16 cannot be measured" in capsys.readouterr().err
