# Copyright 2026 The ijepa-hf Authors. All rights reserved.
# Licensed under the Apache License, Version 2.0.
"""What an evaluation reports: the offline accuracy metric, the metrics of a Trainer-based run, the results file and
the model card of a fine-tuned classifier."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np


ACCURACY_METRIC_DIR = Path(__file__).resolve().parents[1] / "metrics" / "accuracy"


def load_accuracy():
    """
    The accuracy metric as an `evaluate` module, read from the copy shipped in `modeling_ijepa/metrics/accuracy`: it
    never contacts the Hugging Face Hub, so it works offline.
    """
    import evaluate

    script = ACCURACY_METRIC_DIR / "accuracy.py"
    if not script.is_file():
        raise FileNotFoundError(
            f"The shipped accuracy metric is missing at {script}: reinstall ijepa-hf (the metric ships as package "
            "data)."
        )
    return evaluate.load(str(script))


def accuracy_metric_fn(accuracy=None):
    """A `Trainer` `compute_metrics` function: arg-max of the logits compared with the labels, through `accuracy`."""
    accuracy = accuracy or load_accuracy()

    def compute_metrics(evaluation) -> dict[str, float]:
        logits = evaluation.predictions[0] if isinstance(evaluation.predictions, tuple) else evaluation.predictions
        return accuracy.compute(predictions=np.argmax(logits, axis=-1), references=evaluation.label_ids)

    return compute_metrics


def write_model_card(
    output_dir: str | Path,
    base_model: str,
    data_description: str,
    metrics: dict[str, float],
    task: str = "image-classification",
    training_summary: str = "",
) -> Path:
    """Write `README.md` in `output_dir`: what the model is, the data, the metrics and how to load it."""
    output_dir = Path(output_dir)
    metrics_table = "\n".join(
        f"| {name} | {value:.4f} |" if isinstance(value, float) else f"| {name} | {value} |"
        for name, value in sorted(metrics.items())
    )
    card = f"""---
library_name: transformers
pipeline_tag: {task}
tags:
- ijepa
- vision
---

# I-JEPA fine-tuned for image classification

An I-JEPA ViT encoder (`IJepaForImageClassification`: average-pooled patch features and a linear head), fine-tuned
from `{base_model}` with ijepa-hf.

## Data

{data_description}

## Training

{training_summary or "Full fine-tuning with `transformers.Trainer` (training_scripts/finetune.py)."}

## Evaluation

| metric | value |
|---|---|
{metrics_table}

## How to load

The files are the layout of transformers' built-in I-JEPA, so vanilla transformers reads them:

```python
from transformers import AutoImageProcessor, AutoModelForImageClassification

processor = AutoImageProcessor.from_pretrained("{output_dir.as_posix()}")
model = AutoModelForImageClassification.from_pretrained("{output_dir.as_posix()}")
logits = model(**processor(images=image, return_tensors="pt")).logits
```

or `pipeline("image-classification", model="{output_dir.as_posix()}")`.
"""
    path = output_dir / "README.md"
    output_dir.mkdir(parents=True, exist_ok=True)
    path.write_text(card, encoding="utf-8")
    return path


def classification_metrics(
    evaluation: dict,
    train_result,
    *,
    train_dataset,
    eval_dataset,
    class_names: list[str],
    label_fraction: float,
    model_name_or_path: str,
) -> dict:
    """
    The metrics a Trainer-based evaluation script reports: accuracy and losses, data sizes and what was evaluated.

    Args:
        evaluation: `Trainer.evaluate()`'s metrics (`eval_accuracy`, `eval_loss`).
        train_result: `Trainer.train()`'s output (its `training_loss`).
        train_dataset / eval_dataset: the images trained and evaluated on (only their lengths are read).
        class_names: the classes; label_fraction: the fraction of training labels used; model_name_or_path: the
            encoder evaluated.
    """
    return {
        "accuracy": evaluation["eval_accuracy"],
        "eval_loss": evaluation["eval_loss"],
        "train_loss": train_result.training_loss,
        "num_train_samples": len(train_dataset),
        "num_eval_samples": len(eval_dataset),
        "num_classes": len(class_names),
        "label_fraction": label_fraction,
        "model_name_or_path": model_name_or_path,
    }


def save_metrics(output_dir: str | Path, name: str, metrics: dict) -> Path:
    """Write `metrics` to `output_dir/<name>_results.json`."""
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    path = output_dir / f"{name}_results.json"
    path.write_text(json.dumps(metrics, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    return path


__all__ = [
    "ACCURACY_METRIC_DIR",
    "accuracy_metric_fn",
    "classification_metrics",
    "load_accuracy",
    "save_metrics",
    "write_model_card",
]
