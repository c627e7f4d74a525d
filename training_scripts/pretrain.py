#!/usr/bin/env python
"""
I-JEPA pre-training with `transformers.Trainer` and `accelerate launch`.

    accelerate launch training_scripts/pretrain.py                       # embedded digits default, CPU, ~2 min
    accelerate launch --config_file configuration/accelerate/a100x8_bf16_ddp.yaml training_scripts/pretrain.py \
        --config configuration/recipes/in1k-vith14-ep300.yaml --gradient_accumulation_steps 2

Every option can come from a YAML/JSON recipe (`--config NAME_OR_PATH`, default `tiny-cpu`) and be overridden on the
command line. Data: `--dataset_name` (hub, `--streaming` recommended), `--train_dir` (imagefolder or parquet files,
optionally `--streaming`), or nothing (scikit-learn's bundled digits, offline). At the end `output_dir` holds the
target encoder and its image processor (loadable by `AutoModel.from_pretrained` and by vanilla transformers),
`output_dir/pretraining` the full `IJepaForPreTraining` (encoder, predictor, target encoder), and
`training_curves.png` (loss, learning rate, collapse monitors).
"""

from __future__ import annotations

import argparse
import difflib
import json
import logging
import os
import sys
from dataclasses import dataclass, field, fields
from pathlib import Path

import transformers
from transformers import HfArgumentParser, set_seed
from transformers.trainer_utils import get_last_checkpoint

from modeling_ijepa import IJepaConfig, IJepaForPreTraining, IJepaModel
from modeling_ijepa.configuration_ijepa import configuration_dir
from modeling_ijepa.data import IJepaPretrainingCollator, default_image_processor, load_image_dataset
from modeling_ijepa.distributed import OutputDirInUseError
from modeling_ijepa.hardware import require_native_cpu_bf16
from modeling_ijepa.masking import mask_sampler_from_config
from modeling_ijepa.trainer import IJepaTrainer, IJepaTrainingArguments

logger = logging.getLogger("pretrain")

DEFAULT_RECIPE = "tiny-cpu"


@dataclass
class ModelArguments:
    """Which model to pre-train."""

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
        metadata={"help": "Comma-separated config overrides, e.g. 'predictor_num_hidden_layers=16,image_size=448'."},
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
    require_data: bool = field(
        default=False, metadata={"help": "Fail when no data is given instead of using the embedded digits."}
    )
    cache_dir: str | None = field(default=None, metadata={"help": "datasets cache folder."})


class _Parser(HfArgumentParser):
    """`HfArgumentParser` whose unknown flags and bad values end in an argparse error naming the fix."""

    def format_usage(self) -> str:  # the full usage lists ~150 TrainingArguments flags: keep errors readable
        return f"usage: {self.prog} [--config RECIPE] [--option value ...]   (--help lists every option)\n"

    def known_options(self) -> list[str]:
        return [option for action in self._actions for option in action.option_strings if option.startswith("--")]

    def reject_unknown(self, unknown: list[str], origin: str) -> None:
        flags = [item.split("=", 1)[0] for item in unknown if item.startswith("-")]
        if not unknown:
            return
        if not flags:
            self.error(f"unexpected positional argument(s) {unknown} ({origin}); options are written --name value.")
        hints = []
        for flag in flags:
            close = difflib.get_close_matches(flag, self.known_options(), n=1)
            hints.append(f"{flag} (did you mean {close[0]}?)" if close else flag)
        self.error(f"unrecognized option(s) {', '.join(hints)} ({origin}); see --help for the list of options.")


def _has_accelerator() -> bool:
    import torch

    return torch.cuda.is_available() or (hasattr(torch, "xpu") and torch.xpu.is_available()) or torch.backends.mps.is_available()


