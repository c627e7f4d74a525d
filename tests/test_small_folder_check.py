"""`benchmarks/photo_folder.py` and `benchmarks/small_folder_check.py`: the offline photo folders, result caching and
the verdict table (no training here; the real runs are the benchmark)."""

import json

import numpy as np
import pytest
from PIL import Image

from benchmarks import learning_check, photo_folder, small_folder_check
from modeling_ijepa.data import load_image_dataset


def test_shipped_photo_folder_is_an_imagefolder_of_region_classes(tmp_path):
    root = photo_folder.write_photo_folder(tmp_path / "photos", train_per_class=3, validation_per_class=2, seed=1)
    classes = sorted(p.name for p in (root / "train").iterdir())
    assert len(classes) == 12 and classes == sorted(p.name for p in (root / "validation").iterdir())
    assert {name.rsplit("_r", 1)[0] for name in classes} == {"china", "flower", "grace_hopper"}
    with Image.open(next((root / "train" / classes[0]).iterdir())) as image:
        assert image.size == (64, 64) and image.mode == "RGB"
    train = load_image_dataset(train_dir=str(root / "train"), split="train", image_size=48)
    assert len(train) == 36 and sorted(set(train["label"])) == list(range(12))
    # Seeded: the same arguments give the same pixels.
    again = photo_folder.write_photo_folder(tmp_path / "again", train_per_class=3, validation_per_class=2, seed=1)
    first = np.asarray(Image.open(root / "train" / classes[5] / "0001.jpg"))
    assert np.array_equal(first, np.asarray(Image.open(again / "train" / classes[5] / "0001.jpg")))


@pytest.mark.parametrize(("photos", "num_classes"), [("scikit-image", 40), ("scikit-image-grey", 28)])
def test_scikit_image_photo_folders_when_scikit_image_is_installed(tmp_path, photos, num_classes):
    pytest.importorskip("skimage", reason="the scikit-image photo sets need scikit-image (not a dependency)")
    root = photo_folder.write_photo_folder(tmp_path, photos=photos, train_per_class=1, validation_per_class=1)
    classes = sorted(p.name for p in (root / "train").iterdir())
    assert len(classes) == num_classes and classes == sorted(p.name for p in (root / "validation").iterdir())
    with Image.open(next((root / "train" / classes[0]).iterdir())) as image:
        assert image.size == (64, 64) and image.mode == "RGB"


def test_photo_folder_never_overwrites_and_names_bad_arguments(tmp_path):
    photo_folder.write_photo_folder(tmp_path, train_per_class=1, validation_per_class=1)
    with pytest.raises(FileExistsError, match="nothing is overwritten"):
        photo_folder.write_photo_folder(tmp_path, train_per_class=1, validation_per_class=1)
    with pytest.raises(ValueError, match="Unknown photo set"):
        photo_folder.write_photo_folder(tmp_path / "x", photos="imagenet")
    with pytest.raises(ValueError, match="grid"):
        photo_folder.regions({"a": np.zeros((8, 8, 3), np.uint8)}, 0)


def test_regions_tile_every_photo():
    photo = np.arange(10 * 12 * 3, dtype=np.uint8).reshape(10, 12, 3)
    regions = photo_folder.regions({"p": photo}, 2)
    assert list(regions) == ["p_r0c0", "p_r0c1", "p_r1c0", "p_r1c1"]
    assert np.array_equal(regions["p_r1c0"], photo[5:10, 0:6])
    assert list(photo_folder.regions({"p": photo}, 1)) == ["p"]


def test_run_once_computes_once_and_refuses_other_settings(tmp_path):
    calls = []

    def compute():
        calls.append(1)
        return {"knn": 50.0}

    assert learning_check.run_once(tmp_path, compute, {"a": 1}) == {"knn": 50.0}
    assert learning_check.run_once(tmp_path, compute, {"a": 1}) == {"knn": 50.0}
    assert len(calls) == 1
    with pytest.raises(ValueError, match="another --output_dir"):
        learning_check.run_once(tmp_path, compute, {"a": 2})


def test_cached_runs_of_an_edited_recipe_are_not_reused(tmp_path):
    recipe = tmp_path / "mine.yaml"
    recipe.write_text("max_steps: 300\n")
    before = learning_check.pretrain_settings(["--config", str(recipe), "--seed", "1"])
    assert before["pretrain_args"] == ["--config", str(recipe), "--seed", "1"] and len(before["recipe_sha256"]) == 16
    assert learning_check.pretrain_settings(["--config", str(recipe), "--seed", "1"]) == before
    recipe.write_text("# a comment changes nothing\nmax_steps: 300\n")
    assert learning_check.pretrain_settings(["--config", str(recipe), "--seed", "1"]) == before
    recipe.write_text("max_steps: 900\n")
    assert learning_check.pretrain_settings(["--config", str(recipe), "--seed", "1"]) != before
    assert learning_check.pretrain_settings(["--seed", "1"]) == {"pretrain_args": ["--seed", "1"]}


