# Copyright 2026 The ijepa-hf Authors. All rights reserved.
# Licensed under the Apache License, Version 2.0.
"""The attentive probe: frozen evaluation on every patch token instead of their average, as the later JEPA papers
(V-JEPA, V-JEPA 2) evaluate their encoders.

A few learned query tokens attend over the frozen encoder's patch tokens (of the last layer, or of the last `k`
layers concatenated per token) in one cross-attention block (LayerNorm on the tokens, multi-head cross-attention,
residual, LayerNorm + MLP, residual), and a linear classifier reads the mean of the query outputs. Average pooling
is the special case of uniform attention weights, so the probe can only find more in the features; what it finds
beyond the linear probe is information that lives in *where* things are (counting, local detail).

- [`AttentivePooler`]: the cross-attention block, `(batch, num_patches, dim)` -> `(batch, num_queries, dim)`;
- [`AttentiveClassifierHead`]: the pooler and the linear classifier, the probe's head;
- [`AttentiveHeadGrid`] / [`train_attentive_heads`] / [`search_attentive_heads`]: a learning-rate x weight-decay grid
  of heads trained together on cached patch tokens and chosen on a validation split of the training data, with the
  loop and the search of the linear grid (`linear_grid.fit_head_grid`, `linear_grid.search_head_grid`).
"""

from __future__ import annotations

import copy
import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn
from transformers.utils import ModelOutput

from ..optimization import uses_weight_decay
from .linear_grid import HeadSearchResult, fit_head_grid, search_head_grid


