"""`benchmarks/folders/`: the registry that finds every builder module, and the offline photo folders."""

import numpy as np
import pytest
from PIL import Image

from benchmarks import folders
from benchmarks.folders import _regions, photos
from modeling_ijepa.data import group_from_file_name, load_image_dataset


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
    assert {"scikit-image", "scikit-image-grey", "shipped", "stripes"} <= set(folders.names())
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


def _files(root):
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*.png"))}


def test_region_split_crops_never_share_a_row_of_the_source(tmp_path):
    ramp = np.repeat(np.repeat(np.arange(200, dtype=np.uint8)[:, None], 120, axis=1)[..., None], 3, axis=-1)
    rows = _regions.write_region_split(tmp_path, {"ramp": ramp}, (12, 8), image_size=16, seed=0)
    assert rows["ramp"]["train"][1] < rows["ramp"]["validation"][0]
    train = [np.asarray(Image.open(p)) for p in (tmp_path / "train" / "ramp").iterdir()]
    validation = [np.asarray(Image.open(p)) for p in (tmp_path / "validation" / "ramp").iterdir()]
    # A pixel's value is its source row: every training crop lies above every validation crop.
    assert max(int(a.max()) for a in train) < min(int(a.min()) for a in validation)
    names = sorted(p.name for p in (tmp_path / "train" / "ramp").iterdir())
    assert {group_from_file_name(n) for n in names} == {f"ramp-upper-t{t}" for t in range(4)}
    with pytest.raises(ValueError, match="too short"):
        _regions.split_rows(np.zeros((10, 10)), 0.25)


@pytest.mark.parametrize("name", ["textures", "photo-regions", "grey-regions"])
def test_region_folders_are_seeded_and_split_by_region(tmp_path, name):
    pytest.importorskip("skimage", reason="these folders read scikit-image's images")
    options = dict(train_per_class=4, validation_per_class=1, image_size=16)
    root = folders.build(name, tmp_path / "a", seed=3, **options)
    assert _files(root) == _files(folders.build(name, tmp_path / "b", seed=3, **options))
    assert _files(root) != _files(folders.build(name, tmp_path / "c", seed=4, **options))
    classes = sorted(p.name for p in (root / "train").iterdir())
    assert classes == sorted(p.name for p in (root / "validation").iterdir())
    for label in classes:  # four training groups (tiles) per class, none shared with validation
        train = {group_from_file_name(p) for p in (root / "train" / label).iterdir()}
        validation = {group_from_file_name(p) for p in (root / "validation" / label).iterdir()}
        assert len(train) == 4 and not train & validation
    # The file names never name a split (`datasets` would read one from them): both splits load as imagefolders.
    for split in ("train", "validation"):
        assert (
            len(load_image_dataset(train_dir=str(root / split), split="train"))
            == len(classes) * options["train_per_class" if split == "train" else "validation_per_class"]
        )


def test_faces_folder_splits_source_images(tmp_path):
    pytest.importorskip("skimage", reason="the faces folder reads scikit-image's lfw_subset")
    root = folders.build("faces", tmp_path / "a", image_size=8, seed=1)
    assert _files(root) == _files(folders.build("faces", tmp_path / "b", image_size=8, seed=1))
    for label in ("face", "not-face"):
        train = {group_from_file_name(p) for p in (root / "train" / label).iterdir()}
        validation = {group_from_file_name(p) for p in (root / "validation" / label).iterdir()}
        assert (len(train), len(validation)) == (75, 25) and not train & validation


def test_digits_folder_is_the_embedded_split(tmp_path):
    root = folders.build("digits-folder", tmp_path, image_size=8)
    counts = {split: len(list((root / split).rglob("*.png"))) for split in ("train", "validation")}
    assert counts == {"train": 1200, "validation": 597}
    assert sorted(p.name for p in (root / "train").iterdir()) == [str(d) for d in range(10)]


def test_held_out_folders_are_declared_by_their_modules():
    assert folders.held_out() == ("faces", "grey-regions")
    assert not set(folders.held_out()) & {"textures", "photo-regions", "digits-folder"}