def resolve_recipe(name_or_path: str) -> Path:
    """A recipe file: a path, or the name of one shipped in configuration/recipes/ (with or without `.yaml`)."""
    path = Path(name_or_path)
    if path.is_file():
        return path
    recipes = configuration_dir() / "recipes"
    for candidate in (recipes / name_or_path, recipes / f"{name_or_path}.yaml", recipes / f"{name_or_path}.json"):
        if candidate.is_file():
            return candidate
    available = sorted(p.stem for p in recipes.glob("*.yaml"))
    raise FileNotFoundError(f"Recipe {name_or_path!r} not found: pass a YAML/JSON file or one of {available}.")


def load_recipe(path: Path) -> dict:
    import yaml

    text = path.read_text(encoding="utf-8")
    recipe = json.loads(text) if path.suffix == ".json" else yaml.safe_load(text)
    if recipe is None:
        return {}
    if not isinstance(recipe, dict):
        raise ValueError(f"Recipe {path} must be a mapping of option names to values, got {type(recipe).__name__}.")
    return recipe


def parse_args(argv: list[str] | None = None) -> tuple[ModelArguments, DataArguments, IJepaTrainingArguments, str]:
    """Recipe values become the parser's defaults; command-line flags override them."""
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = _Parser((ModelArguments, DataArguments, IJepaTrainingArguments), prog="pretrain.py", description=__doc__)
    parser.add_argument("--config", default=DEFAULT_RECIPE, help="Recipe (YAML/JSON file or shipped recipe name).")
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--config", default=DEFAULT_RECIPE)
    known, _ = pre.parse_known_args(argv)
    try:
        recipe_path = resolve_recipe(known.config)
        recipe = load_recipe(recipe_path)
    except (FileNotFoundError, ValueError) as error:
        parser.error(str(error))
    destinations = {action.dest for action in parser._actions}
    unknown_keys = [key for key in recipe if key not in destinations]
    if unknown_keys:
        parser.reject_unknown([f"--{key}" for key in unknown_keys], f"keys of recipe {recipe_path}")
    parser.set_defaults(**recipe)
    try:
        namespace, unknown = parser.parse_known_args(argv)
        parser.reject_unknown(unknown, "command line")
        values = vars(namespace)
        values.pop("config")
        if not _has_accelerator():
            # Lets `accelerate launch --multi_gpu --num_processes N` run N CPU processes (gloo), and bf16 autocast on CPU.
            values["use_cpu"] = True
        outputs = []
        for dtype in parser.dataclass_types:
            names = {f.name for f in fields(dtype) if f.init}
            outputs.append(dtype(**{k: v for k, v in values.items() if k in names}))
    except ValueError as error:  # raised by the dataclasses' own validation (e.g. TrainingArguments)
        # Without an accelerator `use_cpu` is already on (bf16 autocast works there), so a bf16 error means a device
        # without bf16 support.
        hint = " The official recipes use bf16: on hardware without bf16 pass --bf16 false." if "bf16" in str(error) else ""
        parser.error(f"{error}{hint}")
    model_args, data_args, training_args = outputs
    if training_args.bf16 and training_args.use_cpu:
        try:
            require_native_cpu_bf16("--bf16")
        except ValueError as error:
            parser.error(str(error))
    if not 0.0 < data_args.crop_scale_min <= data_args.crop_scale_max <= 1.0:
        parser.error(
            f"--crop_scale_min {data_args.crop_scale_min} / --crop_scale_max {data_args.crop_scale_max}: need "
            "0 < min <= max <= 1 (the official range is 0.3 to 1.0)."
        )
    if data_args.streaming and training_args.max_steps <= 0:
        parser.error("--streaming data has no length: set --max_steps (the recipes give epochs as steps).")
    if data_args.require_data and not (data_args.dataset_name or data_args.train_dir):
        parser.error(f"recipe {recipe_path.name} needs data: pass --dataset_name or --train_dir.")
    return model_args, data_args, training_args, str(recipe_path)


def build_config(model_args: ModelArguments) -> IJepaConfig:
    overrides = {}
    for item in filter(None, (model_args.config_overrides or "").split(",")):
        if "=" not in item:
            raise ValueError(f"--config_overrides item {item!r} must look like name=value.")
        key, value = (part.strip() for part in item.split("=", 1))
        try:
            overrides[key] = json.loads(value)
        except json.JSONDecodeError:
            overrides[key] = value
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
        dataset = dataset.shuffle(seed=training_args.data_seed or training_args.seed, buffer_size=data_args.shuffle_buffer_size)
    return dataset


