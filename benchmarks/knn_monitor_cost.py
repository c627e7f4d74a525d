#!/usr/bin/env python
"""
What the k-NN monitor costs on the default run: `accelerate launch training_scripts/pretrain.py` (the `tiny-cpu`
recipe, monitor on) and the same run with the monitor off (`--eval_strategy no --load_best_model_at_end false`),
one after the other in this process, plus the monitor's own time measured inside the monitored run.

    python benchmarks/knn_monitor_cost.py                      # ~5 minutes on 2 CPU cores
    python benchmarks/knn_monitor_cost.py --order on off --extra --max_steps 100

Two numbers, because timings on a shared machine drift between runs: the ratio of the two runs' training times
(`train_runtime`, the Trainer's own clock, which includes evaluation), and the share of the monitored run spent in
evaluation (the sum of its `eval_runtime` entries over its `train_runtime`), which both come from the same run.
"""

from __future__ import annotations

import argparse
import ast
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path


ROOT = Path(__file__).resolve().parents[1]
MONITOR_OFF = ["--eval_strategy", "no", "--load_best_model_at_end", "false"]


def run(name: str, output_dir: Path, extra: list[str]) -> dict:
    """Launch one pre-training run; returns its wall time, `train_runtime` and the monitor's evaluation times."""
    command = [
        sys.executable,
        "-m",
        "accelerate.commands.launch",
        "--num_processes",
        "1",
        "--num_machines",
        "1",
        "--mixed_precision",
        "no",
        "--dynamo_backend",
        "no",
        str(ROOT / "training_scripts" / "pretrain.py"),
        "--output_dir",
        str(output_dir),
        "--disable_tqdm",
        "true",
        *(MONITOR_OFF if name == "off" else []),
        *extra,
    ]
    shutil.rmtree(output_dir, ignore_errors=True)  # a fresh run, never a resumed one
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", PYTHONPATH=str(ROOT))
    start = time.perf_counter()
    result = subprocess.run(command, capture_output=True, text=True, env=env, cwd=ROOT)
    wall = time.perf_counter() - start
    if result.returncode != 0:
        raise SystemExit(f"run {name!r} failed:\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}")
    logs = []
    for line in result.stdout.splitlines():  # the Trainer prints each log entry as a dict
        if line.startswith("{") and line.endswith("}"):
            try:
                logs.append(ast.literal_eval(line))
            except (ValueError, SyntaxError):
                continue
    train_runtime = next(float(e["train_runtime"]) for e in logs if "train_runtime" in e)
    evals = [float(e["eval_runtime"]) for e in logs if "eval_runtime" in e]
    knn = [float(e["eval_knn_accuracy"]) for e in logs if "eval_knn_accuracy" in e]
    return {"wall_s": wall, "train_runtime_s": train_runtime, "eval_runtimes_s": evals, "knn_accuracy": knn}


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output_root", default="outputs/knn_monitor_cost")
    parser.add_argument("--order", nargs=2, default=["off", "on"], choices=["on", "off"])
    parser.add_argument("--extra", nargs=argparse.REMAINDER, default=[], help="Flags passed to both runs.")
    args = parser.parse_args(argv)
    root = Path(args.output_root)
    results = {name: run(name, root / name, args.extra) for name in args.order}
    on, off = results["on"], results["off"]
    monitor_s = sum(on["eval_runtimes_s"])
    summary = {
        "train_runtime_ratio_on_over_off": on["train_runtime_s"] / off["train_runtime_s"],
        "wall_ratio_on_over_off": on["wall_s"] / off["wall_s"],
        "monitor_share_of_monitored_run": monitor_s / on["train_runtime_s"],
        "evaluations": len(on["eval_runtimes_s"]),
        "monitor_seconds": monitor_s,
    }
    print(f"{'run':<6}{'wall s':>10}{'train_runtime s':>18}{'evals':>7}{'eval s (sum)':>14}")
    for name, result in results.items():
        print(
            f"{name:<6}{result['wall_s']:>10.1f}{result['train_runtime_s']:>18.1f}{len(result['eval_runtimes_s']):>7}"
            f"{sum(result['eval_runtimes_s']):>14.1f}"
        )
    print(f"k-NN accuracy by evaluation (monitored run): {[round(v, 3) for v in on['knn_accuracy']]}")
    print(
        f"monitor cost: train_runtime on/off = {summary['train_runtime_ratio_on_over_off']:.3f} (wall "
        f"{summary['wall_ratio_on_over_off']:.3f}); evaluation share of the monitored run = "
        f"{100 * summary['monitor_share_of_monitored_run']:.1f} % ({monitor_s:.1f} s in {summary['evaluations']} "
        "evaluations)"
    )
    root.mkdir(parents=True, exist_ok=True)
    (root / "knn_monitor_cost.json").write_text(json.dumps({"runs": results, "summary": summary}, indent=2))
    return summary


if __name__ == "__main__":
    main()
