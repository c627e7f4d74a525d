"""
What a study measures on an encoder: the evaluator registry of `benchmarks/study.py`.

An evaluator is one function registered with `@evaluator("name")`. It receives a [`Target`] (the encoder, its seed,
the data flags of the evaluation scripts, a folder for its files, and the pre-training folder, `None` for random init)
plus the options written in the study spec, and returns `{metric: number}`; values that are not numbers (e.g. the
scores of every checkpoint) are kept in the run's `result.json` but not tabulated. A metric named `name[view]` is
shown as its own table row (`encoder [view]`), e.g. the checkpoint each selection rule picks.
"""

from __future__ import annotations

import json
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np


EVALUATORS: dict[str, Callable[..., dict]] = {}


def evaluator(name: str):
    """Register `function(target, **options) -> {metric: value}` under `name`."""

    def register(function):
        EVALUATORS[name] = function
        return function

    return register


@dataclass
class Target:
    model: str  # an encoder folder, or random:<preset>
    seed: int
    data_args: list[str]  # --train_dir / --validation_dir of the evaluation scripts; [] for the embedded digits
    out: Path
    pretrain_dir: Path | None = None  # the pretrain.py output folder; None for random init


def percent(metrics: dict) -> float:
    return 100.0 * metrics["accuracy"]


@evaluator("linear")
def linear(target: Target, model: str | None = None, out: Path | None = None) -> dict:
    """Linear-probe accuracy (%) with `training_scripts/linear_probe.py`."""
    from training_scripts import linear_probe

    common = ["--model_name_or_path", model or target.model, "--seed", str(target.seed), *target.data_args]
    return {
        "linear": percent(linear_probe.main([*common, "--report_to", "none", "--output_dir", str(out or target.out)]))
    }


@evaluator("knn")
def knn(target: Target, model: str | None = None, out: Path | None = None) -> dict:
    """20-NN accuracy (%) with `training_scripts/knn_eval.py`."""
    from training_scripts import knn_eval

    common = ["--model_name_or_path", model or target.model, "--seed", str(target.seed), *target.data_args]
    return {"knn": percent(knn_eval.main([*common, "--output_dir", str(out or target.out)]))}


def trainer_state(target: Target) -> dict:
    return json.loads((target.pretrain_dir / "trainer_state.json").read_text())


@evaluator("knn_at_steps")
def knn_at_steps(target: Target, steps: list[int]) -> dict:
    """20-NN (%) of the raw checkpoint of every step in `steps`, and the change from the first to the last."""
    if target.pretrain_dir is None:
        return {}
    scores = {}
    for step in steps:
        checkpoint = target.pretrain_dir / f"checkpoint-{step}"
        if not checkpoint.is_dir():
            raise FileNotFoundError(
                f"{checkpoint} is missing: keep it with the arm's --save_steps / --save_total_limit."
            )
        scores[f"knn@{step}"] = knn(target, str(checkpoint), target.out / f"knn-{step}")["knn"]
    return {**scores, "knn change": scores[f"knn@{steps[-1]}"] - scores[f"knn@{steps[0]}"]}


@evaluator("checkpoints")
def checkpoints(target: Target, rules: list[str]) -> dict:
    """
    Linear probe and 20-NN of every checkpoint the k-NN monitor scored, and for every rule (`last`, or a
    `best_model_rule` of `modeling_ijepa.monitoring`) the scores and step of the checkpoint it picks, as views.
    Random init has one "checkpoint": it is scored as it is.
    """
    from modeling_ijepa.monitoring import choose_checkpoint, logged_scores

    if target.pretrain_dir is None:
        return {**linear(target), **knn(target)}
    monitor = logged_scores(trainer_state(target)["log_history"], "eval_knn_accuracy")
    if not monitor:
        raise ValueError(f"{target.pretrain_dir} has no k-NN monitor scores: use a recipe with eval_strategy steps.")
    scores = {}
    for step in sorted(monitor):
        checkpoint = target.pretrain_dir / f"checkpoint-{step}"
        if not checkpoint.is_dir():
            raise FileNotFoundError(f"{checkpoint} is missing: raise the arm's --save_total_limit.")
        out = target.out / f"checkpoint-{step}"
        scores[step] = {**linear(target, str(checkpoint), out / "linear"), **knn(target, str(checkpoint), out / "knn")}
    result = {"monitor": {str(step): list(value) for step, value in monitor.items()}, "scores": dict(scores)}
    for rule in rules:
        step = max(monitor) if rule == "last" else choose_checkpoint(monitor, rule)
        result.update(
            {f"{metric}[{rule}]": value for metric, value in scores[step].items()}, **{f"step[{rule}]": step}
        )
    return result


@evaluator("finetune")
def finetune(target: Target, config: str = "finetune-digits", args: list[str] = ()) -> dict:
    """Test accuracy (%) after `training_scripts/finetune.py --config CONFIG` from the encoder, and its seconds."""
    from training_scripts import finetune as script

    argv = ["--config", config, "--model_name_or_path", target.model, "--seed", str(target.seed)]
    start = time.monotonic()
    metrics = script.main([*argv, *target.data_args, "--output_dir", str(target.out), "--report_to", "none", *args])
    return {"finetune": percent(metrics), "finetune seconds": time.monotonic() - start}


