#!/usr/bin/env python
"""
Which checkpoint should a pre-training run hand over? For every dataset and seed: pre-train with `pretrain.py --config
RECIPE`, keeping every checkpoint, score each one on the validation images (linear probe and 20-NN, the evaluations of
`learning_check.py`), and compare what each rule of choosing a checkpoint would have saved, against random init:

- `last`: the last checkpoint (no monitor);
- `best`: the highest k-NN monitor score (the Trainer's `metric_for_best_model` rule);
- `latest_within_stderr`: the latest checkpoint whose monitor score is within one standard error of the highest
  (`--best_model_rule latest_within_stderr`).

The rules see only the k-NN monitor that `pretrain.py` runs during training (a split of the training folder); the
validation scores are what the chosen encoder then gets. All on CPU and offline.

    python -m benchmarks.checkpoint_selection              # small-folder; digits, shipped, scikit-image; 3 seeds
    python -m benchmarks.checkpoint_selection --datasets scikit-image --seeds 0 1 2 3 4 5

Datasets as in `benchmarks/small_folder_check.py` (`digits`, the photo sets, or an imagefolder with train/ and
validation/); the default `--output_dir` is that benchmark's, so random-init scores and photo folders are shared.
Every run keeps its `result.json` and a repeated command redoes nothing. Prints per dataset and rule the mean ± std
over seeds, gain and seed-to-seed spread against random init (the learning check's verdict: gain > spread on both
metrics) and the step each seed's run keeps. Exits with status 1 unless the recipe's own rule passes everywhere.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path


if not __package__:  # run as a file: import `benchmarks` / `training_scripts` from the repository root, as -m does
    sys.path[0] = str(Path(__file__).resolve().parents[1])

from benchmarks.learning_check import (  # noqa: E402
    METRICS,
    evaluate_encoder,
    pretrain_seed,
    pretrain_settings,
    run_once,
)
from benchmarks.photo_folder import PHOTO_SETS  # noqa: E402
from benchmarks.small_folder_check import (  # noqa: E402
    dataset_folder,
    dataset_label,
    evaluation_data_args,
    metric_verdicts,
    random_init_row,
    recipe_label,
    score_cells,
)
from modeling_ijepa.monitoring import BEST_MODEL_RULES, choose_checkpoint, logged_scores  # noqa: E402


RULES = ("last", *BEST_MODEL_RULES)
KEEP_EVERY_CHECKPOINT = ["--save_total_limit", "20"]  # more than the recipes' schedules save (300 steps / 50)


def monitor_scores(pretrain_dir: Path) -> dict[int, tuple[float, float]]:
    """`{step: (k-NN monitor accuracy, its standard error)}` from the last checkpoint's log history."""
    last = max(pretrain_dir.glob("checkpoint-*"), key=lambda path: int(path.name.rsplit("-", 1)[1]))
    history = json.loads((last / "trainer_state.json").read_text())["log_history"]
    scores = logged_scores(history, "eval_knn_accuracy")
    if not scores:
        raise ValueError(f"{pretrain_dir} has no k-NN monitor scores: pick a recipe with eval_strategy steps.")
    return scores


def pretrain_and_score_checkpoints(seed: int, run_dir: Path, pretrain_args: list[str], data_args: list[str]) -> dict:
    """Pre-train, then the validation scores of every checkpoint and the monitor's scores."""
    from training_scripts import knn_eval, linear_probe

    start = time.monotonic()
    pretrain_seed(seed, run_dir / "pretrain", pretrain_args)
    minutes = (time.monotonic() - start) / 60
    monitor = monitor_scores(run_dir / "pretrain")
    checkpoints = {}
    for step in sorted(monitor):
        checkpoint = run_dir / "pretrain" / f"checkpoint-{step}"
        if not checkpoint.is_dir():
            raise FileNotFoundError(f"{checkpoint} is missing: the run saved more checkpoints than it keeps.")
        out = run_dir / f"eval-{step}"
        checkpoints[str(step)] = evaluate_encoder(str(checkpoint), seed, out, linear_probe, knn_eval, data_args)
    monitor = {str(step): value for step, value in monitor.items()}
    return {"seed": seed, "pretrain_minutes": minutes, "monitor": monitor, "checkpoints": checkpoints}


def chosen(run: dict, rule: str) -> tuple[int, dict[str, float]]:
    """The step a rule picks in one run, and that checkpoint's validation scores."""
    monitor = {int(step): tuple(value) for step, value in run["monitor"].items()}
    step = max(monitor) if rule == "last" else choose_checkpoint(monitor, rule)
    return step, run["checkpoints"][str(step)]


