# Copyright 2026 The ijepa-hf Authors. All rights reserved.
# Licensed under the Apache License, Version 2.0.
"""Representation quality while pre-training: a k-NN monitor of the target encoder, the collapse monitor
(effective rank) and the rules that pick which evaluated checkpoint a run keeps.

The I-JEPA loss is only a proxy: a run can keep lowering it while its features get worse (partial collapse). The
monitor scores the frozen target encoder the way it is evaluated after training (average-pooled last-layer features,
cosine k-NN against a labelled reference set), at every evaluation of the Trainer, so `eval_knn_accuracy` can be
logged, plotted and used as `metric_for_best_model`.

Cost and determinism: the labelled images are decoded and normalised once, at construction, into a float16 cache
(`2 x 3 x height x width` bytes per image: 14 KB at 48 px, 300 KB at 224 px); each evaluation is then batched
forward passes under `torch.no_grad()`, with no DataLoader and no random number drawn, so it never changes the
training batches or the random state a resumed run restores.
"""

from __future__ import annotations

import contextlib
import logging
import math
import time
from collections.abc import Callable

import numpy as np
import torch
from torch import nn

from .data import ImageClassificationCollator, group_split, image_groups, load_image_dataset
from .evaluation import knn_accuracy


logger = logging.getLogger(__name__)


# Collapse monitor
def effective_rank(features: torch.Tensor) -> float:
    """`exp(entropy)` of the normalised singular values of centred `(num_samples, dim)` features (1 = collapsed)."""
    features = features.float()
    singular_values = torch.linalg.svdvals(features - features.mean(dim=0, keepdim=True))
    distribution = singular_values / singular_values.sum().clamp_min(1e-12)
    entropy = -(distribution * torch.log(distribution.clamp_min(1e-12))).sum()
    return float(torch.exp(entropy))


# Which evaluated checkpoint a run keeps
BEST_MODEL_RULES = ("best", "latest_within_stderr")


def check_best_model_rule(rule: str) -> None:
    """Raise `ValueError` naming the choices unless `rule` is one of `BEST_MODEL_RULES`."""
    if rule not in BEST_MODEL_RULES:
        raise ValueError(f"best_model_rule must be one of {list(BEST_MODEL_RULES)}, got {rule!r}.")


def logged_scores(log_history: list[dict], key: str) -> dict[int, tuple[float, float]]:
    """`{step: (score, standard error)}` of every evaluation in a Trainer log history that logged `key` and
    `{key}_stderr` (what [`choose_checkpoint`] reads)."""
    return {e["step"]: (e[key], e[f"{key}_stderr"]) for e in log_history if key in e and f"{key}_stderr" in e}


def choose_checkpoint(
    scores: dict[int, tuple[float, float]], rule: str = "best", greater_is_better: bool = True
) -> int:
    """
    The step whose checkpoint a `best_model_rule` keeps, from the evaluation scores `{step: (score, standard error)}`.

    - `"best"`: the first step with the best score (the Trainer's rule);
    - `"latest_within_stderr"`: the latest step whose score is within one standard error (the one logged with the
      best score) of the best score: the one-standard-error rule, which favours the longer-trained checkpoint among
      those a noisy monitor cannot tell apart.
    """
    check_best_model_rule(rule)
    if not scores:
        raise ValueError("choose_checkpoint needs at least one evaluated step.")
    sign = 1.0 if greater_is_better else -1.0
    steps = sorted(scores)
    best = max(steps, key=lambda step: (sign * scores[step][0], -step))  # the first of equal best scores
    if rule == "best":
        return best
    threshold = sign * scores[best][0] - scores[best][1]
    return max(step for step in steps if sign * scores[step][0] >= threshold)


class UnlabelledMonitorImagesError(ValueError):
    """The k-NN monitor's reference folder has no labels (no class sub-folders)."""


