"""Downstream evaluation: frozen average-pooled features, label subsets, k-NN, the offline metric and the three
scripts (end to end, and configured by a recipe file and flags).

The scripts run end to end on a small part of the embedded digits with a tiny random encoder saved to a temporary
directory, so this file stays fast on a 2-core CPU.
"""

import json
import re
import socket
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import tiny_config
from PIL import Image
from safetensors.torch import load_file
from transformers import AutoImageProcessor, AutoModelForImageClassification, pipeline
from transformers.models.ijepa import modeling_ijepa as vanilla

from modeling_ijepa import IJepaForImageClassification, IJepaForPreTraining, IJepaModel
from modeling_ijepa.cli import EvaluationDataArguments, EvaluationModelArguments
from modeling_ijepa.data import (
    default_image_processor,
    load_classification_datasets,
    load_digits_dataset,
    sample_label_fraction,
)
from modeling_ijepa.evaluation import (
    FrozenEncoderClassifier,
    LinearClassifierHead,
    extract_features,
    knn_accuracy,
    knn_predict,
    load_accuracy,
    load_encoder,
)
from modeling_ijepa.optimization import encoder_layer_id, layer_decay_parameter_groups
from training_scripts import finetune, knn_eval, linear_probe


SCRIPTS = {"linear_probe": linear_probe, "knn_eval": knn_eval, "finetune": finetune}
SMALL_RUN = ["--max_train_samples", "200", "--max_eval_samples", "100"]


def load_script(name: str):
    return SCRIPTS[name]


@pytest.fixture(scope="module")
def checkpoint_dir(tmp_path_factory) -> Path:
    """A tiny random IJepaModel (48 px, patch 4, width 32) with its image processor."""
    directory = tmp_path_factory.mktemp("encoder")
    torch.manual_seed(0)
    IJepaModel(tiny_config()).save_pretrained(directory)
    default_image_processor(48).save_pretrained(directory)
    return directory


def digit_images(count: int) -> list[Image.Image]:
    return [Image.fromarray(np.full((48, 48, 3), 40 * i, dtype=np.uint8)) for i in range(count)]


# ---------------------------------------------------------------------------------------------------------------------
# Features and the frozen encoder


def test_pooled_features_are_the_mean_of_the_last_hidden_state(checkpoint_dir):
    encoder, processor = load_encoder(str(checkpoint_dir))
    dataset = load_digits_dataset(48)["test"].select(range(6))
    features, labels = extract_features(encoder, dataset, processor, batch_size=4)
    pixel_values = processor(
        images=[image.convert("RGB") for image in load_digits_dataset(48)["test"][:6]["image"]], return_tensors="pt"
    )["pixel_values"]
    with torch.no_grad():
        expected = encoder.eval()(pixel_values).last_hidden_state.mean(dim=1)
    assert features.shape == (6, encoder.config.hidden_size)
    torch.testing.assert_close(features, expected, rtol=1e-5, atol=1e-5)
    assert labels.tolist() == dataset["label"]


def test_vanilla_transformers_checkpoint_loads_as_an_encoder_with_equal_features(tmp_path):
    reference = vanilla.IJepaModel(tiny_config()).eval()
    reference.save_pretrained(tmp_path)
    encoder, processor = load_encoder(str(tmp_path))
    assert processor.size == {"height": 48, "width": 48}  # nothing saved: the default processor at the model's size
    images = torch.randn(2, 3, 48, 48)
    with torch.no_grad():
        torch.testing.assert_close(
            encoder.eval()(images).last_hidden_state.mean(1), reference(images).last_hidden_state.mean(1)
        )


def test_pretraining_checkpoint_is_evaluated_through_its_target_encoder(tmp_path):
    model = IJepaForPreTraining(tiny_config())
    with torch.no_grad():
        model.target_encoder.layernorm.bias.normal_()  # the target encoder differs from the context encoder
    model.save_pretrained(tmp_path)
    encoder, _ = load_encoder(str(tmp_path))
    images = torch.randn(2, 3, 48, 48)
    with torch.no_grad():
        expected = model.target_encoder.eval()(images).last_hidden_state
        torch.testing.assert_close(encoder.eval()(images).last_hidden_state, expected)


