#!/usr/bin/env python
"""
I-JEPA pre-training with `transformers.Trainer` and `accelerate launch`.

    accelerate launch training_scripts/pretrain.py                       # embedded digits default, CPU, ~3 min
    accelerate launch --config_file configuration/accelerate/a100x8_bf16_ddp.yaml training_scripts/pretrain.py \
        --config configuration/recipes/in1k-vith14-ep300.yaml --gradient_accumulation_steps 2

Every option can come from a YAML/JSON recipe (`--config NAME_OR_PATH`, default `tiny-cpu`) and be overridden on the
command line. Data: `--dataset_name` (hub, `--streaming` recommended), `--train_dir` (imagefolder or parquet files,
optionally `--streaming`), or nothing (scikit-learn's bundled digits, offline). At the end `output_dir` holds the
target encoder and its image processor (loadable by `AutoModel.from_pretrained` and by vanilla transformers),
`output_dir/pretraining` the full `IJepaForPreTraining` (encoder, predictor, target encoder), and
`training_curves.png` (loss, k-NN accuracy, collapse monitors, learning rate).

Evaluation is the k-NN monitor: with `--eval_strategy steps --eval_steps N`, the frozen target encoder is scored by
k-NN on labelled images every N steps (`eval_knn_accuracy`; the embedded digits, or `--monitor_train_dir` /
`--monitor_eval_dir`), and `--metric_for_best_model knn_accuracy --load_best_model_at_end` saves the best encoder
rather than the last. The `tiny-cpu` recipe turns it on; `--eval_strategy no --load_best_model_at_end false` turns
it off.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from pathlib import Path

import transformers
from transformers import set_seed
from transformers.trainer_utils import IntervalStrategy

from modeling_ijepa import IJepaConfig, IJepaForPreTraining, IJepaModel
from modeling_ijepa.checkpoints import DamagedCheckpointError, resolve_checkpoint
from modeling_ijepa.cli import MaskArguments, RecipeArgumentParser, parse_config_overrides
from modeling_ijepa.compile_watch import CompileWatch
from modeling_ijepa.data import IJepaPretrainingCollator, TokenBuckets, default_image_processor, load_image_dataset
from modeling_ijepa.lifecycle import EXIT_PREEMPTED, OutputDirInUseError, preemption_message, signals_deferred
from modeling_ijepa.masking import mask_sampler_from_config
from modeling_ijepa.monitoring import KnnMonitor, UnlabelledMonitorImagesError, load_knn_monitor_datasets
from modeling_ijepa.output_layout import pretraining_dir, write_output_layout
from modeling_ijepa.trainer import IJepaTrainer, IJepaTrainingArguments


logger = logging.getLogger("pretrain")

DEFAULT_RECIPE = "tiny-cpu"


@dataclass
class ModelArguments(MaskArguments):
    """Which model to pre-train, and its mask settings (one optional flag per setting, generated from
    `modeling_ijepa.masking.MaskSettings`; in a recipe, also as a `mask:` mapping)."""

    model_preset: str = field(
        default="vit_micro_patch4_48",
        metadata={"help": "Model preset from configuration/models/ (e.g. vit_huge_patch14_224)."},
    )
    model_name_or_path: str | None = field(
        default=None,
        metadata={"help": "Start from the weights of an IJepaForPreTraining directory instead of a random init."},
    )
    config_overrides: str | None = field(
        default=None,
        metadata={
            "help": "Config overrides 'name=value,...', values in JSON, e.g. "
            "'predictor_num_hidden_layers=16,image_size=448' or 'target_scale=[0.1,0.2]'."
        },
    )
    attn_implementation: str = field(default="sdpa", metadata={"help": "'sdpa' (fused kernels) or 'eager'."})


@dataclass
class DataArguments:
    """Where the images come from and how they are cropped."""

    dataset_name: str | None = field(default=None, metadata={"help": "Hub dataset, e.g. ILSVRC/imagenet-1k."})
    dataset_config_name: str | None = field(default=None, metadata={"help": "Hub dataset configuration."})
    dataset_split: str = field(default="train", metadata={"help": "Split to pre-train on."})
    train_dir: str | None = field(default=None, metadata={"help": "Local imagefolder or folder of parquet files."})
    streaming: bool = field(default=False, metadata={"help": "Stream the data instead of materialising it."})
    image_column: str | None = field(default=None, metadata={"help": "Image column (default: auto-detected)."})
    shuffle_buffer_size: int = field(default=10_000, metadata={"help": "Shuffle buffer of streamed data."})
    max_train_samples: int | None = field(default=None, metadata={"help": "Use only this many training images."})
    crop_scale_min: float = field(default=0.3, metadata={"help": "RandomResizedCrop smallest area fraction."})
    crop_scale_max: float = field(default=1.0, metadata={"help": "RandomResizedCrop largest area fraction."})
    compile_token_buckets: bool = field(
        default=False,
        metadata={
            "help": "With --torch_compile: pad each batch's context and target token counts up to a few sizes "
            "(TokenBuckets; the loss is the unpadded one) and compile static shapes, one graph per bucket. Off by "
            "default: on CPU, torch's automatic dynamic shapes settled as fast and ran faster (benchmarks/"
            "compile_check.py --steady_state)."
        },
    )
    require_data: bool = field(
        default=False, metadata={"help": "Fail when no data is given instead of using the embedded digits."}
    )
    cache_dir: str | None = field(default=None, metadata={"help": "datasets cache folder."})
    # The k-NN monitor: pre-training's evaluation (it runs whenever --eval_strategy says so).
    monitor_train_dir: str | None = field(
        default=None,
        metadata={
            "help": "k-NN monitor reference images (imagefolder, one sub-folder per class). Default: the embedded "
            "digits, or a held-out split of --train_dir when it has class sub-folders."
        },
    )
    monitor_eval_dir: str | None = field(
        default=None, metadata={"help": "k-NN monitor query images (default: a split of --monitor_train_dir)."}
    )
    monitor_max_train_samples: int | None = field(
        default=None, metadata={"help": "Fixed random subset of the monitor's reference images (cost per eval)."}
    )
    monitor_max_eval_samples: int | None = field(
        default=None, metadata={"help": "Fixed random subset of the monitor's query images."}
    )
    monitor_split: str = field(
        default="auto",
        metadata={
            "help": "How a monitor folder without --monitor_eval_dir is split into references and queries, related "
            "images kept on one side: 'names' (file names <group>__<anything>.<ext>), 'hash' (8x8 average-hash "
            "near-copies), 'random', or 'auto' (names when every file declares a group, else random).",
            "choices": ["auto", "names", "hash", "random"],
        },
    )
    monitor_k: int = field(default=20, metadata={"help": "Neighbours in the monitor's k-NN vote."})
    monitor_temperature: float = field(default=0.07, metadata={"help": "Temperature of the k-NN vote weights."})


def parse_args(argv: list[str] | None = None) -> tuple[ModelArguments, DataArguments, IJepaTrainingArguments, str]:
    """Recipe values become the parser's defaults; command-line flags override them."""
    parser = RecipeArgumentParser(
        (ModelArguments, DataArguments, IJepaTrainingArguments),
        prog="pretrain.py",
        description=__doc__,
        default_recipe=DEFAULT_RECIPE,
    )
    model_args, data_args, training_args, recipe_path = parser.parse(argv)
    if not 0.0 < data_args.crop_scale_min <= data_args.crop_scale_max <= 1.0:
        parser.error(
            f"--crop_scale_min {data_args.crop_scale_min} / --crop_scale_max {data_args.crop_scale_max}: need "
            "0 < min <= max <= 1 (the official range is 0.3 to 1.0)."
        )
    if data_args.streaming and training_args.max_steps <= 0:
        parser.error("--streaming data has no length: set --max_steps (the recipes give epochs as steps).")
    if data_args.require_data and not (data_args.dataset_name or data_args.train_dir):
        parser.error(f"recipe {Path(recipe_path).name} needs data: pass --dataset_name or --train_dir.")
    if training_args.eval_strategy != "no":
        if data_args.monitor_eval_dir and not data_args.monitor_train_dir:
            parser.error("--monitor_eval_dir needs --monitor_train_dir (the k-NN reference images) too.")
    return model_args, data_args, training_args, recipe_path


