"""The compile shape policy: masks padded to a few token counts (`TokenBuckets`) give the unpadded loss and gradients,
and a compiled model settles on a bounded number of graphs."""

import itertools

import pytest
import torch
import torch._dynamo

from modeling_ijepa import IJepaConfig, IJepaForPreTraining
from modeling_ijepa.data import TokenBuckets, optimal_edges
from modeling_ijepa.masking import MultiBlockMaskSampler


def _toy(**overrides):
    config = IJepaConfig.from_preset(
        "vit_micro_patch4_48",
        hidden_size=32,
        num_hidden_layers=2,
        intermediate_size=64,
        predictor_hidden_size=16,
        predictor_num_hidden_layers=2,
        **overrides,
    )
    torch.manual_seed(0)
    return IJepaForPreTraining(config).train()


def _brute_force_padding(counts, num_buckets):
    values = sorted(set(counts))
    best = None
    for size in range(1, min(num_buckets, len(values)) + 1):
        for edges in itertools.combinations(values[:-1], size - 1):
            edges = [*edges, values[-1]]
            padding = sum(min(e for e in edges if e >= c) - c for c in counts)
            best = padding if best is None else min(best, padding)
    return best


def test_optimal_edges_minimise_padding():
    generator = torch.Generator().manual_seed(3)
    counts = torch.randint(20, 60, (200,), generator=generator).tolist()
    for num_buckets in (1, 2, 3):
        edges = optimal_edges(counts, num_buckets)
        assert len(edges) <= num_buckets and edges[-1] == max(counts)
        padding = sum(min(e for e in edges if e >= c) - c for c in counts)
        assert padding == _brute_force_padding(counts, num_buckets)
    assert optimal_edges([5, 7, 7], 4) == [5, 7]
    with pytest.raises(ValueError, match="at least 1"):
        optimal_edges([5], 0)


def test_pad_marks_the_padding_and_rejects_larger_counts():
    buckets = TokenBuckets([8, 12], [4])
    batch = buckets.pad(torch.arange(10).repeat(2, 1), torch.arange(3).repeat(2, 4, 1))
    assert batch["context_indices"].shape == (2, 12) and batch["target_indices"].shape == (2, 4, 4)
    assert batch["context_mask"].sum(dim=1).tolist() == [10, 10]
    assert batch["target_mask"].sum(dim=2).flatten().tolist() == [3] * 8
    assert (batch["context_indices"][~batch["context_mask"]] == -1).all()
    with pytest.raises(ValueError, match="exceeds the largest bucket"):
        buckets.pad(torch.arange(13).repeat(2, 1), torch.arange(3).repeat(2, 4, 1))


@pytest.mark.parametrize(
    "overrides",
    [{}, {"context_truncation": "none"}, {"vicreg_variance_weight": 0.1, "regularized_features": "predictions"}],
    ids=["official", "full-context", "vicreg-on-predictions"],
)
def test_bucketed_loss_and_gradients_equal_the_unpadded_ones(overrides):
    model = _toy(**overrides)
    sampler = MultiBlockMaskSampler.from_config(model.config, seed=1)
    buckets = TokenBuckets([144], [144])  # the whole 12x12 grid: the most padding
    pixel_values = torch.randn(4, 3, 48, 48, generator=torch.Generator().manual_seed(0))
    context_indices, target_indices = sampler.sample_masks(4, sampler.next_generator())
    padded = buckets.pad(context_indices, target_indices)
    assert padded["context_indices"].size(1) > context_indices.size(1)
    assert padded["target_indices"].size(2) > target_indices.size(2)

    def loss_and_grads(**batch):
        model.zero_grad()
        loss = model(pixel_values, **batch).loss
        loss.backward()
        return loss.detach(), [p.grad.clone() for p in model.parameters() if p.grad is not None]

    loss, grads = loss_and_grads(context_indices=context_indices, target_indices=target_indices)
    padded_loss, padded_grads = loss_and_grads(**padded)
    torch.testing.assert_close(padded_loss, loss, rtol=1e-5, atol=1e-7)
    assert len(grads) == len(padded_grads)
    for grad, padded_grad in zip(grads, padded_grads):
        torch.testing.assert_close(padded_grad, grad, rtol=1e-4, atol=1e-6)


