# Copyright 2026 The ijepa-hf Authors. All rights reserved.
# Licensed under the Apache License, Version 2.0.
"""I-JEPA configuration: the encoder fields of transformers' built-in `IJepaConfig`, plus predictor and mask fields."""

from __future__ import annotations

import json
from importlib import resources
from pathlib import Path

from transformers.models.ijepa.configuration_ijepa import IJepaConfig as _TransformersIJepaConfig

from .masking import MaskSettingFields, MaskSettings, mask_sampler_class, mask_sampler_from_config
from .masking.base import pair
from .regularizers import LOSS_TERMS, LossWeightFields


# Which features the variance / covariance (VICReg) and SIGReg regularisers act on.
REGULARIZED_FEATURES = ("pooled_context", "context", "predictions")
# How target-encoder features become regression targets.
TARGET_NORMALIZATIONS = ("layer_norm", "dyn_tanh")
# How attention skips the padding of `context_truncation="none"`.
PADDED_ATTENTIONS = ("mask", "nested")


def configuration_dir() -> Path:
    """Folder of `models/`, `recipes/` and `accelerate/`: the checkout's `configuration/` or the installed copy."""
    checkout = Path(__file__).resolve().parent.parent / "configuration"
    if (checkout / "models").is_dir():
        return checkout
    return Path(str(resources.files("modeling_ijepa._configuration")))


def list_presets() -> list[str]:
    """Names accepted by [`IJepaConfig.from_preset`], e.g. `"vit_huge_patch14_224"`."""
    return sorted(path.stem for path in (configuration_dir() / "models").glob("*.json"))


