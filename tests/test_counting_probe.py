"""The counting probe: canvases of 1..N digits at random non-overlapping positions, built deterministically for a
seed, and frozen probes (linear on pooled features, attentive on patch tokens, k-NN) that predict the count."""

import json

import numpy as np
import pytest
import torch
from conftest import tiny_config

from modeling_ijepa import IJepaModel
from modeling_ijepa.data import default_image_processor
from modeling_ijepa.evaluation.counting import build_counting_dataset, build_counting_splits
from modeling_ijepa.evaluation.scores import frozen_probe_scores
from training_scripts import counting_probe


def test_every_canvas_holds_as_many_separate_digits_as_its_label_says():
    dataset = build_counting_dataset(30, max_count=4, image_size=48, digit_sizes=(6, 14), seed=0, gap=1)
    assert dataset.features["label"].names == ["1", "2", "3", "4"]
    assert set(dataset["label"]) == {0, 1, 2, 3}
    assert {size for boxes in dataset["boxes"] for _, _, size in boxes} >= {6, 14}
    for example in dataset:
        boxes, pixels = example["boxes"], np.asarray(example["image"].convert("L"))
        assert pixels.shape == (48, 48) and len(boxes) == example["label"] + 1
        inside = np.zeros_like(pixels, dtype=bool)
        for index, (top, left, size) in enumerate(boxes):
            assert 6 <= size <= 14 and 0 <= top <= 48 - size and 0 <= left <= 48 - size
            assert (pixels[top : top + size, left : left + size] < 128).any()  # each box holds ink
            inside[top : top + size, left : left + size] = True
            for other_top, other_left, other_size in boxes[index + 1 :]:
                # A pixel apart at least, along one axis.
                assert (
                    top + size < other_top
                    or other_top + other_size < top
                    or left + size < other_left
                    or other_left + other_size < left
                )
        assert (pixels[~inside] == 255).all()  # no ink outside the digits' boxes


def test_canvases_are_a_pure_function_of_the_seed():
    first, again, other = (build_counting_dataset(8, seed=seed) for seed in (3, 3, 4))
    assert first["label"] == again["label"] and first["boxes"] == again["boxes"]
    assert all(np.array_equal(np.asarray(a), np.asarray(b)) for a, b in zip(first["image"], again["image"]))
    assert first["boxes"] != other["boxes"]


def test_train_and_test_splits_differ_and_impossible_canvases_are_refused():
    splits = build_counting_splits(num_train=6, num_test=4, max_count=3, seed=0)
    assert (len(splits["train"]), len(splits["test"])) == (6, 4)
    assert splits["train"]["boxes"][:4] != splits["test"]["boxes"]
    with pytest.raises(ValueError, match="lower max_count"):
        build_counting_dataset(2, max_count=20, image_size=48, digit_sizes=(12, 12))


def test_frozen_probe_scores_refuses_unknown_probes_and_a_module_without_its_processor():
    splits = build_counting_splits(num_train=4, num_test=2, max_count=2)
    with pytest.raises(ValueError, match="Unknown probes"):
        frozen_probe_scores("random:vit_micro_patch4_48", splits["train"], splits["test"], probes=("svm",))
    with pytest.raises(ValueError, match="image_processor"):
        frozen_probe_scores(IJepaModel(tiny_config()), splits["train"], splits["test"])


def test_counting_script_runs_every_probe_on_tiny_data(tmp_path, capsys):
    directory = tmp_path / "encoder"
    torch.manual_seed(0)
    IJepaModel(tiny_config()).save_pretrained(directory)
    default_image_processor(48).save_pretrained(directory)
    metrics = counting_probe.main(
        [
            "--model_name_or_path",
            str(directory),
            "--output_dir",
            str(tmp_path),
            "--num_train",
            "60",
            "--num_test",
            "30",
            "--max_count",
            "3",
            "--linear_epochs",
            "2",
            "--attentive_epochs",
            "1",
        ]
    )
    assert all(0.0 <= metrics[probe] <= 1.0 for probe in ("linear", "attentive", "knn"))
    assert metrics["attentive_learning_rate"] in (0.003, 0.01, 0.03)
    assert json.loads((tmp_path / "counting_probe_results.json").read_text())["knn"] == metrics["knn"]
    assert "chance 0.33" in capsys.readouterr().out
