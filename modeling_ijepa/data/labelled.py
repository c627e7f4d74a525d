# Copyright 2026 The ijepa-hf Authors. All rights reserved.
# Licensed under the Apache License, Version 2.0.
"""Labelled images for evaluation and fine-tuning: a training and an evaluation split with `image` / `label` columns,
the class names, and class-balanced label subsets (`label_fraction`, e.g. 1 % of the labels).

Every function takes plain keyword arguments; the evaluation scripts pass their command-line options through.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from .sources import load_image_dataset


def sample_label_fraction(labels: Sequence[int], fraction: float, seed: int = 0) -> np.ndarray:
    """
    A class-balanced, seeded subset of the examples: `round(fraction * n_c)` random examples of every class `c`
    (at least one per class), so the class proportions are kept, e.g. 1 % of ImageNet is ~13 images per class.

    Args:
        labels: `(num_examples,)` integer class of every example.
        fraction: in `(0, 1]`; `1.0` keeps everything.
        seed: the same seed always gives the same subset.

    Returns:
        `(num_selected,)` int64 indices into `labels`, sorted.
    """
    if not 0.0 < fraction <= 1.0:
        raise ValueError(f"The label fraction must be in (0, 1], got {fraction}.")
    labels = np.asarray(labels)
    if fraction == 1.0:
        return np.arange(len(labels), dtype=np.int64)
    generator = np.random.default_rng(seed)
    selected = []
    for label in np.unique(labels):
        members = np.flatnonzero(labels == label)
        count = max(1, int(round(fraction * len(members))))
        selected.append(generator.choice(members, size=count, replace=False))
    return np.sort(np.concatenate(selected)).astype(np.int64)


def class_names(dataset) -> list[str]:
    """Class names from the `label` column's `ClassLabel` feature, else the sorted distinct label values."""
    feature = (dataset.features or {}).get("label")
    names = getattr(feature, "names", None)
    if names:
        return list(names)
    values = sorted(set(int(v) for v in dataset["label"]))
    if values != list(range(len(values))):
        raise ValueError(
            f"Labels must be class indices 0..num_classes-1 (or a ClassLabel column); found values {values[:10]}..."
        )
    return [str(v) for v in values]


def _square_size(image_size: int | Sequence[int]) -> int:
    return int(image_size[0] if isinstance(image_size, (list, tuple)) else image_size)


def load_classification_datasets(
    dataset_name: str | None = None,
    dataset_config_name: str | None = None,
    train_split: str = "train",
    eval_split: str = "validation",
    train_dir: str | None = None,
    validation_dir: str | None = None,
    train_val_split: float = 0.15,
    image_column: str | None = None,
    label_column: str | None = None,
    label_fraction: float = 1.0,
    max_train_samples: int | None = None,
    max_eval_samples: int | None = None,
    seed: int = 0,
    image_size: int | Sequence[int] = 48,
):
    """
    The training and evaluation `datasets.Dataset`s (columns `image`, `label`) of a labelled image source.

    Sources, in order: `dataset_name` (the hub; splits `train_split` and `eval_split`); `train_dir` with
    `validation_dir`; `train_dir` alone, of which a seeded `train_val_split` fraction is held out for evaluation;
    otherwise the embedded digits (train 1200 / test 597), drawn at `image_size` (a model config's value: an int or a
    `(height, width)` pair). On the training split, `max_train_samples` keeps the first images, then `label_fraction`
    keeps a class-balanced subset seeded by `seed` ([`sample_label_fraction`]); `max_eval_samples` keeps the first
    evaluation images.

    Returns:
        `(train_dataset, eval_dataset, class_names)`.
    """
    if not 0.0 < label_fraction <= 1.0:
        raise ValueError(f"label_fraction must be in (0, 1], got {label_fraction}.")
    if not 0.0 < train_val_split < 1.0:
        raise ValueError(f"train_val_split must be in (0, 1), got {train_val_split}.")
    common = dict(
        dataset_name=dataset_name,
        dataset_config_name=dataset_config_name,
        image_column=image_column,
        label_column=label_column,
        image_size=_square_size(image_size),
    )
    if dataset_name:
        train = load_image_dataset(split=train_split, **common)
        evaluation = load_image_dataset(split=eval_split, **common)
    elif train_dir and not validation_dir:
        full = load_image_dataset(train_dir=train_dir, split="train", **common)
        split = full.train_test_split(test_size=train_val_split, seed=seed)
        train, evaluation = split["train"], split["test"]
    else:
        if validation_dir and not train_dir:
            raise ValueError("--validation_dir needs a --train_dir to train on.")
        dirs = dict(train_dir=train_dir, validation_dir=validation_dir)
        train = load_image_dataset(split="train", **dirs, **common)
        evaluation = load_image_dataset(split="validation", **dirs, **common)
    for name, dataset in (("training", train), ("evaluation", evaluation)):
        if "label" not in dataset.column_names:
            raise ValueError(f"The {name} data has no label column: pass --label_column.")

    if max_train_samples is not None:
        train = train.select(range(min(max_train_samples, len(train))))
    if max_eval_samples is not None:
        evaluation = evaluation.select(range(min(max_eval_samples, len(evaluation))))
    if label_fraction < 1.0:
        train = train.select(sample_label_fraction(train["label"], label_fraction, seed))
    return train, evaluation, class_names(train)


__all__ = ["class_names", "load_classification_datasets", "sample_label_fraction"]
