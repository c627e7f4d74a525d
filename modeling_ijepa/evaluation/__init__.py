# Copyright 2026 The ijepa-hf Authors. All rights reserved.
# Licensed under the Apache License, Version 2.0.
"""Downstream evaluation of I-JEPA encoders, one job per module:

- `features.py`: loading an encoder (a checkpoint, a hub id, or `random:<preset>` for a random-init baseline) with its
  image processor, freezing it, and [`extract_features`], the one feature extractor (average-pooled features of the
  last layer, or of the last `k` layers concatenated), and [`extract_patch_tokens`], the patch tokens themselves;
- `attentive.py`: the attentive probe (learned queries cross-attending over the frozen patch tokens, then a linear
  classifier) and its learning-rate x weight-decay grid;
- `heads.py`: the linear-probe head, a frozen encoder feeding a head, and fine-tuning's standardised head;
- `linear_grid.py`: a learning-rate x weight-decay grid of linear heads trained together on cached features, chosen
  on a validation split carved from the training data;
- `counting.py`: an offline counting task (canvases of 1..N digits at random non-overlapping positions) that measures
  how much local information frozen features keep;
- `scores.py`: [`frozen_probe_scores`], linear, attentive and k-NN accuracies of one encoder as plain numbers (an
  evaluator for study runners);
- `knn.py`: weighted / majority-vote k-nearest-neighbour classification by cosine similarity;
- `reporting.py`: the offline accuracy metric, the metrics of a run, the results file and the model card.

Labelled data (splits, class names, label fractions) lives in `modeling_ijepa.data`; layer-wise learning-rate decay in
`modeling_ijepa.optimization`. The scripts in `training_scripts/` (linear_probe, knn_eval, finetune) parse their
options and call these functions with plain keyword arguments. Every public name is importable from
`modeling_ijepa.evaluation`.
"""

from .attentive import (
    AttentiveClassifierHead,
    AttentiveClassifierOutput,
    AttentiveHeadGrid,
    AttentivePooler,
    search_attentive_heads,
    train_attentive_heads,
)
from .counting import build_counting_dataset, build_counting_splits
from .features import (
    RANDOM_MODEL_PREFIX,
    check_pooled_layers,
    encode_patch_tokens,
    encode_pooled,
    extract_features,
    extract_patch_tokens,
    freeze,
    load_encoder,
    load_image_processor,
    pool_features,
    random_init_config,
)
from .heads import FrozenEncoderClassifier, LinearClassifierHead, StandardizedLinear
from .knn import knn_accuracy, knn_predict
from .linear_grid import (
    HeadSearchResult,
    LinearHeadGrid,
    fit_head_grid,
    head_accuracies,
    search_head_grid,
    search_linear_heads,
    train_linear_heads,
    validation_split,
)
from .reporting import (
    ACCURACY_METRIC_DIR,
    accuracy_metric_fn,
    classification_metrics,
    load_accuracy,
    save_metrics,
    write_model_card,
)
from .scores import PROBES, attentive_probe_scores, frozen_probe_scores


__all__ = [
    "RANDOM_MODEL_PREFIX",
    "random_init_config",
    "load_image_processor",
    "load_encoder",
    "freeze",
    "pool_features",
    "check_pooled_layers",
    "encode_patch_tokens",
    "encode_pooled",
    "extract_features",
    "extract_patch_tokens",
    "StandardizedLinear",
    "LinearClassifierHead",
    "FrozenEncoderClassifier",
    "LinearHeadGrid",
    "fit_head_grid",
    "train_linear_heads",
    "head_accuracies",
    "search_head_grid",
    "validation_split",
    "HeadSearchResult",
    "search_linear_heads",
    "AttentivePooler",
    "AttentiveClassifierOutput",
    "AttentiveClassifierHead",
    "AttentiveHeadGrid",
    "train_attentive_heads",
    "search_attentive_heads",
    "build_counting_dataset",
    "build_counting_splits",
    "PROBES",
    "frozen_probe_scores",
    "attentive_probe_scores",
    "knn_predict",
    "knn_accuracy",
    "ACCURACY_METRIC_DIR",
    "load_accuracy",
    "accuracy_metric_fn",
    "classification_metrics",
    "write_model_card",
    "save_metrics",
]
