"""Frozen evaluation as the papers do it: pooled features of the last k layers, and a learning-rate x weight-decay grid
of linear heads trained together and chosen on a validation split carved from the training data; and fine-tuning's
head-only first stage (LP-FT), which trains its head with the same loop.

Tiny encoders and a few hundred embedded digits (or random features) keep this file to a few seconds on a 2-core CPU.
"""

import json
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from conftest import tiny_config
from safetensors.torch import load_file
from torch.utils.data import DataLoader
from transformers.models.ijepa import modeling_ijepa as vanilla

from modeling_ijepa import IJepaModel
from modeling_ijepa.data import ImageClassificationCollator, default_image_processor, load_digits_dataset
from modeling_ijepa.evaluation import (
    FrozenEncoderClassifier,
    LinearClassifierHead,
    StandardizedLinear,
    encode_pooled,
    extract_features,
    head_accuracies,
    linear_grid,
    load_encoder,
    search_linear_heads,
    train_linear_heads,
    validation_split,
)
from training_scripts import finetune, knn_eval, linear_probe


SMALL_RUN = ["--max_train_samples", "200", "--max_eval_samples", "100"]


@pytest.fixture(scope="module")
def three_layer_dir(tmp_path_factory) -> Path:
    """A tiny random 3-layer IJepaModel (48 px, patch 4, width 32) with its image processor."""
    directory = tmp_path_factory.mktemp("encoder3")
    torch.manual_seed(0)
    IJepaModel(tiny_config(num_hidden_layers=3)).save_pretrained(directory)
    default_image_processor(48).save_pretrained(directory)
    return directory


