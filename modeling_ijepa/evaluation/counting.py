# Copyright 2026 The ijepa-hf Authors. All rights reserved.
# Licensed under the Apache License, Version 2.0.
"""A counting task that measures local information offline, in the spirit of the paper's Clevr/Count evaluation.

Each image is a white canvas of the model's input size holding 1 to `max_count` handwritten digits (scikit-learn's
bundled 8x8 scans, the same as the embedded default data, drawn as dark ink on white) of random sizes at random
non-overlapping positions; the label is the number of digits. Average-pooled features mix every patch together, so
how well a frozen probe reads the count says how much the encoder keeps of the objects as separate things, which the
linear probe of the digits themselves does not test.

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


def _overlaps(box: list[int], boxes: list[list[int]], gap: int) -> bool:
    """Whether the square `[top, left, size]` comes closer than `gap` pixels to any of `boxes` (same layout)."""
    top, left, size = box
    return any(
        top < other_top + other_size + gap
        and other_top < top + size + gap
        and left < other_left + other_size + gap
        and other_left < left + size + gap
        for other_top, other_left, other_size in boxes
    )


def _place_boxes(rng: np.random.Generator, sizes: list[int], image_size: int, gap: int) -> list[list[int]]:
    """
    One random `[top, left, size]` square per entry of `sizes` inside the canvas, at least `gap` pixels apart: each
    square is drawn uniformly among the positions left free; when the first ones leave no room, start over.
    """
    for _ in range(100):
        boxes = []
        for size in sizes:
            for _ in range(100):
                top, left = (int(value) for value in rng.integers(0, image_size - size + 1, size=2))
                if not _overlaps([top, left, size], boxes, gap):
                    boxes.append([top, left, size])
                    break
            else:
                break
        if len(boxes) == len(sizes):
            return boxes
    raise ValueError(
        f"Could not place {len(sizes)} digits of {sizes} px on a {image_size} px canvas: lower max_count or the "
        "digit sizes."
    )


def build_counting_dataset(
    num_images: int,
    max_count: int = 5,
    image_size: int = 48,
    digit_sizes: tuple[int, int] | None = None,
    seed: int = 0,
    split: str = "train",
    gap: int = 1,
):
    """
    A counting split: `num_images` canvases, each holding a uniformly drawn count of 1 to `max_count` digits.

    The digits are scans of the embedded digits' `split` ("train" or "test"), each upscaled (bicubic) to a size drawn
    uniformly in `digit_sizes = (smallest, largest)` px (default `(image_size // 8, image_size // 3)`: 6 to 16 px at
    48 px) and drawn at a random position, at least `gap` pixels from every other digit. Sizes vary so that the
    amount of ink overlaps between counts: the count is then not a linear function of the mean pixel. The same
    arguments always give the same images (a pure function of `seed`).

    Returns:
        A `datasets.Dataset` with columns `image` (RGB, `image_size` px), `label` (ClassLabel "1".."max_count":
        label `i` is `i + 1` digits) and `boxes` (`[top, left, size]` of every digit).
    """
    import datasets

    smallest, largest = digit_sizes or (max(1, image_size // 8), image_size // 3)
    if num_images < 1 or max_count < 1:
        raise ValueError(f"num_images and max_count must be at least 1, got {num_images} and {max_count}.")
    if not 1 <= smallest <= largest <= image_size:
        raise ValueError(
            f"digit_sizes must be (smallest, largest) with 1 <= smallest <= largest <= image_size ({image_size}), "
            f"got {(smallest, largest)}."
        )
    if max_count * ((smallest + largest) / 2 + gap) ** 2 > 0.5 * image_size**2:
        raise ValueError(
            f"{max_count} digits of {smallest}-{largest} px do not fit at random on a {image_size} px canvas (over "
            "half its area): lower max_count or the digit sizes."
        )
    scans = [255 - (scan / 16.0 * 255.0).round().astype(np.uint8) for scan in _digit_scans(split)]
    rng = np.random.default_rng(seed)
    images, labels, all_boxes = [], [], []
    for _ in range(num_images):
        count = int(rng.integers(1, max_count + 1))
        sizes = sorted((int(size) for size in rng.integers(smallest, largest + 1, size=count)), reverse=True)
        boxes = _place_boxes(rng, sizes, image_size, gap)
        canvas = np.full((image_size, image_size), 255, dtype=np.uint8)
        for (top, left, size), scan_index in zip(boxes, rng.choice(len(scans), size=count, replace=False)):
            digit = Image.fromarray(scans[scan_index], mode="L").resize((size, size), Image.BICUBIC)
            canvas[top : top + size, left : left + size] = np.asarray(digit)
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
    digit_sizes: tuple[int, int] | None = None,
    seed: int = 0,
):
    """
    Train and test counting splits ([`build_counting_dataset`]) drawn from disjoint digit scans (the embedded digits'
    train and test scans) under different seeds derived from `seed`.

    Returns:
        `datasets.DatasetDict` with `train` and `test`.
    """
    import datasets

    settings = dict(max_count=max_count, image_size=image_size, digit_sizes=digit_sizes)
    return datasets.DatasetDict(
        {
            "train": build_counting_dataset(num_train, seed=2 * seed, split="train", **settings),
            "test": build_counting_dataset(num_test, seed=2 * seed + 1, split="test", **settings),
        }
    )


__all__ = ["build_counting_dataset", "build_counting_splits"]
