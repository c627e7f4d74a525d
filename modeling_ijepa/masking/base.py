# Copyright 2026 The ijepa-hf Authors. All rights reserved.
# Licensed under the Apache License, Version 2.0.
"""The mask-sampler protocol every masking strategy follows, its seeding, and the validation of mask settings.

A masking strategy is a [`MaskSampler`] subclass in its own file of this package, registered by name in
`masking/__init__.py` (`MASK_STRATEGIES`). It implements two methods:

- `strategy`: the name it is registered under (its settings' `mask_strategy`); construction and `from_config`
  come from the base class, which validates the [`MaskSettings`] on the patch grid;
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

from .settings import MaskSettings


# Fills the end of a `context_indices` row that is shorter than the batch's longest (full-context batches).
CONTEXT_PADDING_INDEX = -1


def pair(value: int | Sequence[int]) -> tuple[int, int]:
    """`(height, width)` from an int or a pair, e.g. an image or patch size."""
    if isinstance(value, (list, tuple)):
        if len(value) != 2:
            raise ValueError(f"Expected an int or a (height, width) pair, got {value!r}.")
        return int(value[0]), int(value[1])
    return int(value), int(value)


class MaskSampler:
    """
    Base class of the masking strategies (see the module docstring for the protocol).

    Args:
        image_size / patch_size: int or `(height, width)`; the patch grid is `image_size // patch_size`.
        settings: the [`MaskSettings`] (default: the official ones); `**overrides` replace single settings by name
            (`MultiBlockMaskSampler(image_size=48, patch_size=4, target_scale=(0.1, 0.2))`).
        seed: masks depend only on `(seed, global batch index)`.

    The settings are validated on the patch grid at construction and kept as `self.settings`, each also as an
    attribute (`self.target_scale`, ...).
    """

    # The name this class is registered under in `MASK_STRATEGIES` (its settings' `mask_strategy`).
    strategy: str = ""

    def __init__(
        self,
        image_size: int | Sequence[int] = 224,
        patch_size: int | Sequence[int] = 16,
        settings: MaskSettings | None = None,
        seed: int = 0,
        **overrides,
    ):
        image_height, image_width = pair(image_size)
        patch_height, patch_width = pair(patch_size)
        if image_height % patch_height or image_width % patch_width:
            raise ValueError(
                f"image_size {image_size} is not divisible by patch_size {patch_size}: choose an image size that is a "
                "multiple of the patch size."
            )
        self.grid_size = (image_height // patch_height, image_width // patch_width)
        settings = MaskSettings.with_overrides(settings, **overrides)
        if self.strategy and settings.mask_strategy != self.strategy:
            settings = MaskSettings.with_overrides(settings, mask_strategy=self.strategy)
        settings.check_on_grid(self.grid_size)
        self.settings = settings
        # Every setting as an attribute of the sampler, pairs as float tuples.
        for name, value in settings.as_dict().items():
            setattr(self, name, tuple(float(v) for v in value) if isinstance(value, (list, tuple)) else value)
        self.seed = int(seed)
        self._start_batch = 0
        self._local_count = 0

    @classmethod
    def from_config(cls, config, seed: int = 0) -> MaskSampler:
        """Build the sampler from an [`IJepaConfig`] (its patch grid and its mask settings)."""
        return cls(config.image_size, config.patch_size, settings=MaskSettings.from_object(config), seed=seed)

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


__all__ = ["CONTEXT_PADDING_INDEX", "MaskSampler", "pair"]
