"""The attentive probe: learned queries cross-attending over frozen patch tokens, then a linear classifier, trained
alone or as a learning-rate x weight-decay grid chosen on a validation split of the training data.

Tiny token sets and a tiny 2-layer encoder keep this file to a few seconds on a 2-core CPU.
"""

import json

import datasets
import numpy as np
import pytest
import torch
from conftest import tiny_config
from PIL import Image
from safetensors.torch import load_file

from modeling_ijepa import IJepaModel
from modeling_ijepa.data import default_image_processor
from modeling_ijepa.evaluation import (
    AttentiveClassifierHead,
    AttentiveHeadGrid,
    AttentivePooler,
    extract_features,
    extract_patch_tokens,
    head_accuracies,
    search_attentive_heads,
    train_attentive_heads,
    train_linear_heads,
)
from training_scripts import linear_probe


def spike_tokens(count: int = 400, num_tokens: int = 8, dim: int = 8, seed: int = 0, informative: bool = True):
    """
    `(count, num_tokens, dim)` Gaussian tokens and 2 classes. With `informative` (features of an encoder that saw the
    objects), class 0 has one token at a random position with `+6` on channel 0 and class 1 has `+6 / num_tokens` on
    channel 0 of every token: the same mean, so a linear head on average-pooled tokens is at chance while a query
    attending to the spike finds it. Without (a random encoder's features), the tokens say nothing of the class.
    """
    generator = torch.Generator().manual_seed(seed)
    tokens = torch.randn(count, num_tokens, dim, generator=generator)
    labels = torch.arange(count) % 2
    if informative:
        positions = torch.randint(0, num_tokens, (count,), generator=generator)
        tokens[labels == 1, :, 0] += 6.0 / num_tokens
        spiked = (labels == 0).nonzero().flatten()
        tokens[spiked, positions[spiked], 0] += 6.0
    return tokens, labels


