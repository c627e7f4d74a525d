# Copyright 2026 The ijepa-hf Authors. All rights reserved.
# Licensed under the Apache License, Version 2.0.
"""
Groups of related images, so that a reference / query split never puts near-duplicates on both sides.

A k-NN score flatters when a query image has a near-copy among the references (two crops of one photo, one photo
saved twice): the neighbour vote then measures recall of that copy, not the features. A grouped split sends every
group wholly to one side.

Where the groups come from:

- **file names** (the convention): a file named `<group>__<anything>.<ext>`, the group being the part of the file
  name before its first double underscore, e.g. `brick-r0c1__0007.png` and `brick-r0c1__0012.png` are one group
  (crops of the same source region). The double underscore is the marker because single `_` and `-` are common in
  ordinary file names (`IMG_0001.jpg`) and would merge unrelated images;
- **perceptual hashes** (the fallback for folders whose names carry no group): an 8 x 8 average hash of each image
  (greyscale, box-downscaled to 8 x 8, one bit per pixel: above the mean or not), images of one class whose hashes
  differ in at most `max_distance` of the 64 bits linked, and linked images (transitively) one group. It finds
  resized, re-encoded, slightly shifted or recoloured copies; it does not find crops of different parts of a photo,
  which only the file-name convention can declare.

Groups are taken within a class: the split is per class, so every class keeps images on both sides wherever it has
at least two groups.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
from PIL import Image

from .images import decode_image


logger = logging.getLogger(__name__)

GROUP_SEPARATOR = "__"
SPLIT_CHOICES = ("auto", "names", "hash", "random")


def group_from_file_name(path: str | Path | None) -> str | None:
    """The group a file name declares (`<group>__<anything>.<ext>` -> `<group>`), or `None` when it declares none."""
    if not path:
        return None
    stem = Path(path).stem
    if GROUP_SEPARATOR not in stem:
        return None
    group = stem.split(GROUP_SEPARATOR, 1)[0]
    return group or None


def image_path(value) -> str | None:
    """The file path of a `datasets` image value (`{"bytes", "path"}` dict or a path), else `None`."""
    if isinstance(value, dict):
        return value.get("path")
    if isinstance(value, (str, Path)):
        return str(value)
    return getattr(value, "filename", None) or None


def average_hash(image: Image.Image) -> int:
    """The 64-bit average hash of `image`: greyscale, box-downscaled to 8 x 8, a bit per pixel above the mean."""
    pixels = np.asarray(image.convert("L").resize((8, 8), Image.BOX), dtype=np.float32).ravel()
    return int(np.packbits(pixels > pixels.mean()).view(">u8")[0])


def hash_groups(hashes: np.ndarray, max_distance: int) -> np.ndarray:
    """
    Connected components of `hashes` (`(n,)` uint64) under "at most `max_distance` bits differ": `(n,)` component
    ids, each the smallest index of its component (so the result does not depend on anything but the hashes).
    """
    hashes = np.asarray(hashes, dtype=np.uint64)
    parent = np.arange(len(hashes))

    def find(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return int(i)

    block = 1024  # rows of the pairwise-distance block: bounded memory for large classes
    for start in range(0, len(hashes), block):
        rows = hashes[start : start + block]
        distances = np.bitwise_count(rows[:, None] ^ hashes[None, :])
        for i, j in zip(*np.nonzero(distances <= max_distance)):
            a, b = find(start + int(i)), find(int(j))
            if a != b:
                parent[max(a, b)] = min(a, b)
    return np.array([find(i) for i in range(len(hashes))])


def image_groups(dataset, split_by: str = "auto", max_distance: int = 3) -> tuple[list[str] | None, str]:
    """
    One group name per example of `dataset` (columns `image`, `label`) and the way they were found: `"names"`,
    `"hash"`, or `(None, "random")` when `split_by="random"`.

    `split_by="auto"`: the file names when every image's name declares a group, else `(None, "random")`: the
    perceptual-hash grouping is opt-in (`"hash"`) until its effect on real folders has been measured.
    """
    if split_by not in SPLIT_CHOICES:
        raise ValueError(f"The k-NN monitor's split must be one of {list(SPLIT_CHOICES)}, got {split_by!r}.")
    if split_by == "random":
        return None, "random"
    images = dataset["image"]
    labels = dataset["label"]
    if split_by in ("auto", "names"):
        named = [group_from_file_name(image_path(value)) for value in images]
        missing = [i for i, group in enumerate(named) if group is None]
        if not missing:
            return [f"{label}/{group}" for label, group in zip(labels, named)], "names"
        if split_by == "auto":
            return None, "random"
        if split_by == "names":
            raise ValueError(
                f"{len(missing)} of {len(named)} k-NN monitor images declare no group in their file name (e.g. "
                f"{image_path(images[missing[0]])!r}): name them <group>{GROUP_SEPARATOR}<anything>.<ext>, or split "
                "by perceptual hash (split 'hash') or at random ('random')."
            )
    if max_distance < 0:
        raise ValueError(f"The perceptual-hash grouping's max_distance must be >= 0, got {max_distance}.")
    hashes = np.zeros(len(labels), dtype=np.uint64)
    groups = [""] * len(labels)
    decodable = np.ones(len(labels), dtype=bool)
    for index, value in enumerate(images):
        image = decode_image(value)
        if image is None:  # its own group (the collator skips it later)
            decodable[index] = False
            groups[index] = f"{labels[index]}/undecodable{index}"
        else:
            hashes[index] = average_hash(image)
    labels_array = np.asarray(labels)
    for label in np.unique(labels_array):
        members = np.flatnonzero((labels_array == label) & decodable)
        components = hash_groups(hashes[members], max_distance)
        for member, component in zip(members, components):
            groups[member] = f"{label}/hash{members[component]}"
    return groups, "hash"


def group_split(labels, groups, eval_fraction: float, seed: int) -> tuple[list[int], list[int], dict[str, int | list]]:
    """
    Reference and query indices such that no group is on both sides, about `eval_fraction` of every class on the
    query side (whole groups, seeded order), and a summary `{"groups", "largest_group", "classes_without_queries"}`.

    Per class, its groups in a seeded random order go to the query side while they fit under
    `round(eval_fraction * class size)`; a class with two groups or more gets at least one query group (when none
    fits, its smallest), a class with a single group stays wholly on the reference side (named in the summary).
    """
    if not 0.0 < eval_fraction < 1.0:
        raise ValueError(f"The k-NN monitor's eval_fraction must be in (0, 1), got {eval_fraction}.")
    if len(labels) != len(groups):
        raise ValueError(f"{len(labels)} labels but {len(groups)} groups.")
    rng = np.random.default_rng(seed)
    by_class: dict = {}
    for index, (label, group) in enumerate(zip(labels, groups)):
        by_class.setdefault(label, {}).setdefault(group, []).append(index)
    reference, query, without_queries = [], [], []
    largest = 0
    for label in sorted(by_class):
        members = by_class[label]
        names = sorted(members)
        largest = max(largest, *(len(members[name]) for name in names))
        total = sum(len(members[name]) for name in names)
        target = min(round(eval_fraction * total), total - 1)
        order = [names[position] for position in rng.permutation(len(names))]
        chosen, count = [], 0
        for name in order:
            if count + len(members[name]) <= target:
                chosen.append(name)
                count += len(members[name])
        if not chosen and len(names) > 1:  # none fits: the smallest group, the first in the seeded order among equals
            chosen = [min(order, key=lambda name: len(members[name]))]
        if not chosen:
            without_queries.append(label)
        for name in names:
            (query if name in chosen else reference).extend(members[name])
    summary = {"groups": len({(label, g) for label in by_class for g in by_class[label]}), "largest_group": largest}
    summary["classes_without_queries"] = without_queries
    return sorted(reference), sorted(query), summary


__all__ = [
    "GROUP_SEPARATOR",
    "SPLIT_CHOICES",
    "average_hash",
    "group_from_file_name",
    "group_split",
    "hash_groups",
    "image_groups",
]
