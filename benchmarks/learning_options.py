#!/usr/bin/env python
"""
The anti-collapse and sampler options of `IJepaConfig`, side by side on the embedded digits (CPU, offline): for every
option, pre-train with a recipe (`--config`, default `tiny-cpu`) plus that option over several seeds, then
linear-probe and 20-NN the target encoder against the same architecture at random init (the functions of
`learning_check.py`), and time a training step of every option in one interleaved run. Every run keeps its result in
its folder: a repeated command redoes nothing, so seeds and options can be added later.

    python benchmarks/learning_options.py                          # 7 options x 3 seeds x 300 steps: about 1 hour
    python benchmarks/learning_options.py --max_steps 900          # the collapse question: 20-NN at 300 / 600 / 900
    python benchmarks/learning_options.py --options plain sigreg --seeds 0 --max_steps 20   # smoke run
    python benchmarks/learning_options.py --timing_only --options plain unbiased full_context full_context_nested

Options (`OPTIONS` below; the weights come from the flags):
- `plain`: the recipe unchanged;
- `vicreg`: VICReg variance + covariance on the pooled context features;
- `sigreg`: SIGReg (LeJEPA) on the pooled context features;
- `dyn_tanh`: bounded DynTanh targets instead of LayerNorm;
- `unbiased`: blocks may touch the last row/column, contexts cut to a random subset;
- `full_context`: every context kept whole (padding + attention mask);
- `full_context_nested`: the same, attention on the packed real tokens (variable-length SDPA, nested tensors).

Prints a table for the encoder `pretrain.py` saved (mean ± std over seeds, gain over random init, seed-to-seed spread,
whether the gain beats the spread on both metrics, and the step it comes from: the k-NN monitor's best when the recipe
keeps it), the 20-NN accuracy of the raw checkpoint at every evaluated step (a long run that does not collapse keeps
it), and the step time of every option relative to `plain`. Writes `learning_options.json` / `.md` to `--output_dir`.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys
import time
from pathlib import Path

import torch


if not __package__:  # run as a file: import `benchmarks` / `training_scripts` from the repository root, as -m does
    sys.path[0] = str(Path(__file__).resolve().parents[1])

from benchmarks.learning_check import (  # noqa: E402
    METRICS,
    evaluate_encoder,
    gain_and_spread,
    pretrain_seed,
    pretrain_settings,
    run_once,
)
from training_scripts import knn_eval, linear_probe  # noqa: E402


def pretrain_and_evaluate(seed: int, run_dir: Path, pretrain_args: list[str], steps: list[int]) -> dict:
    """
    Pre-train one option, then evaluate what `pretrain.py` saved (linear probe and 20-NN: with a k-NN monitor that
    keeps the best encoder, the best one) and the raw checkpoint of every step in `steps` (20-NN).
    """
    start = time.monotonic()
    encoder_dir = pretrain_seed(seed, run_dir / "pretrain", pretrain_args)
    minutes = (time.monotonic() - start) / 60
    saved = evaluate_encoder(encoder_dir, seed, run_dir / "eval-saved", linear_probe, knn_eval)
    evaluations = {}
    for step in steps:
        checkpoint = run_dir / "pretrain" / f"checkpoint-{step}"
        flags = ["--model_name_or_path", str(checkpoint), "--seed", str(seed)]
        result = knn_eval.main([*flags, "--output_dir", str(run_dir / f"eval-{step}" / "knn")])
        evaluations[str(step)] = {"knn": 100.0 * result["accuracy"]}
    state = json.loads((run_dir / "pretrain" / f"checkpoint-{steps[-1]}" / "trainer_state.json").read_text())
    best = state.get("best_model_checkpoint")
    return {
        "pretrain_minutes": minutes,
        "saved": saved,
        "saved_step": int(best.rsplit("-", 1)[1]) if best else steps[-1],
        "evaluations": evaluations,
    }


def option_overrides(args: argparse.Namespace) -> dict[str, dict]:
    """`IJepaConfig` fields of every option (plain = the default recipe unchanged)."""
    return {
        "plain": {},
        "vicreg": {
            "vicreg_variance_weight": args.vicreg_variance_weight,
            "vicreg_covariance_weight": args.vicreg_covariance_weight,
        },
        "sigreg": {"sigreg_weight": args.sigreg_weight},
        "dyn_tanh": {"target_normalization": "dyn_tanh"},
        "unbiased": {"mask_placement": "uniform", "context_truncation": "random"},
        "full_context": {"context_truncation": "none"},
        "full_context_nested": {"context_truncation": "none", "padded_attention": "nested"},
    }


OPTION_NAMES = ("plain", "vicreg", "sigreg", "dyn_tanh", "unbiased", "full_context", "full_context_nested")


def overrides_flag(overrides: dict) -> str:
    """`--config_overrides` text of `pretrain.py` for these fields."""
    return ",".join(f"{name}={value}" for name, value in overrides.items())


def evaluation_steps(max_steps: int, requested: list[int] | None) -> list[int]:
    """The steps evaluated: `requested`, or every 300 steps of a longer run, or the end of the run."""
    if requested:
        steps = sorted(set(requested))
    elif max_steps > 300 and max_steps % 300 == 0:
        steps = list(range(300, max_steps + 1, 300))
    else:
        steps = [max_steps]
    if steps[0] < 1 or steps[-1] > max_steps:
        raise ValueError(f"--eval_steps {steps} must lie in [1, --max_steps {max_steps}].")
    if steps[-1] != max_steps:
        steps.append(max_steps)
    return steps


# ---------------------------------------------------------------------------------------------------------------------
# Step time
# ---------------------------------------------------------------------------------------------------------------------
def measure_step_times(
    options: dict[str, dict], preset: str, batch_size: int, steps: int, repeats: int
) -> dict[str, dict]:
    """
    Milliseconds per training step (forward, backward, AdamW step, EMA update; the batch is collated before the clock
    starts) of every option, measured round-robin so that load on the machine falls on every option alike. Returns per
    option the per-repeat medians (`step_ms`) and the mean real context tokens per image (`context_tokens`).
    """
    from modeling_ijepa import IJepaConfig, IJepaForPreTraining
    from modeling_ijepa.data import IJepaPretrainingCollator, default_image_processor, load_digits_dataset
    from modeling_ijepa.masking import mask_sampler_from_config

    dataset = load_digits_dataset(48)["train"]
    examples = [dataset[index] for index in range(batch_size)]
    setups = {}
    for name, overrides in options.items():
        torch.manual_seed(0)
        config = IJepaConfig.from_preset(preset, **overrides)
        model = IJepaForPreTraining(config).train()
        optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
        image_processor = default_image_processor(config.image_size)
        collator = IJepaPretrainingCollator(mask_sampler_from_config(config), image_processor)
        setups[name] = (model, optimizer, collator)
    results = {name: {"step_ms": [], "context_tokens": []} for name in options}
    for repeat in range(repeats + 1):  # repeat 0 warms up
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
                if repeat:
                    tokens = (batch["context_indices"] >= 0).sum(dim=1).float().mean()
                    results[name]["context_tokens"].append(float(tokens))
            if repeat:
                results[name]["step_ms"].append(statistics.median(times))
    return {
        name: {"step_ms": values["step_ms"], "context_tokens": statistics.mean(values["context_tokens"])}
        for name, values in results.items()
    }


# ---------------------------------------------------------------------------------------------------------------------
# Tables
# ---------------------------------------------------------------------------------------------------------------------
def _mean_std(values: list[float], signed: bool = False) -> str:
    std = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{statistics.mean(values):{'+' if signed else ''}.1f} ± {std:.1f}"


def learning_table(runs: dict[str, list[dict]], random_init: list[dict]) -> list[str]:
    """
    One row per option, for the encoder `pretrain.py` saved: mean ± std per metric, gain over random init and spread,
    verdict, and the step each seed's saved encoder comes from (the k-NN monitor's best, or the last step).
    """
    metric_columns = " | ".join(f"{label} | gain (spread)" for _, label in METRICS)
    header = f"| option | {metric_columns} | beats random on both | saved step per seed |"
    lines = ["The saved encoder:", "", header, "|---|" + "---|---|" * len(METRICS) + "---|---|"]
    cells = [_mean_std([row[metric] for row in random_init]) + " | –" for metric, _ in METRICS]
    lines.append("| random init | " + " | ".join(cells) + " | – | – |")
    for name, rows in runs.items():
        cells, passes = [], []
        for metric, _ in METRICS:
            pretrained = [row["saved"][metric] for row in rows]
            gain, spread = gain_and_spread(pretrained, [row[metric] for row in random_init])
            cells.append(f"{_mean_std(pretrained)} | {gain:+.1f} ({spread:.1f})")
            passes.append(gain > spread)
        saved_steps = ", ".join(str(row["saved_step"]) for row in rows)
        lines.append(f"| {name} | " + " | ".join(cells) + f" | {'yes' if all(passes) else 'no'} | {saved_steps} |")
    return lines


def knn_over_steps_table(runs: dict[str, list[dict]], steps: list[int]) -> list[str]:
    """20-NN accuracy of the raw checkpoint at every evaluated step, and its change from the first to the last."""
    lines = [
        "The raw checkpoints (the weights at each step, whatever the monitor chose):",
        "",
        "| option | " + " | ".join(f"20-NN @ {step}" for step in steps) + " | last − first |",
        "|---|" + "---|" * (len(steps) + 1),
    ]
    for name, rows in runs.items():
        per_step = [[row["evaluations"][str(step)]["knn"] for row in rows] for step in steps]
        change = [last - first for first, last in zip(per_step[0], per_step[-1])]
        lines.append(
            f"| {name} | " + " | ".join(_mean_std(v) for v in per_step) + f" | {_mean_std(change, signed=True)} |"
        )
    return lines


def step_time_table(timings: dict[str, dict], reference: str) -> list[str]:
    """Median ms per step, and the ratio to `reference` (median and range over the interleaved repeats)."""
    lines = ["| option | ms / step | × " + reference + " (range) | context tokens / image |", "|---|---|---|---|"]
    base = timings[reference]["step_ms"]
    for name, timing in timings.items():
        ratios = [value / reference_value for value, reference_value in zip(timing["step_ms"], base)]
        lines.append(
            f"| {name} | {statistics.median(timing['step_ms']):.0f} | {statistics.median(ratios):.2f} "
            f"({min(ratios):.2f}–{max(ratios):.2f}) | {timing['context_tokens']:.1f} |"
        )
    return lines


# ---------------------------------------------------------------------------------------------------------------------
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--options", nargs="+", choices=OPTION_NAMES, default=list(OPTION_NAMES))
    parser.add_argument("--max_steps", type=int, default=300, help="Pre-training steps (the default recipe: 300).")
    parser.add_argument(
        "--eval_steps",
        type=int,
        nargs="+",
        help="Steps whose checkpoints are k-NN evaluated (default: every 300 steps of a longer run, else the end).",
    )
    parser.add_argument("--config", default="tiny-cpu", help="The recipe every option is added to (pretrain.py).")
    parser.add_argument("--output_dir", default="outputs/learning_options")
    parser.add_argument("--preset", default="vit_micro_patch4_48", help="Architecture of the default recipe.")
    parser.add_argument("--vicreg_variance_weight", type=float, default=0.1)
    parser.add_argument("--vicreg_covariance_weight", type=float, default=0.004)
    parser.add_argument("--sigreg_weight", type=float, default=0.01)
    parser.add_argument("--timing_steps", type=int, default=10, help="Timed steps per option and repeat (0: skip).")
    parser.add_argument("--timing_repeats", type=int, default=3, help="Interleaved repeats of the step timing.")
    parser.add_argument("--timing_only", action="store_true", help="Only the step-time comparison, no training.")
    parser.add_argument("--timing_batch_size", type=int, default=64, help="Batch of the step timing (the recipe's).")
    parser.add_argument("--pretrain_args", nargs=argparse.REMAINDER, default=[], help="Extra pretrain.py flags.")
    args = parser.parse_args(argv)
    steps = evaluation_steps(args.max_steps, args.eval_steps)
    options = {name: option_overrides(args)[name] for name in args.options}

    probe, knn = linear_probe, knn_eval
    base = Path(args.output_dir)
    # Checkpoints at every evaluated step, all kept.
    save_every = math.gcd(*steps)
    random_init, runs = [], {name: [] for name in options}
    for seed in [] if args.timing_only else args.seeds:
        random_dir = base / f"seed{seed}" / "eval-random"
        model = f"random:{args.preset}"
        random_row = run_once(
            random_dir, lambda: evaluate_encoder(model, seed, random_dir, probe, knn), {"model": model}
        )
        random_init.append({"seed": seed, **random_row})
        for name, overrides in options.items():
            run_dir = base / f"seed{seed}" / name
            pretrain_args = [
                "--config",
                args.config,
                "--max_steps",
                str(args.max_steps),
                "--save_steps",
                str(save_every),
                "--save_total_limit",
                "1000",
                *(["--config_overrides", overrides_flag(overrides)] if overrides else []),
                *args.pretrain_args,
            ]
            settings = pretrain_settings(pretrain_args)
            row = run_once(run_dir, lambda: pretrain_and_evaluate(seed, run_dir, pretrain_args, steps), settings)
            runs[name].append({"seed": seed, **row})
            print(f"[seed {seed}] {name}: {row}; random init {random_row}", flush=True)

    lines = [f"`python benchmarks/learning_options.py {' '.join(argv if argv is not None else sys.argv[1:])}`", ""]
    lines += [f"Options: {json.dumps(options)}", ""]
    if not args.timing_only:
        lines += learning_table(runs, random_init) + [""]
        lines += knn_over_steps_table(runs, steps) + [""]
    timings = {}
    if args.timing_steps > 0:
        timings = measure_step_times(
            options, args.preset, args.timing_batch_size, args.timing_steps, args.timing_repeats
        )
        lines += step_time_table(timings, "plain" if "plain" in timings else next(iter(timings)))
    print("\n".join(lines))
    base.mkdir(parents=True, exist_ok=True)
    results = {"options": options, "random_init": random_init, "runs": runs, "eval_steps": steps, "timings": timings}
    (base / "learning_options.json").write_text(json.dumps(results, indent=2))
    (base / "learning_options.md").write_text("\n".join(lines) + "\n")
    return 0


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    sys.exit(main())
