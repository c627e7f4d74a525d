#!/usr/bin/env python
"""
Evidence that pre-training helps fine-tuning: on the embedded digits (CPU, offline), for several seeds, pre-train with
the default recipe (or reuse encoders given with `--pretrained`), then fine-tune with the same fine-tuning recipe
(`--finetune_config`, default the shipped `finetune-digits`) from the pre-trained encoder and from the same
architecture at random initialisation (`random:<preset>`, seeded by the seed), with the project's own scripts.

    python -m benchmarks.finetune_check                       # 3 seeds: pre-training ~2-3 min per seed on 2 cores
    python -m benchmarks.finetune_check --pretrained outputs/learning_check/seed{0,1,2}/pretrain   # reuse encoders
    python -m benchmarks.finetune_check --finetune_args "--probe_head_epochs 0"    # override the recipe

Each fine-tuning run is recorded in its output folder (`finetune_check_run.json`); a check with exactly the same
finetune.py arguments reuses it, so runs can be spread over processes with `--arms` and `--seeds`, then gathered:

    python -m benchmarks.finetune_check --seeds 1 --arms random &    # ... one process per (seed, arm)
    python -m benchmarks.finetune_check --pretrained ...              # reuses every recorded run, prints the verdict

Prints a table (per seed, then mean ± std) and PASS / FAIL, and exits with status 1 unless the pre-trained encoder
beats random init by more than the seed-to-seed spread (the largest max-min range over seeds of either encoder), the
rule of `benchmarks/learning_check.py` (its `gain_and_spread`).
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import statistics
import sys
import time
from pathlib import Path


if not __package__:  # run as a file: import `benchmarks` / `training_scripts` from the repository root, as -m does
    sys.path[0] = str(Path(__file__).resolve().parents[1])

from benchmarks.learning_check import gain_and_spread, pretrain_seed  # noqa: E402  (the check's own rule)


KINDS = (("pretrained", "fine-tuned from I-JEPA (default recipe)"), ("random", "fine-tuned from random init"))


RUN_RECORD = "finetune_check_run.json"


def finetune_accuracy(finetune, model: str, seed: int, output_dir: Path, config: str, extra: list[str]) -> dict:
    """
    Fine-tune `model` with recipe `config` (and flags `extra`); returns accuracy (%), wall time (s) and the
    finetune.py arguments. The result is recorded in `output_dir`; a later check with exactly the same arguments
    reuses it instead of fine-tuning again (`"reused": true`).
    """
    argv = [
        "--config",
        config,
        "--model_name_or_path",
        model,
        "--seed",
        str(seed),
        "--output_dir",
        str(output_dir),
        "--report_to",
        "none",
        *extra,
    ]
    record = output_dir / RUN_RECORD
    if record.is_file():
        previous = json.loads(record.read_text())
        if previous.get("argv") == argv:
            return {**previous, "reused": True}
    start = time.monotonic()
    metrics = finetune.main(argv)
    result = {"accuracy": 100.0 * metrics["accuracy"], "seconds": time.monotonic() - start, "argv": argv}
    record.write_text(json.dumps(result, indent=2))
    return result


def results_table(rows: list[dict]) -> list[str]:
    """Markdown table: one column per seed, then mean ± std, for both starting points."""
    lines = [
        "| encoder | " + " | ".join(f"seed {r['seed']}" for r in rows) + " | mean ± std |",
        "|---|" + "---|" * len(rows) + "---|",
    ]
    for kind, name in KINDS:
        values = [r[kind]["accuracy"] for r in rows]
        std = statistics.stdev(values) if len(values) > 1 else 0.0
        cells = " | ".join(f"{v:.1f}" for v in values)
        lines.append(f"| {name} | {cells} | {statistics.mean(values):.1f} ± {std:.1f} |")
    return lines


def verdict_for(rows: list[dict]) -> dict:
    """The gain of the pre-trained encoder over random init, the seed-to-seed spread, and whether gain > spread."""
    accuracies = {kind: [r[kind]["accuracy"] for r in rows] for kind, _ in KINDS}
    gain, spread = gain_and_spread(accuracies["pretrained"], accuracies["random"])
    return {"gain": gain, "spread": spread, "pass": gain > spread}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--output_dir", default="outputs/finetune_check")
    parser.add_argument("--preset", default="vit_micro_patch4_48", help="Architecture of the default recipe.")
    parser.add_argument(
        "--pretrained",
        nargs="+",
        metavar="DIR",
        help="Reuse these pre-trained encoders (one per seed, in the order of --seeds) instead of pre-training.",
    )
    parser.add_argument("--finetune_config", default="finetune-digits", help="Fine-tuning recipe (name or file).")
    parser.add_argument(
        "--finetune_args", default="", help="Extra finetune.py flags for both encoders, one quoted string."
    )
    parser.add_argument("--pretrain_args", default="", help="Extra pretrain.py flags, one quoted string.")
    parser.add_argument(
        "--arms",
        nargs="+",
        choices=["pretrained", "random"],
        default=["pretrained", "random"],
        help="Fine-tune only these starting points (no verdict unless both): to spread the runs over processes, "
        "then combine them with a full check, which reuses the recorded runs.",
    )
    args = parser.parse_args(argv)
    args.finetune_args, args.pretrain_args = shlex.split(args.finetune_args), shlex.split(args.pretrain_args)
    if args.pretrained and len(args.pretrained) != len(args.seeds):
        parser.error(f"--pretrained needs one encoder per seed: {len(args.pretrained)} given for seeds {args.seeds}.")

    from training_scripts import finetune

    base = Path(args.output_dir)
    rows = []
    for index, seed in enumerate(args.seeds):
        run_dir = base / f"seed{seed}"
        start = time.monotonic()
        if args.pretrained:
            encoder_dir = args.pretrained[index]
        elif "pretrained" not in args.arms:
            encoder_dir = None
        else:
            encoder_dir = pretrain_seed(seed, run_dir / "pretrain", args.pretrain_args)
        pretrain_minutes = (time.monotonic() - start) / 60
        tune = dict(seed=seed, config=args.finetune_config, extra=args.finetune_args)
        row = {"seed": seed, "encoder": str(encoder_dir), "pretrain_minutes": pretrain_minutes}
        models = {"pretrained": str(encoder_dir), "random": f"random:{args.preset}"}
        for kind in args.arms:
            result = row[kind] = finetune_accuracy(
                finetune, models[kind], output_dir=run_dir / f"finetune-{kind}", **tune
            )
            took = "recorded run reused" if result.get("reused") else f"{result['seconds']:.0f} s"
            print(f"[seed {seed}] fine-tuned from {models[kind]}: {result['accuracy']:.1f} % ({took})", flush=True)
        rows.append(row)
    if len(args.arms) < 2:
        return 0

    verdict = verdict_for(rows)
    lines = results_table(rows)
    print("\n".join(lines))
    print(
        f"fine-tuning: pre-trained - random = {verdict['gain']:+.1f} points; seed-to-seed spread "
        f"{verdict['spread']:.1f} points -> {'PASS' if verdict['pass'] else 'FAIL'}"
    )
    base.mkdir(parents=True, exist_ok=True)
    results = {
        "runs": rows,
        "verdict": verdict,
        "finetune_config": args.finetune_config,
        "finetune_args": args.finetune_args,
    }
    (base / "finetune_check.json").write_text(json.dumps(results, indent=2))
    (base / "finetune_check.md").write_text("\n".join(lines) + "\n")
    return 0 if verdict["pass"] else 1


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    sys.exit(main())
