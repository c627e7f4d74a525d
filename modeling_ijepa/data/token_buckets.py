# Copyright 2026 The ijepa-hf Authors. All rights reserved.
# Licensed under the Apache License, Version 2.0.
"""A shape policy for `torch.compile`: context and target token counts padded up to a few bucket sizes.

The multiblock rule draws one target-block size per batch and cuts every context to the batch's shortest, so the
number of context tokens and of tokens per target block changes from batch to batch. Compiled with static shapes,
every new pair of counts is a new graph (and past dynamo's recompile limit the model silently runs eagerly); with
dynamic shapes, kernels lose their specialisation. `TokenBuckets` pads `context_indices` and `target_indices` up to
the next of a few sizes, with `CONTEXT_PADDING_INDEX` (-1), and returns `context_mask` / `target_mask` (`True` at real
tokens). `IJepaForPreTraining` masks the padding out of attention in encoder and predictor and out of the loss, so the
loss equals the unpadded one (to float rounding).

The bucket sizes come from the mask sampler itself: `TokenBuckets.from_sampler` draws a few hundred batches at the
training batch size from a generator of its own (the sampler's per-batch seeding is untouched) and picks, for each
of the two counts, the `num_buckets` upper edges that minimise the mean padding over those draws (an exact dynamic
programme over the distinct counts). One more edge, the full patch grid, catches a count never drawn there, so a
run compiles at most `(context buckets + 1) x (target buckets + 1)` shapes and in practice
`context buckets x target buckets`.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence

import torch

from ..masking.base import CONTEXT_PADDING_INDEX


def optimal_edges(counts: Sequence[int], num_buckets: int) -> list[int]:
    """
    The at most `num_buckets` bucket sizes (ascending, the largest = `max(counts)`) that minimise the total padding
    `sum(bucket(c) - c)` over `counts`, where `bucket(c)` is the smallest size `>= c`.
    """
    if num_buckets < 1:
        raise ValueError(f"num_buckets={num_buckets} must be at least 1.")
    if not counts:
        raise ValueError("optimal_edges needs at least one observed count.")
    histogram = Counter(int(c) for c in counts)
    values = sorted(histogram)
    if len(values) <= num_buckets:
        return values
    n = len(values)

    def cost(start: int, end: int) -> int:  # values[start..end] all padded to values[end]
        return sum(histogram[values[i]] * (values[end] - values[i]) for i in range(start, end + 1))

    infinity = float("inf")
    # best[k][j]: the least padding of values[0..j] with k buckets, the last one at values[j].
    best = [[infinity] * n for _ in range(num_buckets + 1)]
    choice = [[-1] * n for _ in range(num_buckets + 1)]
    for j in range(n):
        best[1][j] = cost(0, j)
    for k in range(2, num_buckets + 1):
        for j in range(n):
            for i in range(j):
                candidate = best[k - 1][i] + cost(i + 1, j)
                if candidate < best[k][j]:
                    best[k][j], choice[k][j] = candidate, i
    edges, j = [], n - 1
    for k in range(num_buckets, 0, -1):
        edges.append(values[j])
        j = choice[k][j]
        if j < 0:
            break
    return sorted(edges)


def _round_up(count: int, edges: Sequence[int]) -> int:
    for edge in edges:
        if count <= edge:
            return edge
    raise ValueError(f"A count of {count} tokens exceeds the largest bucket {edges[-1]}.")


class TokenBuckets:
    """
    Pads a batch's masks to bucketed token counts.

    Args:
        context_edges: ascending context-token counts a batch is padded up to.
        target_edges: ascending tokens-per-target-block counts.
    """

    def __init__(self, context_edges: Sequence[int], target_edges: Sequence[int]):
        self.context_edges = sorted({int(e) for e in context_edges})
        self.target_edges = sorted({int(e) for e in target_edges})
        if not self.context_edges or not self.target_edges or min(self.context_edges + self.target_edges) < 1:
            raise ValueError(
                f"TokenBuckets needs positive bucket sizes, got context {context_edges!r}, target {target_edges!r}."
            )

    @classmethod
    def from_sampler(
        cls,
        mask_sampler,
        batch_size: int,
        num_context_buckets: int = 4,
        num_target_buckets: int = 1,
        num_draws: int = 256,
        seed: int = 0,
    ) -> TokenBuckets:
        """
        Buckets fitted to `num_draws` batches of `batch_size` drawn from `mask_sampler` with a generator seeded by
        `seed` (not the sampler's own seeding), plus the full patch grid as a last bucket for unseen counts.
        """
        generator = torch.Generator().manual_seed(seed)
        context_counts, target_counts = [], []
        for _ in range(num_draws):
            context_indices, target_indices = mask_sampler.sample_masks(batch_size, generator)
            context_counts.append(context_indices.size(1))
            target_counts.append(target_indices.size(2))
        num_patches = mask_sampler.grid_size[0] * mask_sampler.grid_size[1]
        context_edges = optimal_edges(context_counts, num_context_buckets) + [num_patches]
        target_edges = optimal_edges(target_counts, num_target_buckets) + [num_patches]
        return cls(context_edges, target_edges)

    def __repr__(self) -> str:
        return f"TokenBuckets(context_edges={self.context_edges}, target_edges={self.target_edges})"

    def pad(self, context_indices: torch.Tensor, target_indices: torch.Tensor) -> dict[str, torch.Tensor]:
        """
        `context_indices` `(batch, num_context)` (may already end in `CONTEXT_PADDING_INDEX`) and `target_indices`
        `(batch, blocks, num_target)` padded with `CONTEXT_PADDING_INDEX` to the next bucket sizes, with the boolean
        `context_mask` and `target_mask` (`True` at real tokens).
        """
        num_context = _round_up(context_indices.size(1), self.context_edges)
        num_target = _round_up(target_indices.size(2), self.target_edges)
        context_indices = torch.nn.functional.pad(
            context_indices, (0, num_context - context_indices.size(1)), value=CONTEXT_PADDING_INDEX
        )
        target_indices = torch.nn.functional.pad(
            target_indices, (0, num_target - target_indices.size(2)), value=CONTEXT_PADDING_INDEX
        )
        return {
            "context_indices": context_indices,
            "target_indices": target_indices,
            "context_mask": context_indices != CONTEXT_PADDING_INDEX,
            "target_mask": target_indices != CONTEXT_PADDING_INDEX,
        }


__all__ = ["TokenBuckets", "optimal_edges"]