def test_random_init_encoder_is_seeded():
    first, _ = load_encoder("random:vit_micro_patch4_48", seed=3)
    second, _ = load_encoder("random:vit_micro_patch4_48", seed=3)
    other, _ = load_encoder("random:vit_micro_patch4_48", seed=4)
    weight = "layers.0.attention.q_proj.weight"
    assert torch.equal(first.state_dict()[weight], second.state_dict()[weight])
    assert not torch.equal(first.state_dict()[weight], other.state_dict()[weight])


def test_frozen_encoder_gets_no_gradients_and_stays_in_eval_mode():
    config = tiny_config(hidden_dropout_prob=0.5)
    model = FrozenEncoderClassifier(IJepaModel(config), LinearClassifierHead(config.hidden_size, 3)).train()
    assert not model.encoder.training and model.head.training
    output = model(torch.randn(4, 3, 48, 48), labels=torch.tensor([0, 1, 2, 0]))
    output["loss"].backward()
    assert all(p.grad is None and not p.requires_grad for p in model.encoder.parameters())
    assert all(p.grad is not None for p in model.head.parameters())


def test_linear_probe_without_feature_cache_leaves_encoder_weights_unchanged(checkpoint_dir, tmp_path):
    output_dir = tmp_path / "probe"
    metrics = load_script("linear_probe").main(
        [
            "--model_name_or_path",
            str(checkpoint_dir),
            "--output_dir",
            str(output_dir),
            "--cache_features",
            "false",
            "--max_train_samples",
            "64",
            "--max_eval_samples",
            "32",
            "--num_train_epochs",
            "2",
            "--per_device_train_batch_size",
            "16",
        ]
    )
    assert 0.0 <= metrics["accuracy"] <= 1.0
    probed = load_file(output_dir / "model.safetensors")
    head = {name for name in probed if name.startswith("head.")}
    assert "head.classifier.weight" in head
    encoder_weights = {name.removeprefix("encoder."): value for name, value in probed.items() if name not in head}
    # Compare with the checkpoint as loaded (the file itself stores the legacy key names).
    reference = IJepaModel.from_pretrained(checkpoint_dir).state_dict()
    assert set(encoder_weights) == set(reference)
    for name, value in encoder_weights.items():
        assert torch.equal(value, reference[name]), name


def test_linear_probe_on_cached_features_learns_the_digits(checkpoint_dir, tmp_path):
    metrics = load_script("linear_probe").main(
        [
            "--model_name_or_path",
            str(checkpoint_dir),
            "--output_dir",
            str(tmp_path),
            "--num_train_epochs",
            "30",
            *SMALL_RUN,
        ]
    )
    print(f"\nlinear probe, tiny random encoder, 200 digits: accuracy {metrics['accuracy']:.3f}")
    assert metrics["num_train_samples"] == 200 and metrics["num_eval_samples"] == 100
    assert metrics["accuracy"] > 0.4  # ten classes: chance is 0.1
    assert json.loads((tmp_path / "linear_probe_results.json").read_text())["accuracy"] == metrics["accuracy"]


# ---------------------------------------------------------------------------------------------------------------------
# Label fractions


def test_label_fraction_is_class_balanced_with_at_least_one_example_per_class():
    labels = np.repeat(np.arange(5), [100, 50, 20, 3, 1])
    indices = sample_label_fraction(labels, 0.1, seed=0)
    counts = np.bincount(labels[indices], minlength=5)
    assert counts.tolist() == [10, 5, 2, 1, 1]
    assert len(np.unique(indices)) == len(indices) and np.all(np.diff(indices) > 0)


