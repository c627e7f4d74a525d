#!/usr/bin/env python
"""
`torch.compile` of the I-JEPA training step under DDP and under FSDP2 on CPU: 2 gloo processes, the real
`IJepaTrainer`, a few optimiser steps eager and then with `torch_compile=True` (inductor), losses compared.

    python benchmarks/compile_check.py                       # DDP and FSDP2, 5 steps each, tolerance 1e-4
    python benchmarks/compile_check.py --modes fsdp2 --steps 3

Each distributed mode is one `torchrun --nproc_per_node 2` launch of this file (`--worker`). In it, every process
trains the toy run of `modeling_ijepa/testing_utils.py` (the one tests/test_fsdp.py shards: 2-block width-32 encoder
and predictor on the 48 px / patch-4 grid, 4 digits per process and step) twice from the same initial weights, with the
same crops and masks: eager, then compiled with inductor (`TrainingArguments(torch_compile=True)`, which accelerate
applies after DDP wrapping, or after `fully_shard` under FSDP2). FSDP2 is requested the way `accelerate launch
--use_fsdp --fsdp_version 2` requests it, so the CPU run goes through `IJepaTrainer`'s FSDP2 set-up
(`modeling_ijepa/distributed.py`).

The check passes when, on every process, every step's logged loss of the compiled run equals the eager one within
`--tolerance`. The table also shows the largest weight difference after the last step, the training time of each run
(the compiled one includes compilation: inductor compiles C++ kernels, minutes on 2 cores) and how many graphs dynamo
compiled (the number of context / target tokens changes from batch to batch, so dynamo recompiles for new shapes).
The compile time depends on inductor's on-disk cache (`TORCHINDUCTOR_CACHE_DIR`): a second run reuses its kernels.
This is not part of the test suite because of that compilation time. Exit status 0 on PASS, 1 on FAIL.

Steady state of one process (`--steady_state`, default 60 steps): the same toy run trained in a fresh process per
variant, each with an empty inductor cache, side by side:

    python -m benchmarks.compile_check --steady_state --steps 60

- `eager`: no compilation;
- `compiled`: `torch_compile=True` on the natural batches (token counts change from batch to batch; torch's default
  automatic dynamic shapes turn the changing sizes symbolic after the first recompilation);
- `compiled-static`: the same with static shapes (`ACCELERATE_DYNAMO_USE_DYNAMIC=false`): every new pair of token
  counts is a new graph until dynamo's recompile limit, after which the model runs eagerly;
- `compiled-buckets`: static shapes on batches padded to a few token counts (`TokenBuckets`, what
  `pretrain.py --torch_compile --compile_token_buckets true` does).

For each: graphs compiled, graphs compiled after the warm-up steps, recompile-limit hits (from dynamo's log), the
median step time after warm-up, the whole training time, and the largest loss difference to eager (the buckets'
loss is the unpadded loss, so all variants follow the same losses).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path


if not __package__:  # run as a file (also by torchrun): import `benchmarks` from the repository root, as -m does
    sys.path[0] = str(Path(__file__).resolve().parents[1])

from modeling_ijepa.testing_utils import (  # noqa: E402
    FSDP2_LAUNCH_ENV,
    WORLD_SIZE,
    build_collator,
    build_dataset,
    build_model,
    training_arguments,
)


ROOT = Path(__file__).resolve().parents[1]
MODES = {"ddp": {}, "fsdp2": FSDP2_LAUNCH_ENV}
VARIANTS = ("eager", "compiled")


# ------------------------------------------------------------------------------------------------------------------
# Verdict (pure; unit-tested in tests/test_fsdp.py)
# ------------------------------------------------------------------------------------------------------------------
def compare_losses(eager: list[float], compiled: list[float], steps: int, tolerance: float) -> tuple[float, str]:
    """
    The largest `|compiled - eager|` over the steps, and `""` when it is within `tolerance`, else the reason it fails
    (a missing step, a non-finite loss or a difference above the tolerance).
    """
    if len(eager) != steps or len(compiled) != steps:
        return float("nan"), f"expected {steps} logged losses, got {len(eager)} eager and {len(compiled)} compiled"
    if not all(math.isfinite(loss) for loss in [*eager, *compiled]):
        return float("nan"), "a loss is not finite"
    differences = [abs(c - e) for e, c in zip(eager, compiled)]
    worst = max(differences)
    if worst > tolerance:
        step = differences.index(worst) + 1
        return worst, f"step {step}: |compiled - eager| = {worst:.2e} > {tolerance:.0e}"
    return worst, ""


# ------------------------------------------------------------------------------------------------------------------
# Worker: one process of a torchrun launch
# ------------------------------------------------------------------------------------------------------------------
def _train(variant: str, rank: int, steps: int, out: Path) -> dict:
    """`steps` optimiser steps of `IJepaTrainer`, eager or compiled; the logged losses, weights and timings."""
    import torch
    import torch._dynamo
    from transformers import TrainerCallback

    from modeling_ijepa.trainer import IJepaTrainer

    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    model = build_model()
    args = training_arguments(out / variant, max_steps=steps, save_strategy="no", torch_compile=variant == "compiled")
    trainer = IJepaTrainer(model=model, args=args, train_dataset=build_dataset(), data_collator=build_collator(rank))
    compiled_steps = []

    class _SeeCompiled(TrainerCallback):
        # Under DDP accelerate compiles the DDP wrapper (`model_wrapped`), under FSDP2 the sharded model (`model`);
        # the Trainer unwraps both when training ends, so look during the steps.
        def on_step_end(self, args, state, control, **kwargs):
            roots = (trainer.model, trainer.model_wrapped)
            compiled_steps.append(any(isinstance(root, torch._dynamo.eval_frame.OptimizedModule) for root in roots))

    trainer.add_callback(_SeeCompiled())
    start = time.perf_counter()
    trainer.train()
    seconds = time.perf_counter() - start
    # TrainingArguments(torch_compile=True) exports ACCELERATE_DYNAMO_BACKEND; later runs must not inherit it.
    os.environ.pop("ACCELERATE_DYNAMO_BACKEND", None)
    state_dict = trainer.accelerator.get_state_dict(trainer.model)
    return {
        "distributed_mode": trainer.distributed_mode,
        "compiled_module": bool(compiled_steps) and all(compiled_steps),
        "losses": [entry["loss"] for entry in trainer.state.log_history if "loss" in entry],
        "seconds": seconds,
        "graphs": int(torch._dynamo.utils.counters["stats"]["unique_graphs"]),
        "state_dict": {k: v.detach().float().cpu() for k, v in state_dict.items()},
    }


def worker(out: Path, steps: int) -> None:
    """Eager, then compiled, in this process of the launch; writes `rank{r}.json` into `out`."""
    rank = int(os.environ["RANK"])
    eager = _train("eager", rank, steps, out)
    compiled = _train("compiled", rank, steps, out)
    expected, got = eager.pop("state_dict"), compiled.pop("state_dict")
    got = {key.replace("_orig_mod.", ""): value for key, value in got.items()}
    if rank == 0:  # under FSDP2 the gathered full state is on process 0 only
        if set(got) == set(expected):
            compiled["max_weight_difference"] = max(float((got[k] - expected[k]).abs().max()) for k in expected)
        else:
            compiled["max_weight_difference"] = float("nan")
    report = {"rank": rank, "eager": eager, "compiled": compiled}
    (out / f"rank{rank}.json").write_text(json.dumps(report), encoding="utf-8")


# ------------------------------------------------------------------------------------------------------------------
# Launcher
# ------------------------------------------------------------------------------------------------------------------
def launch(mode: str, steps: int, out: Path, port: int, timeout: float) -> tuple[list[dict] | None, str]:
    """One `torchrun --nproc_per_node 2` launch of the worker for `mode`: the per-process reports, and the log."""
    out.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", **MODES[mode])
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc_per_node",
        str(WORLD_SIZE),
        "--master_port",
        str(port),
        str(Path(__file__).resolve()),
        "--worker",
        "--output_dir",
        str(out),
        "--steps",
        str(steps),
    ]
    try:
        done = subprocess.run(
            command, env=env, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=timeout
        )
    except subprocess.TimeoutExpired as error:
        return None, f"timed out after {timeout:.0f} s\n{error.stdout or ''}"
    (out / "launch.log").write_text(done.stdout, encoding="utf-8")
    if done.returncode != 0:
        return None, done.stdout
    return [json.loads((out / f"rank{rank}.json").read_text()) for rank in range(WORLD_SIZE)], done.stdout


def _error_summary(log: str, lines: int = 25) -> str:
    """The end of the first traceback in `log` (the exception lines), or the log's last lines."""
    text = log.splitlines()
    starts = [i for i, line in enumerate(text) if "Traceback (most recent call last)" in line]
    if starts:
        end = next((i for i in range(starts[0] + 1, len(text)) if text[i] and not text[i].startswith(" ")), None)
        end = len(text) - 1 if end is None else end
        return "\n".join(text[max(starts[0], end - lines) : end + 1])
    return "\n".join(text[-lines:])


