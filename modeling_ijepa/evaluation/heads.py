# Copyright 2026 The ijepa-hf Authors. All rights reserved.
# Licensed under the Apache License, Version 2.0.
"""Classification heads on average-pooled encoder features: the linear-probe head, a frozen encoder feeding a head,
and the standardised head fine-tuning trains (folded back into a plain `nn.Linear` for saving)."""

from __future__ import annotations

import torch
from torch import nn

from .features import check_pooled_layers, encode_pooled, freeze


class StandardizedLinear(nn.Module):
    """
    `linear((features - mean) / std)` with fixed statistics: a fine-tuning head that sees unit-scale features.

    I-JEPA's average-pooled features share a large common component and vary little between images (on the digits,
    a std of ~0.01 around a mean of ~0.8), so a plain linear head barely learns at fine-tuning learning rates. The
    statistics are fixed (not running), so [`fold`] turns the head back into one exact `nn.Linear`, keeping saved
    classifiers in the vanilla `IJepaForImageClassification` layout.
    """

    def __init__(self, linear: nn.Linear, mean: torch.Tensor, std: torch.Tensor, eps: float = 1e-6):
        super().__init__()
        self.linear = linear
        self.register_buffer("mean", mean.detach().clone().float())
        self.register_buffer("scale", 1.0 / (std.detach().float() + eps))

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        """`features` `(batch, hidden_size)` -> logits `(batch, num_labels)`."""
        return self.linear((features - self.mean.to(features.dtype)) * self.scale.to(features.dtype))

    @torch.no_grad()
    def fold(self) -> nn.Linear:
        """The equivalent plain `nn.Linear`: `W' = W * scale`, `b' = b - W' @ mean`."""
        weight = self.linear.weight * self.scale
        folded = nn.Linear(weight.shape[1], weight.shape[0]).to(weight.device, self.linear.weight.dtype)
        folded.weight.copy_(weight)
        folded.bias.copy_(self.linear.bias - weight @ self.mean)
        return folded


class LinearClassifierHead(nn.Module):
    """
    Linear probe head: an optional non-affine `BatchNorm1d` on the features (MAE's probe; it only standardises the
    frozen features, so the head stays linear) followed by `nn.Linear(hidden_size, num_labels)`.

    `forward(features (batch, hidden_size), labels (batch,) optional)` returns
    `{"loss", "logits" (batch, num_labels)}`.
    """

    def __init__(self, hidden_size: int, num_labels: int, batch_norm: bool = True):
        super().__init__()
        # momentum=None: running statistics are the plain average over all training batches, exact after a few
        # steps, whereas an exponential average lags far behind pooled features whose mean is large against their
        # spread.
        self.norm = nn.BatchNorm1d(hidden_size, affine=False, eps=1e-6, momentum=None) if batch_norm else nn.Identity()
        self.classifier = nn.Linear(hidden_size, num_labels)
        nn.init.trunc_normal_(self.classifier.weight, std=0.01)
        nn.init.zeros_(self.classifier.bias)

    def forward(self, features: torch.Tensor, labels: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        logits = self.classifier(self.norm(features))
        output = {"logits": logits}
        if labels is not None:
            output["loss"] = nn.functional.cross_entropy(logits, labels)
        return output


class FrozenEncoderClassifier(nn.Module):
    """
    A frozen encoder (always in eval mode, no gradients) feeding a trainable head on its average-pooled features (of
    the last `pooled_layers` layers, concatenated: see [`encode_pooled`]), for probing without cached features (e.g.
    with augmentation).

    `forward(pixel_values (batch, 3, height, width), labels (batch,) optional)` returns the head's output.
    """

    def __init__(self, encoder: nn.Module, head: nn.Module, pooled_layers: int = 1):
        super().__init__()
        check_pooled_layers(pooled_layers, encoder.config.num_hidden_layers)
        self.encoder = freeze(encoder)
        self.head = head
        self.pooled_layers = pooled_layers

    def train(self, mode: bool = True) -> FrozenEncoderClassifier:
        super().train(mode)
        self.encoder.eval()
        return self

    def forward(self, pixel_values: torch.Tensor, labels: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        with torch.no_grad():
            features = encode_pooled(self.encoder, pixel_values, self.pooled_layers)
        return self.head(features, labels)


__all__ = ["FrozenEncoderClassifier", "LinearClassifierHead", "StandardizedLinear"]
