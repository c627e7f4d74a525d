"""Specification of `IJepaConfig`: validation with actionable messages, defaults, presets, serialisation."""

import pytest
from conftest import tiny_config

from modeling_ijepa import IJepaConfig, IJepaForPreTraining, IJepaModel, list_presets


@pytest.mark.parametrize(
    ("overrides", "names_the_fix"),
    [
        (dict(target_scale=(0.3, 0.2)), "0 < min <= max <= 1"),
        (dict(target_scale=(0.1, 1.5)), "0 < min <= max <= 1"),
        (dict(context_scale=(0.0, 1.0)), "0 < min <= max <= 1"),
        (dict(target_aspect_ratio=(1.5, 0.75)), "0 < min <= max"),
        (dict(context_aspect_ratio=(-1.0, 1.0)), "0 < min <= max"),
        (dict(num_target_blocks=0), "at least one target block"),
        (dict(min_context_patches=-1), "must be >= 0"),
    ],
    ids=[
        "target-scale-reversed",
        "target-scale-above-one",
        "context-scale-zero",
        "target-aspect-reversed",
        "context-aspect-negative",
        "no-target-blocks",
        "negative-min-context",
    ],
)
def test_invalid_configuration_raises_value_error_naming_the_fix(overrides, names_the_fix):
    with pytest.raises(ValueError, match=names_the_fix):
        tiny_config(**overrides)


@pytest.mark.parametrize(
    ("overrides", "names_the_fix"),
    [
        (dict(image_size=50), "multiple of the patch size"),
        (dict(num_attention_heads=5), "pick a head count that divides the width"),
        (dict(predictor_num_attention_heads=3), "set predictor_num_attention_heads to a divisor"),
        (dict(min_context_patches=200), "lower min_context_patches or use a larger image"),
    ],
    ids=[
        "image-not-divisible-by-patch",
        "heads-not-dividing-width",
        "predictor-heads-not-dividing-predictor-width",
        "min-context-larger-than-grid",
    ],
)
def test_configuration_accepts_an_unbuildable_architecture_and_the_model_raises(overrides, names_the_fix):
    """As transformers' configs: any architecture is a valid configuration; building the model names the fix."""
    config = tiny_config(**overrides)
    with pytest.raises(ValueError, match=names_the_fix):
        IJepaForPreTraining(config)


def test_configuration_accepts_what_transformers_accepts():
    import transformers

    vanilla = transformers.IJepaConfig(hidden_size=37)
    ours = IJepaConfig(hidden_size=37)
    assert (ours.hidden_size, ours.num_attention_heads) == (vanilla.hidden_size, vanilla.num_attention_heads)
    with pytest.raises(ValueError, match=r"hidden size \(37\) is not a multiple of the number of attention heads"):
        IJepaModel(ours)


def test_configuration_source_carries_a_copyright_line():
    """transformers' model tests read the year from the configuration file's `# Copyright YYYY` line."""
    import inspect
    import re

    import modeling_ijepa.configuration_ijepa

    assert re.search(r"^# Copyright (\d{4})", inspect.getsource(modeling_ijepa.configuration_ijepa), re.MULTILINE)


def test_range_fields_must_be_pairs():
    with pytest.raises(ValueError, match=r"\(min, max\) pair"):
        tiny_config(target_scale=(0.1, 0.2, 0.3))


def test_predictor_defaults_follow_the_encoder_and_paper():
    config = IJepaConfig(hidden_size=64, num_attention_heads=8, predictor_hidden_size=32)
    assert config.predictor_num_attention_heads == 8
    assert config.predictor_intermediate_size == 4 * 32
    assert config.layer_norm_eps == 1e-6


def test_default_mask_settings_are_the_papers():
    config = IJepaConfig()
    assert config.num_target_blocks == 4
    assert config.target_scale == [0.15, 0.2]
    assert config.target_aspect_ratio == [0.75, 1.5]
    assert config.context_scale == [0.85, 1.0]
    assert config.context_aspect_ratio == [1.0, 1.0]
    assert config.min_context_patches == 10
    assert config.allow_overlap is False


def test_grid_size_and_num_patches():
    config = tiny_config(image_size=(48, 32), patch_size=4)
    assert config.grid_size == (12, 8)
    assert config.num_patches == 96