def test_label_fraction_is_deterministic_per_seed_and_differs_across_seeds():
    labels = np.tile(np.arange(10), 100)
    first = sample_label_fraction(labels, 0.05, seed=1)
    assert np.array_equal(first, sample_label_fraction(labels, 0.05, seed=1))
    assert not np.array_equal(first, sample_label_fraction(labels, 0.05, seed=2))
    assert np.array_equal(sample_label_fraction(labels, 1.0, seed=1), np.arange(1000))


@pytest.mark.parametrize("fraction", [0.0, -0.1, 1.5])
def test_label_fraction_outside_zero_one_is_refused(fraction):
    with pytest.raises(ValueError, match="label_fraction"):
        EvaluationDataArguments(label_fraction=fraction)
    with pytest.raises(ValueError, match="label_fraction"):
        load_classification_datasets(label_fraction=fraction)
    with pytest.raises(ValueError, match=r"\(0, 1\]"):
        sample_label_fraction([0, 1], fraction)


def test_scripts_train_on_the_label_fraction_of_the_training_split(checkpoint_dir, tmp_path):
    metrics = load_script("knn_eval").main(
        [
            "--model_name_or_path",
            str(checkpoint_dir),
            "--output_dir",
            str(tmp_path),
            "--label_fraction",
            "0.1",
            *SMALL_RUN,
            "--majority_vote",
        ]
    )
    first_labels = np.asarray(load_digits_dataset(48)["train"]["label"][:200])
    expected = sum(max(1, round(0.1 * count)) for count in np.bincount(first_labels))
    assert metrics["num_train_samples"] == expected and metrics["temperature"] is None
    assert metrics["num_eval_samples"] == 100


# ---------------------------------------------------------------------------------------------------------------------
# Metric and k-NN


def test_shipped_accuracy_metric_computes_offline(monkeypatch):
    def no_network(*args, **kwargs):
        raise AssertionError("the shipped metric must not touch the network")

    monkeypatch.setattr(socket.socket, "connect", no_network)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    accuracy = load_accuracy()
    assert accuracy.compute(predictions=[0, 1, 2, 2], references=[0, 1, 1, 2]) == {"accuracy": 0.75}
    assert accuracy.compute(predictions=[1, 1], references=[1, 0], normalize=False) == {"accuracy": 1.0}


def test_knn_weighted_vote_prefers_the_closest_neighbour_and_majority_counts_votes():
    train_features = torch.tensor([[1.0, 0.0], [0.6, 0.8], [0.6, -0.8], [-1.0, 0.0]])
    train_labels = torch.tensor([0, 1, 1, 0])
    test_features = torch.tensor([[5.0, 0.0]])  # cosine similarity ignores the norm
    assert knn_predict(train_features, train_labels, test_features, k=3, temperature=0.07).tolist() == [0]
    assert knn_predict(train_features, train_labels, test_features, k=3, temperature=None).tolist() == [1]
    assert knn_predict(train_features, train_labels, test_features, k=1, temperature=None).tolist() == [0]


def test_knn_accuracy_on_two_clusters():
    train_features = torch.tensor([[1.0, 0.1], [1.0, -0.1], [0.1, 1.0], [-0.1, 1.0]])
    train_labels = torch.tensor([0, 0, 1, 1])
    test_features = torch.tensor([[2.0, 0.0], [0.0, 3.0], [1.0, 0.9], [0.2, 1.0]])
    test_labels = torch.tensor([0, 1, 1, 0])  # the last one is wrong on purpose
    assert knn_accuracy(train_features, train_labels, test_features, test_labels, k=2) == pytest.approx(0.5)


def test_knn_script_reports_accuracy(checkpoint_dir, tmp_path):
    metrics = load_script("knn_eval").main(
        ["--model_name_or_path", str(checkpoint_dir), "--output_dir", str(tmp_path), "--k", "5", *SMALL_RUN]
    )
    assert metrics["k"] == 5 and metrics["temperature"] == pytest.approx(0.07)
    assert metrics["num_train_samples"] == 200 and metrics["num_eval_samples"] == 100
    assert 0.2 < metrics["accuracy"] <= 1.0
    assert (tmp_path / "knn_results.json").is_file()


