# Copyright 2026 The ijepa-hf Authors. All rights reserved.
# Licensed under the Apache License, Version 2.0.
"""The mask-sampler protocol every masking strategy follows, its seeding, and the validation of mask settings.

A masking strategy is a [`MaskSampler`] subclass in its own file of this package, registered by name in
`masking/__init__.py` (`MASK_STRATEGIES`). It implements two methods:

- `from_config(config, seed)`: build the sampler from an [`IJepaConfig`] (its patch grid and mask fields);
- `sample_masks(batch_size, generator)`: draw one batch of masks from `generator` and return
  `context_indices` `(batch_size, num_context)` and `target_indices` `(batch_size, num_target_blocks, num_target)`,
  sorted flattened patch indices (context and targets disjoint unless the strategy allows overlap). A strategy that
  keeps contexts of different lengths pads the shorter rows at their end with `CONTEXT_PADDING_INDEX` (-1);
  `IJepaForPreTraining` then masks those slots out of attention (see `IJepaConfig.context_truncation`).

The base class gives every strategy the same seeding (masks depend only on `(seed, global batch index)`, whatever the
number of DataLoader workers, so a resumed run draws the masks of an uninterrupted one) and the collator interface
(`sampler(examples)` stacks `pixel_values`, collates the other keys and adds the masks).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch.utils.data import default_collate, get_worker_info


# Fills the end of a `context_indices` row that is shorter than the batch's longest (full-context batches).
CONTEXT_PADDING_INDEX = -1

# The `IJepaConfig` fields that choose and set up the masking (the mask flags of `pretrain.py` and a recipe's `mask:`).
MASK_SETTINGS = (
    "mask_strategy",
    "num_target_blocks",
    "target_scale",
    "target_aspect_ratio",
    "context_scale",
    "context_aspect_ratio",
    "min_context_patches",
    "allow_overlap",
    "mask_placement",
    "context_truncation",
)


def pair(value: int | Sequence[int]) -> tuple[int, int]:
    """`(height, width)` from an int or a pair, e.g. an image or patch size."""
    if isinstance(value, (list, tuple)):
        if len(value) != 2:
            raise ValueError(f"Expected an int or a (height, width) pair, got {value!r}.")
        return int(value[0]), int(value[1])
    return int(value), int(value)


def check_mask_ranges(
    num_target_blocks: int,
    target_scale: Sequence[float],
    target_aspect_ratio: Sequence[float],
    context_scale: Sequence[float],
    context_aspect_ratio: Sequence[float],
    min_context_patches: int,
) -> None:
    """Raise `ValueError`, saying what to change, for mask settings that are invalid on any patch grid."""
    for name, value in (
        ("target_scale", target_scale),
        ("context_scale", context_scale),
        ("target_aspect_ratio", target_aspect_ratio),
        ("context_aspect_ratio", context_aspect_ratio),
    ):
        if len(value) != 2:
            raise ValueError(f"{name} must be a (min, max) pair, got {value!r}.")
        low, high = float(value[0]), float(value[1])
        if name.endswith("scale") and not 0.0 < low <= high <= 1.0:
            raise ValueError(
                f"{name}={[low, high]} is not a valid area range: it must satisfy 0 < min <= max <= 1 "
                "(fractions of the patch grid)."
            )
        if name.endswith("aspect_ratio") and not 0.0 < low <= high:
            raise ValueError(f"{name}={[low, high]} is not a valid aspect range: it must satisfy 0 < min <= max.")
    if num_target_blocks < 1:
        raise ValueError(f"num_target_blocks={num_target_blocks}: I-JEPA needs at least one target block.")
    if min_context_patches < 0:
        raise ValueError(f"min_context_patches={min_context_patches} must be >= 0.")


def check_mask_settings(
    grid_size: tuple[int, int],
    num_target_blocks: int,
    target_scale: Sequence[float],
    target_aspect_ratio: Sequence[float],
    context_scale: Sequence[float],
    context_aspect_ratio: Sequence[float],
    min_context_patches: int,
) -> None:
    """Raise `ValueError`, saying what to change, for mask settings that can never give a valid mask on this grid."""
    check_mask_ranges(
        num_target_blocks, target_scale, target_aspect_ratio, context_scale, context_aspect_ratio, min_context_patches
    )
    rows, columns = grid_size
    num_patches = rows * columns
    largest_context = int(num_patches * float(context_scale[1]))
    if min_context_patches >= min(largest_context, num_patches):
        raise ValueError(
            f"min_context_patches={min_context_patches} cannot be met on a {rows}x{columns} patch grid whose largest "
            f"context block has {largest_context} patches: lower min_context_patches or use a larger image / smaller "
            "patch size."
        )


class MaskSampler:
    """
    Base class of the masking strategies (see the module docstring for the protocol).

    Args:
        grid_size: the patch grid `(rows, columns)`.
        seed: masks depend only on `(seed, global batch index)`.
    """

    def __init__(self, grid_size: tuple[int, int], seed: int = 0):
        self.grid_size = (int(grid_size[0]), int(grid_size[1]))
        self.seed = int(seed)
        self._start_batch = 0
        self._local_count = 0

    @classmethod
    def from_config(cls, config, seed: int = 0) -> MaskSampler:
        """Build the sampler from an [`IJepaConfig`] (its patch grid and mask fields)."""
        raise NotImplementedError(f"{cls.__name__} must implement from_config(config, seed).")

    def sample_masks(self, batch_size: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        """`context_indices` `(batch_size, num_context)`, `target_indices` `(batch_size, num_blocks, num_target)`."""
        raise NotImplementedError(f"{type(self).__name__} must implement sample_masks(batch_size, generator).")

    # -- seeding ----------------------------------------------------------------------------------------------------
    def set_batch_index(self, batch_index: int) -> None:
        """The next batch drawn in the main process is batch `batch_index` (e.g. after resuming a run)."""
        self._start_batch = int(batch_index)
        self._local_count = 0

    def next_generator(self) -> torch.Generator:
        """The generator of the next batch, seeded by `(seed, global batch index)`; advances the batch counter."""
        worker = get_worker_info()
        worker_id, num_workers = (worker.id, worker.num_workers) if worker is not None else (0, 1)
        batch_index = self._start_batch + worker_id + num_workers * self._local_count
        self._local_count += 1
        generator = torch.Generator()
        # A fixed affine mix keeps (seed, batch) pairs apart without Python's salted hashing.
        generator.manual_seed((self.seed * 0x9E3779B97F4A7C15 + batch_index) % (2**63 - 1))
        return generator

    # -- collating --------------------------------------------------------------------------------------------------
    def __call__(self, examples: list[dict]) -> dict[str, torch.Tensor]:
        """
        Collate examples (dicts with `pixel_values` `(num_channels, height, width)` and optionally other keys, e.g.
        `labels`) and add `context_indices` and `target_indices`.
        """
        if not examples:
            raise ValueError(f"{type(self).__name__} received an empty batch.")
        if any("pixel_values" not in example for example in examples):
            found = sorted({key for example in examples for key in example})
            raise ValueError(
                f"Every example needs a `pixel_values` entry (num_channels, height, width); found keys {found}. Apply "
                "an image transform first, or collate raw images with modeling_ijepa.data.IJepaPretrainingCollator."
            )
        pixel_values = torch.stack([torch.as_tensor(example["pixel_values"]) for example in examples])
        others = [{key: value for key, value in example.items() if key != "pixel_values"} for example in examples]
        batch = default_collate(others) if others[0] else {}
        batch["pixel_values"] = pixel_values
        context_indices, target_indices = self.sample_masks(len(examples), self.next_generator())
        batch["context_indices"] = context_indices
        batch["target_indices"] = target_indices
        return batch


__all__ = ["CONTEXT_PADDING_INDEX", "MASK_SETTINGS", "MaskSampler", "check_mask_ranges", "check_mask_settings", "pair"]
