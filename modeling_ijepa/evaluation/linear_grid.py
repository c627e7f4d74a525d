# Copyright 2026 The ijepa-hf Authors. All rights reserved.
# Licensed under the Apache License, Version 2.0.
"""A learning-rate x weight-decay grid of linear probe heads, trained together on cached features and chosen on a
validation split carved from the training data (never the evaluation split), as papers' frozen evaluations do
(DINOv2's `linear.py` trains its grid of heads the same way: one pass over the data, every head its own optimiser
settings).

- [`validation_split`]: a seeded, class-balanced validation subset of the training examples;
- [`LinearHeadGrid`]: every head of the grid in one module, each with its own parameters (so its own optimiser group);
- [`fit_head_grid`]: AdamW + warm-up / cosine schedule over cached features, all heads of a grid in the same loop
  (linear heads here, attentive ones in `attentive.py`); [`train_linear_heads`]: that loop on a [`LinearHeadGrid`];
- [`search_head_grid`]: train a grid on the training part, score every head on the validation part, choose
  ([`search_linear_heads`] for linear heads).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import nn

from .heads import LinearClassifierHead


def validation_split(labels: Sequence[int] | torch.Tensor, fraction: float, seed: int = 0) -> tuple[np.ndarray, ...]:
    """
    Carve a seeded, class-balanced validation subset out of training examples.

    Each class `c` with `n_c >= 2` examples gives `round(fraction * n_c)` of them to validation, at least one and at
    most `n_c - 1` (so every class keeps a training example); a class with one example stays in training.

    Args:
        labels: `(num_examples,)` integer class of every training example.
        fraction: in `(0, 1)`.
        seed: the same seed always gives the same split.

    Returns:
        `(train_indices, validation_indices)`, sorted int64 arrays that partition `range(num_examples)`.
    """
    if not 0.0 < fraction < 1.0:
        raise ValueError(f"The validation fraction must be in (0, 1), got {fraction}.")
    labels = np.asarray(labels.cpu() if isinstance(labels, torch.Tensor) else labels)
    generator = np.random.default_rng(seed)
    validation = []
    for label in np.unique(labels):
        members = np.flatnonzero(labels == label)
        if len(members) < 2:
            continue
        count = min(len(members) - 1, max(1, int(round(fraction * len(members)))))
        validation.append(generator.choice(members, size=count, replace=False))
    if not validation:
        raise ValueError(
            "No validation examples can be carved from the training data: every class has a single example. Use more "
            "labels (a larger --label_fraction) or train one head with fixed --learning_rate / --weight_decay."
        )
    validation = np.sort(np.concatenate(validation)).astype(np.int64)
    train = np.setdiff1d(np.arange(len(labels)), validation).astype(np.int64)
    return train, validation


class LinearHeadGrid(nn.Module):
    """
    `num_heads` linear probe heads on the same features, each with its own weight and bias parameters, so that each
    can have its own optimiser group (learning rate, weight decay) while all train in one loop.

    Every head starts from the same weights (trunc-normal std 0.01 drawn under `seed`, zero bias), the initialisation
    of [`LinearClassifierHead`]: heads differ only by their optimiser settings. The optional non-affine BatchNorm has
    no parameters and only standardises the features, so one instance serves every head.

    `forward(features (batch, hidden_size))` returns logits `(batch, num_heads, num_labels)`.
    """

    def __init__(self, hidden_size: int, num_labels: int, num_heads: int, batch_norm: bool = True, seed: int = 0):
        super().__init__()
        if num_heads < 1:
            raise ValueError(f"A head grid needs at least one head, got num_heads={num_heads}.")
        # As in LinearClassifierHead: momentum=None makes the running statistics the plain average over all batches.
        self.norm = nn.BatchNorm1d(hidden_size, affine=False, eps=1e-6, momentum=None) if batch_norm else nn.Identity()
        generator = torch.Generator().manual_seed(seed)
        weight = torch.empty(num_labels, hidden_size)
        nn.init.trunc_normal_(weight, std=0.01, generator=generator)
        self.weights = nn.ParameterList(nn.Parameter(weight.clone()) for _ in range(num_heads))
        self.biases = nn.ParameterList(nn.Parameter(torch.zeros(num_labels)) for _ in range(num_heads))

    @property
    def num_heads(self) -> int:
        return len(self.weights)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        normalized = self.norm(features)
        weight, bias = torch.stack(list(self.weights)), torch.stack(list(self.biases))  # (heads, labels, hidden)
        return torch.einsum("bd,hcd->bhc", normalized, weight) + bias

    def losses(self, features: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """Cross-entropy of every head, `(num_heads,)`, each averaged over the batch."""
        logits = self(features)  # (batch, heads, labels)
        targets = labels[:, None].expand(-1, logits.size(1))
        return nn.functional.cross_entropy(logits.transpose(1, 2), targets, reduction="none").mean(dim=0)

    def parameter_groups(self, learning_rates: Sequence[float], weight_decays: Sequence[float]) -> list[dict]:
        """One AdamW group per head for its weight (`weight_decays[i]`) and one for its bias (no weight decay)."""
        if len(learning_rates) != self.num_heads or len(weight_decays) != self.num_heads:
            raise ValueError(
                f"Give one learning rate and one weight decay per head ({self.num_heads}), got "
                f"{len(learning_rates)} and {len(weight_decays)}."
            )
        groups = []
        for weight, bias, lr, decay in zip(self.weights, self.biases, learning_rates, weight_decays):
            groups.append({"params": [weight], "lr": lr, "weight_decay": decay})
            groups.append({"params": [bias], "lr": lr, "weight_decay": 0.0})
        return groups

    @torch.no_grad()
    def head(self, index: int) -> LinearClassifierHead:
        """Head `index` as a stand-alone [`LinearClassifierHead`] (same normalisation statistics and weights)."""
        hidden_size, num_labels = self.weights[index].shape[1], self.weights[index].shape[0]
        head = LinearClassifierHead(hidden_size, num_labels, batch_norm=isinstance(self.norm, nn.BatchNorm1d))
        head.norm.load_state_dict(self.norm.state_dict())
        head.classifier.weight.copy_(self.weights[index])
        head.classifier.bias.copy_(self.biases[index])
        return head.to(self.weights[index].device).train(self.training)


def epoch_batches(order: torch.Tensor, batch_size: int) -> list[torch.Tensor]:
    """
    `order` `(num_examples,)` cut into batches of `batch_size`; a trailing batch of one example joins the one before
    it (BatchNorm cannot standardise a single example).
    """
    batches = list(order.split(batch_size))
    if len(batches) > 1 and len(batches[-1]) == 1:
        batches[-2:] = [torch.cat(batches[-2:])]
    return batches


def fit_head_grid(
    grid: nn.Module,
    inputs: torch.Tensor,
    labels: torch.Tensor,
    learning_rates: Sequence[float],
    weight_decays: Sequence[float],
    num_epochs: float = 100.0,
    batch_size: int = 256,
    warmup_steps: float = 0.05,
    lr_scheduler_type: str = "cosine",
    seed: int = 0,
) -> nn.Module:
    """
    Train every head of `grid` (a [`LinearHeadGrid`], an `AttentiveHeadGrid`, or any module with
    `parameter_groups(learning_rates, weight_decays)` and `losses(inputs, labels) -> (num_heads,)`) in one loop.

    Every step draws one mini-batch ([`epoch_batches`] of a seeded shuffle per epoch, the same for every head) and
    steps AdamW on the sum of the heads' losses: heads share no parameter, so each gets exactly the gradient of its own
    loss and its own group's learning rate and weight decay, and ends as it would if trained alone (see the tests). The
    learning rate follows `transformers.get_scheduler(lr_scheduler_type)` with `warmup_steps` (a float < 1 is a
    fraction of the steps); gradients are not clipped (clipping their joint norm would couple the heads).

    Args:
        grid: the heads, already on the device of `inputs`.
        inputs: `(num_examples, ...)` cached features (pooled `(num_examples, hidden_size)` or patch tokens
            `(num_examples, num_patches, hidden_size)`); labels: `(num_examples,)` class indices, same device.

    Returns:
        `grid`, trained, in eval mode.
    """
    from transformers import get_scheduler

    optimizer = torch.optim.AdamW(grid.parameter_groups(learning_rates, weight_decays))
    steps_per_epoch = len(epoch_batches(torch.arange(len(inputs)), batch_size))
    total_steps = max(1, math.ceil(num_epochs * steps_per_epoch))
    warmup = int(warmup_steps) if warmup_steps >= 1 else math.ceil(warmup_steps * total_steps)
    scheduler = get_scheduler(lr_scheduler_type, optimizer, num_warmup_steps=warmup, num_training_steps=total_steps)
    generator = torch.Generator().manual_seed(seed)
    grid.train()
    step = 0
    while step < total_steps:
        for batch in epoch_batches(torch.randperm(len(inputs), generator=generator).to(inputs.device), batch_size):
            grid.losses(inputs[batch], labels[batch]).sum().backward()
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            step += 1
            if step == total_steps:
                break
    return grid.eval()


def train_linear_heads(
    features: torch.Tensor,
    labels: torch.Tensor,
    learning_rates: Sequence[float],
    weight_decays: Sequence[float],
    num_labels: int,
    num_epochs: float = 100.0,
    batch_size: int = 256,
    warmup_steps: float = 0.05,
    lr_scheduler_type: str = "cosine",
    batch_norm: bool = True,
    seed: int = 0,
    device: torch.device | str | None = None,
) -> LinearHeadGrid:
    """
    Train one linear head per `(learning_rates[i], weight_decays[i])` on cached `features`, all in the same loop
    ([`fit_head_grid`]: AdamW, the schedule of `transformers.get_scheduler(lr_scheduler_type)` with `warmup_steps`,
    like the Trainer-based single-head probe, but without gradient clipping).

    Args:
        features: `(num_examples, hidden_size)`; labels: `(num_examples,)` class indices.
        learning_rates / weight_decays: one value per head, the same length.
        num_labels: number of classes.

    Returns:
        The trained [`LinearHeadGrid`] in eval mode, on `device` (default: the device of `features`).
    """
    device = torch.device(device or features.device)
    features, labels = features.to(device, torch.float32), labels.to(device).long()
    grid = LinearHeadGrid(features.size(1), num_labels, len(learning_rates), batch_norm, seed).to(device)
    training = dict(num_epochs=num_epochs, batch_size=batch_size, warmup_steps=warmup_steps, seed=seed)
    return fit_head_grid(
        grid, features, labels, learning_rates, weight_decays, lr_scheduler_type=lr_scheduler_type, **training
    )


@torch.no_grad()
def head_accuracies(
    grid: nn.Module, features: torch.Tensor, labels: torch.Tensor, chunk_size: int = 1024
) -> tuple[torch.Tensor, ...]:
    """
    Accuracy in [0, 1] and mean cross-entropy of every head of `grid` (logits `(batch, num_heads, num_labels)`) on
    `features` `(num_examples, ...)`, each `(num_heads,)`; evaluated in eval mode, `chunk_size` examples at a time.
    """
    device = next(grid.parameters()).device
    was_training = grid.training
    grid.eval()
    correct, losses = [], []
    for chunk, chunk_labels in zip(features.split(chunk_size), labels.split(chunk_size)):
        chunk, chunk_labels = chunk.to(device, torch.float32), chunk_labels.to(device).long()
        logits = grid(chunk)  # (examples, heads, labels)
        correct.append((logits.argmax(dim=-1) == chunk_labels[:, None]).float())
        targets = chunk_labels[:, None].expand(-1, logits.size(1))
        losses.append(nn.functional.cross_entropy(logits.transpose(1, 2), targets, reduction="none"))
    grid.train(was_training)
    return torch.cat(correct).mean(dim=0).cpu(), torch.cat(losses).mean(dim=0).cpu()


@dataclass
class HeadSearchResult:
    """What [`search_linear_heads`] chose, and how every point of the grid did on the validation split."""

    learning_rate: float
    weight_decay: float
    validation_accuracy: float
    grid: list[dict] = field(default_factory=list)
    train_indices: np.ndarray | None = None
    validation_indices: np.ndarray | None = None

    def to_dict(self) -> dict:
        """JSON-ready: the chosen values, the validation size and the per-point validation scores."""
        return {
            "chosen_learning_rate": self.learning_rate,
            "chosen_weight_decay": self.weight_decay,
            "validation_accuracy": self.validation_accuracy,
            "num_grid_train_samples": len(self.train_indices),
            "num_validation_samples": len(self.validation_indices),
            "grid": self.grid,
        }


def search_head_grid(
    train_heads: Callable[..., nn.Module],
    features: torch.Tensor,
    labels: torch.Tensor,
    learning_rates: Sequence[float],
    weight_decays: Sequence[float],
    validation_fraction: float = 0.1,
    seed: int = 0,
) -> HeadSearchResult:
    """
    Choose a head's learning rate and weight decay on the training data alone, for any kind of head.

    A [`validation_split`] of `validation_fraction` of the training examples (seeded by `seed`, class-balanced) is
    held out; `train_heads(features, labels, learning_rates, weight_decays, seed=seed)` trains one head per point of
    the `learning_rates x weight_decays` grid on the rest and returns the grid of heads; the head with the best
    validation accuracy ([`head_accuracies`]) wins, ties going to the lower validation loss, then to the earlier grid
    point. Only training features enter: the evaluation split plays no part in the choice.

    Args:
        train_heads: e.g. [`train_linear_heads`] or `train_attentive_heads` with their other settings bound.
        features: `(num_train, ...)` training features; labels: `(num_train,)`.
        learning_rates / weight_decays: the values of each axis of the grid (every pair is trained).

    Returns:
        [`HeadSearchResult`]: the chosen values, their validation accuracy, the validation score of every grid point
        and the indices (into `features`) of the two parts.
    """
    if not learning_rates or not weight_decays:
        raise ValueError("The grid needs at least one learning rate and one weight decay.")
    if any(lr <= 0 for lr in learning_rates) or any(decay < 0 for decay in weight_decays):
        raise ValueError(
            f"Grid learning rates must be positive and weight decays non-negative, got {list(learning_rates)} and "
            f"{list(weight_decays)}."
        )
    points = [(float(lr), float(decay)) for lr in learning_rates for decay in weight_decays]
    train_indices, validation_indices = validation_split(labels, validation_fraction, seed)
    train_part, validation_part = torch.from_numpy(train_indices), torch.from_numpy(validation_indices)
    grid = train_heads(
        features[train_part], labels[train_part], [lr for lr, _ in points], [decay for _, decay in points], seed=seed
    )
    accuracy, loss = head_accuracies(grid, features[validation_part], labels[validation_part])
    best = min(range(len(points)), key=lambda index: (-float(accuracy[index]), float(loss[index]), index))
    scores = [
        {
            "learning_rate": lr,
            "weight_decay": decay,
            "validation_accuracy": float(accuracy[index]),
            "validation_loss": float(loss[index]),
        }
        for index, (lr, decay) in enumerate(points)
    ]
    return HeadSearchResult(
        learning_rate=points[best][0],
        weight_decay=points[best][1],
        validation_accuracy=float(accuracy[best]),
        grid=scores,
        train_indices=train_indices,
        validation_indices=validation_indices,
    )


def search_linear_heads(
    features: torch.Tensor,
    labels: torch.Tensor,
    learning_rates: Sequence[float],
    weight_decays: Sequence[float],
    num_labels: int,
    validation_fraction: float = 0.1,
    seed: int = 0,
    **training,
) -> HeadSearchResult:
    """
    [`search_head_grid`] over linear heads: [`train_linear_heads`] with `num_labels` and `training` (epochs, batch
    size, schedule, batch norm, device) trains the grid. `features` `(num_train, hidden_size)`, `labels`
    `(num_train,)`.
    """

    def train_heads(*args, seed: int) -> LinearHeadGrid:
        return train_linear_heads(*args, num_labels, seed=seed, **training)

    return search_head_grid(train_heads, features, labels, learning_rates, weight_decays, validation_fraction, seed)


__all__ = [
    "HeadSearchResult",
    "LinearHeadGrid",
    "epoch_batches",
    "fit_head_grid",
    "head_accuracies",
    "search_head_grid",
    "search_linear_heads",
    "train_linear_heads",
    "validation_split",
]