# ---------------------------------------------------------------------------------------------------------------------
# Pipeline and fine-tuning


def test_image_feature_extraction_pipeline_loads_our_checkpoint(checkpoint_dir):
    extractor = pipeline("image-feature-extraction", model=str(checkpoint_dir))
    assert isinstance(extractor.model, IJepaModel)
    image = digit_images(2)[1]
    tokens = np.asarray(extractor(image))
    pooled = np.asarray(extractor(image, pool=True))
    assert tokens.shape == (1, 144, 32)
    assert pooled.shape == (1, 32)
    np.testing.assert_allclose(pooled, tokens.mean(axis=1), rtol=1e-5, atol=1e-5)


def test_layer_decay_scales_learning_rate_by_depth_and_skips_decay_on_vectors():
    model = IJepaForImageClassification(tiny_config(num_labels=3))
    groups = layer_decay_parameter_groups(model, weight_decay=0.05, layer_decay=0.5, learning_rate=1.0)
    grouped = [p for group in groups for p in group["params"]]
    trainable = [p for p in model.parameters() if p.requires_grad]
    assert len(grouped) == len(trainable) and {id(p) for p in grouped} == {id(p) for p in trainable}
    assert encoder_layer_id("ijepa.embeddings.patch_embeddings.projection.weight", 2) == 0
    assert encoder_layer_id("ijepa.layers.1.mlp.fc1.weight", 2) == 2
    assert encoder_layer_id("classifier.weight", 2) == 3
    rates = {}
    for group in groups:
        for parameter in group["params"]:
            rates[id(parameter)] = (group["lr"], group["weight_decay"])
    assert rates[id(model.classifier.weight)] == (1.0, 0.05)
    assert rates[id(model.classifier.bias)] == (1.0, 0.0)
    assert rates[id(model.ijepa.layers[0].mlp.fc1.weight)] == (0.25, 0.05)
    assert rates[id(model.ijepa.embeddings.patch_embeddings.projection.weight)] == (0.125, 0.05)


def test_finetune_writes_a_loadable_classifier_with_model_card(checkpoint_dir, tmp_path):
    metrics = load_script("finetune").main(
        [
            "--model_name_or_path",
            str(checkpoint_dir),
            "--output_dir",
            str(tmp_path),
            "--layer_decay",
            "0.75",
            "--max_train_samples",
            "64",
            "--max_eval_samples",
            "32",
            "--num_train_epochs",
            "1",
            "--per_device_train_batch_size",
            "32",
        ]
    )
    assert 0.0 <= metrics["accuracy"] <= 1.0 and metrics["num_classes"] == 10
    card = (tmp_path / "README.md").read_text()
    assert str(checkpoint_dir) in card and f"{metrics['accuracy']:.4f}" in card
    assert "AutoModelForImageClassification" in card
    model = AutoModelForImageClassification.from_pretrained(tmp_path)
    assert isinstance(model, IJepaForImageClassification)
    assert model.config.id2label[3] == "3" and model.config.num_labels == 10
    processor = AutoImageProcessor.from_pretrained(tmp_path)
    with torch.no_grad():
        logits = model.eval()(**processor(images=digit_images(2), return_tensors="pt")).logits
    assert logits.shape == (2, 10)


# ---------------------------------------------------------------------------------------------------------------------
# Arguments


