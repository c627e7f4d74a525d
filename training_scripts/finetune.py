"""Full fine-tuning of an I-JEPA encoder for image classification (`IJepaForImageClassification`).

Every weight trains, with random-resized-crop + flip augmentation and optional layer-wise learning-rate decay
(`--layer_decay 0.75`: each layer below the head trains at 0.75x the rate of the one above). The output directory
holds a model that vanilla transformers loads (`AutoModelForImageClassification`), its image processor, a model
card (README.md) and the metrics.

Embedded digits (no data arguments), random-init baseline:

    python training_scripts/finetune.py --model_name_or_path random:vit_micro_patch4_48

A pre-trained checkpoint, with layer-wise decay:

    python training_scripts/finetune.py --model_name_or_path outputs/pretrain --layer_decay 0.75

Options also come from a YAML / JSON recipe, flags overriding it:

    python training_scripts/finetune.py --config finetune.yaml --num_train_epochs 10
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import torch
from transformers import Trainer, TrainingArguments, set_seed

from modeling_ijepa.cli import EvaluationDataArguments, EvaluationModelArguments, RecipeArgumentParser
from modeling_ijepa.data import ImageClassificationCollator, load_classification_datasets
from modeling_ijepa.evaluation import (
    StandardizedLinear,
    accuracy_metric_fn,
    classification_metrics,
    extract_features,
    load_image_processor,
    random_init_config,
    save_metrics,
    train_linear_heads,
    write_model_card,
)
from modeling_ijepa.modeling_ijepa import IJepaForImageClassification
from modeling_ijepa.optimization import layer_decay_parameter_groups


logger = logging.getLogger(__name__)


@dataclass
class FinetuneArguments:
    """Fine-tuning options beyond `TrainingArguments`."""

    layer_decay: float | None = field(
        default=None,
        metadata={"help": "Layer-wise learning-rate decay in (0, 1], e.g. 0.75 (BEiT/MAE); unset: one rate for all."},
    )
    augment: bool = field(default=True, metadata={"help": "Random-resized crop and (optionally) horizontal flip."})
    crop_scale_min: float = field(
        default=0.3, metadata={"help": "Smallest crop area fraction (ImageNet fine-tuning recipes use 0.08)."}
    )
    horizontal_flip: bool = field(
        default=False, metadata={"help": "Random horizontal flips (off by default: they change digits and text)."}
    )
    standardize_features: bool = field(
        default=True,
        metadata={
            "help": "Train the head on pooled features standardised with training-set statistics (folded into "
            "the saved linear head, so the checkpoint keeps the vanilla layout)."
        },
    )
    probe_head_epochs: float = field(
        default=0.0,
        metadata={
            "help": "LP-FT (Kumar et al. 2022): first train the head alone for this many epochs on the frozen "
            "encoder's cached, standardised pooled features (AdamW, batch 256, cosine), so that fine-tuning "
            "starts from a trained head rather than a random one; 0: start from a random head."
        },
    )
    probe_head_learning_rate: float = field(
        default=0.1, metadata={"help": "Learning rate of the head-only stage (--probe_head_epochs)."}
    )

    def __post_init__(self) -> None:
        if self.probe_head_epochs < 0:
            raise ValueError(f"--probe_head_epochs must be >= 0, got {self.probe_head_epochs}.")
        if self.probe_head_epochs > 0 and not self.standardize_features:
            raise ValueError(
                "--probe_head_epochs trains the head on the standardised features: keep --standardize_features true, "
                "or set --probe_head_epochs 0."
            )


@dataclass
class FinetuneTrainingArguments(TrainingArguments):
    """`TrainingArguments` with defaults for fine-tuning a small ViT on the embedded digits."""

    output_dir: str | None = field(default="outputs/finetune", metadata={"help": "Where the model is written."})
    num_train_epochs: float = field(default=5.0, metadata={"help": "Training epochs."})
    learning_rate: float = field(default=1e-3, metadata={"help": "Peak learning rate (of the head, with decay)."})
    weight_decay: float = field(default=0.05, metadata={"help": "AdamW weight decay (not on biases / norms)."})
    lr_scheduler_type: str = field(default="cosine", metadata={"help": "Learning-rate schedule."})
    warmup_steps: float = field(default=0.1, metadata={"help": "Warm-up steps (a float < 1 is a fraction)."})
    per_device_train_batch_size: int = field(default=64, metadata={"help": "Training batch size."})
    per_device_eval_batch_size: int = field(default=128, metadata={"help": "Evaluation batch size."})
    logging_steps: float = field(default=20, metadata={"help": "Log every N steps."})
    save_strategy: str = field(default="no", metadata={"help": "Checkpointing strategy ('no', 'epoch', 'steps')."})
    remove_unused_columns: bool = field(default=False, metadata={"help": "Keep the image column for the collator."})
    optim: str = field(default="adamw_torch", metadata={"help": "Optimizer."})
    disable_tqdm: bool | None = field(default=True, metadata={"help": "Hide progress bars."})


class LayerDecayTrainer(Trainer):
    """`Trainer` whose optimiser has one parameter group per layer (see `layer_decay_parameter_groups`)."""

    def __init__(self, *args, layer_decay: float, **kwargs):
        super().__init__(*args, **kwargs)
        self.layer_decay = layer_decay

    def create_optimizer(self, model=None) -> torch.optim.Optimizer:
        if self.optimizer is None:
            groups = layer_decay_parameter_groups(
                self.model, self.args.weight_decay, self.layer_decay, self.args.learning_rate
            )
            optimizer_cls, optimizer_kwargs = Trainer.get_optimizer_cls_and_kwargs(self.args, self.model)
            optimizer_kwargs.pop("lr", None)  # every group carries its own
            self.optimizer = optimizer_cls(groups, **optimizer_kwargs)
        return self.optimizer


def load_classifier(model_args: EvaluationModelArguments, names: list[str], seed: int) -> IJepaForImageClassification:
    """A classifier for `names`: the checkpoint's encoder with a new head, or a random-init `random:<preset>`."""
    labels = dict(
        num_labels=len(names),
        id2label={index: name for index, name in enumerate(names)},
        label2id={name: index for index, name in enumerate(names)},
    )
    config = random_init_config(model_args.model_name_or_path, **labels)
    if config is not None:
        torch.manual_seed(seed)
        return IJepaForImageClassification(config)
    return IJepaForImageClassification.from_pretrained(
        model_args.model_name_or_path, cache_dir=model_args.cache_dir, ignore_mismatched_sizes=True, **labels
    )


