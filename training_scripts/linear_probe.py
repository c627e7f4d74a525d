"""Linear probe of a frozen I-JEPA encoder: a linear classifier on average-pooled last-layer features.

The encoder is frozen (eval mode, no gradients). By default its features are computed once, without gradients, and
the head is trained with `transformers.Trainer` on those cached features; `--cache_features false` runs the frozen
encoder inside every training step instead.

Embedded digits (no data arguments), random-init baseline:

    python training_scripts/linear_probe.py --model_name_or_path random:vit_micro_patch4_48

A pre-trained checkpoint on 1 % of the labels; options from a YAML / JSON recipe, flags overriding it:

    python training_scripts/linear_probe.py --model_name_or_path outputs/pretrain --label_fraction 0.01
    python training_scripts/linear_probe.py --config probe.yaml --learning_rate 0.05
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import datasets
from transformers import Trainer, TrainingArguments, set_seed

from modeling_ijepa.cli import EvaluationDataArguments, EvaluationModelArguments, RecipeArgumentParser
from modeling_ijepa.data import ImageClassificationCollator, load_classification_datasets
from modeling_ijepa.evaluation import (
    FrozenEncoderClassifier,
    LinearClassifierHead,
    accuracy_metric_fn,
    classification_metrics,
    extract_features,
    freeze,
    load_encoder,
    save_metrics,
)


logger = logging.getLogger(__name__)


@dataclass
class ProbeArguments:
    """The probe itself."""

    cache_features: bool = field(
        default=True,
        metadata={"help": "Extract the frozen features once and train the head on them (fast); false runs the "
                  "frozen encoder in every step."},
    )
    head_batchnorm: bool = field(
        default=True,
        metadata={"help": "Standardise the features with a non-affine BatchNorm before the linear layer (as MAE)."},
    )
    feature_batch_size: int = field(default=128, metadata={"help": "Batch size of the feature extraction."})


@dataclass
class LinearProbeTrainingArguments(TrainingArguments):
    """`TrainingArguments` with defaults for a linear probe on cached features."""

    output_dir: str | None = field(default="outputs/linear_probe", metadata={"help": "Where results are written."})
    num_train_epochs: float = field(default=100.0, metadata={"help": "Epochs over the training features."})
    learning_rate: float = field(default=0.1, metadata={"help": "Peak learning rate of the head."})
    weight_decay: float = field(default=0.0, metadata={"help": "AdamW weight decay of the head."})
    lr_scheduler_type: str = field(default="cosine", metadata={"help": "Learning-rate schedule."})
    warmup_steps: float = field(default=0.05, metadata={"help": "Warm-up steps (a float < 1 is a fraction)."})
    per_device_train_batch_size: int = field(default=256, metadata={"help": "Training batch size."})
    per_device_eval_batch_size: int = field(default=1024, metadata={"help": "Evaluation batch size."})
    logging_steps: float = field(default=100, metadata={"help": "Log every N steps."})
    save_strategy: str = field(default="no", metadata={"help": "Checkpointing strategy ('no', 'epoch', 'steps')."})
    optim: str = field(default="adamw_torch", metadata={"help": "Optimizer."})
    disable_tqdm: bool | None = field(default=True, metadata={"help": "Hide progress bars."})


def parse_args(
    argv: list[str] | None = None,
) -> tuple[EvaluationModelArguments, EvaluationDataArguments, ProbeArguments, LinearProbeTrainingArguments]:
    """A recipe (`--config FILE`, or a single .yaml / .json argument) gives the defaults; flags override them."""
    parser = RecipeArgumentParser(
        (EvaluationModelArguments, EvaluationDataArguments, ProbeArguments, LinearProbeTrainingArguments),
        prog="linear_probe.py",
        description=__doc__,
    )
    return parser.parse(argv)[:4]


def main(argv: list[str] | None = None) -> dict:
    """Run the probe; returns the metrics (`accuracy` in [0, 1], ...), also written to `output_dir`."""
    model_args, data_args, probe_args, training_args = parse_args(argv)
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", level=logging.INFO)
    set_seed(training_args.seed)

    encoder, image_processor = load_encoder(model_args.model_name_or_path, training_args.seed, model_args.cache_dir)
    freeze(encoder).to(training_args.device)
    train_dataset, eval_dataset, names = load_classification_datasets(
        **data_args.dataset_kwargs(), seed=training_args.seed, image_size=encoder.config.image_size
    )
    head = LinearClassifierHead(encoder.config.hidden_size, len(names), batch_norm=probe_args.head_batchnorm)

    if probe_args.cache_features:
        def cached(dataset) -> datasets.Dataset:
            features, labels = extract_features(
                encoder, dataset, image_processor, probe_args.feature_batch_size,
                training_args.dataloader_num_workers, training_args.device,
            )
            columns = {"features": features.numpy(), "labels": labels.numpy()}
            return datasets.Dataset.from_dict(columns).with_format("torch")

        model, train_dataset, eval_dataset, data_collator = head, cached(train_dataset), cached(eval_dataset), None
    else:
        model = FrozenEncoderClassifier(encoder, head)
        data_collator = ImageClassificationCollator(image_processor, augment=False)
        training_args.remove_unused_columns = False

    trainer = Trainer(
        model=model,
        args=training_args,
        train_dataset=train_dataset,
        eval_dataset=eval_dataset,
        data_collator=data_collator,
        compute_metrics=accuracy_metric_fn(),
    )
    train_result = trainer.train()
    evaluation = trainer.evaluate()
    trainer.save_model()

    metrics = classification_metrics(
        evaluation,
        train_result,
        train_dataset=train_dataset,
        eval_dataset=eval_dataset,
        class_names=names,
        label_fraction=data_args.label_fraction,
        model_name_or_path=model_args.model_name_or_path,
    )
    save_metrics(training_args.output_dir, "linear_probe", metrics)
    print(f"linear probe accuracy: {metrics['accuracy']:.4f} ({len(train_dataset)} training / "
          f"{len(eval_dataset)} evaluation images, {len(names)} classes)")
    return metrics


if __name__ == "__main__":
    main()