def build_config(model_args: ModelArguments) -> IJepaConfig:
    """The preset (or `model_name_or_path`'s configuration) with `--config_overrides` and the mask flags applied."""
    overrides = parse_config_overrides(model_args.config_overrides)
    overrides.update(model_args.mask_overrides())
    if model_args.model_name_or_path:
        config = IJepaConfig.from_pretrained(model_args.model_name_or_path, **overrides)
    else:
        config = IJepaConfig.from_preset(model_args.model_preset, **overrides)
    # Fail before any data is read: the model and the mask collator would raise the same errors later.
    config.check_image_and_patch_size()
    config.check_mask_settings()
    return config


def build_train_dataset(data_args: DataArguments, training_args: IJepaTrainingArguments, image_size: int):
    dataset = load_image_dataset(
        dataset_name=data_args.dataset_name,
        dataset_config_name=data_args.dataset_config_name,
        train_dir=data_args.train_dir,
        split=data_args.dataset_split,
        streaming=data_args.streaming,
        image_column=data_args.image_column,
        cache_dir=data_args.cache_dir,
        image_size=image_size,
    )
    if data_args.max_train_samples is not None:
        dataset = (
            dataset.take(data_args.max_train_samples)
            if data_args.streaming
            else dataset.select(range(min(data_args.max_train_samples, len(dataset))))
        )
    if data_args.streaming:
        # Re-shuffled every epoch: the Trainer calls `set_epoch`, which reseeds the buffer and the shard order.
        dataset = dataset.shuffle(
            seed=training_args.data_seed or training_args.seed, buffer_size=data_args.shuffle_buffer_size
        )
    return dataset