def save_final_model(trainer: IJepaTrainer, config: IJepaConfig, image_processor, output_dir: str) -> None:
    """Target encoder + image processor at the top of `output_dir`; the full pre-training model in `pretraining/`."""
    trainer.save_model(os.path.join(output_dir, "pretraining"))
    state_dict = trainer.accelerator.get_state_dict(trainer.model)  # gathers FSDP shards; collective on all ranks
    if trainer.args.should_save:
        prefix = "target_encoder."
        encoder = IJepaModel(config)
        encoder.load_state_dict({k[len(prefix) :]: v for k, v in state_dict.items() if k.startswith(prefix)})
        encoder.save_pretrained(output_dir)
        image_processor.save_pretrained(output_dir)
        image_processor.save_pretrained(os.path.join(output_dir, "pretraining"))
    trainer.accelerator.wait_for_everyone()


def plot_training_curves(log_history: list[dict], path: str) -> str | None:
    """PNG of the loss, the learning rate and the collapse monitors over optimiser steps."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:  # pragma: no cover - matplotlib is a dependency, but never fail a finished run over a plot
        logger.warning("matplotlib is not installed: no training-curve plot written.")
        return None
    panels = [
        ("loss", "smooth-L1 loss", True),
        ("target_feature_std", "target feature std", False),
        ("pooled_effective_rank", "effective rank (pooled)", False),
        ("learning_rate", "learning rate", False),
    ]
    records = [entry for entry in log_history if "loss" in entry]
    figure, axes = plt.subplots(1, len(panels), figsize=(4 * len(panels), 3.2))
    for axis, (key, title, log_scale) in zip(axes, panels):
        points = [(entry["step"], entry[key]) for entry in records if key in entry]
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
    mask_collator = mask_sampler_from_config(config, seed=training_args.seed + 1_000_003 * training_args.process_index)
    # Batches leave the DataLoader workers as uint8 (4x less host-to-device traffic); the trainer normalises them on
    # the training device with the collator's `normalize`.
    collator = IJepaPretrainingCollator(
        mask_collator,
        image_processor,
        crop_scale=(data_args.crop_scale_min, data_args.crop_scale_max),
        output_uint8=True,
    )
    try:  # the trainer checks the launch (FSDP requested but impossible, processes outside one process group)
        trainer = IJepaTrainer(model=model, args=training_args, train_dataset=train_dataset, data_collator=collator)
    except ValueError as error:
        raise SystemExit(f"pretrain.py: error: {error}") from None

    resume = training_args.resume_from_checkpoint
    if resume in ("last", "latest", "True", "true", True):
        resume = get_last_checkpoint(training_args.output_dir)
        if resume is None:
            logger.info("no checkpoint to resume in %s: starting from scratch", training_args.output_dir)
    try:
        trainer.train(resume_from_checkpoint=resume)
    except OutputDirInUseError as error:
        raise SystemExit(f"pretrain.py: error: {error}") from None
    except FloatingPointError as error:
        last = get_last_checkpoint(training_args.output_dir) if os.path.isdir(training_args.output_dir) else None
        logger.error("%s Last good checkpoint: %s.", error, last or "none saved yet")
        raise SystemExit(1) from None
    if collator.num_dropped:
        logger.warning("%d undecodable images were skipped on this process.", collator.num_dropped)

    save_final_model(trainer, config, image_processor, training_args.output_dir)
    if trainer.args.should_save:
        plot = plot_training_curves(trainer.state.log_history, os.path.join(training_args.output_dir, "training_curves.png"))
        losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
        if losses:
            logger.info("loss %.4f at the first logging step -> %.4f at the last", losses[0], losses[-1])
        logger.info("encoder saved to %s (AutoModel.from_pretrained loads it); curves: %s", training_args.output_dir, plot)
    return training_args.output_dir


if __name__ == "__main__":
    main()
