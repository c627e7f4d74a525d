#!/usr/bin/env python
"""
One command that measures what only a GPU can show, section by section, each written to `gpu_check.json` and
appended to `gpu_check.md` as soon as it is measured (a run cut short keeps what it finished):

    python -m benchmarks.gpu_check --output_dir outputs/gpu-check            # one H100 / H200 / A100, ~7 min
    python -m benchmarks.gpu_check --output_dir /tmp/gpu-check-smoke --smoke # the same code paths on CPU, tiny sizes

Sections (each with a share of `--budget_s`; a measurement that would run past its section's end is cut off and
recorded as `skipped: budget`):

- `environment`: GPU, CUDA, torch, the measured peak of a large bf16 matmul and the datasheet peak;
- `step`: the pre-training step (target encoder, context encoder, predictor, loss, backward, AdamW, EMA) of ViT-B/16
  and ViT-H/14 at 224 px, bf16 autocast, at the largest per-GPU batch up to 128 that fits (tried in descending sizes,
  out-of-memory caught): ours eager and compiled, each with and without activation checkpointing, and the authors'
  step restated in `benchmarks/reference_ijepa.py`, after an fp32 loss-parity check of the two on the same weights,
  batch and masks. Images/s, MFU against the measured and the datasheet peak, peak memory, and the SDPA kernel that
  ran (from the profiler's operator names; the math fallback is a FAIL);
- `context`: the context handling of the model: the official truncation, every context whole and padded (attention
  mask), the same through nested (variable-length) attention, and the official truncation padded to token buckets
  (`TokenBuckets`, the compile shape policy);
- `data`: the real pre-training collator in DataLoaders of k workers on generated ImageNet-like JPEGs: images/s per
  worker and the workers one GPU needs at the measured step rates;
- `end_to_end`: `training_scripts/pretrain.py` for `--e2e_steps` steps on a folder of those JPEGs with the
  `in1k-vith14-ep300` recipe's settings (bf16, DataLoader workers, pinned memory, `--torch_compile`) on a smaller
  preset (ViT-B/16 by default): steady-state images/s against the isolated step, and the share of the time the
  training loop waited for data. Also reads `output_dir/trainer_state.json`.

The step section compiles each `IJepaLayer` (regional compilation: one graph per stack, seconds instead of the
minutes a whole unrolled ViT-H step takes to compile); the end-to-end run compiles the whole model, as
`--torch_compile` does (dynamic shapes; `--compile_token_buckets` is off by default).

`--smoke` runs every section on CPU with the micro preset, small batches, fp32 (bf16 on a CPU without native
support runs ~400x slower: `torch.backends.cpu.get_cpu_capability()` and the CPU flags decide, see
`modeling_ijepa.hardware`) and dynamo's `eager` backend: the compile paths (tracing, guards, graph counts) without
inductor's minutes of C++ compilation.
tests/test_gpu_check.py runs it.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import math
import os
import platform
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path


os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
# Idle OpenMP threads sleep instead of spinning (before torch starts its pool): on a shared CPU spinning threads that
# get descheduled stall every parallel region (see benchmarks/benchmark_step.py).
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import torch  # noqa: E402
import torch._dynamo  # noqa: E402


if not __package__:  # run as a file: import `benchmarks` from the repository root, as -m does
    sys.path[0] = str(Path(__file__).resolve().parents[1])

ROOT = Path(__file__).resolve().parents[1]

# bf16 dense tensor-core peaks from the datasheets (FLOP/s), matched against torch.cuda.get_device_name.
DATASHEET_BF16_PEAKS = (("H200", 989e12), ("H100", 989e12), ("A100", 312e12))
# Shares of --budget_s per section, in the order they run.
SECTION_SHARES = {
    "environment": 0.03,
    "step": 0.42,
    "context": 0.09,
    "data": 0.08,
    "end_to_end": 0.38,
}
SDPA_OPERATORS = {  # profiler operator names -> the SDPA kernel family
    "_scaled_dot_product_flash_attention_for_cpu": "flash (cpu)",
    "_scaled_dot_product_fused_attention_overrideable": "fused (overrideable)",
    "_scaled_dot_product_flash_attention": "flash",
    "_flash_attention_forward": "flash",
    "_scaled_dot_product_efficient_attention": "memory-efficient",
    "_efficient_attention_forward": "memory-efficient",
    "_scaled_dot_product_cudnn_attention": "cudnn",
    "_scaled_dot_product_attention_math": "math",
}


class BudgetExceeded(Exception):
    """Raised inside a measurement when its section's time is up."""


@contextlib.contextmanager
def deadline(seconds: float):
    """Raise `BudgetExceeded` in the main thread after `seconds` (SIGALRM); a no-op where signals are unavailable."""
    if seconds <= 0:
        raise BudgetExceeded("no time left")
    if not hasattr(signal, "setitimer"):
        yield
        return

    def _expire(signum, frame):
        raise BudgetExceeded(f"over its {seconds:.0f} s")

    previous = signal.signal(signal.SIGALRM, _expire)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


