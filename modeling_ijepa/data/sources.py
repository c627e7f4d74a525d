# Copyright 2026 The ijepa-hf Authors. All rights reserved.
# Licensed under the Apache License, Version 2.0.
"""Where images come from: one code path through `datasets` for the hub (optionally streamed), local folders
(imagefolder or parquet), and the embedded digits default; columns standardised to `image` / `label`; per-process
shards of a stream.

Images are left undecoded here: the collators decode them robustly (`images.py`, `collators.py`).
"""

from __future__ import annotations

import os
import socket
import urllib.parse
from functools import lru_cache
from pathlib import Path

import numpy as np
from PIL import Image


IMAGE_COLUMN_CANDIDATES = ("image", "img", "jpg", "jpeg", "png", "webp")
LABEL_COLUMN_CANDIDATES = ("label", "labels", "cls", "class")
DIGITS_TEST_SIZE = 597


def digits_split(targets: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The fixed, stratified train / test indices of the embedded digits (1200 / 597 of scikit-learn's 1797)."""
    from sklearn.model_selection import train_test_split

    return train_test_split(np.arange(len(targets)), test_size=DIGITS_TEST_SIZE, random_state=0, stratify=targets)


@lru_cache(maxsize=4)
def load_digits_dataset(image_size: int = 48):
    """
    The embedded offline default: scikit-learn's bundled 8x8 digits (1797 real scans) as RGB images upscaled to
    `image_size`, split into a fixed, stratified `train` (1200) and `test` (597) `datasets.DatasetDict` with columns
    `image` and `label` (ClassLabel "0".."9").

    The 0-16 ink counts are drawn as dark ink on white paper, as the forms were written. With this rendering, encoders
    at random initialisation measured 87.8-91.0 % linear probe and 60.8-70.7 % 20-NN accuracy over seeds in the
    project's calibration; white ink on black gives a different and more seed-dependent baseline (85-91 % linear,
    45-55 % 20-NN).
    """
    import datasets
    from sklearn.datasets import load_digits

    digits = load_digits()
    pixels = 255 - (digits.images / 16.0 * 255.0).round().astype(np.uint8)  # dark ink on white paper
    images = [
        Image.fromarray(p, mode="L").resize((image_size, image_size), Image.BICUBIC).convert("RGB") for p in pixels
    ]
    train_index, test_index = digits_split(digits.target)
    features = datasets.Features(
        {"image": datasets.Image(), "label": datasets.ClassLabel(names=[str(d) for d in range(10)])}
    )

    def split(indices):
        columns = {"image": [images[i] for i in indices], "label": [int(digits.target[i]) for i in indices]}
        return datasets.Dataset.from_dict(columns, features=features)

    return datasets.DatasetDict({"train": split(sorted(train_index)), "test": split(sorted(test_index))})


def hub_is_reachable(timeout: float = 3.0) -> bool:
    """Whether the Hugging Face Hub can be reached right now (offline mode, or a TCP connect within `timeout` s)."""
    from huggingface_hub import constants

    if constants.HF_HUB_OFFLINE or os.environ.get("HF_DATASETS_OFFLINE", "0").upper() in ("1", "ON", "YES", "TRUE"):
        return False
    endpoint = urllib.parse.urlparse(constants.ENDPOINT)
    port = endpoint.port or (443 if endpoint.scheme == "https" else 80)
    try:
        with socket.create_connection((endpoint.hostname, port), timeout=timeout):
            return True
    except OSError:
        return False


def _data_files(folder: Path) -> dict[str, list[str]] | None:
    parquet = sorted(str(p) for p in folder.rglob("*.parquet"))
    return {"train": parquet} if parquet else None


def load_image_dataset(
    dataset_name: str | None = None,
    dataset_config_name: str | None = None,
    train_dir: str | None = None,
    validation_dir: str | None = None,
    split: str = "train",
    streaming: bool = False,
    image_column: str | None = None,
    label_column: str | None = None,
    cache_dir: str | None = None,
    image_size: int = 48,
):
    """
    Load images through `datasets`, with columns renamed to `image` (left undecoded: the collators decode robustly)
    and, when present, `label`.

    Sources, in order: `dataset_name` (the hub, e.g. `"ILSVRC/imagenet-1k"`, optionally `streaming`); `train_dir` /
    `validation_dir` (an imagefolder with class sub-folders, or parquet files); otherwise the embedded digits default
    (`split` `"train"`, or `"test"` / `"validation"`).

    Returns:
        `datasets.Dataset`, or `datasets.IterableDataset` when `streaming`.
    """
    import datasets

    if dataset_name and (train_dir or validation_dir):
        raise ValueError("Pass either --dataset_name (hub) or --train_dir/--validation_dir (local files), not both.")
    if dataset_name:
        if not hub_is_reachable():
            raise ConnectionError(
                f"Cannot reach the Hugging Face Hub to load {dataset_name!r} (offline). Download the dataset first "
                "and pass its folder with --train_dir, or run without data arguments to use the embedded digits."
            )
        dataset = datasets.load_dataset(
            dataset_name, dataset_config_name, split=split, streaming=streaming, cache_dir=cache_dir
        )
    elif train_dir or validation_dir:
        use_validation = split in ("validation", "test") and validation_dir
        folder = Path(validation_dir if use_validation else train_dir or validation_dir)
        if not folder.exists():
            raise ValueError(f"Data folder {str(folder)!r} does not exist: check --train_dir / --validation_dir.")
        data_files = _data_files(folder)
        if data_files:
            dataset = datasets.load_dataset("parquet", data_files=data_files, split="train", streaming=streaming)
        else:
            dataset = datasets.load_dataset(
                "imagefolder", data_dir=str(folder), split="train", streaming=streaming, cache_dir=cache_dir
            )
    else:
        digits = load_digits_dataset(image_size)
        dataset = digits["test" if split in ("test", "validation") else "train"]
        if streaming:
            dataset = dataset.to_iterable_dataset()

    return _standardise_columns(dataset, image_column, label_column)


def _standardise_columns(dataset, image_column: str | None, label_column: str | None):
    import datasets

    columns = list(dataset.column_names or (dataset.features or {}).keys())
    image_column = image_column or next((c for c in IMAGE_COLUMN_CANDIDATES if c in columns), None)
    if image_column not in columns:
        raise ValueError(
            f"No image column found (looked for {image_column or list(IMAGE_COLUMN_CANDIDATES)}); the dataset has "
            f"columns {columns}. Pass --image_column with the right name."
        )
    label_column = label_column or next((c for c in LABEL_COLUMN_CANDIDATES if c in columns), None)
    if label_column is not None and label_column not in columns:
        raise ValueError(f"Label column {label_column!r} not found; the dataset has columns {columns}.")
    # Decoding inside `datasets` would crash the run on the first corrupt file; our collators skip it instead. It must
    # be off before the renames below: streams apply every step lazily, and their inner steps would decode.
    if isinstance(dataset, datasets.IterableDataset):
        dataset = dataset.decode(False)
    if dataset.features is not None and isinstance(dataset.features.get(image_column), datasets.Image):
        dataset = dataset.cast_column(image_column, datasets.Image(decode=False))
    renames = {image_column: "image"}
    if label_column:
        renames[label_column] = "label"
    dataset = dataset.rename_columns({k: v for k, v in renames.items() if k != v})
    keep = [c for c in ("image", "label") if c in (dataset.column_names or ["image", "label"])]
    if dataset.column_names and set(dataset.column_names) - set(keep):
        dataset = dataset.select_columns(keep)
    return dataset


def shard_for_process(dataset, rank: int, world_size: int):
    """Give each of `world_size` processes its own disjoint part of an iterable dataset (`split_dataset_by_node`)."""
    from datasets.distributed import split_dataset_by_node

    if world_size <= 1:
        return dataset
    return split_dataset_by_node(dataset, rank=rank, world_size=world_size)
