# Copyright 2026 The ijepa-hf Authors. All rights reserved.
# Licensed under the Apache License, Version 2.0.
"""Encoders to evaluate and their frozen features.

An encoder is a checkpoint directory or hub id (ours, vanilla transformers' IJepa, or a pre-training checkpoint,
evaluated through its EMA target encoder), or `random:<preset>` for a random-init baseline. [`extract_features`] is
the one feature extractor: average-pooled last-layer features, I-JEPA's evaluation protocol, used by the linear probe,
the k-NN evaluation, fine-tuning's head statistics and the benchmarks.
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


@torch.no_grad()
def extract_features(
    encoder: nn.Module,
    dataset,
    image_processor,
    batch_size: int = 128,
    num_workers: int = 0,
    device: torch.device | str | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """
    Average-pooled last-layer features of every image of `dataset` (columns `image`, `label`), without gradients.

    The encoder runs in eval mode (its previous mode is restored afterwards) on `device`, by default the device of
    its parameters; images are only resized and normalised by `image_processor`, never augmented.

    Returns:
        `features` `(num_images, hidden_size)` float32 and `labels` `(num_images,)` int64 on the CPU. Undecodable
        images are skipped (with their labels).
    """
    device = torch.device(device or next(encoder.parameters()).device)
    was_training = encoder.training
    encoder.eval()
    collator = ImageClassificationCollator(image_processor, augment=False)
    loader = DataLoader(dataset, batch_size=batch_size, collate_fn=collator, num_workers=num_workers)
    features, labels = [], []
    for batch in loader:
        output = encoder(pixel_values=batch["pixel_values"].to(device))
        features.append(pool_features(output.last_hidden_state).float().cpu())
        labels.append(batch["labels"])
    encoder.train(was_training)
    return torch.cat(features), torch.cat(labels).long()


__all__ = [
    "RANDOM_MODEL_PREFIX",
    "extract_features",
    "freeze",
    "load_encoder",
    "load_image_processor",
    "pool_features",
    "random_init_config",
]