def load_knn_monitor_datasets(
    train_dir: str | None = None,
    eval_dir: str | None = None,
    image_size: int = 48,
    eval_fraction: float = 0.2,
    seed: int = 0,
    split_by: str = "auto",
    max_hash_distance: int = 3,
):
    """
    The labelled reference (`train`) and query (`eval`) images of a k-NN monitor, columns `image` and `label`.

    Sources: `train_dir` and `eval_dir` (imagefolders with one sub-folder per class, or parquet files with a label
    column); `train_dir` alone, split into reference and query by a seeded `eval_fraction` split; neither: the
    embedded digits' training split (1200 images at `image_size`), split the same way. The monitor chooses the saved
    encoder, so it never reads the digits' test split, on which the evaluation scripts report.

    The split of `train_dir` keeps related images on one side (`modeling_ijepa.data.groups`), so that a query never
    has a near-copy among the references: `split_by="names"` groups by the file-name convention
    `<group>__<anything>.<ext>`; `"hash"` by 8 x 8 average hashes at most `max_hash_distance` bits apart (within a
    class); `"random"` is a plain seeded split; `"auto"` (default) is `"names"` when every file name declares a group,
    else `"random"` (the hash grouping is opt-in: its effect on real folders is not measured yet), and `"random"` on
    the embedded digits (distinct scans). The split used is logged.

    Returns:
        `(train_dataset, eval_dataset)`.
    """
    if eval_dir and not train_dir:
        raise ValueError("A k-NN monitor query folder (eval_dir) needs a reference folder too: pass train_dir.")
    if eval_dir:
        train = load_image_dataset(train_dir=train_dir, split="train", image_size=image_size)
        evaluation = load_image_dataset(train_dir=train_dir, validation_dir=eval_dir, split="validation")
    else:
        if not 0.0 < eval_fraction < 1.0:
            raise ValueError(f"The k-NN monitor's eval_fraction must be in (0, 1), got {eval_fraction}.")
        full = load_image_dataset(train_dir=train_dir, split="train", image_size=image_size)
        source = train_dir or "the embedded digits"
        if "label" not in full.column_names:
            raise UnlabelledMonitorImagesError(
                f"{train_dir} has no labels: the k-NN monitor needs one sub-folder per class."
            )
        if split_by == "auto" and not train_dir:
            split_by = "random"
        groups, used = image_groups(full, split_by, max_hash_distance)
        if groups is None:
            split = full.train_test_split(test_size=eval_fraction, seed=seed)
            train, evaluation = split["train"], split["test"]
            logger.info(
                "k-NN monitor split of %s: random (%s references, %s queries).", source, len(train), len(split["test"])
            )
        else:
            reference, query, summary = group_split(full["label"], groups, eval_fraction, seed)
            train, evaluation = full.select(reference), full.select(query)
            logger.info(
                "k-NN monitor split of %s: by %s groups (%s groups, largest %s images; %s references, %s queries).",
                source,
                "file-name" if used == "names" else "perceptual-hash",
                summary["groups"],
                summary["largest_group"],
                len(train),
                len(evaluation),
            )
            if summary["classes_without_queries"]:
                logger.warning(
                    "k-NN monitor: classes %s are a single group each, so they have no query images.",
                    summary["classes_without_queries"],
                )
    for name, dataset in (("reference", train), ("query", evaluation)):
        if "label" not in dataset.column_names:
            raise ValueError(
                f"The k-NN monitor's {name} images have no labels: use imagefolders with one sub-folder per class."
            )
    return train, evaluation


def _subset(dataset, max_samples: int | None, seed: int):
    """At most `max_samples` examples of `dataset`, a seeded random choice (numpy: the torch RNG is untouched)."""
    if max_samples is None or len(dataset) <= max_samples:
        return dataset
    chosen = np.random.default_rng(seed).choice(len(dataset), size=max_samples, replace=False)
    return dataset.select(np.sort(chosen).tolist())


