# Copyright 2026 The ijepa-hf Authors. All rights reserved.
# Licensed under the Apache License, Version 2.0.
"""The official I-JEPA multi-block masking rule (`src/masks/multiblock.py` of the authors' code), vectorised.

Per batch, one target-block size and one context-block size are drawn; per image, `num_target_blocks` target blocks and
one context block are placed at random, the target patches are removed from the context, and every index list is cut to
the shortest one in the batch so that the tensors stack.

Two choices of the authors' code are options here (the official behaviour stays the default):
- `mask_placement="uniform"`: block corners drawn in `[0, rows - height]` inclusive, so blocks can touch the last row
  and column (the official `randint(0, H - h)` never reaches them);
- `context_truncation="random"`: contexts cut to the batch's shortest keep a random subset of their patches instead of
  the first ones in row-major order (which favour the top of the image); `"none"`: no cut at all, shorter contexts are
  padded with `CONTEXT_PADDING_INDEX` and the model masks the padding out of attention.
"""

from __future__ import annotations

import math
import warnings

import torch

from .base import CONTEXT_PADDING_INDEX, MaskSampler


# After this many consecutive invalid context draws, one fewer target block constrains the context (official rule).
_DRAWS_PER_RELAXATION = 20
_MAX_RELAXATIONS_BEFORE_ERROR = 1000


