# Copyright 2026 The ijepa-hf Authors. All rights reserved.
# Licensed under the Apache License, Version 2.0.
"""The command-line layer of the training scripts: one way to configure every script.

Every script parses its argument dataclasses with [`RecipeArgumentParser`]: a recipe file (`--config NAME_OR_FILE`,
YAML or JSON; a name resolves to `configuration/recipes/NAME.yaml`) gives the defaults, command-line flags override
them, and an unknown flag or recipe key fails with a did-you-mean hint. Recipes may group keys in two mappings:

```yaml
model:              # fields of the model preset (IJepaConfig), merged into --config_overrides
  predictor_num_hidden_layers: 6
mask:               # the masking strategy and its settings, as the --mask_strategy / --target_scale ... flags
  strategy: multiblock
  target_scale: [0.15, 0.2]
```

The argument dataclasses shared by the three evaluation scripts (`linear_probe.py`, `knn_eval.py`, `finetune.py`)
live here too: [`EvaluationModelArguments`] and [`EvaluationDataArguments`], whose fields are the keyword arguments of
`modeling_ijepa.data.load_classification_datasets`.

Only the training scripts import this module; the library below it takes plain keyword arguments.
"""

from __future__ import annotations

import argparse
import difflib
import json
import logging
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field, fields, make_dataclass
from pathlib import Path

from transformers import HfArgumentParser, TrainingArguments

from .configuration_ijepa import configuration_dir
from .hardware import require_native_cpu_bf16
from .masking.settings import MaskSettings


