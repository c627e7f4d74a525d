# Copyright 2026 The ijepa-hf Authors. All rights reserved.
# Licensed under the Apache License, Version 2.0.
"""Checkpoints a long run can trust: written atomically and flushed to disk, checked before use, `last` resolved past
damaged ones.

- **Saving** ([`CheckpointingMixin`]): the Trainer writes `checkpoint-N` inside a staging folder `tmp-checkpoint-N/`;
  every file is flushed (`fsync`), a manifest of the files and their sizes (`ijepa_checkpoint.json`) is written last,
  and only then is the checkpoint renamed to `output_dir/checkpoint-N`. A kill at any moment of a save leaves either
  the previous set of checkpoints or a `tmp-checkpoint-*` folder, which no resolution counts and the next run removes.
- **Checking** ([`check_checkpoint`]): the manifest's files are present with their sizes, every safetensors file opens
  (its header covers the file), every torch file is a complete zip archive, distributed-checkpoint folders hold their
  metadata, and `trainer_state.json` parses.
- **Resolving** ([`resolve_checkpoint`]): `last` (also `latest` / `true`) is the newest checkpoint that passes the
  check; newer damaged ones are named in a warning and skipped. A checkpoint named explicitly must pass, or the run
  stops at start with [`DamagedCheckpointError`] naming the file and the fix.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import zipfile
from pathlib import Path

import torch


logger = logging.getLogger(__name__)

CHECKPOINT_PREFIX = "checkpoint"  # transformers' PREFIX_CHECKPOINT_DIR
STAGING_PREFIX = "tmp-checkpoint"
MANIFEST_NAME = "ijepa_checkpoint.json"
TRAINER_STATE_NAME = "trainer_state.json"
LAST_CHECKPOINT_ALIASES = ("last", "latest", "true", "True")

_CHECKPOINT_RE = re.compile(rf"^{CHECKPOINT_PREFIX}-(\d+)$")
_WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin", "pytorch_model_fsdp_0")


class DamagedCheckpointError(ValueError):
    """A checkpoint is incomplete or unreadable; the message names the file and what to do."""


# ---------------------------------------------------------------------------------------------------------------------
# Files on disk
# ---------------------------------------------------------------------------------------------------------------------
def checkpoint_step(path: str | os.PathLike) -> int | None:
    """The step `N` of a `checkpoint-N` folder, or `None` for any other name."""
    match = _CHECKPOINT_RE.match(Path(path).name)
    return int(match.group(1)) if match else None


def list_checkpoints(output_dir: str | os.PathLike) -> list[Path]:
    """The `checkpoint-N` folders of `output_dir`, newest (highest step) first; staging folders never count."""
    folder = Path(output_dir)
    if not folder.is_dir():
        return []
    found = [path for path in folder.iterdir() if path.is_dir() and checkpoint_step(path) is not None]
    return sorted(found, key=checkpoint_step, reverse=True)


def fsync_tree(path: str | os.PathLike) -> None:
    """Flush every file below `path`, then the folders themselves, to disk."""
    for root, _, files in os.walk(path):
        for name in files:
            with open(os.path.join(root, name), "rb") as handle:
                os.fsync(handle.fileno())
    fsync_dir(path)


def fsync_dir(path: str | os.PathLike) -> None:
    """Flush a folder's entries (a rename inside it) to disk, where the platform allows it."""
    try:
        descriptor = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(descriptor)
    except OSError:  # some file systems refuse fsync on folders
        pass
    finally:
        os.close(descriptor)


def write_manifest(checkpoint_dir: str | os.PathLike, step: int) -> None:
    """Record every file of the checkpoint with its size, flushed; written last, it marks the checkpoint complete."""
    root = Path(checkpoint_dir)
    files = {
        str(path.relative_to(root)): path.stat().st_size
        for path in sorted(root.rglob("*"))
        if path.is_file() and path.name != MANIFEST_NAME
    }
    manifest = root / MANIFEST_NAME
    with open(manifest, "w", encoding="utf-8") as handle:
        json.dump({"step": step, "files": files}, handle, indent=1)
        handle.flush()
        os.fsync(handle.fileno())
    fsync_dir(root)


def remove_staging_dirs(output_dir: str | os.PathLike) -> list[str]:
    """Delete the `tmp-checkpoint-*` folders a killed save left behind; returns their names."""
    folder = Path(output_dir)
    if not folder.is_dir():
        return []
    removed = []
    for path in sorted(folder.glob(f"{STAGING_PREFIX}-*")):
        if path.is_dir():
            shutil.rmtree(path, ignore_errors=True)
            removed.append(path.name)
    return removed