class IJepaConfig(_TransformersIJepaConfig, MaskSettingFields, LossWeightFields):
    r"""
    Configuration of an I-JEPA model: the ViT encoder (every field of transformers' built-in `IJepaConfig`, same names
    and meaning), the narrow predictor ViT and the multi-block mask settings of the paper.

    The `model_type` is the built-in `"ijepa"`, so encoder checkpoints saved with this class load in vanilla
    `transformers.IJepaModel` / `AutoModel`, and the extra fields below are ignored there. Importing `modeling_ijepa`
    routes `"ijepa"` to this package's classes (see `modeling_ijepa/__init__.py`).

    Args:
        hidden_size (`int`, *optional*, defaults to 768): width of the encoder.
        num_hidden_layers (`int`, *optional*, defaults to 12): depth of the encoder.
        num_attention_heads (`int`, *optional*, defaults to 12): attention heads of the encoder; must divide
            `hidden_size` (checked when the model is built).
        intermediate_size (`int`, *optional*, defaults to 3072): hidden width of the encoder MLPs.
        layer_norm_eps (`float`, *optional*, defaults to 1e-6): LayerNorm epsilon (I-JEPA uses 1e-6).
        image_size (`int` or `(height, width)`, *optional*, defaults to 224): input resolution; divisible by
            `patch_size`.
        patch_size (`int` or `(height, width)`, *optional*, defaults to 16): patch size of the patch embedding.
        predictor_hidden_size (`int`, *optional*, defaults to 384): width of the predictor.
        predictor_num_hidden_layers (`int`, *optional*, defaults to 12): depth of the predictor.
        predictor_num_attention_heads (`int`, *optional*): heads of the predictor; defaults to `num_attention_heads`.
        predictor_intermediate_size (`int`, *optional*): predictor MLP width; defaults to `4 * predictor_hidden_size`.
        mask settings: `mask_strategy`, `num_target_blocks`, `target_scale`, `target_aspect_ratio`, `context_scale`,
            `context_aspect_ratio`, `min_context_patches`, `allow_overlap`, `mask_placement`, `context_truncation`:
            every field of [`~modeling_ijepa.masking.MaskSettings`], declared there with its default (the paper's
            multi-block rule) and meaning. `context_truncation="none"` keeps every context whole and pads the shorter
            ones with the index `-1` (`modeling_ijepa.masking.CONTEXT_PADDING_INDEX`), which `IJepaForPreTraining`
            turns into an attention mask for the encoder and the predictor.
        padded_attention (`str`, *optional*, defaults to `"mask"`): how the `sdpa` attention skips that padding:
            `"mask"` (a boolean key mask: every sequence is computed at the batch's longest length) or `"nested"`
            (variable length: the real tokens of every sequence are packed into a torch jagged nested tensor, so
            torch's SDPA dispatches to its variable-length kernels on GPU and no padding is computed; on CPU torch
            runs its math kernel on it). Same outputs at real tokens; padding tokens get zeros.
        loss-term weights: `vicreg_variance_weight`, `vicreg_covariance_weight`, `sigreg_weight` (default 0.0: off),
            one field per entry of `modeling_ijepa.regularizers.LOSS_TERMS`, declared there with its meaning.
        sigreg_num_projections (`int`, *optional*, defaults to 256): random directions drawn (from torch's global
            generator, so a resumed run redraws them exactly) at every forward pass for SIGReg.
        regularized_features (`str`, *optional*, defaults to `"pooled_context"`): what the VICReg and SIGReg terms act
            on: `"pooled_context"` (each image's context-encoder output averaged over its context patches, one sample
            per image), `"context"` (every context token) or `"predictions"` (every predicted target token).
        target_normalization (`str`, *optional*, defaults to `"layer_norm"`): how target-encoder features become
            targets: `"layer_norm"` (official, parameter-free LayerNorm over features) or `"dyn_tanh"` (bounded:
            `tanh(dyn_tanh_alpha * features)`, Dynamic Tanh without affine parameters).
        dyn_tanh_alpha (`float`, *optional*, defaults to 0.5): the fixed scale of `"dyn_tanh"` targets (targets get
            no gradient, so it is not learned).

    Example:

    ```python
    >>> from modeling_ijepa import IJepaConfig, IJepaForPreTraining
    >>> config = IJepaConfig.from_preset("vit_small_patch16_224")
    >>> model = IJepaForPreTraining(config)
    ```
    """

    model_type = "ijepa"

    layer_norm_eps: float = 1e-6
    predictor_hidden_size: int = 384
    predictor_num_hidden_layers: int = 12
    predictor_num_attention_heads: int | None = None
    predictor_intermediate_size: int | None = None
    # The mask settings (MaskSettingFields) and the loss-term weights (LossWeightFields) are inherited fields.
    padded_attention: str = "mask"
    # Anti-collapse options: all off by default, which leaves the official loss bit for bit.
    sigreg_num_projections: int = 256
    regularized_features: str = "pooled_context"
    target_normalization: str = "layer_norm"
    dyn_tanh_alpha: float = 0.5

    def __post_init__(self, **kwargs):
        if self.predictor_num_attention_heads is None:
            self.predictor_num_attention_heads = self.num_attention_heads
        if self.predictor_intermediate_size is None:
            self.predictor_intermediate_size = 4 * self.predictor_hidden_size
        for name, value in MaskSettings.from_object(self).as_dict().items():
            if isinstance(value, (list, tuple)):  # pairs are stored as JSON lists
                setattr(self, name, [float(v) for v in value])
        super().__post_init__(**kwargs)
        self._validate_ijepa()

    # ----------------------------------------------------------------------------------------------------------------
    @property
    def grid_size(self) -> tuple[int, int]:
        """Patch grid `(rows, columns)`."""
        image_height, image_width = pair(self.image_size)
        patch_height, patch_width = pair(self.patch_size)
        return image_height // patch_height, image_width // patch_width

    @property
    def num_patches(self) -> int:
        rows, columns = self.grid_size
        return rows * columns

    def _validate_ijepa(self) -> None:
        """
        Field-level checks of the I-JEPA mask settings. Like transformers' configs, the configuration accepts any
        architecture; the model raises when it cannot be built (e.g. heads that do not divide the width, an image size
        that is not a multiple of the patch size), and the mask collator when the masks cannot fit the patch grid.
        """
        mask_sampler_class(self.mask_strategy)
        MaskSettings.from_object(self).check()
        if self.padded_attention not in PADDED_ATTENTIONS:
            raise ValueError(
                f"padded_attention={self.padded_attention!r} is not one of {list(PADDED_ATTENTIONS)}: 'mask' "
                "(default) or 'nested' (variable-length SDPA on packed real tokens)."
            )
        self._validate_anti_collapse_options()

    def _validate_anti_collapse_options(self) -> None:
        for name in (term.weight_field for term in LOSS_TERMS):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 <= value < float("inf"):
                raise ValueError(f"{name}={value!r} must be a finite number >= 0 (0 turns the term off).")
        projections = self.sigreg_num_projections
        if isinstance(projections, bool) or not isinstance(projections, int) or projections < 1:
            raise ValueError(f"sigreg_num_projections={projections!r} must be a positive integer (LeJEPA uses 256).")
        if self.regularized_features not in REGULARIZED_FEATURES:
            raise ValueError(
                f"regularized_features={self.regularized_features!r} is not one of {list(REGULARIZED_FEATURES)}."
            )
        if self.target_normalization not in TARGET_NORMALIZATIONS:
            raise ValueError(
                f"target_normalization={self.target_normalization!r} is not one of {list(TARGET_NORMALIZATIONS)}: "
                "'layer_norm' is the official one, 'dyn_tanh' the bounded alternative."
            )
        alpha = self.dyn_tanh_alpha
        if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not 0.0 < alpha < float("inf"):
            raise ValueError(f"dyn_tanh_alpha={alpha!r} must be a finite number > 0 (the DynTanh default is 0.5).")

    @property
    def uses_regularizers(self) -> bool:
        """Whether any term of `LOSS_TERMS` is on (a weight above 0)."""
        return any(getattr(self, term.weight_field) for term in LOSS_TERMS)

    def check_image_and_patch_size(self) -> None:
        """Raise `ValueError` naming the fix when `image_size` is not a multiple of `patch_size`."""
        image_height, image_width = pair(self.image_size)
        patch_height, patch_width = pair(self.patch_size)
        if image_height % patch_height or image_width % patch_width:
            raise ValueError(
                f"image_size {self.image_size} is not divisible by patch_size {self.patch_size}: choose an image size "
                f"that is a multiple of the patch size (e.g. {image_height // patch_height * patch_height})."
            )

    def check_mask_settings(self) -> None:
        """Raise `ValueError` naming the fix when the mask settings can never give a valid mask on the patch grid."""
        mask_sampler_from_config(self)

    # ----------------------------------------------------------------------------------------------------------------
    @classmethod
    def from_preset(cls, name: str, **overrides) -> IJepaConfig:
        """
        Build a configuration from a preset in `configuration/models/` (see [`list_presets`]), e.g.
        `IJepaConfig.from_preset("vit_huge_patch14_224", predictor_num_hidden_layers=6)`.
        """
        path = configuration_dir() / "models" / f"{name}.json"
        if not path.is_file():
            raise ValueError(f"Unknown preset {name!r}. Available presets: {', '.join(list_presets())}.")
        values = json.loads(path.read_text())
        values.update(overrides)
        return cls(**values)


__all__ = ["IJepaConfig", "REGULARIZED_FEATURES", "TARGET_NORMALIZATIONS", "configuration_dir", "list_presets"]