RECIPE_SECTIONS = ("model", "mask")


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
    """The recipe's options as flat flag names: the `model:` mapping joins `config_overrides`, `mask:` keys become
    mask flags (`strategy` -> `mask_strategy`)."""
    import yaml

    text = path.read_text(encoding="utf-8")
    recipe = json.loads(text) if path.suffix == ".json" else yaml.safe_load(text)
    if recipe is None:
        return {}
    if not isinstance(recipe, dict):
        raise ValueError(f"Recipe {path} must be a mapping of option names to values, got {type(recipe).__name__}.")
    for section in RECIPE_SECTIONS:
        if section in recipe and not isinstance(recipe[section], dict):
            raise ValueError(f"Recipe {path}: `{section}:` must be a mapping of names to values.")
    flat = {key: value for key, value in recipe.items() if key not in RECIPE_SECTIONS}
    model = recipe.get("model") or {}
    if model:
        given = [flat["config_overrides"]] if flat.get("config_overrides") else []
        flat["config_overrides"] = ",".join(given + [f"{key}={json.dumps(value)}" for key, value in model.items()])
    recipe_keys = MaskSettings.recipe_keys()
    for key, value in (recipe.get("mask") or {}).items():
        if key not in recipe_keys:
            close = difflib.get_close_matches(key, recipe_keys, n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise ValueError(f"Recipe {path}: unknown `mask:` key {key!r}{hint}; the keys are {sorted(recipe_keys)}.")
        flat[recipe_keys[key]] = value
    return flat


def _flag_type(annotation):
    """The optional flag type of a mask setting: pairs become `list[float]` flags (`--target_scale 0.1 0.2`)."""
    if "tuple" in str(annotation) or "list" in str(annotation):
        return list[float] | None
    return {"int": int, "bool": bool, "str": str, "float": float}[str(annotation)] | None


def _mask_overrides(self) -> dict:
    """The mask settings given on the command line or in a recipe (those not left at `None`), by setting name."""
    return {name: getattr(self, name) for name in MaskSettings.names() if getattr(self, name) is not None}


# One optional flag per mask setting, generated from the declaration in `masking/settings.py`: `None` (the default)
# keeps the value of the model preset / checkpoint, so a flag only overrides what it names.
MaskArguments = make_dataclass(
    "MaskArguments",
    [
        (
            setting.name,
            _flag_type(setting.type),
            field(
                default=None,
                metadata={
                    "help": setting.metadata["help"]
                    + (f" One of {list(setting.metadata['choices'])}." if setting.metadata["choices"] else "")
                    + " Default: the model preset's value."
                },
            ),
        )
        for setting in fields(MaskSettings)
    ],
    namespace={"mask_overrides": _mask_overrides},
)
MaskArguments.__doc__ = "The mask settings as optional flags (see `modeling_ijepa.masking.MaskSettings`)."


def parse_config_overrides(text: str | None) -> dict:
    """
    `'name=value,name=value'` as a dict; values are JSON where they parse (numbers, booleans, lists such as
    `target_scale=[0.1,0.2]`), strings otherwise. Commas inside brackets do not split.
    """
    items, depth, current = [], 0, ""
    for character in text or "":
        depth += (character in "[{") - (character in "]}")
        if character == "," and depth == 0:
            items.append(current)
            current = ""
        else:
            current += character
    items.append(current)
    overrides = {}
    for item in filter(None, (item.strip() for item in items)):
        if "=" not in item:
            raise ValueError(f"--config_overrides item {item!r} must look like name=value.")
        key, value = (part.strip() for part in item.split("=", 1))
        try:
            overrides[key] = json.loads(value)
        except json.JSONDecodeError:
            overrides[key] = value
    return overrides


def has_accelerator() -> bool:
    import torch

    return (
        torch.cuda.is_available()
        or (hasattr(torch, "xpu") and torch.xpu.is_available())
        or torch.backends.mps.is_available()
    )


@dataclass
class EvaluationModelArguments:
    """Which encoder to evaluate (linear_probe.py, knn_eval.py, finetune.py)."""

    model_name_or_path: str | None = field(
        default=None,
        metadata={
            "help": "Checkpoint directory or hub id of an I-JEPA encoder (ours or vanilla transformers' IJepa; a "
            "saved IJepaForPreTraining gives its target encoder), or `random:<preset>` (e.g. "
            "`random:vit_micro_patch4_48`) for a randomly initialised baseline."
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
class EvaluationDataArguments:
    """
    Labelled images. Without `dataset_name` / `train_dir`, the embedded digits (train 1200 / test 597, 48 px). The
    fields are the keyword arguments of `modeling_ijepa.data.load_classification_datasets`.
    """

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

    def dataset_kwargs(self) -> dict:
        """The options as keyword arguments of `load_classification_datasets`."""
        return {f.name: getattr(self, f.name) for f in fields(self)}


def reconcile_save_and_eval_steps(values: dict, given: set[str]) -> str | None:
    """
    Make the checkpoint and evaluation cadences agree when `load_best_model_at_end` needs a checkpoint at every
    evaluation (`save_steps` a multiple of `eval_steps`): the one set on the command line wins and the other follows
    it (returns the sentence to log); when both or neither were set there, raise `ValueError` naming the flags.
    """
    if not values.get("load_best_model_at_end") or str(values.get("eval_strategy")) != "steps":
        return None
    if str(values.get("save_strategy", "steps")) != "steps":
        return None
    save_steps, eval_steps = values.get("save_steps"), values.get("eval_steps") or values.get("logging_steps")
    if not save_steps or not eval_steps or float(save_steps) % float(eval_steps) == 0:
        return None
    if "save_steps" in given and "eval_steps" not in given:
        values["eval_steps"] = save_steps
        return f"--save_steps {save_steps}: evaluating every {save_steps} steps too (--eval_steps {save_steps})"
    if "eval_steps" in given and "save_steps" not in given:
        values["save_steps"] = eval_steps
        return (
            f"--eval_steps {eval_steps}: saving a checkpoint every {eval_steps} steps too (--save_steps {eval_steps})"
        )
    raise ValueError(
        f"--save_steps {save_steps} is not a multiple of --eval_steps {eval_steps}, which --load_best_model_at_end "
        f"needs (a checkpoint at every evaluation): pass --eval_steps {save_steps} (or a divisor of it), change "
        "--save_steps to a multiple of --eval_steps, or pass --load_best_model_at_end false."
    )


class RecipeArgumentParser(HfArgumentParser):
    """
    `HfArgumentParser` taking defaults from a recipe file, with readable errors.

    Args:
        dataclass_types: the script's argument dataclasses (a `TrainingArguments` subclass among them, if it trains).
        prog / description: for `--help`.
        default_recipe: the recipe used without `--config` (a shipped name or a path), or `None` for none.
    """

    def __init__(self, dataclass_types, prog: str, description: str | None = None, default_recipe: str | None = None):
        # Exact flags only: an abbreviation (--max_eval_sample) would silently set another option.
        super().__init__(dataclass_types, prog=prog, description=description, allow_abbrev=False)
        self.default_recipe = default_recipe
        default = f" (default: {default_recipe})" if default_recipe else ""
        self.add_argument(
            "--config", default=default_recipe, help=f"Recipe: a YAML/JSON file or a shipped recipe name{default}."
        )

    def format_usage(self) -> str:  # the full usage lists ~150 TrainingArguments flags: keep errors readable
        return f"usage: {self.prog} [--config RECIPE] [--option value ...]   (--help lists every option)\n"

    def known_options(self) -> list[str]:
        return [option for action in self._actions for option in action.option_strings if option.startswith("--")]

    def reject_unknown(self, unknown: list[str], origin: str) -> None:
        """Exit with an argparse error naming each unknown option and the closest known one."""
        if not unknown:
            return
        flags = [item.split("=", 1)[0] for item in unknown if item.startswith("-")]
        if not flags:
            self.error(f"unexpected positional argument(s) {unknown} ({origin}); options are written --name value.")
        hints = []
        for flag in flags:
            close = difflib.get_close_matches(flag, self.known_options(), n=1)
            hints.append(f"{flag} (did you mean {close[0]}?)" if close else flag)
        self.error(f"unrecognized option(s) {', '.join(hints)} ({origin}); see --help for the list of options.")

    def parse(self, argv: Sequence[str] | None = None) -> tuple:
        """
        Parse `argv` (default `sys.argv[1:]`): recipe values become the defaults, flags override them. A single
        `.json` / `.yaml` argument is read as the recipe. Without an accelerator, training arguments run on the CPU
        (`use_cpu`), and bf16 there needs a CPU with native bf16.

        Returns:
            One instance per dataclass type, then the recipe path (a `str`, or `None` without a recipe).
        """
        argv = list(sys.argv[1:] if argv is None else argv)
        if len(argv) == 1 and argv[0].endswith((".json", ".yaml", ".yml")):
            argv = ["--config", argv[0]]
        pre = argparse.ArgumentParser(add_help=False)
        pre.add_argument("--config", default=self.default_recipe)
        known, _ = pre.parse_known_args(argv)
        recipe_path, recipe = None, {}
        if known.config:
            try:
                recipe_path = resolve_recipe(known.config)
                recipe = load_recipe(recipe_path)
            except (FileNotFoundError, ValueError) as error:
                self.error(str(error))
        destinations = {action.dest for action in self._actions}
        unknown_keys = [key for key in recipe if key not in destinations]
        if unknown_keys:
            self.reject_unknown([f"--{key}" for key in unknown_keys], f"keys of recipe {recipe_path}")
        self.set_defaults(**recipe)
        try:
            namespace, unknown = self.parse_known_args(argv)
            self.reject_unknown(unknown, "command line")
            values = vars(namespace)
            values.pop("config")
            if "config_overrides" in recipe and values.get("config_overrides") != recipe["config_overrides"]:
                # A --config_overrides flag adds to the recipe's model fields; its own keys win.
                values["config_overrides"] = f"{recipe['config_overrides']},{values['config_overrides']}"
            trains = any(issubclass(dtype, TrainingArguments) for dtype in self.dataclass_types)
            if trains:
                given = {item.split("=", 1)[0].lstrip("-").replace("-", "_") for item in argv if item.startswith("--")}
                note = reconcile_save_and_eval_steps(values, given)
                if note:
                    logging.getLogger(self.prog).warning(note)
            if trains and not has_accelerator():
                # Lets `accelerate launch --num_processes N` run N CPU processes (gloo), and bf16 autocast on CPU.
                values["use_cpu"] = True
            outputs = []
            for dtype in self.dataclass_types:
                names = {f.name for f in fields(dtype) if f.init}
                outputs.append(dtype(**{k: v for k, v in values.items() if k in names}))
        except ValueError as error:  # raised by the dataclasses' own validation (e.g. TrainingArguments)
            self.error(str(error))
        for arguments in outputs:
            if isinstance(arguments, TrainingArguments) and arguments.bf16 and arguments.use_cpu:
                try:
                    require_native_cpu_bf16("--bf16")
                except ValueError as error:
                    self.error(str(error))
        return (*outputs, None if recipe_path is None else str(recipe_path))


__all__ = [
    "EvaluationDataArguments",
    "EvaluationModelArguments",
    "MaskArguments",
    "RecipeArgumentParser",
    "has_accelerator",
    "load_recipe",
    "parse_config_overrides",
    "reconcile_save_and_eval_steps",
    "resolve_recipe",
]