# ---------------------------------------------------------------------------------------------------------------------
# Checking and resolving
# ---------------------------------------------------------------------------------------------------------------------
def checkpoint_problem(checkpoint_dir: str | os.PathLike) -> str | None:
    """Why `checkpoint_dir` cannot be resumed (naming the file), or `None` when it is complete and readable."""
    from safetensors import safe_open

    root = Path(checkpoint_dir)
    if not root.is_dir():
        return f"{root} does not exist"
    manifest_path = root / MANIFEST_NAME
    if manifest_path.is_file():
        try:
            manifest = json.loads(manifest_path.read_text(encoding="utf-8"))
            listed = dict(manifest["files"])
        except (OSError, ValueError, KeyError, TypeError) as error:
            return f"{manifest_path.name} is unreadable ({error})"
        for name, size in listed.items():
            path = root / name
            if not path.is_file():
                return f"{name} is missing"
            if path.stat().st_size != size:
                return f"{name} has {path.stat().st_size} bytes, {size} were written"
    try:
        json.loads((root / TRAINER_STATE_NAME).read_text(encoding="utf-8"))
    except FileNotFoundError:
        return f"{TRAINER_STATE_NAME} is missing"
    except (OSError, ValueError) as error:
        return f"{TRAINER_STATE_NAME} does not parse ({error})"
    if not any((root / name).exists() for name in _WEIGHT_FILES):
        return f"no model weights ({' / '.join(_WEIGHT_FILES)})"
    for path in sorted(root.rglob("*")):
        if not path.is_file():
            continue
        name = str(path.relative_to(root))
        if path.suffix == ".safetensors":
            try:
                with safe_open(str(path), framework="pt") as handle:
                    handle.keys()
            except Exception as error:  # safetensors raises its own error type for a damaged header or length
                return f"{name} is damaged ({error})"
        elif path.suffix in (".pt", ".pth", ".bin") and not zipfile.is_zipfile(path):
            return f"{name} is not a complete torch file"
        elif path.name == ".metadata" and path.stat().st_size == 0:
            return f"{name} (distributed-checkpoint metadata) is empty"
    return None


def check_checkpoint(checkpoint_dir: str | os.PathLike) -> None:
    """Raise [`DamagedCheckpointError`] naming the damaged file and the fix, when `checkpoint_dir` cannot resume."""
    problem = checkpoint_problem(checkpoint_dir)
    if problem is None:
        return
    root = Path(checkpoint_dir)
    good = next((path for path in list_checkpoints(root.parent) if checkpoint_problem(path) is None), None)
    fix = (
        f"resume from {good} (the newest complete checkpoint) or with --resume_from_checkpoint last"
        if good is not None
        else "no complete checkpoint is left in its folder: start without --resume_from_checkpoint"
    )
    raise DamagedCheckpointError(f"Checkpoint {root} is damaged: {problem}. {fix}.")


def resolve_checkpoint(request: str | bool | None, output_dir: str | os.PathLike) -> str | None:
    """
    The checkpoint a `resume_from_checkpoint` request means: `None` / `False` -> `None`; `last` (`latest`, `true`,
    `True`) -> the newest complete checkpoint of `output_dir` (damaged newer ones are skipped with a warning; `None`
    when there is none); a path -> that checkpoint, checked ([`DamagedCheckpointError`] if it is damaged).
    """
    if request is None or request is False:
        return None
    if request is True or str(request) in LAST_CHECKPOINT_ALIASES:
        for path in list_checkpoints(output_dir):
            problem = checkpoint_problem(path)
            if problem is None:
                return str(path)
            logger.warning("skipping damaged checkpoint %s: %s", path, problem)
        return None
    check_checkpoint(request)
    return str(request)


