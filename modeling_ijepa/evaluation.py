"""Downstream evaluation of I-JEPA encoders: frozen features (linear probe, k-NN) and full fine-tuning.

The helpers here are shared by `training_scripts/linear_probe.py`, `knn_eval.py` and `finetune.py`: the argument
dataclasses, loading an encoder (a checkpoint directory, a hub id, or `random:<preset>` for a random-init baseline)
with its image processor, average-pooled feature extraction, class-balanced label subsets, weighted k-NN, layer-wise
learning-rate decay, the offline accuracy metric and the model card.
"""

from __future__ import annotations

import json
import logging
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader

from .configuration_ijepa import IJepaConfig
from .data import ImageClassificationCollator, default_image_processor, load_image_dataset
from .hardware import require_native_cpu_bf16

logger = logging.getLogger(__name__)

RANDOM_MODEL_PREFIX = "random:"
ACCURACY_METRIC_DIR = Path(__file__).resolve().parent / "metrics" / "accuracy"


# ------------------------------------------------------------------------------------------------------------------
# Arguments shared by the evaluation scripts
# ------------------------------------------------------------------------------------------------------------------
@dataclass
class ModelArguments:
    """Which encoder to evaluate."""

    model_name_or_path: str | None = field(
        default=None,
        metadata={
            "help": "Checkpoint directory or hub id of an I-JEPA encoder (ours or vanilla transformers' IJepa; a saved "
            "IJepaForPreTraining gives its target encoder), or `random:<preset>` (e.g. `random:vit_micro_patch4_48`) "
            "for a randomly initialised baseline."
        },
    )
    cache_dir: str | None = field(default=None, metadata={"help": "Where to cache downloaded models and datasets."})

    def __post_init__(self) -> None:
        if not self.model_name_or_path:
            raise ValueError(
                "--model_name_or_path is required: pass a checkpoint directory (e.g. outputs/pretrain), a hub id "
                "(e.g. facebook/ijepa_vith14_1k), or `random:vit_micro_patch4_48` for a random-init baseline."
            )


@dataclass
class DataArguments:
    """Labelled images. Without `dataset_name` / `train_dir`, the embedded digits (train 1200 / test 597, 48 px)."""

    dataset_name: str | None = field(default=None, metadata={"help": "Hub dataset, e.g. `ILSVRC/imagenet-1k`."})
    dataset_config_name: str | None = field(default=None, metadata={"help": "Configuration of the hub dataset."})
    train_split: str = field(default="train", metadata={"help": "Training split of the hub dataset."})
    eval_split: str = field(default="validation", metadata={"help": "Evaluation split of the hub dataset."})
    train_dir: str | None = field(default=None, metadata={"help": "Local imagefolder (class sub-folders) or parquet."})
    validation_dir: str | None = field(
        default=None,
        metadata={"help": "Local evaluation images; without it, `train_val_split` of --train_dir is held out."},
    )
    train_val_split: float = field(
        default=0.15, metadata={"help": "Fraction of --train_dir held out for evaluation when no --validation_dir."}
    )
    image_column: str | None = field(default=None, metadata={"help": "Image column (found automatically if unset)."})
    label_column: str | None = field(default=None, metadata={"help": "Label column (found automatically if unset)."})
    label_fraction: float = field(
        default=1.0,
        metadata={"help": "Train on this class-balanced, seeded fraction of the labels (e.g. 0.01: one percent)."},
    )
    max_train_samples: int | None = field(default=None, metadata={"help": "Keep only the first N training images."})
    max_eval_samples: int | None = field(default=None, metadata={"help": "Keep only the first N evaluation images."})

    def __post_init__(self) -> None:
        if not 0.0 < self.label_fraction <= 1.0:
            raise ValueError(f"--label_fraction must be in (0, 1], got {self.label_fraction}.")
        if not 0.0 < self.train_val_split < 1.0:
            raise ValueError(f"--train_val_split must be in (0, 1), got {self.train_val_split}.")


def parse_arguments(parser, argv: Sequence[str] | None) -> tuple:
    """
    Parse `argv` (default `sys.argv[1:]`) into the parser's dataclasses; a single `.json` / `.yaml` argument is read
    as a file of options.
    """
    from transformers import TrainingArguments

    argv = list(sys.argv[1:] if argv is None else argv)
    if len(argv) == 1 and argv[0].endswith(".json"):
        parsed = parser.parse_json_file(json_file=argv[0])
    elif len(argv) == 1 and argv[0].endswith((".yaml", ".yml")):
        parsed = parser.parse_yaml_file(yaml_file=argv[0])
    else:
        parsed = parser.parse_args_into_dataclasses(args=argv)
    for arguments in parsed:
        if isinstance(arguments, TrainingArguments) and arguments.bf16 and arguments.device.type == "cpu":
            try:
                require_native_cpu_bf16("--bf16")
            except ValueError as error:
                parser.error(str(error))
    return parsed