@pytest.mark.parametrize("name", list_presets())
def test_every_preset_loads(name):
    config = IJepaConfig.from_preset(name)
    assert config.model_type == "ijepa"
    assert config.hidden_size % config.num_attention_heads == 0
    assert config.predictor_num_attention_heads == config.num_attention_heads


def test_preset_list_covers_the_official_and_embedded_models():
    assert {"vit_huge_patch14_224", "vit_huge_patch16_448", "vit_giant_patch16_224", "vit_micro_patch4_48"} <= set(
        list_presets()
    )


def test_vit_huge_14_preset_matches_the_paper():
    config = IJepaConfig.from_preset("vit_huge_patch14_224")
    assert (config.hidden_size, config.num_hidden_layers, config.num_attention_heads) == (1280, 32, 16)
    assert config.intermediate_size == 4 * 1280
    assert (config.predictor_hidden_size, config.predictor_num_hidden_layers) == (384, 12)
    assert config.predictor_num_attention_heads == 16
    assert (config.image_size, config.patch_size) == (224, 14)


def test_vit_huge_16_448_preset_matches_the_paper():
    config = IJepaConfig.from_preset("vit_huge_patch16_448")
    assert (config.hidden_size, config.num_hidden_layers, config.num_attention_heads) == (1280, 32, 16)
    assert (config.image_size, config.patch_size) == (448, 16)


def test_vit_giant_preset_matches_the_paper():
    config = IJepaConfig.from_preset("vit_giant_patch16_224")
    assert (config.hidden_size, config.num_hidden_layers, config.num_attention_heads) == (1408, 40, 16)
    assert config.intermediate_size == 6144  # MLP ratio 48/11
    assert (config.predictor_hidden_size, config.predictor_num_hidden_layers) == (384, 12)


def test_micro_preset_is_the_embedded_default():
    config = IJepaConfig.from_preset("vit_micro_patch4_48")
    assert config.grid_size == (12, 12)
    assert (config.hidden_size, config.num_hidden_layers, config.num_attention_heads) == (96, 4, 4)
    assert (config.predictor_hidden_size, config.predictor_num_hidden_layers) == (48, 2)


def test_preset_overrides_apply():
    config = IJepaConfig.from_preset("vit_micro_patch4_48", predictor_num_hidden_layers=1, num_target_blocks=2)
    assert config.predictor_num_hidden_layers == 1
    assert config.num_target_blocks == 2


def test_unknown_preset_lists_the_available_ones():
    with pytest.raises(ValueError, match="Available presets: .*vit_huge_patch14_224"):
        IJepaConfig.from_preset("vit_enormous_patch1_9000")


def test_dict_round_trip_preserves_every_field():
    config = tiny_config(
        num_target_blocks=3,
        target_scale=(0.1, 0.25),
        target_aspect_ratio=(0.5, 2.0),
        context_scale=(0.8, 0.95),
        context_aspect_ratio=(0.9, 1.1),
        min_context_patches=5,
        allow_overlap=True,
        predictor_num_attention_heads=2,
        mask_strategy="random",
    )
    restored = IJepaConfig.from_dict(config.to_dict())
    assert restored.to_dict() == config.to_dict()
    assert restored.target_scale == [0.1, 0.25]
    assert restored.context_aspect_ratio == [0.9, 1.1]
    assert restored.allow_overlap is True
    assert restored.min_context_patches == 5


def test_configurations_saved_with_ema_fields_still_load():
    """The EMA momentum moved to the training arguments; configs written before keep loading, the keys ignored."""
    values = tiny_config().to_dict()
    values.update(ema_momentum_start=0.99, ema_momentum_end=1.0)
    assert IJepaConfig.from_dict(values).hidden_size == 32


def test_json_file_round_trip(tmp_path):
    config = tiny_config(num_target_blocks=2, target_scale=(0.1, 0.3))
    config.save_pretrained(tmp_path)
    restored = IJepaConfig.from_pretrained(tmp_path)
    assert restored.num_target_blocks == 2
    assert restored.target_scale == [0.1, 0.3]
    assert restored.predictor_hidden_size == config.predictor_hidden_size