def test_dataset_folder_names_what_a_folder_lacks(tmp_path):
    assert small_folder_check.dataset_folder("digits", tmp_path) is None
    (tmp_path / "mine" / "train").mkdir(parents=True)
    with pytest.raises(FileNotFoundError, match="validation/"):
        small_folder_check.dataset_folder(str(tmp_path / "mine"), tmp_path)


def _cached_run(run_dir, settings: dict, result: dict) -> None:
    """A `result.json` as `learning_check.run_once` writes it, standing in for a run."""
    run_dir.mkdir(parents=True)
    (run_dir / "result.json").write_text(json.dumps({"settings": settings, "result": result}))


RANDOM_INIT_SETTINGS = {"model": "random:vit_micro_patch4_48"}


def test_check_dataset_reads_cached_runs_and_gives_the_verdict(tmp_path, monkeypatch):
    """Cached `result.json` files stand in for the runs: the verdict compares the gain with the spread."""
    import argparse

    args = argparse.Namespace(output_dir=str(tmp_path), preset="vit_micro_patch4_48", pretrain_args=[])
    settings = learning_check.pretrain_settings(["--config", "small-folder"])
    for seed in range(3):
        random_result = {"seed": seed, "linear": 90.0 + seed, "knn": 60.0 + seed}
        _cached_run(tmp_path / "digits" / f"random-seed{seed}", RANDOM_INIT_SETTINGS, random_result)
        result = {"seed": seed, "linear": 95.0, "knn": 61.0 + seed}
        _cached_run(tmp_path / "digits" / f"small-folder-seed{seed}", settings, result)
    monkeypatch.setattr(small_folder_check, "pretrain_seed", lambda *a, **k: pytest.fail("ran a cached run"))
    check = small_folder_check.check_dataset("digits", ["small-folder"], [0, 1, 2], args)
    verdict = check["verdicts"]["small-folder"]
    assert verdict["linear"] == {"gain": 4.0, "spread": 2.0, "pass": True}
    assert verdict["knn"] == {"gain": 1.0, "spread": 2.0, "pass": False}
    table = "\n".join(small_folder_check.results_table({"digits": check}, [0, 1, 2]))
    assert "| digits | `small-folder` | 95.0 ± 0.0 | 62.0 ± 1.0 | +4.0 / 2.0 | +1.0 / 2.0 | FAIL |" in table


def test_checkpoint_selection_scores_what_each_rule_picks(tmp_path, monkeypatch):
    """Cached runs stand in for training: each rule's pick, its validation scores, the verdict against random init."""
    import argparse

    from benchmarks import checkpoint_selection

    args = argparse.Namespace(
        output_dir=str(tmp_path), preset="vit_micro_patch4_48", pretrain_args=[], recipe="small-folder", seeds=[0, 1]
    )
    monitor = {"50": [0.70, 0.02], "100": [0.69, 0.02], "150": [0.60, 0.02]}  # best 50; 100 within one error
    checkpoints = {"50": {"linear": 80.0, "knn": 70.0}, "100": {"linear": 85.0, "knn": 69.0}}
    checkpoints["150"] = {"linear": 86.0, "knn": 60.0}
    settings = learning_check.pretrain_settings(
        ["--config", "small-folder", *checkpoint_selection.KEEP_EVERY_CHECKPOINT]
    )
    for seed in range(2):
        random_result = {"seed": seed, "linear": 80.0 + seed, "knn": 60.0 + seed}
        _cached_run(tmp_path / "digits" / f"random-seed{seed}", RANDOM_INIT_SETTINGS, random_result)
        result = {"seed": seed, "monitor": monitor, "checkpoints": checkpoints}
        _cached_run(tmp_path / "digits" / f"small-folder-checkpoints-seed{seed}", settings, result)
    monkeypatch.setattr(checkpoint_selection, "pretrain_seed", lambda *a, **k: pytest.fail("ran a cached run"))
    check = checkpoint_selection.check_dataset("digits", args)
    assert {rule: verdict["steps"] for rule, verdict in check["rules"].items()} == {
        "last": [150, 150],
        "best": [50, 50],
        "latest_within_stderr": [100, 100],
    }
    within = check["rules"]["latest_within_stderr"]
    assert within["linear"]["gain"] == pytest.approx(4.5) and within["linear"]["pass"]
    assert within["knn"]["gain"] == pytest.approx(8.5) and within["knn"]["pass"]
    assert not check["rules"]["last"]["knn"]["pass"]  # 60.0 against 60.5: no gain
    table = "\n".join(checkpoint_selection.results_table({"digits": check}, args))
    row = "| digits | `latest_within_stderr` | 100 100 | 85.0 ± 0.0 | 69.0 ± 0.0 | +4.5 / 1.0 | +8.5 / 1.0 | PASS |"
    assert row in table