# ------------------------------------------------------------------------------------------------------------------
# Data
# ------------------------------------------------------------------------------------------------------------------
def sample_label_fraction(labels: Sequence[int], fraction: float, seed: int = 0) -> np.ndarray:
    """
    A class-balanced, seeded subset of the examples: `round(fraction * n_c)` random examples of every class `c`
    (at least one per class), so the class proportions are kept, e.g. 1 % of ImageNet is ~13 images per class.

    Args:
        labels: `(num_examples,)` integer class of every example.
        fraction: in `(0, 1]`; `1.0` keeps everything.
        seed: the same seed always gives the same subset.

    Returns:
        `(num_selected,)` int64 indices into `labels`, sorted.
    """
    if not 0.0 < fraction <= 1.0:
        raise ValueError(f"The label fraction must be in (0, 1], got {fraction}.")
    labels = np.asarray(labels)
    if fraction == 1.0:
        return np.arange(len(labels), dtype=np.int64)
    generator = np.random.default_rng(seed)
    selected = []
    for label in np.unique(labels):
        members = np.flatnonzero(labels == label)
        count = max(1, int(round(fraction * len(members))))
        selected.append(generator.choice(members, size=count, replace=False))
    return np.sort(np.concatenate(selected)).astype(np.int64)


def class_names(dataset) -> list[str]:
    """Class names from the `label` column's `ClassLabel` feature, else the sorted distinct label values."""
    feature = (dataset.features or {}).get("label")
    names = getattr(feature, "names", None)
    if names:
        return list(names)
    values = sorted(set(int(v) for v in dataset["label"]))
    if values != list(range(len(values))):
        raise ValueError(
            f"Labels must be class indices 0..num_classes-1 (or a ClassLabel column); found values {values[:10]}..."
        )
    return [str(v) for v in values]


def load_classification_datasets(data_args: DataArguments, seed: int = 0, image_size: int | Sequence[int] = 48):
    """
    The training and evaluation `datasets.Dataset`s (columns `image`, `label`), after `max_*_samples` and then
    `label_fraction` (class-balanced, seeded by `seed`) are applied to the training split. `image_size` is a model
    config's value (an int or a `(height, width)` pair); it sizes the embedded digits default.

    Returns:
        `(train_dataset, eval_dataset, class_names)`.
    """
    common = dict(
        dataset_name=data_args.dataset_name,
        dataset_config_name=data_args.dataset_config_name,
        image_column=data_args.image_column,
        label_column=data_args.label_column,
        image_size=_square_size(image_size),
    )
    if data_args.dataset_name:
        train = load_image_dataset(split=data_args.train_split, **common)
        evaluation = load_image_dataset(split=data_args.eval_split, **common)
    elif data_args.train_dir and not data_args.validation_dir:
        full = load_image_dataset(train_dir=data_args.train_dir, split="train", **common)
        split = full.train_test_split(test_size=data_args.train_val_split, seed=seed)
        train, evaluation = split["train"], split["test"]
    else:
        dirs = dict(train_dir=data_args.train_dir, validation_dir=data_args.validation_dir)
        if data_args.validation_dir and not data_args.train_dir:
            raise ValueError("--validation_dir needs a --train_dir to train on.")
        train = load_image_dataset(split="train", **dirs, **common)
        evaluation = load_image_dataset(split="validation", **dirs, **common)
    for name, dataset in (("training", train), ("evaluation", evaluation)):
        if "label" not in dataset.column_names:
            raise ValueError(f"The {name} data has no label column: pass --label_column.")

    if data_args.max_train_samples is not None:
        train = train.select(range(min(data_args.max_train_samples, len(train))))
    if data_args.max_eval_samples is not None:
        evaluation = evaluation.select(range(min(data_args.max_eval_samples, len(evaluation))))
    if data_args.label_fraction < 1.0:
        train = train.select(sample_label_fraction(train["label"], data_args.label_fraction, seed))
    return train, evaluation, class_names(train)


# ------------------------------------------------------------------------------------------------------------------
# Models
# ------------------------------------------------------------------------------------------------------------------
def _square_size(image_size) -> int:
    return int(image_size[0] if isinstance(image_size, (list, tuple)) else image_size)


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

    from .modeling_ijepa import IJepaModel

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


