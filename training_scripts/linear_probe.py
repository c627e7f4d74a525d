"""Linear probe of a frozen I-JEPA encoder: a linear classifier on average-pooled features of the last layer, or of the
last k layers concatenated (`--pooled_layers k`; each layer through the encoder's final LayerNorm, as DINOv2's
`n_last_blocks`).

The encoder is frozen (eval mode, no gradients). By default its features are computed once, without gradients, and
one head (`--learning_rate`, `--weight_decay`) is trained with `transformers.Trainer` on those cached features;
`--cache_features false` runs the frozen encoder inside every training step instead.

With `--grid_learning_rates` and `--grid_weight_decays`, the probe searches as papers' frozen evaluations do: a
seeded, class-balanced `--validation_fraction` of the training images is held out, one head per (learning rate, weight
decay) pair trains on the rest, all together in one loop over the cached features, and the pair with the best
validation accuracy is chosen (the evaluation split never enters the choice). A head with the chosen values is then
retrained on the whole training split (the same loop, one head) and evaluated. The chosen values, the validation
score of every pair and the evaluation accuracy go to `linear_probe_results.json`. The grid uses the same epochs,
batch size and schedule flags as the single head; its gradients are not clipped (`--max_grad_norm` is not used).

Embedded digits (no data arguments), random-init baseline:

    python training_scripts/linear_probe.py --model_name_or_path random:vit_micro_patch4_48

A pre-trained checkpoint on 1 % of the labels; options from a YAML / JSON recipe, flags overriding it:

    python training_scripts/linear_probe.py --model_name_or_path outputs/pretrain --label_fraction 0.01
    python training_scripts/linear_probe.py --config probe.yaml --learning_rate 0.05

With `--head attentive`, the head is the attentive probe of the later JEPA papers (V-JEPA): `--attentive_queries`
learned query tokens cross-attend over the frozen patch tokens of the last layer (or the last `--pooled_layers` layers,
concatenated per token), then a linear classifier; the patch tokens are computed once (refused above
`--max_cached_gib`), one head or the same grid trains on them, and the results go to `attentive_probe_results.json`:

    python training_scripts/linear_probe.py --model_name_or_path outputs/pretrain --head attentive \
        --num_train_epochs 20 --grid_learning_rates 0.003 0.01 0.03 --grid_weight_decays 0 0.01

The papers' protocol: a learning-rate x weight-decay grid chosen on a held-out tenth of the training images, on the
concatenated average-pooled features of the last 4 layers:

    python training_scripts/linear_probe.py --model_name_or_path outputs/pretrain --pooled_layers 4 \
        --grid_learning_rates 0.001 0.003 0.01 0.03 0.1 --grid_weight_decays 0 0.0001 0.001 --validation_fraction 0.1
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

import datasets
from safetensors.torch import save_file
from transformers import Trainer, TrainingArguments, set_seed

from modeling_ijepa.cli import EvaluationDataArguments, EvaluationModelArguments, RecipeArgumentParser
from modeling_ijepa.data import ImageClassificationCollator, load_classification_datasets
from modeling_ijepa.evaluation import (
    FrozenEncoderClassifier,
    LinearClassifierHead,
    accuracy_metric_fn,
    check_pooled_layers,
    classification_metrics,
    extract_features,
    extract_patch_tokens,
    freeze,
    head_accuracies,
    load_encoder,
    save_metrics,
    search_attentive_heads,
    search_linear_heads,
    train_attentive_heads,
    train_linear_heads,
)


logger = logging.getLogger(__name__)


@dataclass
class ProbeArguments:
    """The probe itself."""

    cache_features: bool = field(
        default=True,
        metadata={
            "help": "Extract the frozen features once and train the head on them (fast); false runs the "
            "frozen encoder in every step."
        },
    )
    head_batchnorm: bool = field(
        default=True,
        metadata={"help": "Standardise the features with a non-affine BatchNorm before the linear layer (as MAE)."},
    )
    feature_batch_size: int = field(default=128, metadata={"help": "Batch size of the feature extraction."})
    pooled_layers: int = field(
        default=1,
        metadata={
            "help": "Average-pool the last k layers and concatenate them (each through the final LayerNorm); "
            "1: the last layer only."
        },
    )
    grid_learning_rates: list[float] | None = field(
        default=None,
        metadata={
            "help": "Learning rates of the head grid, e.g. 0.001 0.01 0.1 (with --grid_weight_decays); unset: "
            "one head at --learning_rate."
        },
    )
    grid_weight_decays: list[float] | None = field(
        default=None,
        metadata={"help": "Weight decays of the head grid, e.g. 0 0.0001 0.001 (with --grid_learning_rates)."},
    )
    validation_fraction: float = field(
        default=0.1,
        metadata={
            "help": "With a grid: the class-balanced, seeded fraction of the training images held out to choose "
            "the head."
        },
    )
    head: str = field(
        default="linear",
        metadata={
            "help": "linear: a linear classifier on average-pooled features; attentive: learned query tokens "
            "cross-attending over the patch tokens, then a linear classifier (V-JEPA's attentive probe; it wants a "
            "lower --learning_rate than the linear head's 0.1, e.g. 0.01, or a grid).",
            "choices": ["linear", "attentive"],
        },
    )
    attentive_queries: int = field(default=1, metadata={"help": "Attentive head: number of learned query tokens."})
    attentive_num_heads: int | None = field(
        default=None,
        metadata={"help": "Attentive head: attention heads of the cross-attention (default: the encoder's)."},
    )
    attentive_mlp_ratio: float = field(
        default=4.0, metadata={"help": "Attentive head: MLP hidden size over the token size."}
    )
    max_cached_gib: float = field(
        default=8.0,
        metadata={"help": "Attentive head: refuse to cache patch tokens larger than this (GiB, float32)."},
    )

    def __post_init__(self) -> None:
        if self.pooled_layers < 1:
            raise ValueError(f"--pooled_layers must be at least 1, got {self.pooled_layers}.")
        if (self.grid_learning_rates is None) != (self.grid_weight_decays is None):
            raise ValueError(
                "Pass both --grid_learning_rates and --grid_weight_decays for a grid (e.g. --grid_weight_decays 0 for "
                "learning rates only), or neither for one head."
            )
        if not 0.0 < self.validation_fraction < 1.0:
            raise ValueError(f"--validation_fraction must be in (0, 1), got {self.validation_fraction}.")
        if self.head not in ("linear", "attentive"):
            raise ValueError(f"--head must be linear or attentive, got {self.head!r}.")
        if self.attentive_queries < 1:
            raise ValueError(f"--attentive_queries must be at least 1, got {self.attentive_queries}.")

    @property
    def grid(self) -> bool:
        return self.grid_learning_rates is not None


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
    model_args, data_args, probe_args, training_args = parser.parse(argv)[:4]
    if probe_args.grid and not probe_args.cache_features:
        parser.error("the head grid trains on cached features: drop --cache_features false, or train one head.")
    if probe_args.grid and training_args.max_steps > 0:
        parser.error("the head grid trains for --num_train_epochs: drop --max_steps, or train one head.")
    if probe_args.head == "attentive" and not probe_args.cache_features:
        parser.error(
            "the attentive head trains on patch tokens computed once: drop --cache_features false (use "
            "--max_train_samples or --label_fraction when they do not fit in memory)."
        )
    if probe_args.head == "attentive" and training_args.max_steps > 0:
        parser.error("the attentive head trains for --num_train_epochs: drop --max_steps.")
    return model_args, data_args, probe_args, training_args


def single_head_probe(
    encoder, image_processor, train_dataset, eval_dataset, names, model_args, data_args, probe_args, training_args
) -> dict:
    """One head at `--learning_rate` / `--weight_decay`, trained with `transformers.Trainer`; returns its metrics."""
    num_features = probe_args.pooled_layers * encoder.config.hidden_size
    head = LinearClassifierHead(num_features, len(names), batch_norm=probe_args.head_batchnorm)

    if probe_args.cache_features:

        def cached(dataset) -> datasets.Dataset:
            features, labels = extract_features(
                encoder,
                dataset,
                image_processor,
                probe_args.feature_batch_size,
                training_args.dataloader_num_workers,
                training_args.device,
                probe_args.pooled_layers,
            )
            columns = {"features": features.numpy(), "labels": labels.numpy()}
            return datasets.Dataset.from_dict(columns).with_format("torch")

        model, train_dataset, eval_dataset, data_collator = head, cached(train_dataset), cached(eval_dataset), None
    else:
        model = FrozenEncoderClassifier(encoder, head, probe_args.pooled_layers)
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
    return classification_metrics(
        evaluation,
        train_result,
        train_dataset=train_dataset,
        eval_dataset=eval_dataset,
        class_names=names,
        label_fraction=data_args.label_fraction,
        model_name_or_path=model_args.model_name_or_path,
    )


def head_settings(encoder, probe_args, training_args) -> dict:
    """How heads of `--head` train: the loop's settings plus the head's own (batch norm, or the attentive pooler)."""
    settings = dict(
        num_epochs=training_args.num_train_epochs,
        batch_size=training_args.per_device_train_batch_size,
        warmup_steps=training_args.warmup_steps,
        lr_scheduler_type=getattr(training_args.lr_scheduler_type, "value", training_args.lr_scheduler_type),
        device=training_args.device,
    )
    if probe_args.head == "linear":
        return {**settings, "batch_norm": probe_args.head_batchnorm}
    return {
        **settings,
        "num_queries": probe_args.attentive_queries,
        "num_attention_heads": probe_args.attentive_num_heads or encoder.config.num_attention_heads,
        "mlp_ratio": probe_args.attentive_mlp_ratio,
    }


def cached_head_probe(encoder, image_processor, train_dataset, eval_dataset, names, probe_args, training_args) -> dict:
    """
    The probe on features computed once: average-pooled ones for `--head linear`, patch tokens for `--head attentive`.
    With a grid, choose the head's learning rate and weight decay on a validation split of the training features;
    then train the head (with the chosen or the given values) on all of them and evaluate it. Returns the metrics
    beyond the data description.
    """
    extract = dict(
        batch_size=probe_args.feature_batch_size,
        num_workers=training_args.dataloader_num_workers,
        device=training_args.device,
    )
    if probe_args.head == "linear":
        extract_fn = partial(extract_features, pooled_layers=probe_args.pooled_layers)
        train_fn, search_fn = train_linear_heads, search_linear_heads
    else:
        max_bytes = int(probe_args.max_cached_gib * 2**30)
        extract_fn = partial(extract_patch_tokens, layers=probe_args.pooled_layers, max_bytes=max_bytes)
        train_fn, search_fn = train_attentive_heads, search_attentive_heads
    train_features, train_labels = extract_fn(encoder, train_dataset, image_processor, **extract)
    eval_features, eval_labels = extract_fn(encoder, eval_dataset, image_processor, **extract)
    training = head_settings(encoder, probe_args, training_args)
    learning_rate, weight_decay, search = training_args.learning_rate, training_args.weight_decay, None
    if probe_args.grid:
        search = search_fn(
            train_features,
            train_labels,
            probe_args.grid_learning_rates,
            probe_args.grid_weight_decays,
            len(names),
            validation_fraction=probe_args.validation_fraction,
            seed=training_args.seed,
            **training,
        )
        learning_rate, weight_decay = search.learning_rate, search.weight_decay
    # The chosen values, retrained on every training image: the held-out part chose them, now it trains too.
    final = train_fn(
        train_features, train_labels, [learning_rate], [weight_decay], len(names), seed=training_args.seed, **training
    )
    accuracy, loss = head_accuracies(final, eval_features, eval_labels)
    save_file(final.head(0).state_dict(), str(Path(training_args.output_dir) / "model.safetensors"))
    metrics = {
        "accuracy": float(accuracy[0]),
        "eval_loss": float(loss[0]),
        "learning_rate": learning_rate,
        "weight_decay": weight_decay,
        "head": probe_args.head,
        "num_train_samples": len(train_labels),
        "num_eval_samples": len(eval_labels),
    }
    if search is not None:
        print(
            f"head grid: chose learning rate {search.learning_rate:g}, weight decay {search.weight_decay:g} "
            f"(validation accuracy {search.validation_accuracy:.4f} on {len(search.validation_indices)} held-out "
            f"training images, {len(search.grid)} heads); retrained on all {len(train_labels)} training images"
        )
        metrics["head_search"] = search.to_dict()
    return metrics


def main(argv: list[str] | None = None) -> dict:
    """Run the probe; returns the metrics (`accuracy` in [0, 1], ...), also written to `output_dir`."""
    model_args, data_args, probe_args, training_args = parse_args(argv)
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", level=logging.INFO)
    set_seed(training_args.seed)

    encoder, image_processor = load_encoder(model_args.model_name_or_path, training_args.seed, model_args.cache_dir)
    freeze(encoder).to(training_args.device)
    check_pooled_layers(probe_args.pooled_layers, encoder.config.num_hidden_layers)
    train_dataset, eval_dataset, names = load_classification_datasets(
        **data_args.dataset_kwargs(), seed=training_args.seed, image_size=encoder.config.image_size
    )
    described = dict(
        num_classes=len(names),
        label_fraction=data_args.label_fraction,
        model_name_or_path=model_args.model_name_or_path,
        pooled_layers=probe_args.pooled_layers,
    )
    if probe_args.grid or probe_args.head == "attentive":
        Path(training_args.output_dir).mkdir(parents=True, exist_ok=True)
        datasets_and_names = (train_dataset, eval_dataset, names)
        probe = cached_head_probe(encoder, image_processor, *datasets_and_names, probe_args, training_args)
        metrics = {**probe, **described}
    else:
        metrics = {
            **single_head_probe(
                encoder,
                image_processor,
                train_dataset,
                eval_dataset,
                names,
                model_args,
                data_args,
                probe_args,
                training_args,
            ),
            **described,
        }
    save_metrics(training_args.output_dir, f"{probe_args.head}_probe", metrics)
    print(
        f"{probe_args.head} probe accuracy: {metrics['accuracy']:.4f} ({metrics['num_train_samples']} training / "
        f"{metrics['num_eval_samples']} evaluation images, {len(names)} classes)"
    )
    return metrics


if __name__ == "__main__":
    main()
