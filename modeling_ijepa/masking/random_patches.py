# Copyright 2026 The ijepa-hf Authors. All rights reserved.
# Licensed under the Apache License, Version 2.0.
"""Random-patch masking: targets and context are random patch subsets instead of blocks.

A simple alternative to the multi-block rule (the paper's ablations compare block and random masking). Per batch, one
target size (a fraction of the grid drawn from `target_scale`, shared by the blocks) and one context size (a fraction
drawn from `context_scale`) are drawn; per image, the patches are shuffled, the first `num_target_blocks` groups become
the target blocks, and the context is drawn from the remaining patches (targets never overlap the context).
"""

from __future__ import annotations

import torch

from .base import MaskSampler


class RandomPatchMaskSampler(MaskSampler):
    """
    Random-patch masks on the patch grid of `image_size // patch_size`.

    Args:
        image_size / patch_size: int or `(height, width)`.
        settings / **overrides: the [`MaskSettings`] it reads: `num_target_blocks` (groups of target patches per
            image), `target_scale` (range of one group's size, as a fraction of the grid), `context_scale` (range of
            the context's size, capped by the patches left over) and `min_context_patches`. Patch subsets have no
            shape, so the aspect ratios are not used, and targets never overlap the context whatever
            `allow_overlap` says; placement and truncation must stay at their defaults (a `ValueError` otherwise).
        seed: masks depend only on `(seed, batch index)`.
    """

    strategy = "random"

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        num_patches = self.grid_size[0] * self.grid_size[1]
        left_over = num_patches - self.num_target_blocks * max(1, int(num_patches * self.target_scale[1]))
        if left_over <= self.min_context_patches:
            raise ValueError(
                f"{self.num_target_blocks} target groups of up to {self.target_scale[1]:.0%} of a {num_patches}-patch "
                f"grid leave {left_over} patches for a context that needs more than min_context_patches="
                f"{self.min_context_patches}: lower target_scale, num_target_blocks or min_context_patches."
            )

    def sample_masks(self, batch_size: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        """
        Returns:
            `context_indices` `(batch_size, num_context)` and `target_indices`
            `(batch_size, num_target_blocks, num_target)`, both sorted per row.
        """
        num_patches = self.grid_size[0] * self.grid_size[1]
        draws = torch.rand(2, generator=generator).tolist()
        target_fraction = self.target_scale[0] + draws[0] * (self.target_scale[1] - self.target_scale[0])
        num_target = max(1, int(num_patches * target_fraction))
        left_over = num_patches - self.num_target_blocks * num_target
        context_fraction = self.context_scale[0] + draws[1] * (self.context_scale[1] - self.context_scale[0])
        num_context = min(left_over, max(self.min_context_patches + 1, int(num_patches * context_fraction)))

        order = torch.argsort(torch.rand(batch_size, num_patches, generator=generator), dim=1)
        targets = order[:, : self.num_target_blocks * num_target].view(batch_size, self.num_target_blocks, num_target)
        context = order[:, self.num_target_blocks * num_target :][:, :num_context]
        return context.sort(dim=1).values, targets.sort(dim=-1).values


__all__ = ["RandomPatchMaskSampler"]