class StandardizedLinear(nn.Module):
    """
    `linear((features - mean) / std)` with fixed statistics: a fine-tuning head that sees unit-scale features.

    I-JEPA's average-pooled features share a large common component and vary little between images (on the digits,
    a std of ~0.01 around a mean of ~0.8), so a plain linear head barely learns at fine-tuning learning rates. The
    statistics are fixed (not running), so [`fold`] turns the head back into one exact `nn.Linear`, keeping saved
    classifiers in the vanilla `IJepaForImageClassification` layout.
    """

    def __init__(self, linear: nn.Linear, mean: torch.Tensor, std: torch.Tensor, eps: float = 1e-6):
        super().__init__()
        self.linear = linear
        self.register_buffer("mean", mean.detach().clone().float())
        self.register_buffer("scale", 1.0 / (std.detach().float() + eps))

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        """`features` `(batch, hidden_size)` -> logits `(batch, num_labels)`."""
        return self.linear((features - self.mean.to(features.dtype)) * self.scale.to(features.dtype))

    @torch.no_grad()
    def fold(self) -> nn.Linear:
        """The equivalent plain `nn.Linear`: `W' = W * scale`, `b' = b - W' @ mean`."""
        weight = self.linear.weight * self.scale
        folded = nn.Linear(weight.shape[1], weight.shape[0]).to(weight.device, self.linear.weight.dtype)
        folded.weight.copy_(weight)
        folded.bias.copy_(self.linear.bias - weight @ self.mean)
        return folded