# ------------------------------------------------------------------------------------------------------------------
# The report: JSON rewritten and Markdown appended after every section
# ------------------------------------------------------------------------------------------------------------------
class Report:
    def __init__(self, output_dir: Path, meta: dict):
        self.output_dir = output_dir
        self.json_path = output_dir / "gpu_check.json"
        self.md_path = output_dir / "gpu_check.md"
        self.data = {"meta": meta, "sections": {}}
        output_dir.mkdir(parents=True, exist_ok=True)
        self._write_json()
        self.md_path.write_text(
            "# GPU check\n\n" + "\n".join(f"- {key}: {value}" for key, value in meta.items()) + "\n",
            encoding="utf-8",
        )

    def _write_json(self) -> None:
        temporary = self.json_path.with_suffix(".json.tmp")
        temporary.write_text(json.dumps(self.data, indent=2, default=str), encoding="utf-8")
        os.replace(temporary, self.json_path)

    def add(self, name: str, result: dict, markdown: str) -> None:
        self.data["sections"][name] = result
        self._write_json()
        with open(self.md_path, "a", encoding="utf-8") as handle:
            handle.write(f"\n## {name}\n\n{markdown.rstrip()}\n")
        print(f"[gpu_check] {name}: {result.get('status', '')} ({result.get('seconds', 0):.0f} s)", flush=True)


def table(header: list[str], rows: list[list]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(_cell(value) for value in row) + " |" for row in rows]
    return "\n".join(lines) + "\n"


def _cell(value) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.3g}" if abs(value) < 100 else f"{value:,.0f}"
    return str(value)


# ------------------------------------------------------------------------------------------------------------------
# Settings: full (GPU) and smoke (CPU)
# ------------------------------------------------------------------------------------------------------------------
def settings(args) -> dict:
    if args.smoke:
        return {
            "device": "cpu",
            "dtype": torch.float32,
            "dtype_name": "fp32",
            "models": ["vit_micro_patch4_48"],
            "batch_sizes": [8, 4],
            "warmup": 1,
            "steps": 1,
            "peak_size": 512,
            "compile_backend": "eager",
            "context_model": "vit_micro_patch4_48",
            "context_batch": 8,
            "data_images": 48,
            "data_size": (120, 90),
            "data_batch": 8,
            "data_workers": [1, 2],
            "data_seconds": 1.0,
            "e2e_preset": "vit_micro_patch4_48",
            "e2e_batch": 8,
            "e2e_workers": 1,
        }
    return {
        "device": "cuda",
        "dtype": torch.bfloat16,
        "dtype_name": "bf16",
        "models": ["vit_base_patch16_224", "vit_huge_patch14_224"],
        "batch_sizes": [128, 96, 64, 48, 32, 16, 8],
        "warmup": 2,
        "steps": 5,
        "peak_size": 8192,
        "compile_backend": "inductor",
        "context_model": "vit_base_patch16_224",
        "context_batch": 128,
        "data_images": 512,
        "data_size": (500, 375),
        "data_batch": 128,
        "data_workers": sorted({1, 2, 4, min(8, os.cpu_count() or 1)}),
        "data_seconds": 6.0,
        "e2e_preset": args.e2e_preset,
        "e2e_batch": 128,
        "e2e_workers": min(10, os.cpu_count() or 1),
    }


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def release_memory(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def is_out_of_memory(error: BaseException) -> bool:
    return isinstance(error, torch.OutOfMemoryError) or "out of memory" in str(error).lower()


# ------------------------------------------------------------------------------------------------------------------
# environment
# ------------------------------------------------------------------------------------------------------------------
def datasheet_peak(device_name: str) -> float | None:
    for key, peak in DATASHEET_BF16_PEAKS:
        if key.lower() in device_name.lower():
            return peak
    return None


def section_environment(config: dict, budget: float) -> tuple[dict, str]:
    from benchmarks.benchmark_step import matmul_peak
    from modeling_ijepa import hardware

    device = torch.device(config["device"])
    result = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "cpu_bf16": hardware.cpu_bf16_support().describe(),
        "cpu_count": os.cpu_count(),
        "dtype": config["dtype_name"],
    }
    if device.type == "cuda":
        properties = torch.cuda.get_device_properties(device)
        result.update(
            device_name=properties.name,
            device_memory_gib=round(properties.total_memory / 2**30, 1),
            compute_capability=f"{properties.major}.{properties.minor}",
            cudnn=torch.backends.cudnn.version(),
        )
    else:
        result["device_name"] = (
            f"CPU ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"
        )
    result["datasheet_peak_tflops"] = (datasheet_peak(result["device_name"]) or 0) / 1e12 or None
    with deadline(budget):
        peak = matmul_peak(device, config["dtype"], config["peak_size"], repeats=10)
    result["measured_peak_tflops"] = peak / 1e12
    result["status"] = "ok"
    rows = [[key, value] for key, value in result.items() if key != "status"]
    return result, table(["", "value"], rows)