def test_pooler_computes_multihead_cross_attention_without_projecting_the_tokens():
    pooler = AttentivePooler(hidden_size=16, num_queries=3, num_attention_heads=4)
    keys = pooler.token_norm(torch.randn(2, 10, 16))
    attended, weights = pooler.cross_attention(keys)
    queries = pooler.query_tokens.expand(2, -1, -1)
    expected, expected_weights = pooler.attention(queries, keys, keys, need_weights=True, average_attn_weights=False)
    torch.testing.assert_close(attended, expected, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(weights, expected_weights, rtol=1e-5, atol=1e-6)


def test_attentive_head_shapes_and_attention_weights():
    head = AttentiveClassifierHead(hidden_size=16, num_labels=5, num_queries=2, num_attention_heads=4)
    output = head(torch.randn(3, 10, 16), labels=torch.tensor([0, 4, 2]))
    assert output.logits.shape == (3, 5) and output.pooled_output.shape == (3, 2, 16)
    assert output.attentions.shape == (3, 4, 2, 10) and output.loss.ndim == 0
    torch.testing.assert_close(output.attentions.sum(dim=-1), torch.ones(3, 4, 2))


@pytest.mark.parametrize(
    "settings, tokens, message",
    [
        (dict(num_attention_heads=5), torch.randn(2, 4, 16), "divisor of the token size"),
        (dict(num_queries=0), torch.randn(2, 4, 16), "at least one query"),
        (dict(), torch.randn(2, 16), "not pooled features"),
    ],
)
def test_attentive_pooler_refuses_bad_settings_and_inputs(settings, tokens, message):
    with pytest.raises(ValueError, match=message):
        AttentivePooler(16, **settings)(tokens)


def test_grid_heads_start_equal_and_seeded_without_touching_the_global_random_state():
    state = torch.random.get_rng_state()
    grid = AttentiveHeadGrid(3, seed=7, hidden_size=16, num_labels=4, num_attention_heads=2)
    assert torch.equal(torch.random.get_rng_state(), state)
    again = AttentiveHeadGrid(1, seed=7, hidden_size=16, num_labels=4, num_attention_heads=2)
    other = AttentiveHeadGrid(1, seed=8, hidden_size=16, num_labels=4, num_attention_heads=2)
    for name, parameter in grid.heads[2].named_parameters():
        assert torch.equal(parameter, dict(again.heads[0].named_parameters())[name]), name
    assert not torch.equal(grid.heads[0].pooler.query_tokens, other.heads[0].pooler.query_tokens)


def test_training_is_deterministic_for_a_seed():
    tokens, labels = spike_tokens(count=64)
    settings = dict(num_labels=2, num_attention_heads=2, num_epochs=2, batch_size=16)
    first = train_attentive_heads(tokens, labels, [0.01], [0.01], seed=3, **settings)
    second = train_attentive_heads(tokens, labels, [0.01], [0.01], seed=3, **settings)
    third = train_attentive_heads(tokens, labels, [0.01], [0.01], seed=4, **settings)
    torch.testing.assert_close(first(tokens), second(tokens), rtol=0, atol=0)
    assert not torch.allclose(first(tokens), third(tokens))


def test_attentive_head_reads_local_information_that_average_pooling_loses():
    def accuracies(informative: bool) -> tuple[float, float]:
        train_tokens, train_labels = spike_tokens(seed=0, informative=informative)
        test_tokens, test_labels = spike_tokens(count=200, seed=1, informative=informative)
        settings = dict(num_epochs=10, batch_size=64)
        attentive = train_attentive_heads(
            train_tokens, train_labels, [0.01], [0.0], 2, num_attention_heads=1, **settings
        )
        linear = train_linear_heads(train_tokens.mean(dim=1), train_labels, [0.1], [0.0], 2, **settings)
        return (
            float(head_accuracies(attentive, test_tokens, test_labels)[0][0]),
            float(head_accuracies(linear, test_tokens.mean(dim=1), test_labels)[0][0]),
        )

    attentive, linear = accuracies(informative=True)
    random_attentive, random_linear = accuracies(informative=False)
    assert attentive > 0.65 and linear < 0.58  # chance is 0.5
    assert random_attentive < 0.58 and random_linear < 0.58


def test_attentive_search_chooses_on_the_validation_split():
    tokens, labels = spike_tokens(count=80)
    result = search_attentive_heads(
        tokens, labels, [1e-5, 0.01], [0.0], 2, validation_fraction=0.25, num_attention_heads=1, num_epochs=10
    )
    assert len(result.grid) == 2 and len(result.validation_indices) == 20
    assert result.learning_rate == 0.01  # 1e-5 barely moves the head from its initialisation


@pytest.fixture(scope="module")
def tiny_encoder_dir(tmp_path_factory):
    directory = tmp_path_factory.mktemp("encoder")
    torch.manual_seed(0)
    IJepaModel(tiny_config()).save_pretrained(directory)
    default_image_processor(48).save_pretrained(directory)
    return directory


def test_patch_tokens_are_what_the_pooled_features_average_and_their_size_is_checked():
    torch.manual_seed(0)
    encoder = IJepaModel(tiny_config()).eval()
    pixels = np.random.default_rng(0).integers(0, 256, (6, 48, 48, 3), dtype=np.uint8)
    images = datasets.Dataset.from_dict({"image": [Image.fromarray(p) for p in pixels], "label": list(range(6))})
    processor = default_image_processor(48)
    tokens, labels = extract_patch_tokens(encoder, images, processor, batch_size=4, layers=2)
    pooled, pooled_labels = extract_features(encoder, images, processor, batch_size=4, pooled_layers=2)
    assert tokens.shape == (6, 144, 64) and torch.equal(labels, pooled_labels)
    torch.testing.assert_close(tokens.mean(dim=1), pooled, rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="--max_train_samples"):
        extract_patch_tokens(encoder, images, processor, max_bytes=6 * 144 * 32 * 4 - 1)


def test_probe_script_attentive_grid_on_a_label_fraction(tiny_encoder_dir, tmp_path, capsys):
    metrics = linear_probe.main(
        [
            "--model_name_or_path",
            str(tiny_encoder_dir),
            "--output_dir",
            str(tmp_path),
            "--max_train_samples",
            "200",
            "--max_eval_samples",
            "60",
            "--label_fraction",
            "0.5",
            "--head",
            "attentive",
            "--grid_learning_rates",
            "0.003",
            "0.03",
            "--grid_weight_decays",
            "0",
            "--num_train_epochs",
            "2",
        ]
    )
    search = metrics["head_search"]
    assert metrics["head"] == "attentive" and metrics["num_train_samples"] == 100 and metrics["num_eval_samples"] == 60
    assert (search["num_validation_samples"], search["num_grid_train_samples"]) == (10, 90)
    assert len(search["grid"]) == 2
    assert metrics["learning_rate"] == search["chosen_learning_rate"]
    assert json.loads((tmp_path / "attentive_probe_results.json").read_text())["accuracy"] == metrics["accuracy"]
    weights = load_file(tmp_path / "model.safetensors")
    assert weights["pooler.query_tokens"].shape == (1, 1, 32) and weights["classifier.weight"].shape == (10, 32)
    assert "attentive probe accuracy" in capsys.readouterr().out


def test_probe_script_attentive_head_needs_cached_tokens(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        linear_probe.main(
            [
                "--model_name_or_path",
                "random:vit_micro_patch4_48",
                "--output_dir",
                str(tmp_path),
                "--head",
                "attentive",
                "--cache_features",
                "false",
            ]
        )
    assert exit_info.value.code == 2 and "patch tokens computed once" in capsys.readouterr().err