def separable_features(count: int = 150, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """`(count, 8)` Gaussian features with 3 classes given by a fixed linear map, so a linear head can learn them."""
    generator = torch.Generator().manual_seed(seed)
    features = torch.randn(count, 8, generator=generator)
    labels = (features @ torch.randn(8, 3, generator=generator)).argmax(dim=1)
    return features, labels


# ---------------------------------------------------------------------------------------------------------------------
# Pooled layers


def test_one_pooled_layer_is_bit_identical_to_the_features_before_the_option(three_layer_dir):
    encoder, processor = load_encoder(str(three_layer_dir))
    dataset = load_digits_dataset(48)["test"].select(range(5))
    features, _ = extract_features(encoder, dataset, processor, batch_size=4)
    # The extraction as it was: the mean over tokens of `last_hidden_state`, batch by batch.
    loader = DataLoader(dataset, batch_size=4, collate_fn=ImageClassificationCollator(processor, augment=False))
    with torch.no_grad():
        expected = torch.cat(
            [encoder.eval()(pixel_values=batch["pixel_values"]).last_hidden_state.mean(dim=1) for batch in loader]
        )
    assert features.shape == (5, 32)
    assert torch.equal(features, expected)


def test_pooled_layers_concatenate_the_last_k_layers_each_through_the_final_layernorm():
    encoder = IJepaModel(tiny_config(num_hidden_layers=3)).eval()
    pixel_values = torch.randn(2, 3, 48, 48)
    with torch.no_grad():
        every_layer = encoder(pixel_values, output_hidden_states=True).hidden_states  # embeddings + 3 layers
        expected = torch.cat([encoder.layernorm(every_layer[i]).mean(dim=1) for i in (1, 2, 3)], dim=-1)
        pooled = encode_pooled(encoder, pixel_values, pooled_layers=3)
        last_two = encode_pooled(encoder, pixel_values, pooled_layers=2)
    assert pooled.shape == (2, 3 * 32) and last_two.shape == (2, 2 * 32)
    torch.testing.assert_close(pooled, expected)
    torch.testing.assert_close(last_two, expected[:, 32:])


def test_pooled_layers_are_the_same_for_a_vanilla_transformers_encoder(tmp_path):
    reference = vanilla.IJepaModel(tiny_config(num_hidden_layers=3)).eval()
    reference.save_pretrained(tmp_path)
    encoder, _ = load_encoder(str(tmp_path))
    pixel_values = torch.randn(2, 3, 48, 48)
    with torch.no_grad():
        torch.testing.assert_close(
            encode_pooled(encoder.eval(), pixel_values, 2), encode_pooled(reference, pixel_values, 2)
        )


@pytest.mark.parametrize("pooled_layers", [0, 4])
def test_pooled_layers_outside_the_encoder_depth_are_refused(pooled_layers):
    encoder = IJepaModel(tiny_config(num_hidden_layers=3))
    with pytest.raises(ValueError, match="between 1 and the encoder's 3 layers"):
        encode_pooled(encoder, torch.randn(1, 3, 48, 48), pooled_layers)
    with pytest.raises(ValueError, match="between 1 and the encoder's 3 layers"):
        FrozenEncoderClassifier(encoder, LinearClassifierHead(32, 2), pooled_layers)


def test_frozen_encoder_classifier_feeds_the_pooled_layers_to_its_head():
    encoder = IJepaModel(tiny_config(num_hidden_layers=3))
    model = FrozenEncoderClassifier(encoder, LinearClassifierHead(2 * 32, 4), pooled_layers=2)
    logits = model(torch.randn(3, 3, 48, 48))["logits"]
    assert logits.shape == (3, 4)


def test_knn_and_linear_probe_scripts_use_the_pooled_layers(three_layer_dir, tmp_path):
    common = ["--model_name_or_path", str(three_layer_dir), "--pooled_layers", "2", *SMALL_RUN]
    neighbours = knn_eval.main([*common, "--output_dir", str(tmp_path / "knn"), "--k", "3", "--temperature", "0.1"])
    assert (neighbours["pooled_layers"], neighbours["k"], neighbours["temperature"]) == (2, 3, pytest.approx(0.1))
    assert 0.2 < neighbours["accuracy"] <= 1.0
    probe = linear_probe.main([*common, "--output_dir", str(tmp_path / "probe"), "--num_train_epochs", "5"])
    assert probe["pooled_layers"] == 2
    assert load_file(tmp_path / "probe" / "model.safetensors")["classifier.weight"].shape == (10, 2 * 32)


# ---------------------------------------------------------------------------------------------------------------------
# Validation split


def test_validation_split_is_class_balanced_seeded_and_keeps_a_training_example_per_class():
    labels = np.repeat(np.arange(4), [50, 20, 2, 1])
    train, validation = validation_split(labels, 0.1, seed=0)
    assert np.bincount(labels[validation], minlength=4).tolist() == [5, 2, 1, 0]
    assert np.array_equal(np.sort(np.concatenate([train, validation])), np.arange(len(labels)))
    assert set(labels[train]) == {0, 1, 2, 3}
    assert np.array_equal(validation, validation_split(labels, 0.1, seed=0)[1])
    assert not np.array_equal(validation, validation_split(labels, 0.1, seed=1)[1])


def test_validation_split_refuses_what_it_cannot_carve():
    with pytest.raises(ValueError, match=r"\(0, 1\)"):
        validation_split([0, 1, 0, 1], 1.0)
    with pytest.raises(ValueError, match="single example"):
        validation_split([0, 1, 2], 0.5)


# ---------------------------------------------------------------------------------------------------------------------
# The grid of heads


def test_every_head_of_the_grid_trains_as_it_would_alone():
    features, labels = separable_features()
    settings = dict(num_labels=3, num_epochs=5, batch_size=32, seed=3)
    points = [(0.001, 0.0), (0.1, 0.0), (0.1, 0.5)]
    grid = train_linear_heads(features, labels, [lr for lr, _ in points], [wd for _, wd in points], **settings)
    heads = [grid.head(index) for index in range(3)]
    for index, (lr, decay) in enumerate(points):
        alone = train_linear_heads(features, labels, [lr], [decay], **settings).head(0)
        torch.testing.assert_close(heads[index].classifier.weight, alone.classifier.weight, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(heads[index].classifier.bias, alone.classifier.bias, rtol=1e-5, atol=1e-6)
    # Different learning rates, and different weight decays, end in different heads.
    assert not torch.allclose(heads[0].classifier.weight, heads[1].classifier.weight, atol=1e-3)
    assert not torch.allclose(heads[1].classifier.weight, heads[2].classifier.weight, atol=1e-3)
    accuracy, _ = head_accuracies(grid, features, labels)
    assert accuracy[1] > 0.8 > accuracy[0]  # the 0.001 head has barely moved from its initialisation


def test_grid_head_is_a_stand_alone_linear_probe_head():
    features, labels = separable_features()
    grid = train_linear_heads(features, labels, [0.05, 0.1], [0.0, 0.0], num_labels=3, num_epochs=3, batch_size=50)
    head = grid.head(1).eval()
    assert isinstance(head, LinearClassifierHead)
    with torch.no_grad():
        torch.testing.assert_close(head(features)["logits"], grid(features)[:, 1])


def test_search_chooses_on_the_validation_split_and_reports_every_point():
    features, labels = separable_features(count=200)
    result = search_linear_heads(
        features,
        labels,
        [0.0001, 0.1],
        [0.0, 0.001],
        num_labels=3,
        validation_fraction=0.2,
        seed=0,
        num_epochs=10,
        batch_size=32,
    )
    assert len(result.grid) == 4
    assert {(point["learning_rate"], point["weight_decay"]) for point in result.grid} == {
        (0.0001, 0.0),
        (0.0001, 0.001),
        (0.1, 0.0),
        (0.1, 0.001),
    }
    best = max(result.grid, key=lambda point: point["validation_accuracy"])
    assert result.validation_accuracy == best["validation_accuracy"] and result.learning_rate == 0.1
    assert not set(result.train_indices) & set(result.validation_indices)
    assert len(result.validation_indices) == pytest.approx(40, abs=2)
    reported = result.to_dict()
    assert reported["chosen_learning_rate"] == 0.1
    assert reported["num_validation_samples"] == len(result.validation_indices)


def test_search_ties_go_to_the_lower_validation_loss(monkeypatch):
    features, labels = separable_features(count=60)
    # Both heads reach the same validation accuracy; the second has the lower loss.
    monkeypatch.setattr(
        linear_grid, "head_accuracies", lambda *args: (torch.tensor([0.9, 0.9]), torch.tensor([0.5, 0.3]))
    )
    result = search_linear_heads(features, labels, [0.01, 0.1], [0.0], num_labels=3, num_epochs=1)
    assert result.learning_rate == 0.1


def test_probe_script_grid_chooses_on_training_images_only_and_reports_the_choice(
    three_layer_dir, tmp_path, monkeypatch, capsys
):
    seen = {}

    def spy(features, labels, *args, **kwargs):
        seen["num_examples"] = len(labels)
        return linear_grid.search_linear_heads(features, labels, *args, **kwargs)

    monkeypatch.setattr(linear_probe, "search_linear_heads", spy)
    metrics = linear_probe.main(
        [
            "--model_name_or_path",
            str(three_layer_dir),
            "--output_dir",
            str(tmp_path),
            *SMALL_RUN,
            "--grid_learning_rates",
            "0.01",
            "0.1",
            "--grid_weight_decays",
            "0",
            "0.001",
            "--num_train_epochs",
            "5",
        ]
    )
    assert seen["num_examples"] == 200  # the 200 training images; none of the 100 evaluation images
    search = metrics["head_search"]
    assert (search["num_validation_samples"], search["num_grid_train_samples"]) == (20, 180)
    assert len(search["grid"]) == 4 and metrics["num_train_samples"] == 200 and metrics["num_eval_samples"] == 100
    assert (metrics["learning_rate"], metrics["weight_decay"]) == (
        search["chosen_learning_rate"],
        search["chosen_weight_decay"],
    )
    assert 0.2 < metrics["accuracy"] <= 1.0
    assert json.loads((tmp_path / "linear_probe_results.json").read_text())["head_search"] == search
    assert load_file(tmp_path / "model.safetensors")["classifier.weight"].shape == (10, 32)
    printed = capsys.readouterr().out
    assert f"chose learning rate {metrics['learning_rate']:g}, weight decay {metrics['weight_decay']:g}" in printed


def test_probe_script_grid_works_on_a_label_fraction(three_layer_dir, tmp_path):
    metrics = linear_probe.main(
        [
            "--model_name_or_path",
            str(three_layer_dir),
            "--output_dir",
            str(tmp_path),
            *SMALL_RUN,
            "--label_fraction",
            "0.1",
            "--grid_learning_rates",
            "0.1",
            "--grid_weight_decays",
            "0",
            "--num_train_epochs",
            "3",
        ]
    )
    assert metrics["num_train_samples"] == 20 and metrics["head_search"]["num_validation_samples"] == 10


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--grid_learning_rates", "0.1"], "both --grid_learning_rates and --grid_weight_decays"),
        (["--grid_learning_rates", "0.1", "--grid_weight_decays", "0", "--cache_features", "false"], "cached"),
        (["--grid_learning_rates", "0.1", "--grid_weight_decays", "0", "--max_steps", "5"], "--num_train_epochs"),
        (["--pooled_layers", "0"], "--pooled_layers"),
    ],
)
def test_probe_script_refuses_inconsistent_grid_options_at_start(flags, message, tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        linear_probe.main(
            ["--model_name_or_path", "random:vit_micro_patch4_48", "--output_dir", str(tmp_path), *flags]
        )
    assert exit_info.value.code == 2 and message in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------------------------------
# Fine-tuning's head-only stage (LP-FT)


def test_head_only_stage_fits_the_standardised_head_on_frozen_features():
    features, labels = separable_features(count=120)
    features = 0.8 + 0.01 * features  # pooled I-JEPA features: a large common part, a small spread
    head = StandardizedLinear(torch.nn.Linear(8, 3), features.mean(0), features.std(0))
    args = finetune.FinetuneArguments(probe_head_epochs=100, probe_head_learning_rate=0.1)
    finetune.train_head_on_frozen_features(head, features, labels, 3, args, SimpleNamespace(seed=0))
    with torch.no_grad():
        accuracy = (head(features).argmax(dim=1) == labels).float().mean()
    assert accuracy > 0.9


def test_head_only_stage_needs_the_standardised_head():
    with pytest.raises(ValueError, match="--standardize_features true"):
        finetune.FinetuneArguments(probe_head_epochs=10, standardize_features=False)