# ------------------------------------------------------------------------------------------------------------------
# step
# ------------------------------------------------------------------------------------------------------------------
def detect_sdpa_kernels(run) -> list[str]:
    """The SDPA kernel families whose operators ran in `run()` (torch.profiler operator names)."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if torch.cuda.is_available() else [])
    with profile(activities=activities) as profiler:
        run()
    names = {event.key for event in profiler.key_averages()}
    found = set()
    for name in names:
        bare = name.split("::")[-1]
        for operator, family in SDPA_OPERATORS.items():
            if bare == operator or bare.startswith(operator):
                found.add(family)
                break
    return sorted(found)


def sdpa_verdict(kernels: list[str]) -> str:
    if not kernels:
        return "FAIL: no SDPA operator seen"
    if "math" in kernels:
        return "FAIL: math kernel"
    return "ok"


def find_batch_size(try_step, sizes: list[int]) -> tuple[int | None, list[str]]:
    """The first size in `sizes` (descending) whose `try_step(size)` does not run out of memory, and the attempts."""
    attempts = []
    for size in sizes:
        try:
            try_step(size)
            attempts.append(f"{size}: ok")
            return size, attempts
        except Exception as error:  # noqa: BLE001 - only out-of-memory moves on to a smaller batch
            if not is_out_of_memory(error):
                raise
            attempts.append(f"{size}: out of memory")
    return None, attempts


class StepBench:
    """One preset: our model and the authors' restated step on the same weights, batch and masks."""

    def __init__(self, preset: str, config: dict, seed: int = 0):
        from modeling_ijepa import IJepaConfig, IJepaForPreTraining
        from modeling_ijepa.masking import MultiBlockMaskSampler

        self.preset, self.config = preset, config
        self.device = torch.device(config["device"])
        torch.manual_seed(seed)
        self.model_config = IJepaConfig.from_preset(preset, attn_implementation="sdpa")
        self.model = IJepaForPreTraining(self.model_config).to(self.device).train()
        self.sampler = MultiBlockMaskSampler.from_config(self.model_config, seed=seed)

    def batch(self, batch_size: int) -> dict:
        context_indices, target_indices = self.sampler.sample_masks(batch_size, self.sampler.next_generator())
        c = self.model_config
        pixel_values = torch.randn(batch_size, c.num_channels, c.image_size, c.image_size)
        return {
            "pixel_values": pixel_values.to(self.device),
            "context_indices": context_indices.to(self.device),
            "target_indices": target_indices.to(self.device),
        }

    def loss_parity(self, batch_size: int) -> dict:
        """fp32 losses of ours and the reference on the same weights, batch and masks (TF32 off)."""
        from benchmarks.benchmark_step import LOSS_TOLERANCE
        from benchmarks.reference_ijepa import official_masks, reference_from_ours, reference_loss

        batch = self.batch(batch_size)
        reference = reference_from_ours(self.model)
        tf32 = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
        try:
            with torch.no_grad():
                ours = float(self.model(**batch).loss)
                masks_enc, masks_pred = official_masks(batch["context_indices"], batch["target_indices"])
                theirs = float(reference_loss(reference, batch["pixel_values"], masks_enc, masks_pred))
        finally:
            torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = tf32
        difference = abs(ours - theirs)
        return {
            "batch": batch_size,
            "ours": ours,
            "reference": theirs,
            "difference": difference,
            "tolerance": LOSS_TOLERANCE,
            "status": "ok" if difference <= LOSS_TOLERANCE else "FAIL",
        }

    def step_function(self, implementation: str, compiled: bool, checkpointing: bool):
        """A `run(batch) -> loss` of one full training step, and a cleanup."""
        from benchmarks.benchmark_step import EMA_MOMENTUM, our_optimizer, our_train_step
        from benchmarks.reference_ijepa import (
            official_masks,
            reference_from_ours,
            reference_optimizer,
            reference_train_step,
        )

        bf16 = self.config["dtype"] == torch.bfloat16
        if implementation == "reference":
            reference = reference_from_ours(self.model)
            for module in (reference.encoder, reference.predictor, reference.target_encoder):
                module.train()
            optimizer = reference_optimizer(reference)

            def run(batch):
                masks_enc, masks_pred = official_masks(batch["context_indices"], batch["target_indices"])
                return reference_train_step(
                    reference, optimizer, batch["pixel_values"], masks_enc, masks_pred, EMA_MOMENTUM, bf16
                )

            return run
        torch._dynamo.reset()
        set_checkpointing(self.model, checkpointing)
        compile_layers(self.model, self.config["compile_backend"] if compiled else None)
        forward = self.model
        optimizer = our_optimizer(self.model, self.device)

        def run(batch):
            return our_train_step(self.model, forward, optimizer, batch, EMA_MOMENTUM, bf16)

        return run


def compile_layers(model, backend: str | None) -> None:
    """
    Regional compilation: every `IJepaLayer` compiled in place (`backend`), or back to eager (`None`). Layers of one
    stack share their code, so dynamo compiles one graph per stack (encoder, target encoder, predictor) instead of the
    whole step unrolled: seconds of compilation instead of minutes, where most of the step's time is spent. (The
    end-to-end section compiles the whole model, as `--torch_compile` does.)
    """
    from modeling_ijepa.modeling_ijepa import IJepaLayer

    for module in model.modules():
        if isinstance(module, IJepaLayer):
            if backend is None:
                module._compiled_call_impl = None
            else:
                module.compile(backend=backend)


def set_checkpointing(model, on: bool) -> None:
    """Activation checkpointing of every layer on or off (transformers 5.25 names; older ones say `gradient_`)."""
    if hasattr(model, "activation_checkpointing_enable"):
        if on:
            model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
        else:
            model.activation_checkpointing_disable()
    elif on:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    else:
        model.gradient_checkpointing_disable()


def measure_step(run, batch: dict, warmup: int, steps: int, device: torch.device) -> dict:
    """Warm-up (compilation included, timed apart), then `steps` timed steps: median seconds and peak memory."""
    start = time.perf_counter()
    for _ in range(warmup):
        run(batch)
    synchronize(device)
    warmup_seconds = time.perf_counter() - start
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    seconds = []
    for _ in range(steps):
        synchronize(device)
        begin = time.perf_counter()
        loss = run(batch)
        synchronize(device)
        seconds.append(time.perf_counter() - begin)
    peak = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None
    return {
        "warmup_seconds": warmup_seconds,
        "step_seconds": statistics.median(seconds),
        "peak_memory_gib": peak,
        "last_loss": loss,
    }


STEP_VARIANTS = (  # (implementation, compiled, activation checkpointing), in the order they are measured
    ("ours", False, False),
    ("reference", False, False),
    ("ours", True, False),
    ("ours", False, True),
    ("ours", True, True),
)


