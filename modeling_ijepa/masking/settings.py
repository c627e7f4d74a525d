# Copyright 2026 The ijepa-hf Authors. All rights reserved.
# Licensed under the Apache License, Version 2.0.
"""The mask settings, declared once.

[`MaskSettings`] is the one declaration of every setting that chooses and shapes the masks: its name, type, default,
help text, accepted values and the strategies it applies to. Everything else is derived from it:

- `IJepaConfig` stores the settings as its own fields (it inherits [`MaskSettingFields`], the same fields without
  the methods, so `config.json` keeps them flat, next to the encoder fields);
- the command-line flags of `pretrain.py` (`--target_scale 0.15 0.2`, ...) and the keys of a recipe's `mask:` mapping
  are generated from it (`modeling_ijepa.cli.mask_arguments`);
- the samplers take a `MaskSettings` (or its fields as keyword arguments) and validate it with [`check`].

Adding a setting is one field below (with [`mask_setting`]) plus the code that uses it.
"""

from __future__ import annotations

import difflib
from collections.abc import Sequence
from dataclasses import dataclass, field, fields, make_dataclass, replace


def mask_setting(
    default,
    help: str,
    choices: Sequence[str] | None = None,
    strategies: Sequence[str] | None = None,
    recipe_key: str | None = None,
):
    """
    A field of [`MaskSettings`].

    Args:
        default: the official value (pairs as tuples).
        help: one sentence for `--help` and the docs.
        choices: the accepted values of a string setting.
        strategies: the masking strategies the setting applies to (`None`: all); another strategy refuses a value
            other than the default.
        recipe_key: a shorter key accepted in a recipe's `mask:` mapping (e.g. `strategy` for `mask_strategy`).
    """
    metadata = {"help": help, "choices": tuple(choices) if choices else None, "strategies": strategies}
    return field(default=default, metadata={**metadata, "recipe_key": recipe_key})