@torch.no_grad()
def train_head_on_frozen_features(
    head: StandardizedLinear,
    features: torch.Tensor,
    labels: torch.Tensor,
    num_labels: int,
    finetune_args,
    training_args,
) -> None:
    """
    LP-FT's first stage: fit `head.linear` on the frozen pooled `features` `(num_train, hidden_size)`, standardised as
    `head` standardises them, with the linear probe's loop ([`train_linear_heads`]: AdamW, batch 256, warm-up and
    cosine, no weight decay); the weights are copied into `head` in place.
    """
    standardized = (features.to(head.mean.device) - head.mean) * head.scale
    with torch.enable_grad():
        trained = train_linear_heads(
            standardized,
            labels,
            [finetune_args.probe_head_learning_rate],
            [0.0],
            num_labels,
            num_epochs=finetune_args.probe_head_epochs,
            batch_size=256,
            batch_norm=False,
            seed=training_args.seed,
        )
    head.linear.weight.copy_(trained.weights[0])
    head.linear.bias.copy_(trained.biases[0])


def parse_args(
    argv: list[str] | None = None,
) -> tuple[EvaluationModelArguments, EvaluationDataArguments, FinetuneArguments, FinetuneTrainingArguments]:
    """A recipe (`--config FILE`, or a single .yaml / .json argument) gives the defaults; flags override them."""
    parser = RecipeArgumentParser(
        (EvaluationModelArguments, EvaluationDataArguments, FinetuneArguments, FinetuneTrainingArguments),
        prog="finetune.py",
        description=__doc__,
    )
    return parser.parse(argv)[:4]