def step_one_model(preset: str, config: dict, peaks: dict, end: float) -> dict:
    from benchmarks.benchmark_step import step_flops

    bench = StepBench(preset, config)
    device = bench.device
    result = {"preset": preset, "dtype": config["dtype_name"], "compile_backend": config["compile_backend"]}
    with deadline(end - time.perf_counter()):
        result["loss_parity"] = bench.loss_parity(min(8, config["batch_sizes"][-1]))
    release_memory(device)

    def try_step(size):
        run = bench.step_function("ours", False, False)
        batch = bench.batch(size)
        try:
            run(batch)
            run(batch)
        finally:
            del run, batch
            bench.model.zero_grad(set_to_none=True)  # an out-of-memory backward leaves some gradients behind
            release_memory(device)

    with deadline(end - time.perf_counter()):
        batch_size, attempts = find_batch_size(try_step, config["batch_sizes"])
    result["batch_attempts"] = attempts
    if batch_size is None:
        result["status"] = "FAIL: even the smallest batch runs out of memory"
        return result
    result["batch_size"] = batch_size
    batch = bench.batch(batch_size)
    num_blocks, num_target = batch["target_indices"].shape[1:]
    flops = step_flops(bench.model_config, batch_size, batch["context_indices"].size(1), num_blocks, num_target)
    result.update(
        num_context=batch["context_indices"].size(1), num_target=num_target, gflop_per_step=flops["step"] / 1e9
    )
    rows = []
    for implementation, compiled, checkpointing in STEP_VARIANTS:
        name = f"{implementation}, {'compiled per layer' if compiled else 'eager'}"
        name += ", checkpointing" if checkpointing else ""
        row = {"variant": name}
        try:
            with deadline(end - time.perf_counter()):
                run = bench.step_function(implementation, compiled, checkpointing)
                row.update(measure_step(run, batch, config["warmup"], config["steps"], device))
                row["sdpa_kernels"] = detect_sdpa_kernels(lambda: (run(batch), synchronize(device)))
            # The authors' attention is an explicit matmul + softmax: no SDPA kernel to check there.
            row["sdpa"] = sdpa_verdict(row["sdpa_kernels"]) if implementation == "ours" else "ok"
            if implementation == "reference" and not row["sdpa_kernels"]:
                row["sdpa_kernels"] = ["none (explicit matmul + softmax, as the authors)"]
            row["images_per_second"] = batch_size / row["step_seconds"]
            achieved = flops["step"] / row["step_seconds"]
            row["achieved_tflops"] = achieved / 1e12
            row["mfu_measured_peak"] = achieved / peaks["measured"] if peaks.get("measured") else None
            row["mfu_datasheet_peak"] = achieved / peaks["datasheet"] if peaks.get("datasheet") else None
            row["status"] = "ok" if row["sdpa"] == "ok" else row["sdpa"]
        except BudgetExceeded as error:
            row["status"] = f"skipped: budget ({error})"
        except Exception as error:  # noqa: BLE001 - one variant failing must not lose the others
            row["status"] = "out of memory" if is_out_of_memory(error) else f"FAIL: {type(error).__name__}: {error}"
            row["traceback"] = traceback.format_exc(limit=6)
        finally:
            run = None
            set_checkpointing(bench.model, False)
            compile_layers(bench.model, None)
            release_memory(device)
        rows.append(row)
    result["variants"] = rows
    failures = [r["variant"] for r in rows if r["status"].startswith("FAIL")]
    result["status"] = "FAIL: " + ", ".join(failures) if failures else result["loss_parity"]["status"]
    bench.model = None
    release_memory(device)
    return result


def section_step(config: dict, budget: float, peaks: dict) -> tuple[dict, str]:
    start = time.perf_counter()
    models, markdown = {}, ""
    # ViT-H gets the larger part of the section; each model's share ends at a fixed time.
    weights = [1.0 if "huge" not in preset else 2.0 for preset in config["models"]]
    end = start
    for preset, weight in zip(config["models"], weights):
        end += budget * weight / sum(weights)
        try:
            models[preset] = step_one_model(preset, config, peaks, end)
        except BudgetExceeded as error:
            models[preset] = {"preset": preset, "status": f"skipped: budget ({error})"}
        except Exception as error:  # noqa: BLE001
            models[preset] = {"preset": preset, "status": f"FAIL: {type(error).__name__}: {error}"}
            models[preset]["traceback"] = traceback.format_exc(limit=8)
        release_memory(torch.device(config["device"]))
        m = models[preset]
        markdown += f"### {preset}\n\n"
        if "loss_parity" in m:
            p = m["loss_parity"]
            markdown += (
                f"fp32 loss parity (batch {p['batch']}): ours {p['ours']:.6f}, reference {p['reference']:.6f}, "
                f"|diff| {p['difference']:.1e} (tolerance {p['tolerance']:g}): {p['status']}\n\n"
            )
        if "batch_size" in m:
            markdown += (
                f"batch {m['batch_size']} ({'; '.join(m['batch_attempts'])}); {m['num_context']} context tokens, "
                f"{m['num_target']} per target block; {m['gflop_per_step']:,.0f} GFLOP/step\n\n"
            )
        rows = [
            [
                r["variant"],
                r.get("images_per_second"),
                None if "step_seconds" not in r else 1e3 * r["step_seconds"],
                r.get("warmup_seconds"),
                r.get("achieved_tflops"),
                r.get("mfu_measured_peak"),
                r.get("mfu_datasheet_peak"),
                r.get("peak_memory_gib"),
                ", ".join(r.get("sdpa_kernels", [])) or None,
                r["status"],
            ]
            for r in m.get("variants", [])
        ]
        header = ["variant", "img/s", "ms/step", "warm-up s", "TFLOP/s", "MFU (measured)", "MFU (datasheet)"]
        markdown += table(header + ["peak GiB", "SDPA", "status"], rows) if rows else f"{m['status']}\n"
        markdown += "\n"
    statuses = [m["status"] for m in models.values()]
    status = next((s for s in statuses if s.startswith("FAIL")), None) or (
        "ok" if all(s == "ok" for s in statuses) else "; ".join(statuses)
    )
    return {"status": status, "models": models}, markdown


