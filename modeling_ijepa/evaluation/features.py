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


def encode_pooled(encoder: nn.Module, pixel_values: torch.Tensor, pooled_layers: int = 1) -> torch.Tensor:
    """
    Average-pooled features of the last `pooled_layers` layers of `encoder`, concatenated.

    `pooled_layers=1` is the mean over patch tokens of `last_hidden_state` (the last layer after the encoder's final
    LayerNorm), exactly as before this option existed. With `k > 1`, each of the last `k` layer outputs is normalised
    by the same final LayerNorm (`encoder.layernorm`, the normalisation the last layer gets), average-pooled, and the
    `k` vectors are concatenated from the earliest layer to the last, as DINOv2's linear evaluation does with
    `n_last_blocks` (`get_intermediate_layers(..., norm=True)`). Only the `k` layers asked for are kept during the
    forward pass.

    Args:
        encoder: an I-JEPA encoder (ours or vanilla transformers' `IJepaModel`) with `config.num_hidden_layers`.
        pixel_values: `(batch_size, num_channels, height, width)`.
        pooled_layers: `k`, in `[1, config.num_hidden_layers]`.

    Returns:
        `(batch_size, pooled_layers * hidden_size)`.
    """
    check_pooled_layers(pooled_layers, encoder.config.num_hidden_layers)
    if pooled_layers == 1:
        return pool_features(encoder(pixel_values=pixel_values).last_hidden_state)
    # `hidden_states[i]` is the output of layer i (0: the embeddings), before the final LayerNorm; the last one is
    # taken from `last_hidden_state`, which has that LayerNorm already.
    earlier = list(range(-pooled_layers, -1))
    output = encoder(pixel_values=pixel_values, output_hidden_states=earlier)
    layers = [encoder.layernorm(output.hidden_states[index]) for index in earlier] + [output.last_hidden_state]
    return torch.cat([pool_features(layer) for layer in layers], dim=-1)


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
    device = torch.device(device or next(encoder.parameters()).device)
    was_training = encoder.training
    encoder.eval()
    collator = ImageClassificationCollator(image_processor, augment=False)
    loader = DataLoader(dataset, batch_size=batch_size, collate_fn=collator, num_workers=num_workers)
    features, labels = [], []
    for batch in loader:
        pooled = encode_pooled(encoder, batch["pixel_values"].to(device), pooled_layers)
        features.append(pooled.float().cpu())
        labels.append(batch["labels"])
    encoder.train(was_training)
    return torch.cat(features), torch.cat(labels).long()


__all__ = [
    "RANDOM_MODEL_PREFIX",
    "check_pooled_layers",
    "encode_pooled",
    "extract_features",
    "freeze",
    "load_encoder",
    "load_image_processor",
    "pool_features",
    "random_init_config",
]
