# Copyright 2026 The ijepa-hf Authors. All rights reserved.
# Licensed under the Apache License, Version 2.0.
"""k-nearest-neighbour classification of frozen features by cosine similarity (weighted or majority vote)."""

from __future__ import annotations

import torch
from torch import nn


@torch.no_grad()
def knn_predict(
    train_features: torch.Tensor,
    train_labels: torch.Tensor,
    test_features: torch.Tensor,
    k: int = 20,
    temperature: float | None = 0.07,
    num_classes: int | None = None,
    chunk_size: int = 1024,
) -> torch.Tensor:
    """
    k-nearest-neighbour classification by cosine similarity.

    Each test point takes its `k` most similar training points. With a `temperature`, neighbour `i` votes with weight
    `exp(similarity_i / temperature)` (the weighted k-NN of Wu et al. 2018 / DINO); with `temperature=None`, every
    neighbour has one vote (plain majority). Ties go to the lowest class index.

    Args:
        train_features: `(num_train, dim)`; train_labels: `(num_train,)` class indices.
        test_features: `(num_test, dim)`.
        num_classes: defaults to `train_labels.max() + 1`.

    Returns:
        `(num_test,)` predicted class indices.
    """
    if k < 1:
        raise ValueError(f"k must be at least 1, got {k}.")
    if temperature is not None and temperature <= 0:
        raise ValueError(f"The k-NN temperature must be positive (or None for majority voting), got {temperature}.")
    train_labels = train_labels.long()
    num_classes = int(num_classes or int(train_labels.max()) + 1)
    k = min(k, train_features.size(0))
    train_features = nn.functional.normalize(train_features.float(), dim=1)
    predictions = []
    for test_chunk in nn.functional.normalize(test_features.float(), dim=1).split(chunk_size):
        similarity, neighbours = (test_chunk @ train_features.T).topk(k, dim=1)  # (chunk, k)
        weights = torch.ones_like(similarity) if temperature is None else (similarity / temperature).exp()
        votes = torch.zeros(test_chunk.size(0), num_classes).scatter_add_(1, train_labels[neighbours], weights)
        predictions.append(votes.argmax(dim=1))
    return torch.cat(predictions)


def knn_accuracy(
    train_features: torch.Tensor,
    train_labels: torch.Tensor,
    test_features: torch.Tensor,
    test_labels: torch.Tensor,
    k: int = 20,
    temperature: float | None = 0.07,
) -> float:
    """
    Accuracy in [0, 1] of [`knn_predict`] on `test_features` `(num_test, dim)` against `test_labels` `(num_test,)`.
    """
    num_classes = int(max(int(train_labels.max()), int(test_labels.max()))) + 1
    predictions = knn_predict(train_features, train_labels, test_features, k, temperature, num_classes)
    return float((predictions == test_labels.long()).float().mean())


__all__ = ["knn_accuracy", "knn_predict"]