# ------------------------------------------------------------------------------------------------------------------
# context handling
# ------------------------------------------------------------------------------------------------------------------
CONTEXT_MODES = (
    ("official truncation", {"context_truncation": "first"}, False),
    ("official truncation, token buckets", {"context_truncation": "first"}, True),
    ("full contexts, padded (mask)", {"context_truncation": "none", "padded_attention": "mask"}, False),
    ("full contexts, nested", {"context_truncation": "none", "padded_attention": "nested"}, False),
)


def section_context(config: dict, budget: float) -> tuple[dict, str]:
    from benchmarks.benchmark_step import EMA_MOMENTUM, our_optimizer
    from modeling_ijepa import IJepaConfig, IJepaForPreTraining
    from modeling_ijepa.data import TokenBuckets
    from modeling_ijepa.masking import MultiBlockMaskSampler

    device = torch.device(config["device"])
    end = time.perf_counter() + budget
    batch_size = config["context_batch"]
    bf16 = config["dtype"] == torch.bfloat16
    rows = []
    for name, overrides, bucketed in CONTEXT_MODES:
        row = {"mode": name}
        try:
            with deadline(end - time.perf_counter()):
                torch.manual_seed(0)
                model_config = IJepaConfig.from_preset(config["context_model"], **overrides)
                model = IJepaForPreTraining(model_config).to(device).train()
                sampler = MultiBlockMaskSampler.from_config(model_config, seed=0)
                context_indices, target_indices = sampler.sample_masks(batch_size, sampler.next_generator())
                batch = {"context_indices": context_indices, "target_indices": target_indices}
                if bucketed:
                    buckets = TokenBuckets.from_sampler(sampler, batch_size, num_draws=64)
                    batch = buckets.pad(context_indices, target_indices)
                    row["buckets"] = repr(buckets)
                real = (batch["context_indices"] >= 0).sum(dim=1).float()
                row["context_tokens_mean"] = float(real.mean())
                row["context_tokens_padded"] = batch["context_indices"].size(1)
                batch = {key: value.to(device) for key, value in batch.items()}
                c = model_config
                batch["pixel_values"] = torch.randn(batch_size, 3, c.image_size, c.image_size, device=device)
                optimizer = our_optimizer(model, device)

                def run(batch=batch, model=model, optimizer=optimizer):
                    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
                        loss = model(**batch).loss
                    loss.backward()
                    optimizer.step()
                    optimizer.zero_grad(set_to_none=True)
                    model.update_target_encoder(EMA_MOMENTUM)
                    return float(loss.detach())

                row.update(measure_step(lambda _: run(), batch, config["warmup"], config["steps"], device))
                row["images_per_second"] = batch_size / row["step_seconds"]
                row["sdpa_kernels"] = detect_sdpa_kernels(lambda: (run(), synchronize(device)))
                row["status"] = sdpa_verdict(row["sdpa_kernels"])
        except BudgetExceeded as error:
            row["status"] = f"skipped: budget ({error})"
        except Exception as error:  # noqa: BLE001
            row["status"] = "out of memory" if is_out_of_memory(error) else f"FAIL: {type(error).__name__}: {error}"
            row["traceback"] = traceback.format_exc(limit=6)
        model = optimizer = batch = run = None
        release_memory(device)
        rows.append(row)
    base = rows[0].get("images_per_second")
    for row in rows:
        if base and row.get("images_per_second"):
            row["speed_vs_official"] = row["images_per_second"] / base
    failures = [r["mode"] for r in rows if r["status"].startswith("FAIL")]
    skipped = [r["mode"] for r in rows if r["status"].startswith("skipped")]
    status = "FAIL: " + ", ".join(failures) if failures else ("skipped: budget" if skipped else "ok")
    result = {
        "status": status,
        "preset": config["context_model"],
        "batch": batch_size,
        "dtype": config["dtype_name"],
        "modes": rows,
    }
    header = ["mode", "context tokens (mean real / padded)", "img/s", "x official", "ms/step", "SDPA", "status"]
    markdown = f"{config['context_model']}, batch {batch_size}, {config['dtype_name']}, eager\n\n" + table(
        header,
        [
            [
                r["mode"],
                f"{r['context_tokens_mean']:.1f} / {r['context_tokens_padded']}"
                if "context_tokens_mean" in r
                else None,
                r.get("images_per_second"),
                r.get("speed_vs_official"),
                None if "step_seconds" not in r else 1e3 * r["step_seconds"],
                ", ".join(r.get("sdpa_kernels", [])) or None,
                r["status"],
            ]
            for r in rows
        ],
    )
    return result, markdown


