"""
Shared by the region-split builders (not a builder: its name starts with `_`): cut a source image into a training
part and a validation part that share no pixel, cut each part into tiles, and write random crops taken wholly inside
one tile, named `<source>-<part>-t<tile>__<index>.png` (`part`: `upper` for training, `lower` for validation; never a
split name, which `datasets`' imagefolder would read as a split) so that the k-NN monitor's grouped split
(`modeling_ijepa.data.groups`, the `<group>__` file-name convention) keeps crops of one tile on one side.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image


def check_empty(root: Path) -> None:
    for split in ("train", "validation"):
        if (root / split).exists():
            raise FileExistsError(f"{root / split} exists; pass an empty folder (nothing is overwritten).")


def as_rgb(image: np.ndarray) -> np.ndarray:
    """`(H, W)` grey, `(H, W, 3)` or `(H, W, 4)` of any dtype to `(H, W, 3)` uint8."""
    array = np.asarray(image)
    if array.dtype != np.uint8:
        array = (np.clip(array.astype(np.float64), 0.0, 1.0) * 255.0).round().astype(np.uint8)
    if array.ndim == 2:
        array = np.repeat(array[..., None], 3, axis=-1)
    return np.ascontiguousarray(array[..., :3])


def split_rows(image: np.ndarray, validation_fraction: float) -> tuple[tuple[int, int], tuple[int, int]]:
    """Row ranges `(start, stop)` of the training part (top) and the validation part (bottom), a 2 % gap between."""
    if not 0.0 < validation_fraction < 1.0:
        raise ValueError(f"validation_fraction must be in (0, 1), got {validation_fraction}.")
    height = image.shape[0]
    gap = max(1, height // 50)
    boundary = int(round(height * (1.0 - validation_fraction)))
    train, validation = (0, boundary - gap // 2), (boundary + (gap - gap // 2), height)
    if train[1] - train[0] < 8 or validation[1] - validation[0] < 8:
        raise ValueError(f"An image of {height} rows is too short to split at {validation_fraction}.")
    return train, validation


def tiles(rows: tuple[int, int], width: int, count: int) -> list[tuple[int, int, int, int]]:
    """`count` side-by-side tiles `(top, bottom, left, right)` of the rows `rows` over `width` columns."""
    edges = np.linspace(0, width, count + 1).round().astype(int)
    return [(rows[0], rows[1], int(edges[i]), int(edges[i + 1])) for i in range(count)]


def random_crop(
    image: np.ndarray, box: tuple[int, int, int, int], rng: np.random.Generator, image_size: int, scale=(0.5, 1.0)
) -> Image.Image:
    """A random square crop wholly inside `box` (side `scale` of its shorter side), resized, flipped half the time."""
    top, bottom, left, right = box
    side = max(8, int(rng.uniform(*scale) * min(bottom - top, right - left)))
    y = int(rng.integers(top, bottom - side + 1))
    x = int(rng.integers(left, right - side + 1))
    crop = Image.fromarray(image[y : y + side, x : x + side]).resize((image_size, image_size), Image.BICUBIC)
    return crop.transpose(Image.FLIP_LEFT_RIGHT) if rng.random() < 0.5 else crop


def write_region_split(
    root: Path,
    sources: dict[str, np.ndarray],
    per_class: tuple[int, int],
    image_size: int,
    seed: int,
    validation_fraction: float = 0.25,
    num_tiles: int = 4,
) -> dict[str, dict[str, tuple[int, int]]]:
    """
    Write `train/<class>/` and `validation/<class>/` crops for `sources` (`class -> (H, W, 3) uint8`): training
    crops from the top rows of each source, validation crops from its bottom `validation_fraction`, `num_tiles`
    tiles per part, crops spread evenly over the tiles. Returns `{class: {split: (first row, stop row)}}`.
    """
    if min(per_class) < 1:
        raise ValueError("Need at least one training and one validation image per class.")
    check_empty(root)
    rng = np.random.default_rng(seed)
    rows_used = {}
    for label, image in sorted(sources.items()):
        train_rows, validation_rows = split_rows(image, validation_fraction)
        rows_used[label] = {"train": train_rows, "validation": validation_rows}
        for split, rows, count in (("train", train_rows, per_class[0]), ("validation", validation_rows, per_class[1])):
            folder = root / split / label
            folder.mkdir(parents=True)
            boxes = tiles(rows, image.shape[1], num_tiles)
            for index in range(count):
                tile = index % num_tiles
                crop = random_crop(image, boxes[tile], rng, image_size)
                part = "upper" if split == "train" else "lower"
                crop.save(folder / f"{label}-{part}-t{tile}__{index:04d}.png")
    return rows_used