def _cache_pixels(dataset, image_processor, batch_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Every decodable image of `dataset` as normalised float16 `(num_images, 3, height, width)` and its labels."""
    collator = ImageClassificationCollator(image_processor, augment=False)  # deterministic resize: no randomness
    pixels, labels = [], []
    for start in range(0, len(dataset), batch_size):
        examples = list(dataset.select(range(start, min(start + batch_size, len(dataset)))))
        batch = collator(examples)
        pixels.append(batch["pixel_values"].to(torch.float16))
        labels.append(batch["labels"].long())
    if not pixels:
        raise ValueError("The k-NN monitor got an empty dataset: give it labelled images.")
    return torch.cat(pixels), torch.cat(labels)


class KnnMonitor:
    """
    k-NN accuracy of a frozen encoder on a fixed labelled reference / query pair.

    Features are the average-pooled last-layer tokens (I-JEPA's evaluation protocol); each query image is classified
    by its `k` most cosine-similar reference images with weights `exp(similarity / temperature)`
    (`modeling_ijepa.evaluation.knn_accuracy`).

    Args:
        train_dataset / eval_dataset: reference and query images, `datasets.Dataset`s with columns `image`, `label`.
        image_processor: the encoder's image processor (deterministic resize and normalisation).
        k / temperature: the k-NN vote.
        batch_size: images per forward pass.
        max_train_samples / max_eval_samples: a fixed, seeded random subset of each set (`None`: all).
        seed: picks the subsets.
    """

    def __init__(
        self,
        train_dataset,
        eval_dataset,
        image_processor,
        k: int = 20,
        temperature: float | None = 0.07,
        batch_size: int = 256,
        max_train_samples: int | None = None,
        max_eval_samples: int | None = None,
        seed: int = 0,
    ):
        if k < 1:
            raise ValueError(f"The k-NN monitor's k must be at least 1, got {k}.")
        if temperature is not None and temperature <= 0:
            raise ValueError(f"The k-NN monitor's temperature must be positive (or None), got {temperature}.")
        if batch_size < 1:
            raise ValueError(f"The k-NN monitor's batch size must be at least 1, got {batch_size}.")
        self.k, self.temperature, self.batch_size = k, temperature, batch_size
        self.train_dataset = _subset(train_dataset, max_train_samples, seed)
        self.eval_dataset = _subset(eval_dataset, max_eval_samples, seed + 1)
        self.train_pixels, self.train_labels = _cache_pixels(self.train_dataset, image_processor, batch_size)
        self.eval_pixels, self.eval_labels = _cache_pixels(self.eval_dataset, image_processor, batch_size)

    @property
    def num_images(self) -> int:
        """Reference plus query images encoded by one evaluation."""
        return len(self.train_labels) + len(self.eval_labels)

    @torch.no_grad()
    def encode(
        self,
        encoder: nn.Module,
        pixel_values: torch.Tensor,
        device: torch.device | str | None = None,
        autocast: Callable[[], contextlib.AbstractContextManager] | None = None,
    ) -> torch.Tensor:
        """
        Average-pooled last-layer features of `pixel_values` `(num_images, 3, height, width)` in batches, the encoder
        switched to eval mode for the duration (and restored). Returns float32 `(num_images, hidden_size)` on the CPU.
        """
        device = torch.device(device or next(encoder.parameters()).device)
        was_training = encoder.training
        encoder.eval()
        features = []
        try:
            for batch in pixel_values.split(self.batch_size):
                with autocast() if autocast is not None else contextlib.nullcontext():
                    hidden = encoder(pixel_values=batch.to(device=device, dtype=torch.float32)).last_hidden_state
                features.append(hidden.mean(dim=1).float().cpu())
        finally:
            encoder.train(was_training)
        return torch.cat(features)

    def evaluate(
        self,
        encoder: nn.Module,
        device: torch.device | str | None = None,
        autocast: Callable[[], contextlib.AbstractContextManager] | None = None,
    ) -> dict[str, float]:
        """
        Score `encoder` (e.g. `IJepaForPreTraining.get_encoder()`, the target encoder).

        Returns:
            `{"knn_accuracy": accuracy in [0, 1], "knn_accuracy_stderr": its binomial standard error
            sqrt(accuracy * (1 - accuracy) / query images), "knn_seconds": wall time of this evaluation}`.
        """
        start = time.perf_counter()
        train_features = self.encode(encoder, self.train_pixels, device, autocast)
        eval_features = self.encode(encoder, self.eval_pixels, device, autocast)
        accuracy = knn_accuracy(
            train_features, self.train_labels, eval_features, self.eval_labels, k=self.k, temperature=self.temperature
        )
        stderr = math.sqrt(accuracy * (1.0 - accuracy) / len(self.eval_labels))
        return {"knn_accuracy": accuracy, "knn_accuracy_stderr": stderr, "knn_seconds": time.perf_counter() - start}


class KnnEvaluationMixin:
    """
    Evaluation hooks of [`~transformers.Trainer`] for pre-training (mixed into `IJepaTrainer`), with a
    [`KnnMonitor`] as `self.knn_monitor`:

    - `evaluate`: k-NN accuracy of the frozen target encoder on the monitor's images, so `eval_strategy` /
      `eval_steps` schedule it. Under FSDP2 every process runs the same evaluation on the same images: the root's
      parameters (embeddings, final norm) are gathered for it with `unshard()`, the layers gather their own in their
      forward hooks, as in training, and all processes get the same scores;
    - `_determine_best_metric`: `best_model_rule="latest_within_stderr"` (the latest checkpoint within one standard
      error of the best score, [`choose_checkpoint`] over the logged scores, so the rule survives a resume) next to
      the Trainer's own `"best"`; `state.best_metric` is the chosen checkpoint's score.
    """

    knn_monitor: KnnMonitor | None = None

    @contextlib.contextmanager
    def _target_encoder_for_evaluation(self):
        model = self.accelerator.unwrap_model(self.model)
        root = None
        if self.is_fsdp_enabled:
            from torch.distributed.fsdp import FSDPModule

            root = model if isinstance(model, FSDPModule) else None
            if root is None:
                raise ValueError(
                    "The k-NN monitor runs under FSDP2 only (fully_shard); this run uses FSDP1: pass --fsdp_version 2 "
                    "or turn evaluation off with --eval_strategy no."
                )
            root.unshard()
        try:
            yield model.get_encoder()
        finally:
            if root is not None:
                root.reshard()

    def evaluate(self, eval_dataset=None, ignore_keys=None, metric_key_prefix: str = "eval") -> dict[str, float]:
        """
        With a `knn_monitor`: `{prefix}_knn_accuracy`, its standard error `{prefix}_knn_accuracy_stderr` and
        `{prefix}_runtime`, logged and returned; no gradient, no random number, no data-loader state is touched, so the
        training that follows is the same as without evaluation. Without one: the Trainer's own evaluation.
        """
        if self.knn_monitor is None:
            return super().evaluate(eval_dataset, ignore_keys=ignore_keys, metric_key_prefix=metric_key_prefix)
        if eval_dataset is not None:
            raise ValueError(
                "This trainer's evaluation is its k-NN monitor, which scores its own images: call evaluate() without "
                "eval_dataset, or build a KnnMonitor for the other images."
            )
        start = time.perf_counter()
        with self._target_encoder_for_evaluation() as encoder:
            scores = self.knn_monitor.evaluate(
                encoder, device=self.args.device, autocast=self.autocast_smart_context_manager
            )
        names = [name for name in ("knn_accuracy", "knn_accuracy_stderr") if name in scores]
        metrics = {f"{metric_key_prefix}_{name}": scores[name] for name in names}
        metrics[f"{metric_key_prefix}_runtime"] = round(time.perf_counter() - start, 4)
        self.log(metrics)
        self.control = self.callback_handler.on_evaluate(self.args, self.state, self.control, metrics)
        return metrics

    def _determine_best_metric(self, metrics: dict[str, float], trial) -> bool:
        if self.args.best_model_rule == "best":
            return super()._determine_best_metric(metrics=metrics, trial=trial)
        key = self.args.metric_for_best_model
        key = key if key.startswith("eval_") else f"eval_{key}"
        for name in (key, f"{key}_stderr"):
            if name not in metrics:
                raise KeyError(
                    f"best_model_rule={self.args.best_model_rule!r} needs {name!r} in the evaluation metrics, which "
                    f"has {sorted(metrics)}: evaluate with the k-NN monitor (metric_for_best_model knn_accuracy), or "
                    "use best_model_rule best."
                )
        step = self.state.global_step
        scores = logged_scores(self.state.log_history, key)
        scores[step] = (metrics[key], metrics[f"{key}_stderr"])
        if choose_checkpoint(scores, self.args.best_model_rule, self.args.greater_is_better) != step:
            return False
        self.state.best_metric = metrics[key]
        if self.args.save_strategy in ("steps", "epoch", "best"):
            self.state.best_global_step = step
        return True


__all__ = [
    "BEST_MODEL_RULES",
    "KnnEvaluationMixin",
    "KnnMonitor",
    "UnlabelledMonitorImagesError",
    "check_best_model_rule",
    "choose_checkpoint",
    "effective_rank",
    "load_knn_monitor_datasets",
    "logged_scores",
]