# ------------------------------------------------------------------------------------------------------------------
# data pipeline
# ------------------------------------------------------------------------------------------------------------------
def make_synthetic_jpegs(folder: Path, num_images: int, size: tuple[int, int], num_classes: int = 4) -> list[Path]:
    """
    `num_images` ImageNet-like JPEGs (`size` = width x height, quality 90) in `folder/class_<k>/`: smooth random
    colour fields (upsampled low-resolution noise) with edges and fine noise, so they compress like photographs
    rather than like flat colour or white noise.
    """
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    width, height = size
    paths = []
    for index in range(num_images):
        coarse = rng.uniform(0, 255, (rng.integers(4, 12), rng.integers(4, 12), 3)).astype(np.uint8)
        image = Image.fromarray(coarse).resize((width, height), Image.BICUBIC)
        pixels = np.asarray(image).astype(np.float32)
        rows = slice(int(rng.integers(0, height // 2)), int(rng.integers(height // 2, height)))
        pixels[rows, : int(rng.integers(1, width)), :] *= rng.uniform(0.5, 1.0)  # a hard edge
        pixels += rng.normal(0.0, 6.0, pixels.shape)
        path = folder / f"class_{index % num_classes}" / f"image_{index:05d}.jpg"
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8)).save(path, "JPEG", quality=90)
        paths.append(path)
    return paths


class _Files(torch.utils.data.Dataset):
    """The rows the pre-training collator reads: `{"image": {"bytes": None, "path": ...}}`, as `datasets` gives."""

    def __init__(self, paths: list[Path]):
        self.paths = [str(p) for p in paths]

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int) -> dict:
        return {"image": {"bytes": None, "path": self.paths[index]}}


def loader_rate(dataset, collator, batch_size: int, workers: int, seconds: float) -> tuple[float, int]:
    """Images/s of a DataLoader (persistent workers, pinned memory) after one warm-up pass of the workers."""
    loader = torch.utils.data.DataLoader(
        dataset,
        batch_size=batch_size,
        shuffle=True,
        drop_last=True,
        num_workers=workers,
        collate_fn=collator,
        pin_memory=torch.cuda.is_available(),
        persistent_workers=True,
        prefetch_factor=4,
    )
    iterator = iter(loader)
    for _ in range(workers):  # each worker's first batch: start-up and imports
        next(iterator)
    count, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds or count == 0:
        try:
            batch = next(iterator)
        except StopIteration:
            iterator = iter(loader)
            continue
        count += batch["pixel_values"].size(0)
    rate = count / (time.perf_counter() - start)
    del iterator, loader
    return rate, count


def section_data(config: dict, budget: float, step_rates: dict, folder: Path) -> tuple[dict, str]:
    from modeling_ijepa import IJepaConfig
    from modeling_ijepa.data import IJepaPretrainingCollator, default_image_processor
    from modeling_ijepa.masking import MultiBlockMaskSampler

    end = time.perf_counter() + budget
    with deadline(end - time.perf_counter()):
        start = time.perf_counter()
        paths = make_synthetic_jpegs(folder, config["data_images"], config["data_size"])
        made = time.perf_counter() - start
    preset = config["models"][-1] if not config["e2e_preset"].startswith("vit_micro") else config["e2e_preset"]
    model_config = IJepaConfig.from_preset(preset)
    sampler = MultiBlockMaskSampler.from_config(model_config, seed=0)
    collator = IJepaPretrainingCollator(sampler, default_image_processor(model_config.image_size), output_uint8=True)
    dataset = _Files(paths)
    rows = []
    for position, workers in enumerate(config["data_workers"]):
        row = {"workers": workers}
        left = end - time.perf_counter()
        # What is left, shared by the configurations still to measure (start-up of the workers included).
        seconds = min(config["data_seconds"], left / (len(config["data_workers"]) - position) / 2)
        try:
            with deadline(left):
                rate, count = loader_rate(dataset, collator, config["data_batch"], workers, seconds)
            row.update(images_per_second=rate, images=count, per_worker=rate / workers, status="ok")
        except BudgetExceeded as error:
            row["status"] = f"skipped: budget ({error})"
        except Exception as error:  # noqa: BLE001
            row["status"] = f"FAIL: {type(error).__name__}: {error}"
        rows.append(row)
    measured = [r for r in rows if r["status"] == "ok"]
    per_worker = max((r["per_worker"] for r in measured), default=None)
    # The single-worker rate is the cost of one worker; more workers only show how that scales on this host.
    single = next((r["per_worker"] for r in measured if r["workers"] == 1), per_worker)
    needed = {
        name: math.ceil(rate / single) if single else None for name, rate in step_rates.items() if rate is not None
    }
    result = {
        "status": "ok" if measured else "FAIL: no DataLoader measured",
        "images": len(paths),
        "image_size": list(config["data_size"]),
        "made_in_seconds": made,
        "crop_size": model_config.image_size,
        "batch": config["data_batch"],
        "loaders": rows,
        "images_per_second_per_worker": single,
        "workers_needed": needed,
    }
    markdown = (
        f"{len(paths)} generated {config['data_size'][0]}x{config['data_size'][1]} JPEGs, "
        f"{model_config.image_size}-px crops, batch {config['data_batch']}, uint8 out, pinned memory\n\n"
        + table(
            ["workers", "img/s", "img/s per worker", "status"],
            [[r["workers"], r.get("images_per_second"), r.get("per_worker"), r["status"]] for r in rows],
        )
        + "\nworkers one GPU needs at the step rate (1-worker rate): "
        + (", ".join(f"{name}: {n}" for name, n in needed.items()) or "no step rate measured")
        + "\n"
    )
    return result, markdown