class MultiBlockMaskSampler(MaskSampler):
    """
    Collate images and sample I-JEPA context and target blocks on the patch grid.

    Args:
        image_size / patch_size: int or `(height, width)`; the patch grid is `image_size // patch_size`.
        settings / **overrides: the [`MaskSettings`] (declared, with their defaults and meaning, in
            `masking/settings.py`): `num_target_blocks`, `target_scale` / `target_aspect_ratio` (ranges of a target
            block's area as a fraction of the grid and its height/width), `context_scale` / `context_aspect_ratio`,
            `min_context_patches` (official `min_keep`), `allow_overlap`, `mask_placement` and `context_truncation`.
        seed: masks depend only on `(seed, batch index)`, whatever the number of DataLoader workers.

    Calling it on a list of examples (dicts with `pixel_values` `(num_channels, height, width)` and optionally other
    keys, e.g. `labels`) returns those keys collated, plus:
        - `context_indices`: LongTensor `(batch_size, num_context)`, sorted flattened patch indices of the context
          (with `context_truncation="none"`, `num_context` is the longest context and shorter rows end in padding);
        - `target_indices`: LongTensor `(batch_size, num_target_blocks, num_target)`, sorted indices of each block.
    """

    strategy = "multiblock"

    # -- sampling ---------------------------------------------------------------------------------------------------
    def _sample_block_size(
        self, generator: torch.Generator, scale: tuple[float, float], aspect_ratio: tuple[float, float]
    ) -> tuple[int, int]:
        rows, columns = self.grid_size
        # As the authors' sampler: ONE uniform draw sets both the scale and the aspect ratio (larger blocks are
        # taller).
        draw = float(torch.rand(1, generator=generator))
        max_keep = int(rows * columns * (scale[0] + draw * (scale[1] - scale[0])))
        ratio = aspect_ratio[0] + draw * (aspect_ratio[1] - aspect_ratio[0])
        height = min(int(round(math.sqrt(max_keep * ratio))), rows - 1)
        width = min(int(round(math.sqrt(max_keep / ratio))), columns - 1)
        return height, width

    def _block_masks(self, tops: torch.Tensor, lefts: torch.Tensor, height: int, width: int) -> torch.Tensor:
        """Boolean masks `(*tops.shape, rows, columns)` of `height x width` blocks at the given corners."""
        rows, columns = self.grid_size
        row_range = torch.arange(rows)
        column_range = torch.arange(columns)
        in_rows = (row_range >= tops.unsqueeze(-1)) & (row_range < (tops + height).unsqueeze(-1))
        in_columns = (column_range >= lefts.unsqueeze(-1)) & (column_range < (lefts + width).unsqueeze(-1))
        return in_rows.unsqueeze(-1) & in_columns.unsqueeze(-2)

    def _random_corners(self, generator: torch.Generator, shape: tuple[int, ...], height: int, width: int):
        rows, columns = self.grid_size
        # Official: exclusive upper bound `rows - height`, as `torch.randint(0, H - h, ...)`, so the last row and
        # column are never covered; uniform: every position of the block on the grid.
        reach = int(self.mask_placement == "uniform")
        tops = torch.randint(0, rows - height + reach, shape, generator=generator)
        lefts = torch.randint(0, columns - width + reach, shape, generator=generator)
        return tops, lefts

    def sample_masks(self, batch_size: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        """
        Draw the masks of one batch.

        Returns:
            `context_indices` `(batch_size, num_context)` and `target_indices`
            `(batch_size, num_target_blocks, num_target)`, both sorted per row (padding, if any, at the end of a row).
        """
        rows, columns = self.grid_size
        target_height, target_width = self._sample_block_size(generator, self.target_scale, self.target_aspect_ratio)
        context_height, context_width = self._sample_block_size(
            generator, self.context_scale, self.context_aspect_ratio
        )
        if target_height * target_width <= self.min_context_patches:
            raise ValueError(
                f"Target blocks of {target_height}x{target_width} patches on a {rows}x{columns} grid can never keep "
                "more "
                f"than min_context_patches={self.min_context_patches} patches: use a larger image / smaller patch "
                "size, larger target_scale, or lower min_context_patches."
            )

        # Targets are unconstrained, so every block is a full rectangle: its indices need no truncation.
        target_tops, target_lefts = self._random_corners(
            generator, (batch_size, self.num_target_blocks), target_height, target_width
        )
        block_rows = target_tops.unsqueeze(-1) + torch.arange(target_height)  # (batch, blocks, height)
        block_columns = target_lefts.unsqueeze(-1) + torch.arange(target_width)  # (batch, blocks, width)
        target_indices = (block_rows.unsqueeze(-1) * columns + block_columns.unsqueeze(-2)).flatten(2)
        target_masks = self._block_masks(target_tops, target_lefts, target_height, target_width)

        context_masks = self._sample_context(generator, batch_size, target_masks, context_height, context_width)
        return self._context_indices(context_masks.flatten(1), generator), target_indices

    def _context_indices(self, context_masks: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        """`(batch, num_patches)` boolean context masks -> `(batch, num_context)` sorted indices, cut or padded."""
        counts = context_masks.sum(dim=1)
        if self.context_truncation == "random":
            # Random priorities for context patches, above-any priority for the others: the first `shortest` of the
            # sort are a uniform random subset of the row's context.
            priorities = torch.rand(context_masks.shape, generator=generator).masked_fill(~context_masks, 2.0)
            kept = torch.argsort(priorities, dim=1)[:, : int(counts.min())]
            return kept.sort(dim=1).values
        # Stable sort puts each row's context patches first, in increasing index order.
        order = torch.argsort((~context_masks).to(torch.uint8), dim=1, stable=True)
        if self.context_truncation == "first":
            return order[:, : int(counts.min())]
        context_indices = order[:, : int(counts.max())]
        padding = torch.arange(context_indices.size(1)) >= counts.unsqueeze(1)
        return context_indices.masked_fill(padding, CONTEXT_PADDING_INDEX)

    def _sample_context(
        self,
        generator: torch.Generator,
        batch_size: int,
        target_masks: torch.Tensor,
        height: int,
        width: int,
    ) -> torch.Tensor:
        """Context masks `(batch, rows, columns)`: a block minus the target patches, redrawn until large enough."""
        rows, columns = self.grid_size
        context_masks = torch.zeros(batch_size, rows, columns, dtype=torch.bool)
        pending = torch.arange(batch_size)
        relaxation = 0
        while pending.numel():
            # One round is the official run of consecutive draws before a relaxation, drawn for all pending images.
            tops, lefts = self._random_corners(generator, (pending.numel(), _DRAWS_PER_RELAXATION), height, width)
            candidates = self._block_masks(tops, lefts, height, width)  # (pending, draws, rows, columns)
            if not self.allow_overlap:
                constraining = max(self.num_target_blocks - relaxation, 0)
                covered = target_masks[pending, :constraining].any(dim=1)
                candidates = candidates & ~covered.unsqueeze(1)
            valid = candidates.flatten(2).sum(-1) > self.min_context_patches  # (pending, draws)
            found = valid.any(dim=1)
            first_valid = valid.to(torch.uint8).argmax(dim=1)
            chosen = candidates[torch.arange(pending.numel()), first_valid]
            context_masks[pending[found]] = chosen[found]
            pending = pending[~found]
            if pending.numel():
                relaxation += 1
                message = (
                    f"{type(self).__name__}: no valid context block after {_DRAWS_PER_RELAXATION * relaxation} draws "
                    "for "
                    f"{pending.numel()} image(s); dropping one target block from the constraint (official rule). Use "
                    "a larger patch grid or smaller target_scale to avoid this."
                )
                warnings.warn(message, stacklevel=3)
                if relaxation > _MAX_RELAXATIONS_BEFORE_ERROR:
                    raise ValueError(
                        f"No context block of {height}x{width} patches keeps more than min_context_patches="
                        f"{self.min_context_patches} patches on a {rows}x{columns} grid: lower min_context_patches."
                    )
        return context_masks


__all__ = ["MultiBlockMaskSampler"]