def check_dataset(name: str, args: argparse.Namespace) -> dict:
    """Per seed: random init and every checkpoint's scores; per rule: the steps it picks and the verdict."""
    output_dir = Path(args.output_dir)
    folder = dataset_folder(name, output_dir)
    data_args = evaluation_data_args(folder)
    base = output_dir / dataset_label(name)
    random_rows, runs = [], []
    for seed in args.seeds:
        random_rows.append(random_init_row(seed, base, args.preset, data_args))
        pretrain_args = ["--config", args.recipe, *KEEP_EVERY_CHECKPOINT, *args.pretrain_args]
        if folder is not None:
            pretrain_args += ["--train_dir", str(folder / "train")]
        run_dir = base / f"{recipe_label(args.recipe)}-checkpoints-seed{seed}"
        runs.append(
            run_once(
                run_dir,
                lambda seed=seed, run_dir=run_dir, pretrain_args=pretrain_args: pretrain_and_score_checkpoints(
                    seed, run_dir, pretrain_args, data_args
                ),
                pretrain_settings(pretrain_args),
            )
        )
        cells = [f"{rule} step {chosen(runs[-1], rule)[0]}" for rule in RULES]
        print(f"[{dataset_label(name)} / seed {seed}] {', '.join(cells)}", flush=True)
    rules = {}
    for rule in RULES:
        picks = [chosen(run, rule) for run in runs]
        verdict = {
            "steps": [step for step, _ in picks],
            **metric_verdicts([scores for _, scores in picks], random_rows),
        }
        for metric, _ in METRICS:
            verdict[metric]["values"] = [scores[metric] for _, scores in picks]
        rules[rule] = verdict
    return {"random": random_rows, "runs": runs, "rules": rules}


def results_table(checks: dict[str, dict], args: argparse.Namespace) -> list[str]:
    lines = [
        f"Recipe `{args.recipe}`, seeds {', '.join(map(str, args.seeds))}; validation scores of the checkpoint each "
        "rule picks; gain = mean minus random init's, spread = largest max-min range over seeds of either; PASS when "
        "gain > spread on both.",
        "",
        "| dataset | encoder | chosen steps | linear probe (%) | 20-NN (%) | linear gain / spread | 20-NN gain / "
        "spread | verdict |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for name, check in checks.items():
        lines.append(f"| {name} | random init | | {score_cells(check['random'])} |")
        for rule, verdict in check["rules"].items():
            picked = [{m: verdict[m]["values"][i] for m, _ in METRICS} for i in range(len(verdict["steps"]))]
            steps = " ".join(map(str, verdict["steps"]))
            lines.append(f"| {name} | `{rule}` | {steps} | {score_cells(picked, verdict)} |")
    return lines


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--datasets",
        nargs="+",
        default=["digits", "shipped", "scikit-image"],
        help=f"digits, {', '.join(PHOTO_SETS)} or imagefolders with train/ and validation/ (default: digits and the "
        "two photo sets the rule was measured on).",
    )
    parser.add_argument("--recipe", default="small-folder", help="pretrain.py --config (needs a k-NN monitor).")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--output_dir", default="outputs/small_folder_check")
    parser.add_argument("--preset", default="vit_micro_patch4_48", help="Architecture of the random-init baseline.")
    parser.add_argument("--pretrain_args", nargs=argparse.REMAINDER, default=[], help="Extra pretrain.py flags.")
    args = parser.parse_args(argv)
    if len(args.seeds) < 2:
        parser.error("The verdict compares the gain with the seed-to-seed spread: pass at least 2 --seeds.")

    checks = {dataset_label(name): check_dataset(name, args) for name in args.datasets}
    lines = results_table(checks, args)
    print("\n".join(lines))
    output_dir = Path(args.output_dir)
    (output_dir / "checkpoint_selection.json").write_text(json.dumps(checks, indent=2))
    (output_dir / "checkpoint_selection.md").write_text("\n".join(lines) + "\n")
    from modeling_ijepa.cli import load_recipe, resolve_recipe

    rule = load_recipe(resolve_recipe(args.recipe)).get("best_model_rule", "best")
    passed = all(check["rules"][rule][m]["pass"] for check in checks.values() for m, _ in METRICS)
    return 0 if passed else 1


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    sys.exit(main())