# ------------------------------------------------------------------------------------------------------------------
# Steady state: one process, one fresh interpreter per variant
# ------------------------------------------------------------------------------------------------------------------
STEADY_VARIANTS = ("eager", "compiled", "compiled-static", "compiled-buckets")


def steady_state_worker(variant: str, steps: int, warmup: int, out: Path) -> dict:
    """Train the toy run for `steps` steps as `variant`; per-step times, losses and dynamo's graph counts."""
    import torch
    from transformers import TrainerCallback

    from modeling_ijepa.compile_watch import CompileWatch
    from modeling_ijepa.data import TokenBuckets
    from modeling_ijepa.trainer import IJepaTrainer

    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    if variant in ("compiled-static", "compiled-buckets"):
        os.environ["ACCELERATE_DYNAMO_USE_DYNAMIC"] = "false"
    collator = build_collator(0)
    if variant == "compiled-buckets":
        collator.token_buckets = TokenBuckets.from_sampler(collator.mask_sampler, batch_size=4)
    model = build_model()
    args = training_arguments(out / variant, max_steps=steps, save_strategy="no", torch_compile="compiled" in variant)
    trainer = IJepaTrainer(model=model, args=args, train_dataset=build_dataset(), data_collator=collator)
    watch = CompileWatch(warmup_steps=warmup)
    step_seconds = []

    class _StepTimer(TrainerCallback):
        def on_step_begin(self, args, state, control, **kwargs):
            self.start = time.perf_counter()

        def on_step_end(self, args, state, control, **kwargs):
            step_seconds.append(time.perf_counter() - self.start)

    trainer.add_callback(watch)
    trainer.add_callback(_StepTimer())
    start = time.perf_counter()
    trainer.train()
    seconds = time.perf_counter() - start
    steady = sorted(step_seconds[warmup:]) or [float("nan")]
    return {
        "variant": variant,
        "buckets": repr(collator.token_buckets) if collator.token_buckets else None,
        "losses": [entry["loss"] for entry in trainer.state.log_history if "loss" in entry],
        "graphs": watch.graphs,
        "graphs_after_warmup": watch.graphs_after_warmup,
        "limit_hits": len(watch.limit_hits),
        "median_step_ms": 1e3 * steady[len(steady) // 2],
        "train_seconds": seconds,
    }


def steady_state(variants: list[str], steps: int, warmup: int, out: Path, timeout: float) -> int:
    """Each variant in a fresh process with an empty inductor cache; prints the side-by-side table."""
    import torch

    out.mkdir(parents=True, exist_ok=True)
    print(
        f"torch {torch.__version__}, 1 process, {steps} steps ({warmup} warm-up), toy run of "
        f"modeling_ijepa/testing_utils.py, output in {out}",
        flush=True,
    )
    results = {}
    for variant in variants:
        env = dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1")
        env.setdefault("OMP_NUM_THREADS", "1")
        env["TORCHINDUCTOR_CACHE_DIR"] = str(out / variant / "inductor-cache")
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
        command = [sys.executable, str(Path(__file__).resolve()), "--steady_state_worker", variant]
        command += ["--steps", str(steps), "--warmup", str(warmup), "--output_dir", str(out)]
        start = time.perf_counter()
        try:
            done = subprocess.run(
                command,
                env=env,
                cwd=ROOT,
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                text=True,
                timeout=timeout,
            )
            log = done.stdout
            failed = done.returncode != 0
        except subprocess.TimeoutExpired as error:
            log, failed = f"timed out after {timeout:.0f} s\n{error.stdout or ''}", True
        (out / f"{variant}.log").write_text(log if isinstance(log, str) else log.decode(), encoding="utf-8")
        result_file = out / f"{variant}.json"
        if failed or not result_file.exists():
            print(f"{variant}: FAILED after {time.perf_counter() - start:.0f} s\n{_error_summary(str(log))}")
            continue
        results[variant] = json.loads(result_file.read_text())
        fallback = [line for line in str(log).splitlines() if "fell back to eager" in line]
        print(f"{variant}: {time.perf_counter() - start:.0f} s" + (f"; {fallback[0]}" if fallback else ""), flush=True)
    eager = results.get("eager")
    header = ["variant", "graphs", f"after step {warmup}", "limit hits", "median step ms", "train s", "|loss - eager|"]
    print("| " + " | ".join(header) + " |")
    print("|" + "---|" * len(header))
    for variant, r in results.items():
        difference = "-"
        if eager is not None and len(eager["losses"]) == len(r["losses"]):
            difference = f"{max(abs(a - b) for a, b in zip(eager['losses'], r['losses'])):.1e}"
        cells = [variant, r["graphs"], r["graphs_after_warmup"], r["limit_hits"], f"{r['median_step_ms']:.1f}"]
        print("| " + " | ".join(str(c) for c in [*cells, f"{r['train_seconds']:.0f}", difference]) + " |")
    for r in results.values():
        if r["buckets"]:
            print(f"{r['variant']}: {r['buckets']}")
    (out / "steady_state.json").write_text(json.dumps(results, indent=2), encoding="utf-8")
    return 0 if len(results) == len(variants) else 1


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--modes", nargs="+", choices=sorted(MODES), default=["ddp", "fsdp2"])
    parser.add_argument("--steps", type=int, default=5, help="Optimiser steps per run (default 5).")
    parser.add_argument("--tolerance", type=float, default=1e-4, help="Largest |compiled - eager| loss (1e-4).")
    parser.add_argument("--output_dir", default=None, help="Where launches write (default: a temporary folder).")
    parser.add_argument("--port", type=int, default=29561, help="torchrun --master_port of the first launch.")
    parser.add_argument("--timeout", type=float, default=1800, help="Seconds per launch before it counts as failed.")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--steady_state", action="store_true", help="One-process steady state of the variants.")
    parser.add_argument("--variants", nargs="+", choices=STEADY_VARIANTS, default=list(STEADY_VARIANTS))
    parser.add_argument("--warmup", type=int, default=10, help="Steady state: steps before the timed ones (10).")
    parser.add_argument("--steady_state_worker", choices=STEADY_VARIANTS, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.steady_state_worker:
        out = Path(args.output_dir)
        result = steady_state_worker(args.steady_state_worker, args.steps, args.warmup, out)
        (out / f"{args.steady_state_worker}.json").write_text(json.dumps(result), encoding="utf-8")
        return 0
    if args.steady_state:
        out = Path(args.output_dir or tempfile.mkdtemp(prefix="ijepa-compile-steady-"))
        return steady_state(args.variants, args.steps if args.steps != 5 else 60, args.warmup, out, args.timeout)
    if args.steps < 1:
        parser.error("--steps must be at least 1.")
    if args.worker:
        worker(Path(args.output_dir), args.steps)
        return 0

    import torch

    out = Path(args.output_dir or tempfile.mkdtemp(prefix="ijepa-compile-check-"))
    print(
        f"torch {torch.__version__}, {WORLD_SIZE} gloo processes, {args.steps} steps, "
        f"tolerance {args.tolerance:.0e}, output in {out}"
    )
    rows, failures = [], []
    for index, mode in enumerate(args.modes):
        start = time.perf_counter()
        reports, log = launch(mode, args.steps, out / mode, args.port + index, args.timeout)
        print(f"{mode}: launch finished in {time.perf_counter() - start:.0f} s (log: {out / mode / 'launch.log'})")
        if reports is None:
            failures.append(f"{mode}: the launch failed:\n{_error_summary(log)}")
            rows.append([mode, "-", "launch failed", "-", "-", "-", "-", "FAIL"])
            continue
        for report in reports:
            eager, compiled = report["eager"], report["compiled"]
            worst, reason = compare_losses(eager["losses"], compiled["losses"], args.steps, args.tolerance)
            if not compiled["compiled_module"] or compiled["graphs"] == 0:
                reason = reason or "the compiled run has no OptimizedModule or no dynamo graph: it ran eagerly"
            if reason:
                failures.append(f"{mode}, process {report['rank']}: {reason}")
            weights = compiled.get("max_weight_difference")
            rows.append(
                [
                    mode,
                    str(report["rank"]),
                    compiled["distributed_mode"],
                    " ".join(f"{loss:.6f}" for loss in compiled["losses"]),
                    f"{worst:.1e}",
                    "-" if weights is None else f"{weights:.1e}",
                    f"{eager['seconds']:.1f} / {compiled['seconds']:.1f} ({compiled['graphs']} graphs)",
                    "FAIL" if reason else "ok",
                ]
            )
    header = [
        "mode",
        "process",
        "distributed mode (compiled run)",
        "compiled losses",
        "max |loss diff|",
        "max |weight diff|",
        "train s eager / compiled",
        "",
    ]
    print("| " + " | ".join(header) + " |")
    print("|" + "---|" * len(header))
    for row in rows:
        print("| " + " | ".join(row) + " |")
    for failure in failures:
        print(failure)
    print("PASS" if not failures else "FAIL")
    return 0 if not failures else 1


if __name__ == "__main__":
    sys.exit(main())
