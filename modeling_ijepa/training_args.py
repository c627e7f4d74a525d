# Copyright 2026 The ijepa-hf Authors. All rights reserved.
# Licensed under the Apache License, Version 2.0.
"""The training arguments of I-JEPA pre-training: transformers' `TrainingArguments` plus the I-JEPA schedules."""

from __future__ import annotations

from dataclasses import dataclass, field

from transformers import TrainingArguments

from .monitoring import BEST_MODEL_RULES, check_best_model_rule


@dataclass
class IJepaTrainingArguments(TrainingArguments):
    """[`~transformers.TrainingArguments`] plus the I-JEPA schedules (defaults: the official ViT-H/14 recipe)."""

    learning_rate: float = field(default=1e-3, metadata={"help": "Peak learning rate, reached after warm-up."})
    start_lr: float = field(default=2e-4, metadata={"help": "Learning rate at the start of the linear warm-up."})
    final_lr: float = field(default=1e-6, metadata={"help": "Learning rate at the end of the cosine decay."})
    weight_decay: float = field(default=0.04, metadata={"help": "Weight decay at the start of its cosine schedule."})
    final_weight_decay: float = field(
        default=0.4, metadata={"help": "Weight decay at the end of its cosine schedule."}
    )
    ema_momentum_start: float = field(
        default=0.996, metadata={"help": "Target-encoder EMA momentum at the start, linear to ema_momentum_end."}
    )
    ema_momentum_end: float = field(default=1.0, metadata={"help": "Target-encoder EMA momentum at the end."})
    remove_unused_columns: bool = field(
        default=False, metadata={"help": "Kept False: the I-JEPA collator needs the raw `image` column."}
    )
    ddp_timeout: int = field(
        default=600,
        metadata={
            "help": "Process-group timeout in seconds (transformers' default is 1800): how long a process waits in a "
            "collective for a peer before the run fails. A process that dies ends a one-machine launch at once (the "
            "launcher stops the others); on several machines the survivors fail after this timeout. It must cover "
            "the longest gap between collectives: a checkpoint save or a k-NN evaluation."
        },
    )
    monitor_collapse: bool = field(
        default=True, metadata={"help": "Log target-feature std and effective rank at every logging step."}
    )
    best_model_rule: str = field(
        default="best",
        metadata={
            "help": "How `metric_for_best_model` picks the best checkpoint: 'best' (the Trainer's rule: the highest "
            "score) or 'latest_within_stderr' (the latest checkpoint scoring within one standard error of the "
            "highest, the one-standard-error rule: a noisy monitor does not pick an early checkpoint by luck; the "
            "evaluation must report the metric's standard error as `<metric>_stderr`, as the k-NN monitor does).",
            "choices": list(BEST_MODEL_RULES),
        },
    )

    def __post_init__(self):
        super().__post_init__()
        check_best_model_rule(self.best_model_rule)
        if self.best_model_rule != "best" and self.metric_for_best_model is None:
            raise ValueError(
                f"best_model_rule={self.best_model_rule!r} picks among evaluated checkpoints: set "
                "metric_for_best_model too (e.g. knn_accuracy with the k-NN monitor)."
            )


__all__ = ["IJepaTrainingArguments"]