@pytest.mark.parametrize("script", ["linear_probe", "knn_eval", "finetune"])
def test_missing_model_path_names_the_fix(script, tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        load_script(script).main(["--output_dir", str(tmp_path)])
    assert exit_info.value.code == 2
    assert re.search("--model_name_or_path is required.*random:vit_micro_patch4_48", capsys.readouterr().err)
    with pytest.raises(ValueError, match="--model_name_or_path is required.*random:vit_micro_patch4_48"):
        EvaluationModelArguments()


# One option of each script's own dataclass: (name, recipe value, flag value, parsed argument index).
SCRIPT_OPTIONS = {
    "linear_probe": ("feature_batch_size", 64, 32, 2),
    "knn_eval": ("k", 5, 7, 2),
    "finetune": ("layer_decay", 0.75, 0.5, 2),
}


@pytest.mark.parametrize("script", ["linear_probe", "knn_eval", "finetune"])
def test_recipe_gives_defaults_and_flags_override_them(script, tmp_path):
    name, recipe_value, flag_value, index = SCRIPT_OPTIONS[script]
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(
        f"model_name_or_path: random:vit_micro_patch4_48\nlabel_fraction: 0.5\nmax_eval_samples: 7\n"
        f"{name}: {recipe_value}\noutput_dir: {tmp_path / 'from_recipe'}\n"
    )
    parsed = load_script(script).parse_args(
        ["--config", str(recipe), "--label_fraction", "0.25", f"--{name}", str(flag_value)]
    )
    model_args, data_args = parsed[:2]
    assert model_args.model_name_or_path == "random:vit_micro_patch4_48"
    assert (data_args.label_fraction, data_args.max_eval_samples) == (0.25, 7)
    assert getattr(parsed[index], name) == flag_value
    assert parsed[-1].output_dir == str(tmp_path / "from_recipe")

    # The single-file form (YAML or JSON) reads the same recipe, without overrides.
    as_json = tmp_path / "recipe.json"
    as_json.write_text(
        json.dumps({"model_name_or_path": "random:vit_micro_patch4_48", "label_fraction": 0.5, name: recipe_value})
    )
    for path in (recipe, as_json):
        parsed = load_script(script).parse_args([str(path)])
        assert parsed[1].label_fraction == 0.5 and getattr(parsed[index], name) == recipe_value


@pytest.mark.parametrize("script", ["linear_probe", "knn_eval", "finetune"])
def test_unknown_recipe_key_or_flag_fails_with_a_did_you_mean_hint(script, tmp_path, capsys):
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text("model_name_or_path: random:vit_micro_patch4_48\nlabel_fractoin: 0.5\n")
    with pytest.raises(SystemExit) as exit_info:
        load_script(script).parse_args(["--config", str(recipe)])
    assert exit_info.value.code == 2
    error = capsys.readouterr().err
    assert "--label_fractoin (did you mean --label_fraction?)" in error and str(recipe) in error

    with pytest.raises(SystemExit):
        load_script(script).parse_args(["--model_name_or_path", "random:vit_micro_patch4", "--max_eval_smaples", "3"])
    assert "--max_eval_smaples (did you mean --max_eval_samples?)" in capsys.readouterr().err


@pytest.mark.parametrize("script", ["linear_probe", "knn_eval", "finetune"])
def test_help_lists_every_option(script, capsys):
    with pytest.raises(SystemExit) as exit_info:
        load_script(script).main(["--help"])
    assert exit_info.value.code == 0
    assert "--model_name_or_path" in capsys.readouterr().out


def test_unknown_random_preset_lists_the_presets(tmp_path):
    with pytest.raises(ValueError, match="vit_micro_patch4_48"):
        load_script("knn_eval").main(["--model_name_or_path", "random:vit_nonexistent", "--output_dir", str(tmp_path)])


def test_standardized_head_folds_into_an_exact_plain_linear():
    from modeling_ijepa.evaluation import StandardizedLinear

    torch.manual_seed(0)
    features = 0.8 + 0.01 * torch.randn(32, 16)
    head = StandardizedLinear(torch.nn.Linear(16, 5), features.mean(0), features.std(0))
    standardized = (features - features.mean(0)) / (features.std(0) + 1e-6)
    torch.testing.assert_close(head(features), head.linear(standardized))
    folded = head.fold()
    assert type(folded) is torch.nn.Linear
    torch.testing.assert_close(folded(features), head(features), rtol=1e-4, atol=1e-4)
