# Copyright 2026 The ijepa-hf Authors. All rights reserved.
# Licensed under the Apache License, Version 2.0.
"""The folder a pre-training run or a checkpoint conversion leaves behind, written in one place.

```
output_dir/
├── config.json, model.safetensors   the target encoder: AutoModel and vanilla transformers.IJepaModel load it
├── preprocessor_config.json         its image processor
└── pretraining/                     the full IJepaForPreTraining (encoder, predictor, target encoder) + processor
```
"""

from __future__ import annotations

import os
from pathlib import Path

from torch import nn


PRETRAINING_SUBDIR = "pretraining"


def pretraining_dir(output_dir: str | os.PathLike) -> Path:
    """Where the full `IJepaForPreTraining` of `output_dir` lives."""
    return Path(output_dir) / PRETRAINING_SUBDIR


def write_output_layout(
    output_dir: str | os.PathLike,
    encoder: nn.Module,
    image_processor,
    pretraining_model: nn.Module | None = None,
) -> None:
    """
    Write the target `encoder` and the `image_processor` at the top of `output_dir`, and the processor (plus
    `pretraining_model`, unless the caller saved it there itself, e.g. through `Trainer.save_model`) in `pretraining/`.
    The encoder is saved first: it shares its config with the pre-training model, and saving records the class in it,
    so the pre-training folder's config ends up naming `IJepaForPreTraining`.
    """
    encoder.save_pretrained(output_dir)
    image_processor.save_pretrained(output_dir)
    if pretraining_model is not None:
        pretraining_model.save_pretrained(pretraining_dir(output_dir))
    image_processor.save_pretrained(pretraining_dir(output_dir))


__all__ = ["PRETRAINING_SUBDIR", "pretraining_dir", "write_output_layout"]