def build_knn_monitor(data_args: DataArguments, training_args: IJepaTrainingArguments, image_processor, image_size):
    """
    The k-NN monitor that pre-training's evaluation runs, or `None` when `--eval_strategy no`. When the recipe's
    monitor falls on a training folder without class sub-folders, it turns evaluation and best-model selection off in
    `training_args` (logged) and returns `None`.
    """
    if training_args.eval_strategy == "no":
        return None
    if data_args.dataset_name and not data_args.monitor_train_dir:
        raise ValueError(f"no labelled images to score {data_args.dataset_name} pre-training with.")
    train_dir = data_args.monitor_train_dir or (None if data_args.streaming else data_args.train_dir)
    if data_args.streaming and not data_args.monitor_train_dir and data_args.train_dir:
        logger.warning("k-NN monitor on the embedded digits; --monitor_train_dir monitors your labelled images.")
    try:
        train, evaluation = load_knn_monitor_datasets(
            train_dir=train_dir,
            eval_dir=data_args.monitor_eval_dir,
            image_size=image_size,
            seed=training_args.seed,
            split_by=data_args.monitor_split,
        )
    except UnlabelledMonitorImagesError:
        if data_args.monitor_train_dir:  # asked for by name: an error
            raise
        # The recipe's monitor on a training folder without class sub-folders: nothing to score with, so the run goes
        # on without evaluation and saves its last encoder, and says so.
        logger.warning(
            "k-NN monitor off: %s has no class sub-folders (no labels), so there is no evaluation and the encoder "
            "saved is the last one. Pass labelled images with --monitor_train_dir to keep the best encoder.",
            train_dir,
        )
        training_args.eval_strategy = IntervalStrategy.NO
        training_args.load_best_model_at_end = False
        training_args.metric_for_best_model = None
        return None
    monitor = KnnMonitor(
        train,
        evaluation,
        image_processor,
        k=data_args.monitor_k,
        temperature=data_args.monitor_temperature,
        batch_size=training_args.per_device_eval_batch_size,
        max_train_samples=data_args.monitor_max_train_samples,
        max_eval_samples=data_args.monitor_max_eval_samples,
        seed=training_args.seed,
    )
    logger.info(
        "k-NN monitor: %d reference / %d query images, %d-NN, every %s",
        len(monitor.train_labels),
        len(monitor.eval_labels),
        monitor.k,
        f"{training_args.eval_steps} steps" if training_args.eval_strategy == "steps" else training_args.eval_strategy,
    )
    return monitor


