#!/usr/bin/env python
"""
Evidence that pre-training learns: on the embedded digits (CPU, offline), pre-train with the default recipe, then
linear-probe and k-NN the pre-trained target encoder and the same architecture at random initialisation, for several
seeds, with the project's own scripts (`training_scripts/{pretrain,linear_probe,knn_eval}.py`).

    python -m benchmarks.learning_check                 # 3 seeds, ~10 minutes on 2 CPU cores

Prints a table (per seed and summary) and exits with status 1 unless the pre-trained encoder beats random init by more
than the seed-to-seed spread on both evaluations (spread = the largest max-min range over seeds of either encoder).

How much the verdict depends on the seeds: run more seeds, then combine the results of several runs. For every subset
of `--subset_size` seeds, the check is applied as if those seeds had been run alone, and the passing subsets counted:

    python -m benchmarks.learning_check --seeds 3 4 5 --output_dir outputs/learning_check_345
    python -m benchmarks.learning_check --combine outputs/learning_check/learning_check.json \
        outputs/learning_check_345/learning_check.json
"""

from __future__ import annotations

import argparse
import hashlib
import itertools
import json
import math
import os
import statistics
import sys
import time
from pathlib import Path


if not __package__:  # run as a file: import `benchmarks` / `training_scripts` from the repository root, as -m does
    sys.path[0] = str(Path(__file__).resolve().parents[1])


def pretrain_seed(seed: int, output_dir: Path, extra_args: list[str] = ()) -> str:
    """Pre-train with the default recipe under `seed` into `output_dir` (`pretrain.py`); returns the encoder folder."""
    from training_scripts import pretrain

    return pretrain.main(["--seed", str(seed), "--output_dir", str(output_dir), "--disable_tqdm", "true", *extra_args])


def evaluate_encoder(
    model: str, seed: int, output_dir: Path, probe, knn, data_args: list[str] = ()
) -> dict[str, float]:
    """Linear probe and 20-NN accuracy (%) of `model` (the embedded digits, or the data of `data_args` flags)."""
    common = ["--model_name_or_path", model, "--seed", str(seed), *data_args]
    linear = probe.main([*common, "--report_to", "none", "--output_dir", str(output_dir / "linear_probe")])
    neighbours = knn.main([*common, "--output_dir", str(output_dir / "knn")])
    return {"linear": 100.0 * linear["accuracy"], "knn": 100.0 * neighbours["accuracy"]}


def pretrain_settings(pretrain_args: list[str]) -> dict:
    """
    What a cached pre-training run is keyed on ([`run_once`]): its `pretrain.py` flags and, when they name a recipe
    (`--config`), a digest of that recipe's values, so that the runs of a recipe whose values changed are never reused
    (an edited comment changes nothing).
    """
    from modeling_ijepa.cli import load_recipe, resolve_recipe

    settings = {"pretrain_args": list(pretrain_args)}
    if "--config" in pretrain_args:
        values = load_recipe(resolve_recipe(pretrain_args[pretrain_args.index("--config") + 1]))
        digest = hashlib.sha256(json.dumps(values, sort_keys=True).encode()).hexdigest()[:16]
        settings["recipe_sha256"] = digest
    return settings


def run_once(run_dir: Path, compute, settings: dict | None = None) -> dict:
    """
    `compute()` once: its result is kept in `run_dir/result.json` and read back on later calls, so that an interrupted
    or extended benchmark (more seeds, more datasets) redoes nothing. `settings` (e.g. the pre-training flags) are
    stored with it; a later call with different settings is refused rather than mixing results.
    """
    path = run_dir / "result.json"
    if path.is_file():
        stored = json.loads(path.read_text())
        if stored.get("settings") != settings:
            raise ValueError(
                f"{path} was computed with settings {stored.get('settings')}, not {settings}: pass another "
                "--output_dir (or delete that folder) to run these settings."
            )
        return stored["result"]
    result = compute()
    run_dir.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"settings": settings, "result": result}, indent=2))
    return result


METRICS = (("linear", "linear probe (%)"), ("knn", "20-NN (%)"))


def gain_and_spread(pretrained: list[float], random_init: list[float]) -> tuple[float, float]:
    """
    The two quantities the check compares, from per-seed accuracies: the mean gain of the pre-trained encoder over
    random init, and the seed-to-seed spread (the largest max-min range over seeds of either encoder).
    """
    spread = max(max(values) - min(values) for values in (pretrained, random_init))
    return statistics.mean(pretrained) - statistics.mean(random_init), spread


def verdicts_for(rows: list[dict]) -> dict[str, dict]:
    """
    The check on per-seed results `rows` (`{"seed", "pretrained": {metric: %}, "random": {metric: %}}`): per metric,
    the gain and spread of [`gain_and_spread`] and whether the gain exceeds the spread.
    """
    verdicts = {}
    for metric, _ in METRICS:
        gain, spread = gain_and_spread([r["pretrained"][metric] for r in rows], [r["random"][metric] for r in rows])
        verdicts[metric] = {"gain": gain, "spread": spread, "pass": gain > spread}
    return verdicts


