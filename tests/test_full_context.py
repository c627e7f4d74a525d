"""Sampler options of the multiblock rule: uniform block placement, random truncation, full (padded) contexts, and
the attention mask that makes padded contexts give the official loss."""

import importlib.util
import sys
import warnings
from pathlib import Path

import pytest
import torch
from conftest import tiny_config

from modeling_ijepa import IJepaForPreTraining, IJepaModel
from modeling_ijepa.masking import CONTEXT_PADDING_INDEX, MultiBlockMaskSampler, mask_sampler_from_config


GRID = (12, 12)


def sampler(seed=0, **options):
    return MultiBlockMaskSampler(image_size=48, patch_size=4, seed=seed, **options)


def draw(mask_sampler, batch_size=8):
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no relaxation of the context constraint on this grid
        return mask_sampler.sample_masks(batch_size, mask_sampler.next_generator())


def real_entries(row):
    return row[row != CONTEXT_PADDING_INDEX]


# ---------------------------------------------------------------------------------------------------------------------
# Block placement


def test_uniform_placement_reaches_the_last_row_and_column_and_official_never_does():
    rows, columns = GRID
    reached = {"official": [False, False], "uniform": [False, False]}
    for placement in reached:
        mask_sampler = sampler(seed=0, mask_placement=placement, context_truncation="none")
        for _ in range(20):
            context, targets = draw(mask_sampler)
            for indices in (targets.flatten(), real_entries(context.flatten())):
                reached[placement][0] |= bool((indices // columns == rows - 1).any())
                reached[placement][1] |= bool((indices % columns == columns - 1).any())
    assert reached == {"official": [False, False], "uniform": [True, True]}


# ---------------------------------------------------------------------------------------------------------------------
# Truncation


def test_full_context_keeps_every_context_whole_padded_at_the_end():
    """With no relaxation, a context is its block minus the targets: the rectangle spanned by its patches, minus the
    target patches, must be exactly the row's patches (nothing cut)."""
    rows, columns = GRID
    lengths = set()
    for seed in range(10):
        context, targets = draw(sampler(seed=seed, context_truncation="none"))
        for image in range(context.size(0)):
            row = context[image]
            kept = real_entries(row)
            lengths.add(kept.numel())
            assert torch.equal(row[kept.numel() :], torch.full_like(row[kept.numel() :], CONTEXT_PADDING_INDEX))
            assert torch.equal(kept, kept.sort().values) and kept.unique().numel() == kept.numel()
            target_set = set(targets[image].flatten().tolist())
            assert not set(kept.tolist()) & target_set, "targets leak into the context"
            top, bottom = int((kept // columns).min()), int((kept // columns).max())
            left, right = int((kept % columns).min()), int((kept % columns).max())
            block = {r * columns + c for r in range(top, bottom + 1) for c in range(left, right + 1)}
            assert set(kept.tolist()) == block - target_set, "part of the context was cut"
        assert real_entries(context[0]).numel() > 10
    assert len(lengths) > 1  # contexts of different lengths really are kept whole


def test_official_and_random_truncation_keep_subsets_of_the_full_context_of_the_shortest_length():
    for seed in range(5):
        full, _ = draw(sampler(seed=seed, context_truncation="none"))
        first, _ = draw(sampler(seed=seed, context_truncation="first"))
        random_subset, _ = draw(sampler(seed=seed, context_truncation="random"))
        shortest = min(real_entries(row).numel() for row in full)
        assert first.shape[1] == random_subset.shape[1] == shortest
        for image in range(full.size(0)):
            whole = real_entries(full[image])
            assert torch.equal(first[image], whole[:shortest])  # official: the first patches in row-major order
            row = random_subset[image]
            assert torch.equal(row, row.sort().values) and set(row.tolist()) <= set(whole.tolist())


def test_random_truncation_is_not_biased_towards_the_top_of_the_image():
    """The official cut keeps the first patches in row-major order, so its kept patches sit higher in the image."""
    mean_rows = {}
    for truncation in ("first", "random"):
        mask_sampler = sampler(seed=1, context_truncation=truncation)
        kept_rows = [draw(mask_sampler, batch_size=16)[0] // GRID[1] for _ in range(10)]
        mean_rows[truncation] = float(torch.cat([rows.flatten() for rows in kept_rows]).float().mean())
    assert mean_rows["random"] > mean_rows["first"] + 0.5


def test_the_official_options_are_the_default_and_unknown_values_name_the_choices():
    mask_sampler = mask_sampler_from_config(tiny_config())
    assert (mask_sampler.mask_placement, mask_sampler.context_truncation) == ("official", "first")
    with pytest.raises(ValueError, match=r"'official' never places"):
        tiny_config(mask_placement="anywhere")
    with pytest.raises(ValueError, match=r"'none' pads them"):
        sampler(context_truncation="pad")
    with pytest.raises(ValueError, match="options of the 'multiblock' strategy"):
        tiny_config(mask_strategy="random", context_truncation="none")


def test_from_config_reads_the_sampler_options():
    config = tiny_config(mask_placement="uniform", context_truncation="random")
    mask_sampler = mask_sampler_from_config(config, seed=2)
    assert (mask_sampler.mask_placement, mask_sampler.context_truncation) == ("uniform", "random")


# ---------------------------------------------------------------------------------------------------------------------
# The padded path in the model


def _equal_weights(official, padded):
    padded.load_state_dict(official.state_dict())
    return padded


@pytest.mark.parametrize("attention", ["eager", "sdpa"])
def test_padded_loss_equals_the_official_loss_when_every_context_has_the_same_length(attention):
    torch.manual_seed(0)
    official_config = tiny_config()
    official_config._attn_implementation = attention
    padded_config = tiny_config(context_truncation="none")
    padded_config._attn_implementation = attention
    official = IJepaForPreTraining(official_config).eval()
    padded = _equal_weights(official, IJepaForPreTraining(padded_config).eval())
    images = torch.randn(4, 3, 48, 48)
    context, targets = draw(sampler(seed=3), batch_size=4)  # official masks: every row has the same length
    with torch.no_grad():
        expected = official(images, context, targets).loss
        same = padded(images, context, targets)  # the full-context path, no padding present
        extra = torch.full((4, 7), CONTEXT_PADDING_INDEX)  # the same contexts inside a wider, padded batch
        wider = padded(images, torch.cat([context, extra], dim=1), targets)
    assert same.context_mask.all() and not wider.context_mask[:, -7:].any()
    assert torch.equal(same.loss, expected)
    torch.testing.assert_close(wider.loss, expected, rtol=1e-6, atol=0)
    torch.testing.assert_close(wider.predictions, same.predictions, rtol=1e-5, atol=1e-6)


def test_a_padded_image_gets_the_outputs_it_gets_alone():
    torch.manual_seed(0)
    config = tiny_config(context_truncation="none")
    model = IJepaForPreTraining(config).eval()
    images = torch.randn(2, 3, 48, 48)
    context, targets = draw(sampler(seed=4, context_truncation="none"), batch_size=2)
    lengths = [real_entries(row).numel() for row in context]
    with torch.no_grad():
        batched = model(images, context, targets)
        for image in range(2):
            one = slice(image, image + 1)
            alone = model(images[one], context[one, : lengths[image]], targets[one])
            torch.testing.assert_close(batched.predictions[image], alone.predictions[0], rtol=1e-5, atol=1e-6)
            real_tokens = batched.context_hidden_state[image, : lengths[image]]
            torch.testing.assert_close(real_tokens, alone.context_hidden_state[0], rtol=1e-5, atol=1e-6)


def test_padding_keys_get_no_attention_and_pooling_skips_padding():
    torch.manual_seed(0)
    encoder = IJepaModel(tiny_config()).eval()
    images = torch.randn(2, 3, 48, 48)
    context_indices = torch.tensor([[0, 5, 9, 20, 30, 31], [2, 3, 4, 50, -1, -1]])
    context_mask = context_indices != CONTEXT_PADDING_INDEX
    with torch.no_grad():
        outputs = encoder(images, context_indices=context_indices, context_mask=context_mask, output_attentions=True)
        short = encoder(images[1:], context_indices=context_indices[1:, :4])
    for weights in outputs.attentions:
        assert torch.all(weights[1, :, :, 4:] == 0)
    torch.testing.assert_close(outputs.pooler_output[1], short.pooler_output[0], rtol=1e-5, atol=1e-6)


def test_padding_without_the_full_context_option_names_it():
    model = IJepaForPreTraining(tiny_config())
    context, targets = draw(sampler(seed=0, context_truncation="none"), batch_size=4)
    if bool((context != CONTEXT_PADDING_INDEX).all()):  # pragma: no cover - the seed gives different lengths
        pytest.skip("no padding drawn")
    with pytest.raises(ValueError, match="context_truncation='none'"):
        model(torch.randn(4, 3, 48, 48), context, targets)


def test_context_mask_must_match_the_context_indices():
    encoder = IJepaModel(tiny_config())
    with pytest.raises(ValueError, match="shaped like context_indices"):
        encoder(torch.randn(1, 3, 48, 48), context_indices=torch.arange(12)[None], context_mask=torch.ones(1, 11) > 0)
    with pytest.raises(ValueError, match="pass context_indices too"):
        encoder(torch.randn(1, 3, 48, 48), context_mask=torch.ones(1, 144).bool())


def test_full_context_training_step_runs_through_the_collated_batch():
    config = tiny_config(
        context_truncation="none", mask_placement="uniform", vicreg_variance_weight=0.1, regularized_features="context"
    )
    model = IJepaForPreTraining(config).train()
    batch = mask_sampler_from_config(config, seed=0)([{"pixel_values": torch.randn(3, 48, 48)} for _ in range(4)])
    outputs = model(**batch)
    outputs.loss.backward()
    assert torch.isfinite(outputs.loss) and model.encoder.layers[0].attention.q_proj.weight.grad is not None
    real = outputs.context_hidden_state[outputs.context_mask]
    assert real.shape[0] == int((batch["context_indices"] != CONTEXT_PADDING_INDEX).sum())


def test_pretrain_script_takes_the_sampler_options_as_flags_and_recipe_mask_keys(tmp_path):
    script = Path(__file__).resolve().parent.parent / "training_scripts" / "pretrain.py"
    spec = importlib.util.spec_from_file_location("pretrain_for_sampler_options", script)
    pretrain = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = pretrain  # its argument dataclasses look their module up
    spec.loader.exec_module(pretrain)
    model_args, _, _, _ = pretrain.parse_args(["--mask_placement", "uniform", "--context_truncation", "none"])
    config = pretrain.build_config(model_args)
    assert (config.mask_placement, config.context_truncation) == ("uniform", "none")
    recipe = tmp_path / "full-context.yaml"
    recipe.write_text("mask:\n  context_truncation: random\nmodel:\n  sigreg_weight: 0.05\n")
    model_args, _, _, _ = pretrain.parse_args(["--config", str(recipe)])
    config = pretrain.build_config(model_args)
    assert (config.context_truncation, config.sigreg_weight) == ("random", 0.05)


# On CPU, torch's jagged SDPA runs its math kernel through a strided nested tensor, whose constructor warns.
@pytest.mark.filterwarnings("ignore:The PyTorch API of nested tensors is in prototype stage")
def test_nested_padded_attention_equals_the_masked_path_in_outputs_and_gradients():
    """`padded_attention="nested"` packs the real tokens (variable-length SDPA): same loss, outputs and gradients."""
    torch.manual_seed(0)
    masked = IJepaForPreTraining(tiny_config(context_truncation="none"))
    nested = _equal_weights(
        masked, IJepaForPreTraining(tiny_config(context_truncation="none", padded_attention="nested"))
    )
    images = torch.randn(4, 3, 48, 48)
    context, targets = draw(sampler(seed=4, context_truncation="none"), batch_size=4)
    assert not bool((context != CONTEXT_PADDING_INDEX).all())  # padding present
    outputs = {}
    for name, model in (("masked", masked), ("nested", nested)):
        result = model(images, context, targets)
        result.loss.backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
        outputs[name] = (result, grads)
    (masked_out, masked_grads), (nested_out, nested_grads) = outputs["masked"], outputs["nested"]
    torch.testing.assert_close(nested_out.loss, masked_out.loss, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(nested_out.predictions, masked_out.predictions, rtol=1e-5, atol=1e-6)
    real = nested_out.context_mask
    torch.testing.assert_close(
        nested_out.context_hidden_state[real], masked_out.context_hidden_state[real], rtol=1e-5, atol=1e-6
    )
    assert masked_grads.keys() == nested_grads.keys()
    for name, grad in masked_grads.items():
        torch.testing.assert_close(nested_grads[name], grad, rtol=1e-4, atol=1e-6, msg=name)


def test_unknown_padded_attention_is_refused():
    with pytest.raises(ValueError, match="padded_attention='varlen' is not one of"):
        tiny_config(padded_attention="varlen")
