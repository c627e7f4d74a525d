#!/usr/bin/env python
"""
Evidence that pre-training learns: on the embedded digits (CPU, offline), pre-train with the default recipe, then
linear-probe and k-NN the pre-trained target encoder and the same architecture at random initialisation, for several
seeds, with the project's own scripts (`training_scripts/{pretrain,linear_probe,knn_eval}.py`).

    python benchmarks/learning_check.py                 # 3 seeds, ~10 minutes on 2 CPU cores

Prints a table (per seed and summary) and exits with status 1 unless the pre-trained encoder beats random init by more
than the seed-to-seed spread on both evaluations (spread = the largest max-min range over seeds of either encoder).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _script(name: str):
    spec = importlib.util.spec_from_file_location(f"ijepa_{name}", ROOT / "training_scripts" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def evaluate_encoder(model: str, seed: int, output_dir: Path, probe, knn) -> dict[str, float]:
    common = ["--model_name_or_path", model, "--seed", str(seed)]
    linear = probe.main([*common, "--report_to", "none", "--output_dir", str(output_dir / "linear_probe")])
    neighbours = knn.main([*common, "--output_dir", str(output_dir / "knn")])
    return {"linear": 100.0 * linear["accuracy"], "knn": 100.0 * neighbours["accuracy"]}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--output_dir", default="outputs/learning_check")
    parser.add_argument("--preset", default="vit_micro_patch4_48", help="Architecture of the default recipe.")
    parser.add_argument("--pretrain_args", nargs=argparse.REMAINDER, default=[], help="Extra pretrain.py flags.")
    args = parser.parse_args(argv)

    pretrain, probe, knn = _script("pretrain"), _script("linear_probe"), _script("knn_eval")
    base = Path(args.output_dir)
    rows = []
    for seed in args.seeds:
        start = time.monotonic()
        run_dir = base / f"seed{seed}"
        encoder_dir = pretrain.main(
            ["--seed", str(seed), "--output_dir", str(run_dir / "pretrain"), "--disable_tqdm", "true", *args.pretrain_args]
        )
        pretrain_minutes = (time.monotonic() - start) / 60
        pretrained = evaluate_encoder(encoder_dir, seed, run_dir / "eval-pretrained", probe, knn)
        random_init = evaluate_encoder(f"random:{args.preset}", seed, run_dir / "eval-random", probe, knn)
        rows.append({"seed": seed, "pretrain_minutes": pretrain_minutes, "pretrained": pretrained, "random": random_init})
        print(f"[seed {seed}] pre-training {pretrain_minutes:.1f} min; pretrained {pretrained}; random init {random_init}",
              flush=True)

    verdicts = {}
    lines = [
        "| encoder | metric | " + " | ".join(f"seed {r['seed']}" for r in rows) + " | mean ± std |",
        "|---|---|" + "---|" * len(rows) + "---|",
    ]
    for metric, label in (("linear", "linear probe (%)"), ("knn", "20-NN (%)")):
        values = {kind: [r[kind][metric] for r in rows] for kind in ("pretrained", "random")}
        for kind, name in (("pretrained", "I-JEPA, default recipe"), ("random", "random init")):
            std = statistics.stdev(values[kind]) if len(values[kind]) > 1 else 0.0
            cells = " | ".join(f"{v:.1f}" for v in values[kind])
            lines.append(f"| {name} | {label} | {cells} | {statistics.mean(values[kind]):.1f} ± {std:.1f} |")
        spread = max(max(v) - min(v) for v in values.values())
        gain = statistics.mean(values["pretrained"]) - statistics.mean(values["random"])
        verdicts[metric] = {"gain": gain, "spread": spread, "pass": gain > spread}
    print("\n".join(lines))
    for metric, verdict in verdicts.items():
        print(f"{metric}: pre-trained - random = {verdict['gain']:+.1f} points; seed-to-seed spread {verdict['spread']:.1f} "
              f"points -> {'PASS' if verdict['pass'] else 'FAIL'}")
    base.mkdir(parents=True, exist_ok=True)
    (base / "learning_check.json").write_text(json.dumps({"runs": rows, "verdicts": verdicts}, indent=2))
    (base / "learning_check.md").write_text("\n".join(lines) + "\n")
    return 0 if all(v["pass"] for v in verdicts.values()) else 1


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    sys.exit(main())
