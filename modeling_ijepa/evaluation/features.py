# Copyright 2026 The ijepa-hf Authors. All rights reserved.
# Licensed under the Apache License, Version 2.0.
"""Encoders to evaluate and their frozen features.

An encoder is a checkpoint directory or hub id (ours, vanilla transformers' IJepa, or a pre-training checkpoint,
evaluated through its EMA target encoder), or `random:<preset>` for a random-init baseline. [`extract_features`] is
the one feature extractor, used by the linear probe, the k-NN evaluation, fine-tuning's head statistics and the
benchmarks: average-pooled features of the last layer (I-JEPA's evaluation protocol) or of the last `k` layers,
concatenated ([`encode_pooled`]).
"""

from __future__ import annotations

import logging
from functools import partial

import torch
from torch import nn
from torch.utils.data import DataLoader

from ..configuration_ijepa import IJepaConfig
from ..data import ImageClassificationCollator, default_image_processor


logger = logging.getLogger(__name__)

RANDOM_MODEL_PREFIX = "random:"


def random_init_config(model_name_or_path: str, **overrides) -> IJepaConfig | None:
    """The preset configuration named by `random:<preset>`, or `None` for any other model name."""
    if not model_name_or_path.startswith(RANDOM_MODEL_PREFIX):
        return None
    return IJepaConfig.from_preset(model_name_or_path[len(RANDOM_MODEL_PREFIX) :], **overrides)


def load_image_processor(model_name_or_path: str, config, cache_dir: str | None = None):
    """The checkpoint's saved image processor, else [`default_image_processor`] at the model's resolution."""
    if not model_name_or_path.startswith(RANDOM_MODEL_PREFIX):
        from transformers import AutoImageProcessor

        try:
            return AutoImageProcessor.from_pretrained(model_name_or_path, cache_dir=cache_dir)
        except (OSError, ValueError) as error:
            logger.info("No image processor saved with %s (%s); using the default one.", model_name_or_path, error)
    return default_image_processor(config.image_size)


def load_encoder(
    model_name_or_path: str, seed: int = 0, cache_dir: str | None = None, random_init: bool = False
) -> tuple[nn.Module, object]:
    """
    Load an encoder and its image processor.

    `model_name_or_path` is a checkpoint directory or hub id read with `transformers.AutoModel` (our checkpoints,
    vanilla transformers IJepa ones, or a pre-training checkpoint, whose EMA target encoder is returned), or
    `random:<preset>`: a fresh [`IJepaModel`] of `IJepaConfig.from_preset(preset)`, initialised under `seed`. With
    `random_init`, a checkpoint's configuration is used the same way: a fresh network of its architecture, seeded by
    `seed`, with the checkpoint's image processor.

    Returns:
        `(encoder, image_processor)`.
    """
    from transformers import AutoModel

    from ..modeling_ijepa import IJepaModel

    config = random_init_config(model_name_or_path)
    if config is None and random_init:
        config = IJepaConfig.from_pretrained(model_name_or_path, cache_dir=cache_dir)
    if config is not None:
        torch.manual_seed(seed)
        encoder = IJepaModel(config)
    else:
        encoder = AutoModel.from_pretrained(model_name_or_path, cache_dir=cache_dir)
    return encoder, load_image_processor(model_name_or_path, encoder.config, cache_dir)


def freeze(module: nn.Module) -> nn.Module:
    """Switch `module` to eval mode with every parameter frozen (`requires_grad=False`); returns it."""
    module.requires_grad_(False)
    return module.eval()


def pool_features(last_hidden_state: torch.Tensor) -> torch.Tensor:
    """Average-pool patch tokens, I-JEPA's evaluation protocol: `(batch, tokens, hidden)` -> `(batch, hidden)`."""
    return last_hidden_state.mean(dim=1)


def check_pooled_layers(pooled_layers: int, num_hidden_layers: int) -> None:
    """Refuse a `pooled_layers` the encoder cannot give: it must be in `[1, num_hidden_layers]`."""
    if isinstance(pooled_layers, bool) or not isinstance(pooled_layers, int):
        raise TypeError(f"pooled_layers must be an int (the number of last layers to pool), got {pooled_layers!r}.")
    if not 1 <= pooled_layers <= num_hidden_layers:
        raise ValueError(
            f"pooled_layers must be between 1 and the encoder's {num_hidden_layers} layers, got {pooled_layers}: "
            "pass --pooled_layers 1 for the last layer, or a larger value up to the encoder's depth."
        )


def encode_patch_tokens(encoder: nn.Module, pixel_values: torch.Tensor, layers: int = 1) -> torch.Tensor:
    """
    Patch tokens of the last `layers` layers of `encoder`, concatenated along the hidden dimension.

    `layers=1` is `last_hidden_state` (the last layer after the encoder's final LayerNorm). With `k > 1`, each of the
    last `k` layer outputs is normalised by the same final LayerNorm (`encoder.layernorm`, the normalisation the last
    layer gets) and the `k` outputs are concatenated per token from the earliest layer to the last. Only the `k`
    layers asked for are kept during the forward pass.

    Args:
        encoder: an I-JEPA encoder (ours or vanilla transformers' `IJepaModel`) with `config.num_hidden_layers`.
        pixel_values: `(batch_size, num_channels, height, width)`.
        layers: `k`, in `[1, config.num_hidden_layers]`.

    Returns:
        `(batch_size, num_patches, layers * hidden_size)`.
    """
    check_pooled_layers(layers, encoder.config.num_hidden_layers)
    if layers == 1:
        return encoder(pixel_values=pixel_values).last_hidden_state
    # `hidden_states[i]` is the output of layer i (0: the embeddings), before the final LayerNorm; the last one is
    # taken from `last_hidden_state`, which has that LayerNorm already.
    earlier = list(range(-layers, -1))
    output = encoder(pixel_values=pixel_values, output_hidden_states=earlier)
    outputs = [encoder.layernorm(output.hidden_states[index]) for index in earlier] + [output.last_hidden_state]
    return torch.cat(outputs, dim=-1)