# ------------------------------------------------------------------------------------------------------------------
# end to end: pretrain.py
# ------------------------------------------------------------------------------------------------------------------
def e2e_worker(argv: list[str], result_path: Path, warmup_steps: int) -> None:
    """Run `pretrain.main(argv)` with a timing callback and a DataLoader whose waits are timed; write the timings."""
    from transformers import TrainerCallback

    from training_scripts import pretrain

    marks: list[float] = []
    waits: list[float] = []

    class _Marks(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            synchronize(args.device)
            marks.append(time.perf_counter())

    class _TimedIterator:
        def __init__(self, iterator):
            self.iterator = iterator

        def __iter__(self):
            return self

        def __next__(self):
            start = time.perf_counter()
            try:
                return next(self.iterator)
            finally:
                waits.append(time.perf_counter() - start)

    class _TimedLoader:
        """Forwards everything to the prepared DataLoader; times each `next` (the loop's wait for a batch)."""

        def __init__(self, loader):
            self.__dict__["_loader"] = loader

        def __iter__(self):
            return _TimedIterator(iter(self._loader))

        def __len__(self):
            return len(self._loader)

        def __getattr__(self, name):
            return getattr(self._loader, name)

        def __setattr__(self, name, value):
            setattr(self._loader, name, value)

    class TimedTrainer(pretrain.IJepaTrainer):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            self.add_callback(_Marks())

        def get_train_dataloader(self):
            return _TimedLoader(super().get_train_dataloader())

    pretrain.IJepaTrainer = TimedTrainer
    start = time.perf_counter()
    output_dir = pretrain.main(argv)
    total = time.perf_counter() - start
    steady = marks[warmup_steps:]
    # waits[i] precedes step i (one micro-batch per step: no gradient accumulation here)
    steady_waits = waits[warmup_steps + 1 : len(marks)]
    span = steady[-1] - steady[0] if len(steady) > 1 else float("nan")
    result = {
        "output_dir": output_dir,
        "wall_seconds": total,
        "steps": len(marks),
        "steady_steps": max(len(steady) - 1, 0),
        "steady_seconds": span,
        "steady_step_seconds": span / (len(steady) - 1) if len(steady) > 1 else None,
        "data_wait_seconds": sum(steady_waits),
        "data_wait_share": sum(steady_waits) / span if len(steady) > 1 and span > 0 else None,
        "first_steps_seconds": (marks[warmup_steps - 1] - start) if len(marks) >= warmup_steps else None,
    }
    result_path.write_text(json.dumps(result), encoding="utf-8")


def section_end_to_end(config: dict, budget: float, args, folder: Path, isolated: dict) -> tuple[dict, str]:
    output = Path(args.output_dir) / "end_to_end"
    steps = args.e2e_steps
    warmup = min(10, max(1, steps // 5))
    pretrain_args = [
        "--config",
        "in1k-vith14-ep300",
        "--model_preset",
        config["e2e_preset"],
        "--train_dir",
        str(folder),
        "--dataset_name",
        "",
        "--streaming",
        "false",
        "--output_dir",
        str(output),
        "--max_steps",
        str(steps),
        "--warmup_steps",
        "5",
        "--per_device_train_batch_size",
        str(config["e2e_batch"]),
        "--dataloader_num_workers",
        str(config["e2e_workers"]),
        "--dataloader_pin_memory",
        "true",
        "--torch_compile",
        "true",
        "--save_strategy",
        "no",
        "--eval_strategy",
        "no",
        "--load_best_model_at_end",
        "false",
        "--logging_steps",
        str(max(1, min(5, steps // 2))),
    ]
    if args.smoke:
        pretrain_args += ["--bf16", "false", "--use_cpu", "true", "--torch_compile_backend", "eager"]
    result_path = Path(args.output_dir) / "end_to_end_timing.json"
    result_path.unlink(missing_ok=True)
    command = [sys.executable, "-m", "benchmarks.gpu_check", "--e2e_worker", str(result_path), "--warmup", str(warmup)]
    command += ["--", *pretrain_args]
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])))
    start = time.perf_counter()
    log_path = Path(args.output_dir) / "end_to_end.log"
    try:
        with open(log_path, "w", encoding="utf-8") as log:
            done = subprocess.run(command, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT, timeout=budget)
        returncode = done.returncode
    except subprocess.TimeoutExpired:
        returncode = None
    seconds = time.perf_counter() - start
    log_text = log_path.read_text(encoding="utf-8", errors="replace")
    result = {"command": "python training_scripts/pretrain.py " + " ".join(pretrain_args), "seconds_total": seconds}
    if returncode is None:
        result["status"] = f"skipped: budget (pretrain.py ran past {budget:.0f} s; see end_to_end.log)"
    elif returncode != 0 or not result_path.exists():
        result["status"] = f"FAIL: pretrain.py exited {returncode}"
        result["log_tail"] = log_text.splitlines()[-25:]
    else:
        timing = json.loads(result_path.read_text())
        result.update(timing)
        batch = config["e2e_batch"]
        if timing.get("steady_step_seconds"):
            result["steady_images_per_second"] = batch / timing["steady_step_seconds"]
        state_path = output / "trainer_state.json"
        if state_path.exists():
            state = json.loads(state_path.read_text())
            history = state.get("log_history", [])
            summary = next((e for e in reversed(history) if "train_runtime" in e), {})
            losses = [e["loss"] for e in history if "loss" in e]
            result["trainer_state"] = {
                "global_step": state.get("global_step"),
                "train_runtime": summary.get("train_runtime"),
                "train_samples_per_second": summary.get("train_samples_per_second"),
                "first_loss": losses[0] if losses else None,
                "last_loss": losses[-1] if losses else None,
                "context_tokens": [e.get("context_tokens") for e in history if "context_tokens" in e][-1:],
            }
        reference = isolated.get(config["e2e_preset"])
        if reference and result.get("steady_images_per_second"):
            result["isolated_images_per_second"] = reference
            result["vs_isolated_step"] = result["steady_images_per_second"] / reference
        compile_lines = [line for line in log_text.splitlines() if "torch.compile" in line]
        result["compile_log"] = compile_lines[-3:]
        finite = all(math.isfinite(x) for x in losses) if state_path.exists() and losses else False
        result["status"] = "ok" if finite else "FAIL: no finite loss logged"
    markdown = f"`{result['command']}`\n\n" + table(
        ["", "value"],
        [
            [key, value]
            for key, value in result.items()
            if key not in ("command", "log_tail", "output_dir", "compile_log", "trainer_state")
        ]
        + [[f"trainer_state {k}", v] for k, v in result.get("trainer_state", {}).items()]
        + [["compile log", line] for line in result.get("compile_log", [])],
    )
    return result, markdown


# ------------------------------------------------------------------------------------------------------------------
# main
# ------------------------------------------------------------------------------------------------------------------
def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output_dir", required=False, help="where gpu_check.json / gpu_check.md are written")
    parser.add_argument("--smoke", action="store_true", help="CPU, micro preset, fp32, dynamo 'eager' backend")
    parser.add_argument("--budget_s", type=float, default=None, help="total time of the sections (420 s; smoke 240)")
    parser.add_argument("--sections", nargs="+", choices=list(SECTION_SHARES), default=list(SECTION_SHARES))
    parser.add_argument("--e2e_preset", default="vit_base_patch16_224", help="model of the end-to-end run")
    parser.add_argument("--e2e_steps", type=int, default=None, help="pretrain.py steps (50; smoke 6)")
    parser.add_argument("--e2e_worker", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--warmup", type=int, default=10, help=argparse.SUPPRESS)
    args, rest = parser.parse_known_args(argv)
    if args.e2e_worker:
        return args, rest
    if rest:
        parser.error(f"unrecognised arguments: {' '.join(rest)}")
    if not args.output_dir:
        parser.error("--output_dir is required")
    if not args.smoke and not torch.cuda.is_available():
        parser.error("no CUDA device: run on a GPU, or pass --smoke for the CPU smoke run")
    # Smoke: a generous ceiling (an idle 2-core machine needs ~30 s); the deadlines only stop a run going astray.
    args.budget_s = args.budget_s or (240.0 if args.smoke else 420.0)
    args.e2e_steps = args.e2e_steps or (4 if args.smoke else 50)
    return args, rest


def main(argv=None) -> int:
    args, rest = parse_args(argv)
    if args.e2e_worker:
        e2e_worker([a for a in rest if a != "--"], Path(args.e2e_worker), args.warmup)
        return 0
    config = settings(args)
    if args.smoke:  # one thread: tiny tensors gain nothing from more, and a shared CPU makes them slower
        torch.set_num_threads(1)
    started = time.perf_counter()
    report = Report(
        Path(args.output_dir),
        {
            "mode": "smoke (CPU, tiny sizes)" if args.smoke else "full",
            "started": time.strftime("%Y-%m-%d %H:%M:%S"),
            "budget_s": args.budget_s,
            "dtype": config["dtype_name"],
            "compile_backend": config["compile_backend"],
            "command": " ".join(["python -m benchmarks.gpu_check", *(argv if argv is not None else sys.argv[1:])]),
        },
    )
    shares = {name: SECTION_SHARES[name] for name in args.sections}
    scale = args.budget_s / sum(shares.values())
    peaks: dict = {}
    step_rates: dict = {}
    isolated: dict = {}
    work = Path(tempfile.mkdtemp(prefix="gpu-check-"))
    folder = work / "jpegs"
    for name in args.sections:
        budget = shares[name] * scale
        start = time.perf_counter()
        try:
            if name == "environment":
                result, markdown = section_environment(config, budget)
                peaks = {"measured": result["measured_peak_tflops"] * 1e12}
                if result.get("datasheet_peak_tflops"):
                    peaks["datasheet"] = result["datasheet_peak_tflops"] * 1e12
            elif name == "step":
                result, markdown = section_step(config, budget, peaks)
                for preset, m in result["models"].items():
                    rates = [
                        r.get("images_per_second") for r in m.get("variants", []) if r["variant"].startswith("ours")
                    ]
                    rates = [r for r in rates if r]
                    step_rates[preset] = max(rates) if rates else None
                    isolated[preset] = step_rates[preset]
            elif name == "context":
                result, markdown = section_context(config, budget)
            elif name == "data":
                result, markdown = section_data(config, budget, step_rates, folder)
            else:
                if not folder.exists():
                    make_synthetic_jpegs(folder, config["data_images"], config["data_size"])
                result, markdown = section_end_to_end(config, budget, args, folder, isolated)
        except BudgetExceeded as error:
            result, markdown = {"status": f"skipped: budget ({error})"}, f"skipped: budget ({error})\n"
        except Exception as error:  # noqa: BLE001 - a failed section is recorded; the next one still runs
            result = {"status": f"FAIL: {type(error).__name__}: {error}", "traceback": traceback.format_exc()}
            markdown = f"FAIL: {type(error).__name__}: {error}\n\n```\n{traceback.format_exc(limit=8)}```\n"
        result["seconds"] = time.perf_counter() - start
        result["budget_s"] = budget
        report.add(name, result, markdown)
    total = time.perf_counter() - started
    report.data["meta"]["seconds"] = total
    report.add("summary", {"status": "done", "seconds": total}, _summary(report.data["sections"]))
    return 0


def _summary(sections: dict) -> str:
    rows = [[name, s.get("status"), s.get("seconds"), s.get("budget_s")] for name, s in sections.items()]
    return table(["section", "status", "seconds", "budget s"], rows)


if __name__ == "__main__":
    sys.exit(main())