@dataclass(kw_only=True)
class MaskSettings:
    """Every setting of the masks; the defaults are the paper's (official multi-block rule, ViT-H/14 recipe)."""

    mask_strategy: str = mask_setting(
        "multiblock",
        "Masking strategy, a name of modeling_ijepa.masking.MASK_STRATEGIES: 'multiblock' (the official rule) or "
        "'random' (random patch subsets).",
        recipe_key="strategy",
    )
    num_target_blocks: int = mask_setting(4, "Target blocks per image (4).")
    target_scale: list[float] | tuple[float, float] = mask_setting(
        (0.15, 0.2), "Target block area range, fractions of the patch grid (0.15 0.2)."
    )
    target_aspect_ratio: list[float] | tuple[float, float] = mask_setting(
        (0.75, 1.5), "Target block height/width range (0.75 1.5)."
    )
    context_scale: list[float] | tuple[float, float] = mask_setting(
        (0.85, 1.0), "Context block area range, fractions of the patch grid (0.85 1.0)."
    )
    context_aspect_ratio: list[float] | tuple[float, float] = mask_setting(
        (1.0, 1.0), "Context block height/width range (1.0 1.0)."
    )
    min_context_patches: int = mask_setting(
        10, "A context keeps more patches than this after the targets are removed (the official min_keep, 10)."
    )
    allow_overlap: bool = mask_setting(False, "Keep target patches in the context (off in I-JEPA).")
    mask_placement: str = mask_setting(
        "official",
        "Block corners: 'official' never places a block on the last row or column (randint(0, rows - height), as "
        "the authors' code), 'uniform' places blocks anywhere.",
        choices=("official", "uniform"),
        strategies=("multiblock",),
    )
    context_truncation: str = mask_setting(
        "first",
        "How the contexts of a batch stack: 'first' (official) and 'random' cut contexts to the batch's shortest "
        "('first' keeps the first patches in row-major order, 'random' a random subset), 'none' pads them to the "
        "longest (padding index -1, masked out of attention).",
        choices=("first", "random", "none"),
        strategies=("multiblock",),
    )

    # -- derived views ------------------------------------------------------------------------------------------------
    @classmethod
    def names(cls) -> tuple[str, ...]:
        """The settings' names, in declaration order."""
        return tuple(f.name for f in fields(MaskSettings))

    @classmethod
    def recipe_keys(cls) -> dict[str, str]:
        """`{recipe key: setting name}` of a recipe's `mask:` mapping: every name, plus the shorter aliases."""
        keys = {name: name for name in cls.names()}
        keys.update({f.metadata["recipe_key"]: f.name for f in fields(MaskSettings) if f.metadata["recipe_key"]})
        return keys

    @classmethod
    def from_object(cls, source) -> MaskSettings:
        """The settings held by `source` (an `IJepaConfig` or any object with the same attribute names)."""
        return cls(**{name: getattr(source, name) for name in cls.names() if hasattr(source, name)})

    @classmethod
    def with_overrides(cls, base: MaskSettings | None = None, **overrides) -> MaskSettings:
        """`base` (default: the official settings) with `overrides`; an unknown name fails with a did-you-mean hint."""
        unknown = [name for name in overrides if name not in cls.names()]
        if unknown:
            hints = []
            for name in unknown:
                close = difflib.get_close_matches(name, cls.names(), n=1)
                hints.append(f"{name!r}" + (f" (did you mean {close[0]!r}?)" if close else ""))
            raise TypeError(f"Unknown mask setting(s) {', '.join(hints)}: the settings are {list(cls.names())}.")
        return replace(base if base is not None else cls(), **overrides)

    def as_dict(self) -> dict:
        return {name: getattr(self, name) for name in self.names()}

    # -- validation ---------------------------------------------------------------------------------------------------
    def check(self) -> None:
        """Raise `ValueError`, saying what to change, for settings that are invalid on any patch grid."""
        for name in ("target_scale", "context_scale", "target_aspect_ratio", "context_aspect_ratio"):
            value = getattr(self, name)
            if isinstance(value, (str, bytes)) or not isinstance(value, Sequence) or len(value) != 2:
                raise ValueError(f"{name} must be a (min, max) pair, got {value!r}.")
            low, high = float(value[0]), float(value[1])
            if name.endswith("scale") and not 0.0 < low <= high <= 1.0:
                raise ValueError(
                    f"{name}={[low, high]} is not a valid area range: it must satisfy 0 < min <= max <= 1 "
                    "(fractions of the patch grid)."
                )
            if name.endswith("aspect_ratio") and not 0.0 < low <= high:
                raise ValueError(f"{name}={[low, high]} is not a valid aspect range: it must satisfy 0 < min <= max.")
        if self.num_target_blocks < 1:
            raise ValueError(f"num_target_blocks={self.num_target_blocks}: I-JEPA needs at least one target block.")
        if self.min_context_patches < 0:
            raise ValueError(f"min_context_patches={self.min_context_patches} must be >= 0.")
        for setting in fields(MaskSettings):
            value, choices = getattr(self, setting.name), setting.metadata["choices"]
            if choices and value not in choices:
                raise ValueError(f"{setting.name}={value!r} is not one of {list(choices)}: {setting.metadata['help']}")
            strategies = setting.metadata["strategies"]
            if strategies and self.mask_strategy not in strategies and not _same(value, setting.default):
                raise ValueError(
                    f"{setting.name}={value!r}: {setting.name} is one of the options of the "
                    f"{' / '.join(map(repr, strategies))} strategy, not of {self.mask_strategy!r}: set "
                    f"mask_strategy={strategies[0]!r} or leave {setting.name} at {setting.default!r}."
                )

    def check_on_grid(self, grid_size: tuple[int, int]) -> None:
        """[`check`], then raise `ValueError` naming the fix when no valid mask fits a `(rows, columns)` grid."""
        self.check()
        rows, columns = grid_size
        num_patches = rows * columns
        largest_context = int(num_patches * float(self.context_scale[1]))
        if self.min_context_patches >= min(largest_context, num_patches):
            raise ValueError(
                f"min_context_patches={self.min_context_patches} cannot be met on a {rows}x{columns} patch grid whose "
                f"largest context block has {largest_context} patches: lower min_context_patches or use a larger "
                "image / smaller patch size."
            )


def _same(value, default) -> bool:
    """Whether a setting holds its default (pairs compared as float tuples: a config stores them as lists)."""
    if isinstance(default, tuple):
        return isinstance(value, (list, tuple)) and tuple(float(v) for v in value) == default
    return value == default


# The fields of `MaskSettings` without its methods: what `IJepaConfig` inherits, so the configuration stores every
# setting under its own name with its declared default.
MaskSettingFields = make_dataclass(
    "MaskSettingFields",
    [(f.name, f.type, field(default=f.default, metadata=f.metadata)) for f in fields(MaskSettings)],
    kw_only=True,
)
MaskSettingFields.__doc__ = "The mask settings as plain dataclass fields (see `MaskSettings`)."


__all__ = ["MaskSettingFields", "MaskSettings", "mask_setting"]