def encode_pooled(encoder: nn.Module, pixel_values: torch.Tensor, pooled_layers: int = 1) -> torch.Tensor:
    """
    Average-pooled features of the last `pooled_layers` layers of `encoder`, concatenated: the mean over patches of
    [`encode_patch_tokens`].

    `pooled_layers=1` is the mean over patch tokens of `last_hidden_state`, exactly as before this option existed.
    With `k > 1`, each of the last `k` layers goes through the encoder's final LayerNorm, is average-pooled, and the
    `k` vectors are concatenated from the earliest layer to the last, as DINOv2's linear evaluation does with
    `n_last_blocks` (`get_intermediate_layers(..., norm=True)`).

    Args:
        encoder: an I-JEPA encoder (ours or vanilla transformers' `IJepaModel`) with `config.num_hidden_layers`.
        pixel_values: `(batch_size, num_channels, height, width)`.
        pooled_layers: `k`, in `[1, config.num_hidden_layers]`.

    Returns:
        `(batch_size, pooled_layers * hidden_size)`.
    """
    return pool_features(encode_patch_tokens(encoder, pixel_values, pooled_layers))


def _encode_dataset(
    encode, encoder: nn.Module, dataset, image_processor, batch_size: int, num_workers: int, device
) -> tuple[torch.Tensor, torch.Tensor]:
    """`encode(encoder, pixel_values)` of every image of `dataset`, in eval mode, concatenated on the CPU."""
    device = torch.device(device or next(encoder.parameters()).device)
    was_training = encoder.training
    encoder.eval()
    collator = ImageClassificationCollator(image_processor, augment=False)
    loader = DataLoader(dataset, batch_size=batch_size, collate_fn=collator, num_workers=num_workers)
    features, labels = [], []
    for batch in loader:
        features.append(encode(encoder, batch["pixel_values"].to(device)).float().cpu())
        labels.append(batch["labels"])
    encoder.train(was_training)
    return torch.cat(features), torch.cat(labels).long()


@torch.no_grad()
def extract_features(
    encoder: nn.Module,
    dataset,
    image_processor,
    batch_size: int = 128,
    num_workers: int = 0,
    device: torch.device | str | None = None,
    pooled_layers: int = 1,
) -> tuple[torch.Tensor, torch.Tensor]:
    """
    Average-pooled features ([`encode_pooled`]) of every image of `dataset` (columns `image`, `label`), without
    gradients: the last layer's by default, the last `pooled_layers` layers' concatenated otherwise.

    The encoder runs in eval mode (its previous mode is restored afterwards) on `device`, by default the device of
    its parameters; images are only resized and normalised by `image_processor`, never augmented.

    Returns:
        `features` `(num_images, pooled_layers * hidden_size)` float32 and `labels` `(num_images,)` int64 on the
        CPU. Undecodable images are skipped (with their labels).
    """
    check_pooled_layers(pooled_layers, encoder.config.num_hidden_layers)
    encode = partial(encode_pooled, pooled_layers=pooled_layers)
    return _encode_dataset(encode, encoder, dataset, image_processor, batch_size, num_workers, device)


@torch.no_grad()
def extract_patch_tokens(
    encoder: nn.Module,
    dataset,
    image_processor,
    batch_size: int = 128,
    num_workers: int = 0,
    device: torch.device | str | None = None,
    layers: int = 1,
    max_bytes: int | None = 8 * 2**30,
) -> tuple[torch.Tensor, torch.Tensor]:
    """
    Patch tokens ([`encode_patch_tokens`]) of every image of `dataset` (columns `image`, `label`), without gradients,
    computed once so that heads which read every token (the attentive probe) train on them without the encoder.

    As [`extract_features`]: eval mode (restored afterwards), on `device` (default: the encoder's), images only
    resized and normalised. The tokens are float32 on the CPU; before any image is encoded, their size is compared
    with `max_bytes` (`None`: no limit) and a larger set is refused.

    Returns:
        `tokens` `(num_images, num_patches, layers * hidden_size)` float32 and `labels` `(num_images,)` int64.
    """
    check_pooled_layers(layers, encoder.config.num_hidden_layers)
    config = encoder.config
    image_size = config.image_size if isinstance(config.image_size, int) else config.image_size[0]
    num_patches = (image_size // config.patch_size) ** 2
    needed = len(dataset) * num_patches * layers * config.hidden_size * 4
    if max_bytes is not None and needed > max_bytes:
        raise ValueError(
            f"The patch tokens of {len(dataset)} images ({num_patches} patches x {layers * config.hidden_size} "
            f"values each) need {needed / 2**30:.1f} GiB, more than the {max_bytes / 2**30:.1f} GiB allowed: use "
            "fewer images (--max_train_samples, --label_fraction), fewer layers, or a larger limit."
        )
    encode = partial(encode_patch_tokens, layers=layers)
    return _encode_dataset(encode, encoder, dataset, image_processor, batch_size, num_workers, device)


__all__ = [
    "RANDOM_MODEL_PREFIX",
    "check_pooled_layers",
    "encode_patch_tokens",
    "encode_pooled",
    "extract_features",
    "extract_patch_tokens",
    "freeze",
    "load_encoder",
    "load_image_processor",
    "pool_features",
    "random_init_config",
]