def main(argv: list[str] | None = None) -> dict:
    """Fine-tune and evaluate; returns the metrics (`accuracy` in [0, 1], ...), also written to `output_dir`."""
    model_args, data_args, finetune_args, training_args = parse_args(argv)
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", level=logging.INFO)
    set_seed(training_args.seed)

    config = random_init_config(model_args.model_name_or_path)
    if config is None:
        from transformers import AutoConfig

        config = AutoConfig.from_pretrained(model_args.model_name_or_path, cache_dir=model_args.cache_dir)
    train_dataset, eval_dataset, names = load_classification_datasets(
        **data_args.dataset_kwargs(), seed=training_args.seed, image_size=config.image_size
    )
    model = load_classifier(model_args, names, training_args.seed)
    image_processor = load_image_processor(model_args.model_name_or_path, model.config, model_args.cache_dir)

    if finetune_args.standardize_features:
        features, labels = extract_features(model.ijepa, train_dataset, image_processor, 128, 0, training_args.device)
        model.classifier = StandardizedLinear(model.classifier, features.mean(dim=0), features.std(dim=0))
        if finetune_args.probe_head_epochs > 0:
            train_head_on_frozen_features(model.classifier, features, labels, len(names), finetune_args, training_args)

    trainer_kwargs = dict(
        model=model,
        args=training_args,
        train_dataset=train_dataset,
        eval_dataset=eval_dataset,
        data_collator=ImageClassificationCollator(
            image_processor,
            augment=finetune_args.augment,
            seed=training_args.seed,
            crop_scale=(finetune_args.crop_scale_min, 1.0),
            horizontal_flip=finetune_args.horizontal_flip,
        ),
        processing_class=image_processor,
        compute_metrics=accuracy_metric_fn(),
    )
    if finetune_args.layer_decay is not None:
        trainer = LayerDecayTrainer(layer_decay=finetune_args.layer_decay, **trainer_kwargs)
    else:
        trainer = Trainer(**trainer_kwargs)
    train_result = trainer.train()
    # Evaluation images are only resized, never augmented.
    trainer.data_collator = ImageClassificationCollator(image_processor, augment=False)
    evaluation = trainer.evaluate()

    metrics = classification_metrics(
        evaluation,
        train_result,
        train_dataset=train_dataset,
        eval_dataset=eval_dataset,
        class_names=names,
        label_fraction=data_args.label_fraction,
        model_name_or_path=model_args.model_name_or_path,
    )
    if isinstance(model.classifier, StandardizedLinear):
        model.classifier = model.classifier.fold()  # exact: same logits, vanilla `classifier` weights
    trainer.save_model()
    image_processor.save_pretrained(training_args.output_dir)
    save_metrics(training_args.output_dir, "finetune", metrics)
    data_source = data_args.dataset_name or data_args.train_dir or "the embedded scikit-learn digits (48 px)"
    schedule = getattr(training_args.lr_scheduler_type, "value", training_args.lr_scheduler_type)
    augmentation = "none"
    if finetune_args.augment:
        augmentation = "random-resized crop" + (" + flip" if finetune_args.horizontal_flip else "")
    write_model_card(
        training_args.output_dir,
        base_model=model_args.model_name_or_path,
        data_description=(
            f"Trained on {len(train_dataset)} images of {data_source} ({len(names)} classes: {', '.join(names[:20])}"
            f"{', ...' if len(names) > 20 else ''}; label fraction {data_args.label_fraction}), evaluated on "
            f"{len(eval_dataset)} held-out images."
        ),
        metrics={key: metrics[key] for key in ("accuracy", "eval_loss", "train_loss")},
        training_summary=(
            f"Full fine-tuning with `transformers.Trainer`: {training_args.num_train_epochs:g} epochs, batch size "
            f"{training_args.per_device_train_batch_size}, AdamW learning rate {training_args.learning_rate:g} "
            f"({schedule} schedule), weight decay {training_args.weight_decay:g}, layer-wise LR decay "
            f"{finetune_args.layer_decay or 'none'}, augmentation {augmentation}"
            + (
                f"; the head first trained alone for {finetune_args.probe_head_epochs:g} epochs on the frozen "
                f"features (LP-FT)."
                if finetune_args.probe_head_epochs
                else "."
            )
        ),
    )
    print(
        f"fine-tuning accuracy: {metrics['accuracy']:.4f} ({len(train_dataset)} training / "
        f"{len(eval_dataset)} evaluation images, {len(names)} classes)"
    )
    return metrics


if __name__ == "__main__":
    main()
