# Copyright 2026 The ijepa-hf Authors. All rights reserved.
# Licensed under the Apache License, Version 2.0.
"""Random-patch masking: targets and context are random patch subsets instead of blocks.

A simple alternative to the multi-block rule (the paper's ablations compare block and random masking). Per batch, one
target size (a fraction of the grid drawn from `target_scale`, shared by the blocks) and one context size (a fraction
drawn from `context_scale`) are drawn; per image, the patches are shuffled, the first `num_target_blocks` groups become
the target blocks, and the context is drawn from the remaining patches (targets never overlap the context).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from .base import MaskSampler, check_mask_ranges, pair


class RandomPatchMaskSampler(MaskSampler):
    """
    Random-patch masks on the patch grid of `image_size // patch_size`.

    Args:
        image_size / patch_size: int or `(height, width)`.
        num_target_blocks: groups of target patches per image.
        target_scale: range of one group's size, as a fraction of the grid.
        context_scale: range of the context's size, as a fraction of the grid (capped by the patches left over).
        min_context_patches: the context keeps more patches than this.
        seed: masks depend only on `(seed, batch index)`.
    """

    def __init__(
        self,
        image_size: int | Sequence[int] = 224,
        patch_size: int | Sequence[int] = 16,
        num_target_blocks: int = 4,
        target_scale: Sequence[float] = (0.15, 0.2),
        context_scale: Sequence[float] = (0.85, 1.0),
        min_context_patches: int = 10,
        seed: int = 0,
    ):
        image_height, image_width = pair(image_size)
        patch_height, patch_width = pair(patch_size)
        super().__init__((image_height // patch_height, image_width // patch_width), seed)
        check_mask_ranges(num_target_blocks, target_scale, (1.0, 1.0), context_scale, (1.0, 1.0), min_context_patches)
        self.num_target_blocks = int(num_target_blocks)
        self.target_scale = tuple(float(v) for v in target_scale)
        self.context_scale = tuple(float(v) for v in context_scale)
        self.min_context_patches = int(min_context_patches)
        num_patches = self.grid_size[0] * self.grid_size[1]
        left_over = num_patches - self.num_target_blocks * max(1, int(num_patches * self.target_scale[1]))
        if left_over <= self.min_context_patches:
            raise ValueError(
                f"{self.num_target_blocks} target groups of up to {self.target_scale[1]:.0%} of a {num_patches}-patch "
                f"grid leave {left_over} patches for a context that needs more than min_context_patches="
                f"{self.min_context_patches}: lower target_scale, num_target_blocks or min_context_patches."
            )

    @classmethod
    def from_config(cls, config, seed: int = 0) -> RandomPatchMaskSampler:
        options = (getattr(config, "mask_placement", "official"), getattr(config, "context_truncation", "first"))
        if options != ("official", "first"):
            raise ValueError(
                f"mask_placement / context_truncation {options} are options of the 'multiblock' strategy; random "
                "contexts all have the same length: leave them at 'official' / 'first' or use "
                "mask_strategy='multiblock'."
            )
        names = (
            "image_size",
            "patch_size",
            "num_target_blocks",
            "target_scale",
            "context_scale",
            "min_context_patches",
        )
        return cls(**{name: getattr(config, name) for name in names}, seed=seed)

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