def save_final_model(trainer: IJepaTrainer, config: IJepaConfig, image_processor, output_dir: str) -> None:
    """Target encoder + image processor at the top of `output_dir`; the full pre-training model in `pretraining/`."""
    trainer.save_model(str(pretraining_dir(output_dir)))
    state_dict = trainer.accelerator.get_state_dict(trainer.model)  # gathers FSDP shards; collective on all ranks
    if trainer.args.should_save:
        prefix = "target_encoder."
        encoder = IJepaModel(config)
        encoder.load_state_dict({k[len(prefix) :]: v for k, v in state_dict.items() if k.startswith(prefix)})
        write_output_layout(output_dir, encoder, image_processor)
    trainer.accelerator.wait_for_everyone()


def plot_training_curves(log_history: list[dict], path: str) -> str | None:
    """PNG of the loss, the k-NN monitor's accuracy (when it ran), the collapse monitors and the learning rate over
    optimiser steps."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:  # pragma: no cover - matplotlib is a dependency, but never fail a finished run over a plot
        logger.warning("matplotlib is not installed: no training-curve plot written.")
        return None
    panels = [
        ("loss", "smooth-L1 loss", True),
        ("eval_knn_accuracy", "k-NN accuracy (target encoder)", False),
        ("target_feature_std", "target feature std", False),
        ("pooled_effective_rank", "effective rank (pooled)", False),
        ("learning_rate", "learning rate", False),
    ]
    if not any("eval_knn_accuracy" in entry for entry in log_history):
        panels = [panel for panel in panels if panel[0] != "eval_knn_accuracy"]
    figure, axes = plt.subplots(1, len(panels), figsize=(4 * len(panels), 3.2))
    for axis, (key, title, log_scale) in zip(axes, panels):
        points = [(entry["step"], entry[key]) for entry in log_history if key in entry and "step" in entry]
        if points:
            axis.plot(*zip(*points), marker=".")
        axis.set_title(title)
        axis.set_xlabel("step")
        if log_scale and points and min(p[1] for p in points) > 0:
            axis.set_yscale("log")
        axis.grid(alpha=0.3)
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)
    return path


def main(argv: list[str] | None = None) -> str:
    """Run pre-training; returns the output directory."""
    model_args, data_args, training_args, recipe_path = parse_args(argv)
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", level=logging.INFO)
    transformers.utils.logging.set_verbosity(training_args.get_process_log_level())
    logger.info("recipe %s; process %d of %d", recipe_path, training_args.process_index, training_args.world_size)
    set_seed(training_args.seed)

    try:
        config = build_config(model_args)
    except (ValueError, OSError) as error:
        raise SystemExit(f"pretrain.py: error: invalid model configuration: {error}") from None
    image_processor = default_image_processor(config.image_size)
    try:
        train_dataset = build_train_dataset(data_args, training_args, config.image_size)
    except (ConnectionError, ValueError, FileNotFoundError) as error:
        raise SystemExit(f"pretrain.py: error: {error}") from None

    try:
        if model_args.model_name_or_path:
            model = IJepaForPreTraining.from_pretrained(
                model_args.model_name_or_path, config=config, attn_implementation=model_args.attn_implementation
            )
        else:
            config._attn_implementation = model_args.attn_implementation
            model = IJepaForPreTraining(config)
    except ValueError as error:  # an architecture the configuration describes but no model can have
        raise SystemExit(f"pretrain.py: error: invalid model configuration: {error}") from None

    # Each process draws its own crops and masks; every draw depends only on (seed, process, batch index).
    mask_sampler = mask_sampler_from_config(config, seed=training_args.seed + 1_000_003 * training_args.process_index)
    # Batches leave the DataLoader workers as uint8 (4x less host-to-device traffic); the trainer normalises them on
    # the training device with the collator's `normalize`.
    token_buckets = None
    if training_args.torch_compile and data_args.compile_token_buckets:
        token_buckets = TokenBuckets.from_sampler(mask_sampler, training_args.per_device_train_batch_size)
        os.environ["ACCELERATE_DYNAMO_USE_DYNAMIC"] = "false"  # one static graph per bucket (read by accelerate)
        logger.info("torch.compile shape policy: %s, static shapes", token_buckets)
    collator = IJepaPretrainingCollator(
        mask_sampler,
        image_processor,
        crop_scale=(data_args.crop_scale_min, data_args.crop_scale_max),
        output_uint8=True,
        token_buckets=token_buckets,
    )
    try:
        knn_monitor = build_knn_monitor(data_args, training_args, image_processor, config.image_size)
    except (ValueError, FileNotFoundError) as error:
        raise SystemExit(
            f"pretrain.py: error: k-NN monitor: {error} Pass labelled --monitor_train_dir, or turn evaluation off "
            "with --eval_strategy no --load_best_model_at_end false."
        ) from None
    try:  # the trainer checks the launch (FSDP requested but impossible, processes outside one process group)
        trainer = IJepaTrainer(
            model=model,
            args=training_args,
            train_dataset=train_dataset,
            data_collator=collator,
            knn_monitor=knn_monitor,
        )
    except ValueError as error:
        raise SystemExit(f"pretrain.py: error: {error}") from None
    if training_args.torch_compile:  # logs a fall-back to eager (dynamo's recompile limit) and the graph count
        trainer.add_callback(CompileWatch())

    try:  # "last" resolves to the newest complete checkpoint; a named damaged one stops here
        trainer.train(resume_from_checkpoint=training_args.resume_from_checkpoint)
    except (OutputDirInUseError, DamagedCheckpointError) as error:
        raise SystemExit(f"pretrain.py: error: {error}") from None
    except FloatingPointError as error:
        last = resolve_checkpoint("last", training_args.output_dir)
        logger.error("%s Last good checkpoint: %s.", error, last or "none saved yet")
        raise SystemExit(1) from None
    if collator.num_dropped:
        logger.warning("%d undecodable images were skipped on this process.", collator.num_dropped)
    if trainer.preemption.preempted_at_step is not None:
        # The checkpoint is written; the final encoder is not (the run is to be resumed, not finished).
        logger.warning(preemption_message(trainer.preemption))
        raise SystemExit(EXIT_PREEMPTED)

    with signals_deferred():  # a SIGTERM now takes effect once the final files are complete
        save_final_model(trainer, config, image_processor, training_args.output_dir)
        trainer.save_state()  # output_dir/trainer_state.json: the whole log history, train_runtime included
    if trainer.args.should_save:
        plot = plot_training_curves(
            trainer.state.log_history, os.path.join(training_args.output_dir, "training_curves.png")
        )
        losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
        if losses:
            logger.info("loss %.4f at the first logging step -> %.4f at the last", losses[0], losses[-1])
        knn = [e for e in trainer.state.log_history if "eval_knn_accuracy" in e]
        if knn:
            logger.info(
                "k-NN accuracy by step (± its standard error): %s",
                ", ".join(
                    f"{e['step']}: {e['eval_knn_accuracy']:.3f} ± {e.get('eval_knn_accuracy_stderr', 0):.3f}"
                    for e in knn
                ),
            )
        if training_args.load_best_model_at_end and trainer.state.best_model_checkpoint:
            logger.info(
                "saved encoder: the %s by %s (%s, %.4f)",
                "best" if training_args.best_model_rule == "best" else "latest within a standard error of the best",
                training_args.metric_for_best_model,
                trainer.state.best_model_checkpoint,
                trainer.state.best_metric,
            )
        logger.info(
            "encoder saved to %s (AutoModel.from_pretrained loads it); curves: %s", training_args.output_dir, plot
        )
    return training_args.output_dir


if __name__ == "__main__":
    main()