# ---------------------------------------------------------------------------------------------------------------------
# The Trainer's checkpoint hooks
# ---------------------------------------------------------------------------------------------------------------------
class CheckpointingMixin:
    """
    Checkpoint hooks of [`~transformers.Trainer`] for I-JEPA models (mixed into `IJepaTrainer`):

    - `_save_checkpoint`: the Trainer's own save, redirected into a staging folder (through `_get_output_dir`, which
      the Trainer asks for the folder to save into), then flushed, given its manifest and renamed (module docstring);
    - `_load_from_checkpoint` / `_load_best_model`: weights loaded through `from_pretrained`, which maps the
      vanilla-compatible key names of our files back onto the modules (the Trainer's raw, non-strict
      `load_state_dict` would skip them); FSDP / DeepSpeed checkpoints go through the Trainer's own loader;
    - `save_model`: under FSDP with sharded state dicts, the final model is gathered into one safetensors file.
    """

    _staging_root: str | None = None

    def _get_output_dir(self, trial) -> str:
        if self._staging_root is not None:
            return self._staging_root
        return super()._get_output_dir(trial=trial)

    def _save_checkpoint(self, model, trial) -> None:
        run_dir = super()._get_output_dir(trial=trial)
        step = self.state.global_step
        staging_root = os.path.join(run_dir, f"{STAGING_PREFIX}-{step}")
        final_dir = os.path.join(run_dir, f"{CHECKPOINT_PREFIX}-{step}")
        staged = os.path.join(staging_root, f"{CHECKPOINT_PREFIX}-{step}")
        self._staging_root = staging_root
        try:
            super()._save_checkpoint(model, trial)
        finally:
            self._staging_root = None
        # The Trainer recorded the best checkpoint under the staging name (or missed it): point it at its final name.
        best_step = self.state.best_global_step
        best_dir = os.path.join(run_dir, f"{CHECKPOINT_PREFIX}-{best_step}")
        best_moved = bool(best_step) and (best_step == step or os.path.isdir(best_dir))
        if best_moved:
            self.state.best_model_checkpoint = best_dir
        self.accelerator.wait_for_everyone()
        if self.args.should_save or self.args.local_process_index == 0:  # every node flushes what it wrote
            if os.path.isdir(staged):
                fsync_tree(staged)
        self.accelerator.wait_for_everyone()
        if self.args.should_save:
            if best_moved:  # the copy of the state inside the checkpoint, read on resume
                self.state.save_to_json(os.path.join(staged, TRAINER_STATE_NAME))
            write_manifest(staged, step)
            if os.path.isdir(final_dir):  # the same step saved again (e.g. a resumed run): the new one wins
                shutil.rmtree(final_dir)
            os.replace(staged, final_dir)
            fsync_dir(run_dir)
            shutil.rmtree(staging_root, ignore_errors=True)
            # The Trainer rotated the staging folder; apply `save_total_limit` to the real set.
            from transformers.trainer import rotate_checkpoints

            rotate_checkpoints(
                output_dir=run_dir,
                save_total_limit=self.args.save_total_limit,
                best_model_checkpoint=self.state.best_model_checkpoint,
                use_mtime=False,
            )
        self.accelerator.wait_for_everyone()

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model=None) -> None:
        model = self.model if model is None else model
        if self.is_fsdp_enabled or self.is_deepspeed_enabled:
            return super()._load_from_checkpoint(resume_from_checkpoint, model=model)
        target = self.accelerator.unwrap_model(model)
        loaded = type(target).from_pretrained(resume_from_checkpoint)
        state = loaded.state_dict()
        missing = set(target.state_dict()) ^ set(state)
        if missing:
            raise ValueError(
                f"Checkpoint {resume_from_checkpoint} does not match the model (keys differ: {sorted(missing)[:5]}): "
                "resume with the same --model_preset and --config_overrides it was trained with."
            )
        target.load_state_dict(state)

    def _load_best_model(self) -> None:
        if self.is_fsdp_enabled or self.is_deepspeed_enabled:
            return super()._load_best_model()
        logger.info("loading the best model, %s (score %s)", self.state.best_model_checkpoint, self.state.best_metric)
        self._load_from_checkpoint(self.state.best_model_checkpoint)

    def save_model(self, output_dir: str | None = None, _internal_call: bool = False) -> None:
        """
        [`~transformers.Trainer.save_model`]; under FSDP with sharded state dicts the Trainer writes nothing here (its
        checkpoints hold the sharded state), so the final model is gathered and saved as one safetensors file that
        `from_pretrained` loads. Collective: call it on every process.
        """
        plugin = self.accelerator.state.fsdp_plugin if self.is_fsdp_enabled else None
        sharded = plugin is not None and "SHARDED_STATE_DICT" in str(plugin.state_dict_type)
        if not sharded or _internal_call:
            return super().save_model(output_dir, _internal_call=_internal_call)
        output_dir = self.args.output_dir if output_dir is None else output_dir
        state_dict = self.accelerator.get_state_dict(self.model)  # gathered on the main process
        if self.args.should_save:
            # A plain (unsharded) copy built on the meta device holds the gathered tensors without copying them.
            model = self.accelerator.unwrap_model(self.model)
            with torch.device("meta"):
                plain = type(model)(model.config)
            plain.load_state_dict(state_dict, assign=True)
            plain.save_pretrained(output_dir)
        self.accelerator.wait_for_everyone()


__all__ = [
    "CHECKPOINT_PREFIX",
    "CheckpointingMixin",
    "DamagedCheckpointError",
    "LAST_CHECKPOINT_ALIASES",
    "MANIFEST_NAME",
    "STAGING_PREFIX",
    "check_checkpoint",
    "checkpoint_problem",
    "checkpoint_step",
    "fsync_tree",
    "list_checkpoints",
    "remove_staging_dirs",
    "resolve_checkpoint",
    "write_manifest",
]
