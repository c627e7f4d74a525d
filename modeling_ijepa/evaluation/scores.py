# Copyright 2026 The ijepa-hf Authors. All rights reserved.
# Licensed under the Apache License, Version 2.0.
"""One evaluator for frozen encoders: the linear probe, the attentive probe and k-NN on the same train / test images,
each with its hyper-parameters chosen on a validation split of the training images.

[`frozen_probe_scores`] takes an encoder directory (or hub id, or `random:<preset>`), or an already loaded encoder,
and returns plain numbers, so a study runner can call it as an evaluator for every encoder it trains.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from .attentive import search_attentive_heads, train_attentive_heads
from .features import extract_features, extract_patch_tokens, freeze, load_encoder
from .knn import knn_accuracy
from .linear_grid import head_accuracies, search_linear_heads, train_linear_heads


PROBES = ("linear", "attentive", "knn")


def frozen_probe_scores(
    encoder: str | nn.Module,
    train_dataset,
    eval_dataset,
    image_processor=None,
    probes: Sequence[str] = PROBES,
    seed: int = 0,
    random_init: bool = False,
    layers: int = 1,
    validation_fraction: float = 0.1,
    linear_learning_rates: Sequence[float] = (0.01, 0.03, 0.1, 0.3),
    linear_weight_decays: Sequence[float] = (0.0, 0.001),
    linear_epochs: float = 100.0,
    attentive_learning_rates: Sequence[float] = (0.003, 0.01, 0.03),
    attentive_weight_decays: Sequence[float] = (0.0, 0.01),
    attentive_epochs: float = 20.0,
    attentive_queries: int = 1,
    attentive_batch_size: int = 128,
    knn_k: int = 20,
    knn_temperature: float = 0.07,
    device: torch.device | str | None = None,
) -> dict[str, float]:
    """
    Frozen-evaluation accuracies of one encoder on `train_dataset` / `eval_dataset` (columns `image`, `label`).

    - `linear`: BatchNorm + linear head on the average-pooled features of the last `layers` layers; learning rate and
      weight decay chosen on a seeded, class-balanced `validation_fraction` of the training images, then retrained on
      all of them;
    - `attentive`: the attentive probe ([`AttentiveClassifierHead`], the encoder's number of attention heads) on the
      patch tokens of the last `layers` layers, chosen and retrained the same way;
    - `knn`: weighted `knn_k`-NN on the average-pooled features (no choice to make).

    Args:
        encoder: a checkpoint directory, hub id or `random:<preset>` ([`load_encoder`], which also gives the image
            processor), or a loaded encoder with `image_processor`.
        random_init: with a directory, a fresh network of its architecture seeded by `seed` (the random-init
            baseline of the same encoder).
        probes: which of `("linear", "attentive", "knn")` to run.

    Returns:
        `{probe: accuracy in [0, 1]}` for each probe, plus `<probe>_learning_rate` / `<probe>_weight_decay` for the
        chosen values of the two trained probes.
    """
    unknown = set(probes) - set(PROBES)
    if unknown:
        raise ValueError(f"Unknown probes {sorted(unknown)}: choose among {list(PROBES)}.")
    if isinstance(encoder, str):
        encoder, loaded_processor = load_encoder(encoder, seed=seed, random_init=random_init)
        image_processor = image_processor or loaded_processor
    elif image_processor is None:
        raise ValueError("Pass the image_processor with a loaded encoder (or pass the encoder's directory instead).")
    device = torch.device(device or "cpu")
    freeze(encoder).to(device)
    label_feature = getattr(train_dataset, "features", {}).get("label")
    num_labels = getattr(label_feature, "num_classes", None) or int(max(train_dataset["label"])) + 1
    scores = {}

    def choose_and_test(search, train, features, labels, test_features, test_labels, lrs, wds, **training) -> tuple:
        chosen = search(features, labels, lrs, wds, num_labels, validation_fraction, seed, **training)
        values = [chosen.learning_rate], [chosen.weight_decay]
        final = train(features, labels, *values, num_labels, seed=seed, **training)
        return float(head_accuracies(final, test_features, test_labels)[0][0]), chosen

    if "linear" in probes or "knn" in probes:
        train_features, train_labels = extract_features(
            encoder, train_dataset, image_processor, device=device, pooled_layers=layers
        )
        test_features, test_labels = extract_features(
            encoder, eval_dataset, image_processor, device=device, pooled_layers=layers
        )
        if "linear" in probes:
            accuracy, chosen = choose_and_test(
                search_linear_heads,
                train_linear_heads,
                train_features,
                train_labels,
                test_features,
                test_labels,
                linear_learning_rates,
                linear_weight_decays,
                num_epochs=linear_epochs,
            )
            scores.update(linear=accuracy, linear_learning_rate=chosen.learning_rate)
            scores["linear_weight_decay"] = chosen.weight_decay
        if "knn" in probes:
            scores["knn"] = knn_accuracy(
                train_features, train_labels, test_features, test_labels, knn_k, knn_temperature
            )
    if "attentive" in probes:
        extract = dict(image_processor=image_processor, device=device, layers=layers)
        train_tokens, train_labels = extract_patch_tokens(encoder, train_dataset, **extract)
        test_tokens, test_labels = extract_patch_tokens(encoder, eval_dataset, **extract)
        accuracy, chosen = choose_and_test(
            search_attentive_heads,
            train_attentive_heads,
            train_tokens,
            train_labels,
            test_tokens,
            test_labels,
            attentive_learning_rates,
            attentive_weight_decays,
            num_epochs=attentive_epochs,
            batch_size=attentive_batch_size,
            num_queries=attentive_queries,
            num_attention_heads=encoder.config.num_attention_heads,
        )
        scores.update(attentive=accuracy, attentive_learning_rate=chosen.learning_rate)
        scores["attentive_weight_decay"] = chosen.weight_decay
    return scores


def attentive_probe_scores(encoder: str | nn.Module, train_dataset, eval_dataset, **options) -> dict[str, float]:
    """[`frozen_probe_scores`] with the attentive probe only: `{"attentive": accuracy, ...}`."""
    return frozen_probe_scores(encoder, train_dataset, eval_dataset, probes=("attentive",), **options)


__all__ = ["PROBES", "attentive_probe_scores", "frozen_probe_scores"]