def test_target_mask_of_the_wrong_shape_fails_clearly():
    model = _toy()
    sampler = MultiBlockMaskSampler.from_config(model.config, seed=1)
    context_indices, target_indices = sampler.sample_masks(2, sampler.next_generator())
    with pytest.raises(ValueError, match="target_mask must be a boolean tensor shaped like target_indices"):
        model(torch.randn(2, 3, 48, 48), context_indices, target_indices, target_mask=torch.ones(2, 3, dtype=bool))


def _graphs_over_batches(model, batches) -> int:
    """Graphs dynamo compiles (static shapes, the "eager" backend: tracing only) over the batches."""
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    compiled = torch.compile(model, backend="eager", dynamic=False)
    pixel_values = torch.randn(4, 3, 48, 48)
    for batch in batches:
        compiled(pixel_values, **batch).loss.backward()
    graphs = int(torch._dynamo.utils.counters["stats"]["unique_graphs"])
    torch._dynamo.reset()
    return graphs


def test_buckets_bound_the_number_of_compiled_graphs():
    model = _toy()
    sampler = MultiBlockMaskSampler.from_config(model.config, seed=1)
    buckets = TokenBuckets.from_sampler(sampler, batch_size=4, num_context_buckets=2, num_target_buckets=1)
    assert len(buckets.context_edges) <= 3 and len(buckets.target_edges) <= 2
    raw = [
        dict(zip(("context_indices", "target_indices"), sampler.sample_masks(4, sampler.next_generator())))
        for _ in range(4)
    ]
    shapes = {(b["context_indices"].size(1), b["target_indices"].size(2)) for b in raw}
    bucketed = [buckets.pad(b["context_indices"], b["target_indices"]) for b in raw]
    bucket_shapes = {(b["context_indices"].size(1), b["target_indices"].size(2)) for b in bucketed}
    assert len(shapes) > len(bucket_shapes) <= 2
    graphs_raw = _graphs_over_batches(model, raw)
    graphs_bucketed = _graphs_over_batches(model, bucketed)
    # One graph per distinct shape (forward; the model has no graph break under compile), up to dynamo's limit.
    assert graphs_bucketed == len(bucket_shapes)
    assert graphs_raw == min(len(shapes), torch._dynamo.config.recompile_limit) > graphs_bucketed


def test_compile_watch_reports_a_fall_back_to_eager(caplog):
    from types import SimpleNamespace

    from modeling_ijepa.compile_watch import CompileWatch

    torch._dynamo.reset()
    watch = CompileWatch(warmup_steps=1)
    state = SimpleNamespace(global_step=0)
    watch.on_train_begin(None, state, None)
    compiled = torch.compile(lambda x: (x * 2).sum(), backend="eager", dynamic=False)
    with torch._dynamo.config.patch(recompile_limit=2), caplog.at_level("WARNING", "modeling_ijepa.compile_watch"):
        for step, size in enumerate((3, 4, 5, 6), start=1):
            compiled(torch.ones(size))
            state.global_step = step
            watch.on_step_end(None, state, None)
    watch.on_train_end(None, state, None)
    torch._dynamo.reset()
    assert watch.graphs == 2 and watch.graphs_after_warmup == 1
    assert len(watch.limit_hits) == 1
    assert "fell back to eager at step 3" in caplog.text


def test_collator_pads_to_buckets_and_keeps_the_real_masks():
    import numpy as np
    from PIL import Image

    from modeling_ijepa.data import IJepaPretrainingCollator, default_image_processor

    model = _toy()
    rows = [{"image": Image.fromarray(np.full((60, 50, 3), 40 * i, dtype=np.uint8))} for i in range(4)]
    plain = IJepaPretrainingCollator(
        MultiBlockMaskSampler.from_config(model.config, seed=2), default_image_processor(48)
    )
    buckets = TokenBuckets([64, 144], [32, 144])
    bucketed = IJepaPretrainingCollator(
        MultiBlockMaskSampler.from_config(model.config, seed=2), default_image_processor(48), token_buckets=buckets
    )
    expected, batch = plain(rows), bucketed(rows)
    assert batch["context_indices"].size(1) in (64, 144) and batch["target_indices"].size(2) in (32, 144)
    torch.testing.assert_close(batch["pixel_values"], expected["pixel_values"])
    num_context, num_target = expected["context_indices"].size(1), expected["target_indices"].size(2)
    assert torch.equal(batch["context_indices"][:, :num_context], expected["context_indices"])
    assert torch.equal(batch["target_indices"][..., :num_target], expected["target_indices"])
    assert batch["context_mask"].sum() == expected["context_indices"].numel()
    assert batch["target_mask"].sum() == expected["target_indices"].numel()