class AttentivePooler(nn.Module):
    """
    `num_queries` learned query tokens attend over a sequence of tokens in one cross-attention block:
    `queries + attention(queries, LayerNorm(tokens))`, then `+ MLP(LayerNorm(.))`. The queries themselves are not
    normalised (they are parameters, not features).

    The attention weights live in an `nn.MultiheadAttention` (so `self.attention(queries, keys, keys)` computes the
    same thing), but the forward pass never projects the tokens: because the queries do not depend on the input,
    `q_h . (W_k x + b_k)` is `(W_k^T q_h) . x` up to a constant per head (which the softmax drops), and the weighted
    sum of `W_v x + b_v` is `W_v` of the weighted sum of `x`, plus `b_v`. That costs `O(tokens x dim)` per query and
    head instead of `O(tokens x dim^2)`, which is what makes a grid of attentive heads cheap to train on CPU.

    Args:
        hidden_size: `dim`, the size of each token (`k * encoder hidden size` for the last `k` layers).
        num_queries: learned query tokens.
        num_attention_heads: must divide `hidden_size`.
        mlp_ratio: the MLP's hidden size over `hidden_size`.
    """

    def __init__(
        self,
        hidden_size: int,
        num_queries: int = 1,
        num_attention_heads: int = 4,
        mlp_ratio: float = 4.0,
        layer_norm_eps: float = 1e-6,
    ):
        super().__init__()
        if num_queries < 1:
            raise ValueError(f"The attentive pooler needs at least one query token, got num_queries={num_queries}.")
        if num_attention_heads < 1 or hidden_size % num_attention_heads:
            raise ValueError(
                f"num_attention_heads ({num_attention_heads}) must be a positive divisor of the token size "
                f"({hidden_size}); e.g. the encoder's own number of attention heads."
            )
        self.num_attention_heads = num_attention_heads
        self.query_tokens = nn.Parameter(torch.zeros(1, num_queries, hidden_size))
        self.token_norm = nn.LayerNorm(hidden_size, eps=layer_norm_eps)
        self.attention = nn.MultiheadAttention(hidden_size, num_attention_heads, batch_first=True)
        self.mlp_norm = nn.LayerNorm(hidden_size, eps=layer_norm_eps)
        mlp_hidden_size = int(hidden_size * mlp_ratio)
        self.mlp = nn.Sequential(
            nn.Linear(hidden_size, mlp_hidden_size), nn.GELU(), nn.Linear(mlp_hidden_size, hidden_size)
        )
        nn.init.trunc_normal_(self.query_tokens, std=0.02)
        for linear in (self.mlp[0], self.mlp[2]):
            nn.init.trunc_normal_(linear.weight, std=0.02)
            nn.init.zeros_(linear.bias)

    def cross_attention(self, keys: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """
        `self.attention(queries, keys, keys)` without projecting the keys (see the class docstring).

        Args:
            keys: `(batch_size, num_tokens, hidden_size)`, already normalised.

        Returns:
            `attended` `(batch_size, num_queries, hidden_size)` (after the output projection) and the attention
            weights `(batch_size, num_attention_heads, num_queries, num_tokens)`.
        """
        heads, hidden_size = self.num_attention_heads, keys.size(-1)
        head_size = hidden_size // heads
        query_weight, key_weight, value_weight = self.attention.in_proj_weight.chunk(3)
        query_bias, _, value_bias = self.attention.in_proj_bias.chunk(3)
        queries = (self.query_tokens[0] @ query_weight.T + query_bias).view(-1, heads, head_size)  # (Q, H, d)
        # Each head's query mapped back into token space: (H, Q, hidden).
        token_queries = torch.einsum("qhd,hdc->hqc", queries, key_weight.view(heads, head_size, hidden_size))
        logits = torch.einsum("btc,hqc->bhqt", keys, token_queries) / math.sqrt(head_size)
        weights = logits.softmax(dim=-1)
        mixed = torch.einsum("bhqt,btc->bhqc", weights, keys)  # per head, the attention-weighted mean token
        values = torch.einsum("bhqc,hdc->bqhd", mixed, value_weight.view(heads, head_size, hidden_size))
        values = values + value_bias.view(heads, head_size)
        return self.attention.out_proj(values.flatten(2)), weights

    def forward(self, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """
        Args:
            tokens: `(batch_size, num_tokens, hidden_size)`, e.g. an encoder's patch tokens.

        Returns:
            `pooled` `(batch_size, num_queries, hidden_size)` and the attention weights
            `(batch_size, num_attention_heads, num_queries, num_tokens)`.
        """
        if tokens.ndim != 3 or tokens.size(-1) != self.query_tokens.size(-1):
            raise ValueError(
                f"The attentive pooler takes tokens (batch_size, num_tokens, {self.query_tokens.size(-1)}), got a "
                f"tensor of shape {tuple(tokens.shape)}: pass patch tokens (extract_patch_tokens), not pooled "
                "features."
            )
        attended, weights = self.cross_attention(self.token_norm(tokens))
        pooled = self.query_tokens + attended
        pooled = pooled + self.mlp(self.mlp_norm(pooled))
        return pooled, weights


@dataclass
class AttentiveClassifierOutput(ModelOutput):
    """
    Output of [`AttentiveClassifierHead`].

    Args:
        loss: `()` cross-entropy, when labels are given.
        logits: `(batch_size, num_labels)`.
        pooled_output: `(batch_size, num_queries, hidden_size)`, the query tokens after the cross-attention block.
        attentions: `(batch_size, num_attention_heads, num_queries, num_tokens)`, where each query looked.
    """

    loss: torch.FloatTensor | None = None
    logits: torch.FloatTensor | None = None
    pooled_output: torch.FloatTensor | None = None
    attentions: torch.FloatTensor | None = None


class AttentiveClassifierHead(nn.Module):
    """
    The attentive probe's head: an [`AttentivePooler`] over the patch tokens, then `nn.Linear(hidden_size,
    num_labels)` on the mean of its query outputs (trunc-normal std 0.02 weights, zero bias).

    `forward(tokens (batch, num_tokens, hidden_size), labels (batch,) optional)` returns an
    [`AttentiveClassifierOutput`].
    """

    def __init__(
        self,
        hidden_size: int,
        num_labels: int,
        num_queries: int = 1,
        num_attention_heads: int = 4,
        mlp_ratio: float = 4.0,
    ):
        super().__init__()
        self.pooler = AttentivePooler(hidden_size, num_queries, num_attention_heads, mlp_ratio)
        self.classifier = nn.Linear(hidden_size, num_labels)
        nn.init.trunc_normal_(self.classifier.weight, std=0.02)
        nn.init.zeros_(self.classifier.bias)

    def forward(self, tokens: torch.Tensor, labels: torch.Tensor | None = None) -> AttentiveClassifierOutput:
        pooled, attentions = self.pooler(tokens)
        logits = self.classifier(pooled.mean(dim=1))
        loss = None if labels is None else nn.functional.cross_entropy(logits, labels)
        return AttentiveClassifierOutput(loss=loss, logits=logits, pooled_output=pooled, attentions=attentions)


class AttentiveHeadGrid(nn.Module):
    """
    `num_heads` [`AttentiveClassifierHead`]s on the same tokens, each with its own parameters and so its own
    optimiser groups; all start from the same weights, drawn under `seed` (the global random state is left as it
    was), so they differ only by their optimiser settings.

    `forward(tokens (batch, num_tokens, hidden_size))` returns logits `(batch, num_heads, num_labels)`.
    """

    def __init__(self, num_heads: int, seed: int = 0, **head_settings):
        super().__init__()
        if num_heads < 1:
            raise ValueError(f"A head grid needs at least one head, got num_heads={num_heads}.")
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            first = AttentiveClassifierHead(**head_settings)
        self.heads = nn.ModuleList([first] + [copy.deepcopy(first) for _ in range(num_heads - 1)])

    @property
    def num_heads(self) -> int:
        return len(self.heads)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return torch.stack([head(tokens).logits for head in self.heads], dim=1)

    def losses(self, tokens: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """Cross-entropy of every head, `(num_heads,)`, each averaged over the batch."""
        return torch.stack([head(tokens, labels).loss for head in self.heads])

    def parameter_groups(self, learning_rates: Sequence[float], weight_decays: Sequence[float]) -> list[dict]:
        """Per head, one AdamW group with `weight_decays[i]` (matrices, query tokens) and one without (biases,
        norms): the package's one no-weight-decay rule, `optimization.uses_weight_decay`."""
        if len(learning_rates) != self.num_heads or len(weight_decays) != self.num_heads:
            raise ValueError(
                f"Give one learning rate and one weight decay per head ({self.num_heads}), got "
                f"{len(learning_rates)} and {len(weight_decays)}."
            )
        groups = []
        for head, lr, decay in zip(self.heads, learning_rates, weight_decays):
            decayed, not_decayed = [], []
            for name, parameter in head.named_parameters():
                (decayed if uses_weight_decay(name, parameter) else not_decayed).append(parameter)
            groups.append({"params": decayed, "lr": lr, "weight_decay": decay})
            groups.append({"params": not_decayed, "lr": lr, "weight_decay": 0.0})
        return groups

    def head(self, index: int) -> AttentiveClassifierHead:
        """Head `index` as a stand-alone [`AttentiveClassifierHead`] (a copy)."""
        return copy.deepcopy(self.heads[index])


def train_attentive_heads(
    tokens: torch.Tensor,
    labels: torch.Tensor,
    learning_rates: Sequence[float],
    weight_decays: Sequence[float],
    num_labels: int,
    num_queries: int = 1,
    num_attention_heads: int = 4,
    mlp_ratio: float = 4.0,
    num_epochs: float = 20.0,
    batch_size: int = 128,
    warmup_steps: float = 0.05,
    lr_scheduler_type: str = "cosine",
    seed: int = 0,
    device: torch.device | str | None = None,
) -> AttentiveHeadGrid:
    """
    Train one attentive head per `(learning_rates[i], weight_decays[i])` on cached patch tokens, all in one loop
    (`linear_grid.fit_head_grid`: seeded mini-batches shared by the heads, AdamW, warm-up and `lr_scheduler_type`).

    Args:
        tokens: `(num_examples, num_patches, hidden_size)` ([`extract_patch_tokens`]); labels: `(num_examples,)`.
        learning_rates / weight_decays: one value per head, the same length.
        num_labels: number of classes; num_queries / num_attention_heads / mlp_ratio: the [`AttentivePooler`].

    Returns:
        The trained [`AttentiveHeadGrid`] in eval mode, on `device` (default: the device of `tokens`).
    """
    if tokens.ndim != 3:
        raise ValueError(
            f"Attentive heads train on patch tokens (num_examples, num_patches, hidden_size), got shape "
            f"{tuple(tokens.shape)}: extract them with extract_patch_tokens."
        )
    device = torch.device(device or tokens.device)
    tokens, labels = tokens.to(device, torch.float32), labels.to(device).long()
    grid = AttentiveHeadGrid(
        len(learning_rates),
        seed,
        hidden_size=tokens.size(-1),
        num_labels=num_labels,
        num_queries=num_queries,
        num_attention_heads=num_attention_heads,
        mlp_ratio=mlp_ratio,
    ).to(device)
    training = dict(num_epochs=num_epochs, batch_size=batch_size, warmup_steps=warmup_steps, seed=seed)
    return fit_head_grid(
        grid, tokens, labels, learning_rates, weight_decays, lr_scheduler_type=lr_scheduler_type, **training
    )


def search_attentive_heads(
    tokens: torch.Tensor,
    labels: torch.Tensor,
    learning_rates: Sequence[float],
    weight_decays: Sequence[float],
    num_labels: int,
    validation_fraction: float = 0.1,
    seed: int = 0,
    **training,
) -> HeadSearchResult:
    """
    `linear_grid.search_head_grid` over attentive heads: a seeded, class-balanced validation split of the training
    tokens chooses the learning rate and weight decay; [`train_attentive_heads`] with `num_labels` and `training`
    (head shape, epochs, batch size, schedule, device) trains the grid. `tokens` `(num_train, num_patches,
    hidden_size)`, `labels` `(num_train,)`.
    """

    def train_heads(*args, seed: int) -> AttentiveHeadGrid:
        return train_attentive_heads(*args, num_labels, seed=seed, **training)

    return search_head_grid(train_heads, tokens, labels, learning_rates, weight_decays, validation_fraction, seed)


__all__ = [
    "AttentiveClassifierHead",
    "AttentiveClassifierOutput",
    "AttentiveHeadGrid",
    "AttentivePooler",
    "search_attentive_heads",
    "train_attentive_heads",
]