@evaluator("cost")
def cost(target: Target) -> dict:
    """The run's `train_runtime` and the k-NN monitor's share of it, from `output_dir/trainer_state.json`."""
    if target.pretrain_dir is None:
        return {}
    history = trainer_state(target)["log_history"]
    runtime = next(entry["train_runtime"] for entry in reversed(history) if "train_runtime" in entry)
    evaluations = [entry["eval_runtime"] for entry in history if "eval_runtime" in entry]
    return {
        "train_runtime s": runtime,
        "monitor s": sum(evaluations),
        "monitor share %": 100.0 * sum(evaluations) / runtime,
        "evaluations": len(evaluations),
        "monitor scores": [entry["eval_knn_accuracy"] for entry in history if "eval_knn_accuracy" in entry],
    }


def standardise(train_x: np.ndarray, test_x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Both splits standardised per feature with the training split's mean and (sample) standard deviation."""
    mean, std = train_x.mean(0), np.maximum(train_x.std(0, ddof=1), 1e-12)
    return (train_x - mean) / std, (test_x - mean) / std


def logistic_accuracies(train_x, train_y, test_x, test_y, inverse_strengths) -> list[float]:
    from sklearn.linear_model import LogisticRegression

    train_x, test_x = standardise(train_x, test_x)
    fits = (LogisticRegression(C=c, max_iter=10000).fit(train_x, train_y) for c in inverse_strengths)
    return [100.0 * fit.score(test_x, test_y) for fit in fits]


@evaluator("probe_sweep")
def probe_sweep(target: Target, C: list[float] = (0.01, 0.1, 1.0, 10.0, 100.0)) -> dict:
    """
    L2-regularised logistic regression (scikit-learn, L-BFGS, to convergence) on the standardised pooled features of
    the digits at every inverse strength `C`, and the same on the 64 raw 8x8 pixels (a floor for any encoder).
    """
    from sklearn.datasets import load_digits

    from modeling_ijepa.data import digits_split, load_classification_datasets
    from modeling_ijepa.evaluation import extract_features, freeze, load_encoder

    if target.data_args:
        raise ValueError("probe_sweep runs on the embedded digits only (its floor is their raw pixels).")
    encoder, image_processor = load_encoder(target.model, target.seed)
    freeze(encoder)
    train, test, _ = load_classification_datasets(image_size=encoder.config.image_size)
    train_x, train_y = extract_features(encoder, train, image_processor)
    test_x, test_y = extract_features(encoder, test, image_processor)
    features = logistic_accuracies(train_x.numpy(), train_y.numpy(), test_x.numpy(), test_y.numpy(), C)
    digits = load_digits()
    train_index, test_index = (np.sort(index) for index in digits_split(digits.target))
    pixels = logistic_accuracies(
        digits.data[train_index], digits.target[train_index], digits.data[test_index], digits.target[test_index], C
    )
    return {
        **{f"C={c:g}": value for c, value in zip(C, features)},
        **{f"raw pixels C={c:g}": value for c, value in zip(C, pixels)},
    }


def step_times(
    arms: dict[str, dict], preset: str = "vit_micro_patch4_48", batch_size: int = 64, steps: int = 10, repeats: int = 3
) -> dict[str, dict]:
    """
    Milliseconds per training step (forward, backward, AdamW step, EMA update; batches collated before the clock
    starts) of every arm's `IJepaConfig` overrides, measured round-robin so that load on the machine falls on every arm
    alike (repeat 0 warms up). Per arm: the per-repeat medians (`step_ms`) and mean real context tokens per image.
    """
    import torch

    from modeling_ijepa import IJepaConfig, IJepaForPreTraining
    from modeling_ijepa.data import IJepaPretrainingCollator, default_image_processor, load_digits_dataset
    from modeling_ijepa.masking import mask_sampler_from_config

    dataset = load_digits_dataset(48)["train"]
    examples = [dataset[index] for index in range(batch_size)]
    setups = {}
    for name, overrides in arms.items():
        torch.manual_seed(0)
        model = IJepaForPreTraining(IJepaConfig.from_preset(preset, **overrides)).train()
        optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
        processor = default_image_processor(model.config.image_size)
        setups[name] = (model, optimizer, IJepaPretrainingCollator(mask_sampler_from_config(model.config), processor))
    results = {name: {"step_ms": [], "tokens": []} for name in arms}
    for repeat in range(repeats + 1):
        for name, (model, optimizer, collator) in setups.items():
            times = []
            for _ in range(steps):
                batch = collator(examples)
                start = time.perf_counter()
                model(**batch).loss.backward()
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
                model.update_target_encoder(0.996)
                times.append(1000.0 * (time.perf_counter() - start))
                tokens = float((batch["context_indices"] >= 0).sum(dim=1).float().mean())
                results[name]["tokens"] += [tokens] if repeat else []
            if repeat:
                results[name]["step_ms"].append(statistics.median(times))
    return {
        name: {"step_ms": r["step_ms"], "context_tokens": statistics.mean(r["tokens"])} for name, r in results.items()
    }