class LinearClassifierHead(nn.Module):
    """
    Linear probe head: an optional non-affine `BatchNorm1d` on the features (MAE's probe; it only standardises the
    frozen features, so the head stays linear) followed by `nn.Linear(hidden_size, num_labels)`.

    `forward(features (batch, hidden_size), labels (batch,) optional)` returns `{"loss", "logits" (batch, num_labels)}`.
    """

    def __init__(self, hidden_size: int, num_labels: int, batch_norm: bool = True):
        super().__init__()
        # momentum=None: running statistics are the plain average over all training batches, exact after a few
        # steps, whereas an exponential average lags far behind pooled features whose mean is large against their spread.
        self.norm = nn.BatchNorm1d(hidden_size, affine=False, eps=1e-6, momentum=None) if batch_norm else nn.Identity()
        self.classifier = nn.Linear(hidden_size, num_labels)
        nn.init.trunc_normal_(self.classifier.weight, std=0.01)
        nn.init.zeros_(self.classifier.bias)

    def forward(self, features: torch.Tensor, labels: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        logits = self.classifier(self.norm(features))
        output = {"logits": logits}
        if labels is not None:
            output["loss"] = nn.functional.cross_entropy(logits, labels)
        return output


class FrozenEncoderClassifier(nn.Module):
    """
    A frozen encoder (always in eval mode, no gradients) feeding a trainable head on its average-pooled features, for
    probing without cached features (e.g. with augmentation).

    `forward(pixel_values (batch, 3, height, width), labels (batch,) optional)` returns the head's output.
    """

    def __init__(self, encoder: nn.Module, head: nn.Module):
        super().__init__()
        self.encoder = freeze(encoder)
        self.head = head

    def train(self, mode: bool = True) -> "FrozenEncoderClassifier":
        super().train(mode)
        self.encoder.eval()
        return self

    def forward(self, pixel_values: torch.Tensor, labels: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        with torch.no_grad():
            features = pool_features(self.encoder(pixel_values=pixel_values).last_hidden_state)
        return self.head(features, labels)


# ------------------------------------------------------------------------------------------------------------------
# Metrics
# ------------------------------------------------------------------------------------------------------------------
def load_accuracy():
    """
    The accuracy metric as an `evaluate` module, read from the copy shipped in `modeling_ijepa/metrics/accuracy`: it
    never contacts the Hugging Face Hub, so it works offline.
    """
    import evaluate

    script = ACCURACY_METRIC_DIR / "accuracy.py"
    if not script.is_file():
        raise FileNotFoundError(
            f"The shipped accuracy metric is missing at {script}: reinstall ijepa-hf (the metric ships as package data)."
        )
    return evaluate.load(str(script))


def accuracy_metric_fn(accuracy=None):
    """A `Trainer` `compute_metrics` function: arg-max of the logits compared with the labels, through `accuracy`."""
    accuracy = accuracy or load_accuracy()

    def compute_metrics(evaluation) -> dict[str, float]:
        logits = evaluation.predictions[0] if isinstance(evaluation.predictions, tuple) else evaluation.predictions
        return accuracy.compute(predictions=np.argmax(logits, axis=-1), references=evaluation.label_ids)

    return compute_metrics


@torch.no_grad()
def knn_predict(
    train_features: torch.Tensor,
    train_labels: torch.Tensor,
    test_features: torch.Tensor,
    k: int = 20,
    temperature: float | None = 0.07,
    num_classes: int | None = None,
    chunk_size: int = 1024,
) -> torch.Tensor:
    """
    k-nearest-neighbour classification by cosine similarity.

    Each test point takes its `k` most similar training points. With a `temperature`, neighbour `i` votes with weight
    `exp(similarity_i / temperature)` (the weighted k-NN of Wu et al. 2018 / DINO); with `temperature=None`, every
    neighbour has one vote (plain majority). Ties go to the lowest class index.

    Args:
        train_features: `(num_train, dim)`; train_labels: `(num_train,)` class indices.
        test_features: `(num_test, dim)`.
        num_classes: defaults to `train_labels.max() + 1`.

    Returns:
        `(num_test,)` predicted class indices.
    """
    if k < 1:
        raise ValueError(f"k must be at least 1, got {k}.")
    if temperature is not None and temperature <= 0:
        raise ValueError(f"The k-NN temperature must be positive (or None for majority voting), got {temperature}.")
    train_labels = train_labels.long()
    num_classes = int(num_classes or int(train_labels.max()) + 1)
    k = min(k, train_features.size(0))
    train_features = nn.functional.normalize(train_features.float(), dim=1)
    predictions = []
    for test_chunk in nn.functional.normalize(test_features.float(), dim=1).split(chunk_size):
        similarity, neighbours = (test_chunk @ train_features.T).topk(k, dim=1)  # (chunk, k)
        weights = torch.ones_like(similarity) if temperature is None else (similarity / temperature).exp()
        votes = torch.zeros(test_chunk.size(0), num_classes).scatter_add_(1, train_labels[neighbours], weights)
        predictions.append(votes.argmax(dim=1))
    return torch.cat(predictions)


def knn_accuracy(
    train_features: torch.Tensor,
    train_labels: torch.Tensor,
    test_features: torch.Tensor,
    test_labels: torch.Tensor,
    k: int = 20,
    temperature: float | None = 0.07,
) -> float:
    """
    Accuracy in [0, 1] of [`knn_predict`] on `test_features` `(num_test, dim)` against `test_labels` `(num_test,)`.
    """
    num_classes = int(max(int(train_labels.max()), int(test_labels.max()))) + 1
    predictions = knn_predict(train_features, train_labels, test_features, k, temperature, num_classes)
    return float((predictions == test_labels.long()).float().mean())


# ------------------------------------------------------------------------------------------------------------------
# Fine-tuning
# ------------------------------------------------------------------------------------------------------------------
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
    metrics_table = "\n".join(f"| {name} | {value:.4f} |" if isinstance(value, float) else f"| {name} | {value} |"
                              for name, value in sorted(metrics.items()))
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
    evaluation: dict, train_result, train_dataset, eval_dataset, names: list[str], data_args: DataArguments,
    model_args: ModelArguments,
) -> dict:
    """The metrics a Trainer-based evaluation script reports: accuracy and losses, data sizes and what was evaluated."""
    return {
        "accuracy": evaluation["eval_accuracy"],
        "eval_loss": evaluation["eval_loss"],
        "train_loss": train_result.training_loss,
        "num_train_samples": len(train_dataset),
        "num_eval_samples": len(eval_dataset),
        "num_classes": len(names),
        "label_fraction": data_args.label_fraction,
        "model_name_or_path": model_args.model_name_or_path,
    }


def save_metrics(output_dir: str | Path, name: str, metrics: dict) -> Path:
    """Write `metrics` to `output_dir/<name>_results.json`."""
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    path = output_dir / f"{name}_results.json"
    path.write_text(json.dumps(metrics, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    return path


__all__ = [
    "ModelArguments",
    "DataArguments",
    "parse_arguments",
    "sample_label_fraction",
    "class_names",
    "load_classification_datasets",
    "random_init_config",
    "load_image_processor",
    "load_encoder",
    "freeze",
    "pool_features",
    "extract_features",
    "LinearClassifierHead",
    "FrozenEncoderClassifier",
    "load_accuracy",
    "accuracy_metric_fn",
    "knn_predict",
    "knn_accuracy",
    "write_model_card",
    "classification_metrics",
    "save_metrics",
]