def results_table(rows: list[dict]) -> list[str]:
    """Markdown table: one column per seed, then mean ± std, for both encoders and both metrics."""
    lines = [
        "| encoder | metric | " + " | ".join(f"seed {r['seed']}" for r in rows) + " | mean ± std |",
        "|---|---|" + "---|" * len(rows) + "---|",
    ]
    for metric, label in METRICS:
        for kind, name in (("pretrained", "I-JEPA, default recipe"), ("random", "random init")):
            values = [r[kind][metric] for r in rows]
            std = statistics.stdev(values) if len(values) > 1 else 0.0
            cells = " | ".join(f"{v:.1f}" for v in values)
            lines.append(f"| {name} | {label} | {cells} | {statistics.mean(values):.1f} ± {std:.1f} |")
    return lines


def seed_subset_summary(rows: list[dict], subset_size: int = 3) -> dict[str, dict]:
    """
    How the verdict depends on which seeds are run: per metric, the number of `subset_size`-seed subsets of `rows` that
    pass (and the total), the per-seed gains (pre-trained minus random init of the same seed), and the mean gain over
    all seeds with its standard error (unpaired: the two encoders' seed-to-seed variances added).
    """
    if subset_size < 2 or subset_size > len(rows):
        raise ValueError(
            f"Need at least {max(subset_size, 2)} seeds to count {subset_size}-seed subsets (a spread needs 2 seeds), "
            f"got {len(rows)}."
        )
    subset_verdicts = [verdicts_for(list(subset)) for subset in itertools.combinations(rows, subset_size)]
    summary = {}
    for metric, _ in METRICS:
        pretrained = [r["pretrained"][metric] for r in rows]
        random_init = [r["random"][metric] for r in rows]
        gain, _ = gain_and_spread(pretrained, random_init)
        standard_error = math.sqrt((statistics.variance(pretrained) + statistics.variance(random_init)) / len(rows))
        summary[metric] = {
            "passing_subsets": sum(verdicts[metric]["pass"] for verdicts in subset_verdicts),
            "subsets": len(subset_verdicts),
            "paired_gains": [p - r for p, r in zip(pretrained, random_init)],
            "gain": gain,
            "standard_error": standard_error,
        }
    return summary


def combine(paths: list[str], subset_size: int) -> int:
    """Merge the runs of several `learning_check.json` files (one row per seed) and print the seed-subset summary."""
    rows = {}
    for path in paths:
        results = json.loads(Path(path).read_text())
        if not isinstance(results, dict) or "runs" not in results:
            raise ValueError(f"{path} is not a learning_check.json: it has no 'runs'. Pass the files the runs wrote.")
        for row in results["runs"]:
            previous = rows.get(row["seed"])
            if previous and (previous["pretrained"], previous["random"]) != (row["pretrained"], row["random"]):
                raise ValueError(f"Seed {row['seed']} appears in more than one result file with different results.")
            rows[row["seed"]] = row
    rows = [rows[seed] for seed in sorted(rows)]
    print("\n".join(results_table(rows)))
    for metric, item in seed_subset_summary(rows, subset_size).items():
        gains = ", ".join(f"{g:+.1f}" for g in item["paired_gains"])
        print(
            f"{metric}: {item['passing_subsets']} of {item['subsets']} {subset_size}-seed subsets pass; mean gain "
            f"{item['gain']:+.1f} ± {item['standard_error']:.1f} (standard error) points over {len(rows)} seeds; "
            f"gain over the random network of the same seed: {gains}"
        )
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--output_dir", default="outputs/learning_check")
    parser.add_argument("--preset", default="vit_micro_patch4_48", help="Architecture of the default recipe.")
    parser.add_argument(
        "--combine",
        nargs="+",
        metavar="JSON",
        help="Run nothing: merge these learning_check.json files and count the seed subsets that pass.",
    )
    parser.add_argument("--subset_size", type=int, default=3, help="Seeds per subset with --combine.")
    parser.add_argument("--pretrain_args", nargs=argparse.REMAINDER, default=[], help="Extra pretrain.py flags.")
    args = parser.parse_args(argv)
    if args.combine:
        return combine(args.combine, args.subset_size)

    from training_scripts import knn_eval, linear_probe

    base = Path(args.output_dir)
    rows = []
    for seed in args.seeds:
        start = time.monotonic()
        run_dir = base / f"seed{seed}"
        encoder_dir = pretrain_seed(seed, run_dir / "pretrain", args.pretrain_args)
        pretrain_minutes = (time.monotonic() - start) / 60
        pretrained = evaluate_encoder(encoder_dir, seed, run_dir / "eval-pretrained", linear_probe, knn_eval)
        random_init = evaluate_encoder(f"random:{args.preset}", seed, run_dir / "eval-random", linear_probe, knn_eval)
        rows.append(
            {"seed": seed, "pretrain_minutes": pretrain_minutes, "pretrained": pretrained, "random": random_init}
        )
        print(
            f"[seed {seed}] pre-training {pretrain_minutes:.1f} min; pretrained {pretrained}; "
            f"random init {random_init}",
            flush=True,
        )

    verdicts = verdicts_for(rows)
    lines = results_table(rows)
    print("\n".join(lines))
    for metric, verdict in verdicts.items():
        print(
            f"{metric}: pre-trained - random = {verdict['gain']:+.1f} points; seed-to-seed spread "
            f"{verdict['spread']:.1f} points -> {'PASS' if verdict['pass'] else 'FAIL'}"
        )
    base.mkdir(parents=True, exist_ok=True)
    (base / "learning_check.json").write_text(json.dumps({"runs": rows, "verdicts": verdicts}, indent=2))
    (base / "learning_check.md").write_text("\n".join(lines) + "\n")
    return 0 if all(v["pass"] for v in verdicts.values()) else 1


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    sys.exit(main())
