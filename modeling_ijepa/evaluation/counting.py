# Copyright 2026 The ijepa-hf Authors. All rights reserved.
# Licensed under the Apache License, Version 2.0.
"""A counting task that measures local information offline, in the spirit of the paper's Clevr/Count evaluation.

Each image is a white canvas of the model's input size holding 1 to `max_count` handwritten digits (scikit-learn's
bundled 8x8 scans, the same as the embedded default data, drawn as dark ink on white) at random non-overlapping
positions; the label is the number of digits. Average-pooled features mix every patch together, so how well a frozen
probe reads the count says how much the encoder keeps about *where* things are, which the linear probe of the digits
themselves does not test.

[`build_counting_dataset`] builds one split as a pure function of its seed; [`build_counting_splits`] builds a train
and a test split from disjoint digit scans (the fixed train / test split of the embedded digits).
"""

from __future__ import annotations

from functools import lru_cache

import numpy as np
from PIL import Image


@lru_cache(maxsize=2)
def _digit_scans(split: str) -> np.ndarray:
    """The `(num_scans, 8, 8)` 0-16 ink counts of the embedded digits' `train` or `test` scans."""
    from sklearn.datasets import load_digits

    from ..data.sources import digits_split

    digits = load_digits()
    train_index, test_index = digits_split(digits.target)
    if split not in ("train", "test"):
        raise ValueError(f"split must be 'train' or 'test', got {split!r}.")
    return digits.images[np.sort(train_index if split == "train" else test_index)]


def _overlaps(top: int, left: int, boxes: list[list[int]], digit_size: int, gap: int) -> bool:
    """Whether a `digit_size` square at `(top, left)` comes closer than `gap` pixels to any of `boxes`."""
    reach = digit_size + gap
    return any(abs(top - other_top) < reach and abs(left - other_left) < reach for other_top, other_left in boxes)


def _place_boxes(rng: np.random.Generator, count: int, image_size: int, digit_size: int, gap: int) -> list[list[int]]:
    """
    `count` random `[top, left]` corners of `digit_size` squares inside the canvas, at least `gap` pixels apart:
    each square is drawn uniformly among the positions left free; when the first ones leave no room, start over.
    """
    for _ in range(100):
        boxes = []
        for _ in range(count):
            for _ in range(100):
                top, left = (int(value) for value in rng.integers(0, image_size - digit_size + 1, size=2))
                if not _overlaps(top, left, boxes, digit_size, gap):
                    boxes.append([top, left])
                    break
            else:
                break
        if len(boxes) == count:
            return boxes
    raise ValueError(
        f"Could not place {count} digits of {digit_size} px on a {image_size} px canvas: lower max_count or "
        "digit_size."
    )


def build_counting_dataset(
    num_images: int,
    max_count: int = 5,
    image_size: int = 48,
    digit_size: int | None = None,
    seed: int = 0,
    split: str = "train",
    gap: int = 1,
):
    """
    A counting split: `num_images` canvases, each holding a uniformly drawn count of 1 to `max_count` digits.

    The digits are scans of the embedded digits' `split` ("train" or "test"), each upscaled (bicubic) to
    `digit_size` px (default `image_size // 4`) and drawn at a random position, at least `gap` pixels from every
    other digit. The same arguments always give the same images (a pure function of `seed`).

    Returns:
        A `datasets.Dataset` with columns `image` (RGB, `image_size` px), `label` (ClassLabel "1".."max_count":
        label `i` is `i + 1` digits) and `boxes` (the `[top, left]` corner of every digit, each `digit_size` px).
    """
    import datasets

    digit_size = digit_size or image_size // 4
    if num_images < 1 or max_count < 1:
        raise ValueError(f"num_images and max_count must be at least 1, got {num_images} and {max_count}.")
    if not 1 <= digit_size <= image_size:
        raise ValueError(f"digit_size must be between 1 and image_size ({image_size}), got {digit_size}.")
    if max_count * (digit_size + gap) ** 2 > 0.6 * image_size**2:
        raise ValueError(
            f"{max_count} digits of {digit_size} px do not fit at random on a {image_size} px canvas (over 60 % of "
            "its area): lower max_count or digit_size."
        )
    scans = _digit_scans(split)
    ink = [
        np.asarray(
            Image.fromarray(255 - (scan / 16.0 * 255.0).round().astype(np.uint8), mode="L").resize(
                (digit_size, digit_size), Image.BICUBIC
            )
        )
        for scan in scans
    ]
    rng = np.random.default_rng(seed)
    images, labels, all_boxes = [], [], []
    for _ in range(num_images):
        count = int(rng.integers(1, max_count + 1))
        boxes = _place_boxes(rng, count, image_size, digit_size, gap)
        canvas = np.full((image_size, image_size), 255, dtype=np.uint8)
        for (top, left), scan_index in zip(boxes, rng.choice(len(ink), size=count, replace=False)):
            canvas[top : top + digit_size, left : left + digit_size] = ink[scan_index]
        images.append(Image.fromarray(canvas, mode="L").convert("RGB"))
        labels.append(count - 1)
        all_boxes.append(boxes)
    features = datasets.Features(
        {
            "image": datasets.Image(),
            "label": datasets.ClassLabel(names=[str(count) for count in range(1, max_count + 1)]),
            "boxes": datasets.Sequence(datasets.Sequence(datasets.Value("int32"))),
        }
    )
    return datasets.Dataset.from_dict({"image": images, "label": labels, "boxes": all_boxes}, features=features)


def build_counting_splits(
    num_train: int = 1200,
    num_test: int = 600,
    max_count: int = 5,
    image_size: int = 48,
    digit_size: int | None = None,
    seed: int = 0,
):
    """
    Train and test counting splits ([`build_counting_dataset`]) drawn from disjoint digit scans (the embedded digits'
    train and test scans) under different seeds derived from `seed`.

    Returns:
        `datasets.DatasetDict` with `train` and `test`.
    """
    import datasets

    settings = dict(max_count=max_count, image_size=image_size, digit_size=digit_size)
    return datasets.DatasetDict(
        {
            "train": build_counting_dataset(num_train, seed=2 * seed, split="train", **settings),
            "test": build_counting_dataset(num_test, seed=2 * seed + 1, split="test", **settings),
        }
    )


__all__ = ["build_counting_dataset", "build_counting_splits"]
