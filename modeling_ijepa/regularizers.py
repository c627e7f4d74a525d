# Copyright 2026 The ijepa-hf Authors. All rights reserved.
# Licensed under the Apache License, Version 2.0.
"""Anti-collapse regularisers of pre-training features, off by default, and their registry `LOSS_TERMS`.

Pure functions of `(num_samples, dim)` features, returning a scalar loss: VICReg's variance and covariance terms and
LeJEPA's SIGReg. Each is one [`LossTerm`] of `LOSS_TERMS` (its name, the configuration field of its weight, and the
function), from which the rest is derived: `IJepaConfig` gets one weight field per term (default 0: off, through
[`LossWeightFields`]), `IJepaForPreTraining` adds the terms whose weight is above 0, weighted, to the prediction loss
and returns each unweighted in `loss_terms`, and the trainer logs them under their names. Adding a term is one entry
of `LOSS_TERMS` plus its function.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field, make_dataclass

import torch
import torch.nn.functional as F


def _check_samples(name: str, features: torch.Tensor) -> None:
    if features.dim() != 2 or features.size(0) < 2:
        raise ValueError(
            f"{name} needs features of shape (num_samples >= 2, dim), got {tuple(features.shape)}: with "
            "regularized_features='pooled_context' every image is one sample, so use a batch of at least 2 images."
        )


def vicreg_variance_loss(features: torch.Tensor, epsilon: float = 1e-4) -> torch.Tensor:
    """
    VICReg's variance term: `mean_d relu(1 - sqrt(var_d + epsilon))` over the dimensions of `(num_samples, dim)`
    features (variance over samples); 0 once every dimension has a standard deviation of at least 1.
    """
    _check_samples("vicreg_variance_loss", features)
    std = torch.sqrt(features.float().var(dim=0) + epsilon)
    return F.relu(1.0 - std).mean()


def vicreg_covariance_loss(features: torch.Tensor) -> torch.Tensor:
    """
    VICReg's covariance term: the squared off-diagonal entries of the covariance matrix of `(num_samples, dim)`
    features, summed and divided by `dim`; 0 when the dimensions are decorrelated.
    """
    _check_samples("vicreg_covariance_loss", features)
    features = features.float()
    centred = features - features.mean(dim=0)
    covariance = centred.T @ centred / (features.size(0) - 1)
    off_diagonal = covariance - torch.diag_embed(torch.diagonal(covariance))
    return off_diagonal.square().sum() / features.size(1)


def sigreg_loss(
    features: torch.Tensor, num_projections: int = 256, num_knots: int = 17, max_frequency: float = 3.0
) -> torch.Tensor:
    """
    SIGReg of LeJEPA (Balestriero & LeCun, 2025): the features should be isotropic Gaussian, N(0, I). Each of
    `num_projections` random unit directions (drawn from torch's global generator at every call) projects the
    `(num_samples, dim)` features to 1-D, and the Epps-Pulley statistic compares the empirical characteristic function
    of the projections with that of N(0, 1):

        num_samples * integral over t of |mean_n exp(i t x_n) - exp(-t^2 / 2)|^2 exp(-t^2 / 2) dt,

    integrated with the trapezoid rule on `num_knots` points of `[0, max_frequency]` (the integrand is even in t).
    Returns the mean statistic over directions (0 for Gaussian features, up to sampling noise).
    """
    _check_samples("sigreg_loss", features)
    features = features.float()
    directions = torch.randn(features.size(1), num_projections, device=features.device)
    directions = directions / directions.norm(dim=0, keepdim=True)
    frequencies = torch.linspace(0.0, max_frequency, num_knots, device=features.device)
    gaussian = torch.exp(-0.5 * frequencies.square())  # characteristic function of N(0, 1), also the weight window
    step = max_frequency / (num_knots - 1)
    quadrature = torch.full((num_knots,), 2.0 * step, device=features.device)  # doubled: the integral over t < 0
    quadrature[[0, -1]] = step
    angles = (features @ directions).unsqueeze(-1) * frequencies  # (num_samples, num_projections, num_knots)
    error = (angles.cos().mean(dim=0) - gaussian).square() + angles.sin().mean(dim=0).square()
    statistic = (error @ (quadrature * gaussian)) * features.size(0)  # (num_projections,)
    return statistic.mean()


@dataclass(frozen=True)
class LossTerm:
    """
    One regulariser of the pre-training loss.

    Args:
        name: the key of the unweighted term in the model output's `loss_terms` and in the training logs.
        weight_field: the `IJepaConfig` field of its weight (default 0, which turns the term off).
        function: `function(features, config) -> scalar`, on the `(num_samples, dim)` features that
            `config.regularized_features` chooses.
        help: one sentence for the configuration's documentation.
    """

    name: str
    weight_field: str
    function: Callable[[torch.Tensor, object], torch.Tensor]
    help: str


LOSS_TERMS: tuple[LossTerm, ...] = (
    LossTerm(
        "vicreg_variance_loss",
        "vicreg_variance_weight",
        lambda features, config: vicreg_variance_loss(features),
        "Weight of the VICReg variance term (hinge on the per-dimension std, mean(relu(1 - std))); 0 turns it off.",
    ),
    LossTerm(
        "vicreg_covariance_loss",
        "vicreg_covariance_weight",
        lambda features, config: vicreg_covariance_loss(features),
        "Weight of the VICReg covariance term (squared off-diagonal covariances / width); 0 turns it off.",
    ),
    LossTerm(
        "sigreg_loss",
        "sigreg_weight",
        lambda features, config: sigreg_loss(features, config.sigreg_num_projections),
        "Weight of SIGReg (LeJEPA: Epps-Pulley statistic of sigreg_num_projections random 1-D projections against "
        "N(0, 1)); 0 turns it off.",
    ),
)

# The name of the prediction (smooth-L1) term in `loss_terms`, next to the regularisers' names.
PREDICTION_LOSS = "prediction_loss"

# One weight field per loss term (default 0.0), for `IJepaConfig` to inherit.
LossWeightFields = make_dataclass(
    "LossWeightFields",
    [(term.weight_field, float, field(default=0.0, metadata={"help": term.help})) for term in LOSS_TERMS],
    kw_only=True,
)
LossWeightFields.__doc__ = "The weights of the loss terms of `LOSS_TERMS`, as plain dataclass fields."


__all__ = [
    "LOSS_TERMS",
    "LossTerm",
    "LossWeightFields",
    "PREDICTION_LOSS",
    "sigreg_loss",
    "vicreg_covariance_loss",
    "vicreg_variance_loss",
]
