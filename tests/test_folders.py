"""`benchmarks/folders/`: the registry that finds every builder module, and the offline photo folders."""

import numpy as np
import pytest
from PIL import Image

from benchmarks import folders
from benchmarks.folders import photos
from modeling_ijepa.data import load_image_dataset


def test_registry_finds_a_new_builder_module_without_any_other_edit(tmp_path, monkeypatch):
    (tmp_path / "stripes.py").write_text(
        "NAME = 'stripes'\n"
        "def build(root, classes=2):\n"
        "    from pathlib import Path\n"
        "    for split in ('train', 'validation'):\n"
        "        for label in range(classes):\n"
        "            (Path(root) / split / str(label)).mkdir(parents=True)\n"
        "    return root\n"
    )
    (tmp_path / "_private.py").write_text("raise RuntimeError('helpers starting with _ are not builders')\n")
    monkeypatch.setattr(folders, "__path__", [*folders.__path__, str(tmp_path)])
    assert folders.names() == ("scikit-image", "scikit-image-grey", "shipped", "stripes")
    root = folders.build("stripes", tmp_path / "out", classes=3)
    assert sorted(p.name for p in (root / "validation").iterdir()) == ["0", "1", "2"]
    with pytest.raises(KeyError, match="Did you mean 'stripes'"):
        folders.build("strips", tmp_path / "other")


def test_a_module_that_is_not_a_builder_is_named(tmp_path, monkeypatch):
    (tmp_path / "notes.py").write_text("TEXT = 'no NAME, no build'\n")
    monkeypatch.setattr(folders, "__path__", [*folders.__path__, str(tmp_path)])
    with pytest.raises(TypeError, match="notes is not a folder builder"):
        folders.names()


def test_shipped_photo_folder_is_an_imagefolder_of_region_classes(tmp_path):
    root = folders.build("shipped", tmp_path / "photos", train_per_class=3, validation_per_class=2, seed=1)
    classes = sorted(p.name for p in (root / "train").iterdir())
    assert len(classes) == 12 and classes == sorted(p.name for p in (root / "validation").iterdir())
    assert {name.rsplit("_r", 1)[0] for name in classes} == {"china", "flower", "grace_hopper"}
    with Image.open(next((root / "train" / classes[0]).iterdir())) as image:
        assert image.size == (64, 64) and image.mode == "RGB"
    train = load_image_dataset(train_dir=str(root / "train"), split="train", image_size=48)
    assert len(train) == 36 and sorted(set(train["label"])) == list(range(12))
    # Seeded: the same arguments give the same pixels.
    again = folders.build("shipped", tmp_path / "again", train_per_class=3, validation_per_class=2, seed=1)
    first = np.asarray(Image.open(root / "train" / classes[5] / "0001.jpg"))
    assert np.array_equal(first, np.asarray(Image.open(again / "train" / classes[5] / "0001.jpg")))


@pytest.mark.parametrize(("name", "num_classes"), [("scikit-image", 40), ("scikit-image-grey", 28)])
def test_scikit_image_photo_folders_when_scikit_image_is_installed(tmp_path, name, num_classes):
    pytest.importorskip("skimage", reason="the scikit-image photo sets need scikit-image (not a dependency)")
    root = folders.build(name, tmp_path, train_per_class=1, validation_per_class=1)
    classes = sorted(p.name for p in (root / "train").iterdir())
    assert len(classes) == num_classes and classes == sorted(p.name for p in (root / "validation").iterdir())
    with Image.open(next((root / "train" / classes[0]).iterdir())) as image:
        assert image.size == (64, 64) and image.mode == "RGB"


def test_photo_folder_never_overwrites_and_names_bad_arguments(tmp_path):
    photos.build(tmp_path, train_per_class=1, validation_per_class=1)
    with pytest.raises(FileExistsError, match="nothing is overwritten"):
        photos.build(tmp_path, train_per_class=1, validation_per_class=1)
    with pytest.raises(ValueError, match="Unknown photo set"):
        photos.build(tmp_path / "x", name="imagenet")
    with pytest.raises(ValueError, match="grid"):
        photos.regions({"a": np.zeros((8, 8, 3), np.uint8)}, 0)


def test_regions_tile_every_photo():
    photo = np.arange(10 * 12 * 3, dtype=np.uint8).reshape(10, 12, 3)
    regions = photos.regions({"p": photo}, 2)
    assert list(regions) == ["p_r0c0", "p_r0c1", "p_r1c0", "p_r1c1"]
    assert np.array_equal(regions["p_r1c0"], photo[5:10, 0:6])
    assert list(photos.regions({"p": photo}, 1)) == ["p"]
