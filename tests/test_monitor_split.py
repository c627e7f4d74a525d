"""The k-NN monitor's split of a training folder keeps related images (one group) on one side."""

import logging

import numpy as np
import pytest
from PIL import Image

from modeling_ijepa.data import average_hash, group_from_file_name, group_split, hash_groups
from modeling_ijepa.monitoring import load_knn_monitor_datasets


def _groups_of(dataset) -> set[str]:
    return {group_from_file_name(value["path"]) for value in dataset["image"]}


def _crops_folder(root, named: bool = True, sources: int = 4, crops: int = 5):
    """Two classes, `sources` source images per class, `crops` overlapping 16 px crops of each."""
    rng = np.random.default_rng(0)
    for label in ("a", "b"):
        (root / label).mkdir(parents=True)
        for source in range(sources):
            photo = rng.integers(0, 256, size=(24, 24, 3), dtype=np.uint8)
            for crop in range(crops):
                top, left = rng.integers(0, 8, size=2)
                name = f"{label}{source}__{crop}.png" if named else f"{label}{source}x{crop}.png"
                Image.fromarray(photo[top : top + 16, left : left + 16]).save(root / label / name)
    return root


def test_file_name_groups_follow_the_double_underscore_convention():
    assert group_from_file_name("/data/cat/photo-17__crop3.jpg") == "photo-17"
    assert group_from_file_name("IMG_0001.jpg") is None  # a single underscore declares nothing
    assert group_from_file_name("__0001.png") is None and group_from_file_name(None) is None


def test_a_random_split_leaks_crops_of_a_source_and_the_group_split_does_not(tmp_path, caplog):
    root = _crops_folder(tmp_path)
    train, evaluation = load_knn_monitor_datasets(train_dir=str(root), image_size=16, split_by="random")
    assert _groups_of(train) & _groups_of(evaluation)  # the plain split puts crops of one photo on both sides
    with caplog.at_level(logging.INFO, logger="modeling_ijepa.monitoring"):
        train, evaluation = load_knn_monitor_datasets(train_dir=str(root), image_size=16)
    assert "by file-name groups (8 groups" in caplog.text
    assert not _groups_of(train) & _groups_of(evaluation)
    assert len(train) + len(evaluation) == 40 and sorted(set(evaluation["label"])) == [0, 1]
    # Deterministic for a seed; another seed sends other groups to the query side.
    again = load_knn_monitor_datasets(train_dir=str(root), image_size=16)[1]
    assert again["image"] == evaluation["image"]
    others = [_groups_of(load_knn_monitor_datasets(train_dir=str(root), image_size=16, seed=s)[1]) for s in range(4)]
    assert len({frozenset(groups) for groups in others}) > 1


def test_names_split_refuses_a_folder_whose_names_declare_no_group(tmp_path):
    root = _crops_folder(tmp_path, named=False, sources=2, crops=2)
    with pytest.raises(ValueError, match="declare no group in their file name"):
        load_knn_monitor_datasets(train_dir=str(root), image_size=16, split_by="names")
    with pytest.raises(ValueError, match="must be one of"):
        load_knn_monitor_datasets(train_dir=str(root), image_size=16, split_by="groups")


def test_a_folder_without_group_names_is_split_by_perceptual_hash_on_request(tmp_path, caplog):
    # Near-copies (one pattern with a little noise, re-saved) without names, next to distinct patterns.
    rng = np.random.default_rng(1)
    copies = {}
    for label in ("a", "b"):
        (tmp_path / label).mkdir()
        for pattern in range(6):
            base = np.kron(rng.integers(0, 2, size=(8, 8)) * 200 + 20, np.ones((4, 4)))
            for copy in range(3):
                noisy = np.clip(base + rng.normal(0, 6, size=base.shape), 0, 255).astype(np.uint8)
                path = tmp_path / label / f"{label}{pattern}x{copy}.png"
                Image.fromarray(noisy).convert("RGB").save(path)
                copies[path.name] = f"{label}{pattern}"
    with caplog.at_level(logging.INFO, logger="modeling_ijepa.monitoring"):
        load_knn_monitor_datasets(train_dir=str(tmp_path), image_size=16)  # "auto": no names, so a random split
        assert "random (" in caplog.text
        train, evaluation = load_knn_monitor_datasets(train_dir=str(tmp_path), image_size=16, split_by="hash")
    assert "by perceptual-hash groups (12 groups" in caplog.text
    sides = [{copies[value["path"].rsplit("/", 1)[1]] for value in d["image"]} for d in (train, evaluation)]
    assert sides[1] and not sides[0] & sides[1]


def test_a_folder_of_distinct_images_still_splits_about_the_fraction(tmp_path):
    rng = np.random.default_rng(2)
    for label in ("a", "b"):
        (tmp_path / label).mkdir()
        for index in range(10):
            pattern = np.kron(rng.integers(0, 2, size=(8, 8)) * 255, np.ones((2, 2))).astype(np.uint8)
            Image.fromarray(pattern).convert("RGB").save(tmp_path / label / f"{index}.png")
    train, evaluation = load_knn_monitor_datasets(train_dir=str(tmp_path), image_size=16, eval_fraction=0.3)
    assert (len(train), len(evaluation)) == (14, 6) and sorted(evaluation["label"]) == [0, 0, 0, 1, 1, 1]


def test_hash_groups_link_near_hashes_transitively_and_only_them():
    hashes = np.array([0b0, 0b11, 0b1111, 2**63 + 2**62 + 2**61, 0xFF00], dtype=np.uint64)
    # 0 - 3 (2 bits) - 15 (2 bits): one group through the chain; the fourth is 3 bits from 0, the last 8 bits or more.
    assert hash_groups(hashes, max_distance=2).tolist() == [0, 0, 0, 3, 4]
    assert hash_groups(hashes, max_distance=3).tolist() == [0, 0, 0, 0, 4]
    assert hash_groups(hashes, max_distance=0).tolist() == [0, 1, 2, 3, 4]
    grey = Image.fromarray(np.kron(np.eye(8) * 255, np.ones((4, 4))).astype(np.uint8))
    assert average_hash(grey) == average_hash(grey.resize((64, 64))) and bin(average_hash(grey)).count("1") == 8


def test_group_split_keeps_single_group_classes_on_the_reference_side():
    labels = [0] * 6 + [1] * 3
    groups = ["x", "x", "y", "y", "z", "z", "w", "w", "w"]
    reference, query, summary = group_split(labels, groups, eval_fraction=0.3, seed=0)
    assert summary == {"groups": 4, "largest_group": 3, "classes_without_queries": [1]}
    assert {6, 7, 8} <= set(reference) and len(query) == 2 and len({groups[i] for i in query}) == 1
    with pytest.raises(ValueError, match="eval_fraction"):
        group_split(labels, groups, eval_fraction=1.0, seed=0)
