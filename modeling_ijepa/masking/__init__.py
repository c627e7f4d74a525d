# Copyright 2026 The ijepa-hf Authors. All rights reserved.
# Licensed under the Apache License, Version 2.0.
"""Masking strategies for I-JEPA pre-training, selected by name (`config.mask_strategy`, `--mask_strategy`).

Each strategy is a [`MaskSampler`] in its own file (the protocol is documented in `base.py`) and one entry of
`MASK_STRATEGIES`. Adding a strategy: write `masking/my_rule.py` with a `MaskSampler` subclass whose `strategy` is
`"my_rule"`, then list the class below. Adding a setting: one field of `MaskSettings` (`masking/settings.py`).
"""

from __future__ import annotations

import difflib

from .base import CONTEXT_PADDING_INDEX, MaskSampler
from .multiblock import MultiBlockMaskSampler
from .random_patches import RandomPatchMaskSampler
from .settings import MaskSettingFields, MaskSettings, mask_setting


MASK_STRATEGIES: dict[str, type[MaskSampler]] = {
    sampler.strategy: sampler
    for sampler in (
        MultiBlockMaskSampler,  # the official I-JEPA rule (default)
        RandomPatchMaskSampler,
    )
}

# The names of every mask setting (config fields, `pretrain.py` flags, sampler attributes), from their declaration.
MASK_SETTINGS: tuple[str, ...] = MaskSettings.names()


def mask_sampler_class(name: str) -> type[MaskSampler]:
    """The sampler class registered as `name`; a `ValueError` lists the names (with a did-you-mean hint) otherwise."""
    if name in MASK_STRATEGIES:
        return MASK_STRATEGIES[name]
    close = difflib.get_close_matches(name, MASK_STRATEGIES, n=1)
    hint = f" Did you mean {close[0]!r}?" if close else ""
    raise ValueError(f"Unknown mask strategy {name!r}: choose one of {sorted(MASK_STRATEGIES)}.{hint}")


def mask_sampler_from_config(config, seed: int = 0) -> MaskSampler:
    """The sampler of `config.mask_strategy` (default `"multiblock"`), built from the config's mask settings."""
    return mask_sampler_class(getattr(config, "mask_strategy", "multiblock")).from_config(config, seed=seed)


__all__ = [
    "MASK_SETTINGS",
    "CONTEXT_PADDING_INDEX",
    "MASK_STRATEGIES",
    "MaskSampler",
    "MultiBlockMaskSampler",
    "RandomPatchMaskSampler",
    "MaskSettingFields",
    "MaskSettings",
    "mask_setting",
    "mask_sampler_class",
    "mask_sampler_from_config",
]
