"""Time one I-JEPA pre-training step of this package against a re-statement of the authors' implementation.

A step is: target-encoder forward (no grad), context-encoder forward on the context tokens, predictor, smooth-L1 loss,
backward, AdamW step and EMA update of the target encoder. For each model preset the script builds
`IJepaForPreTraining`, copies its weights into the reference of `reference_ijepa.py`, checks that both give the same
fp32 loss on the same batch and masks, then times warm-up + repeated steps of both in the same process (interleaved)
and prints images/s, ms/step, peak memory and model FLOP utilisation (MFU): analytic matmul FLOPs per step divided by
the step time and by the peak FLOP/s of a large matmul of the same dtype, measured around every timed step. Speed
ratios are paired: the median over rounds of the ratio of two steps timed back to back in the same round. The mask
collators are timed too.

Ours runs as a user would run it: SDPA attention (the model itself takes matmul + softmax for bf16 on CPU), fused
AdamW (on CPU too: torch's CPU `foreach` AdamW is a per-tensor loop, ~8x slower than the fused kernel for ViT-B),
foreach EMA, optional bf16 autocast and `torch.compile`.

Example:

    python -m benchmarks.benchmark_step --device cpu         # or: python benchmarks/benchmark_step.py ...
    python -m benchmarks.benchmark_step --device cuda --models vit_base_patch16_224 --batch_size 128 --dtype bf16
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import os
import statistics
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path


os.environ.setdefault("HF_HUB_OFFLINE", "1")
# Idle OpenMP threads sleep instead of spinning (set before torch starts its thread pool). On a machine shared with
# other processes, a spinning thread that gets descheduled stalls every parallel region: steps ran up to 20x slower.
# Export OMP_WAIT_POLICY=ACTIVE to measure with spinning threads.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import torch  # noqa: E402


if not __package__:  # run as a file: import `benchmarks` / `training_scripts` from the repository root, as -m does
    sys.path[0] = str(Path(__file__).resolve().parents[1])

from benchmarks.reference_ijepa import (  # noqa: E402
    ReferenceMaskCollator,
    official_masks,
    reference_from_ours,
    reference_loss,
    reference_optimizer,
    reference_train_step,
)
from modeling_ijepa import IJepaConfig, IJepaForPreTraining, hardware  # noqa: E402
from modeling_ijepa.masking import MultiBlockMaskSampler  # noqa: E402
from modeling_ijepa.optimization import ijepa_optimizer  # noqa: E402


DEFAULT_MODELS = ("vit_tiny_patch16_224", "vit_small_patch16_224", "vit_base_patch16_224")
SHORT_NAMES = {"vit-t": "vit_tiny_patch16_224", "vit-s": "vit_small_patch16_224", "vit-b": "vit_base_patch16_224"}
LOSS_TOLERANCE = 1e-4
EMA_MOMENTUM = 0.996
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


# ---------------------------------------------------------------------------------------------------------------------
# FLOPs: matmuls only, 2 * M * N * K each; training = 3x forward for the trained parts, 1x for the target encoder.
# ---------------------------------------------------------------------------------------------------------------------
def transformer_flops(num_sequences: int, length: int, width: int, depth: int, mlp_width: int) -> int:
    """Forward matmul FLOPs of `depth` ViT blocks on `num_sequences` sequences of `length` tokens."""
    tokens = num_sequences * length
    projections = 2 * tokens * width * (3 * width + width + 2 * mlp_width)  # qkv, out, fc1, fc2
    attention = 2 * 2 * num_sequences * length * length * width  # q @ k^T and attn @ v over all heads
    return depth * (projections + attention)


def step_flops(
    config: IJepaConfig, batch_size: int, num_context: int, num_blocks: int, num_target: int
) -> dict[str, int]:
    """
    Analytic matmul FLOPs of one training step, for the tokens the step actually processes: the target encoder on all
    patches (forward only), the context encoder on `num_context` tokens and the predictor on
    `batch_size * num_blocks` sequences of `num_context + num_target` tokens (forward + backward = 3x forward).
    """
    num_patches = config.num_patches
    patch_dim = config.num_channels * config.patch_size**2
    patch_embedding = 2 * batch_size * num_patches * patch_dim * config.hidden_size
    target = patch_embedding + transformer_flops(
        batch_size, num_patches, config.hidden_size, config.num_hidden_layers, config.intermediate_size
    )
    context = patch_embedding + transformer_flops(
        batch_size, num_context, config.hidden_size, config.num_hidden_layers, config.intermediate_size
    )
    predictor = (
        2 * batch_size * num_context * config.hidden_size * config.predictor_hidden_size
        + transformer_flops(
            batch_size * num_blocks,
            num_context + num_target,
            config.predictor_hidden_size,
            config.predictor_num_hidden_layers,
            config.predictor_intermediate_size,
        )
        + 2 * batch_size * num_blocks * num_target * config.predictor_hidden_size * config.hidden_size
    )
    return {"target": target, "context": context, "predictor": predictor, "step": target + 3 * (context + predictor)}


# ---------------------------------------------------------------------------------------------------------------------
# Timing and memory helpers
# ---------------------------------------------------------------------------------------------------------------------
def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def matmul_peak(device: torch.device, dtype: torch.dtype, size: int, repeats: int = 5) -> float:
    """Best FLOP/s of a `size x size x size` matmul in `dtype`."""
    a = torch.randn(size, size, device=device, dtype=dtype)
    b = torch.randn(size, size, device=device, dtype=dtype)
    for _ in range(2):
        a @ b
    best = float("inf")
    for _ in range(repeats):
        synchronize(device)
        start = time.perf_counter()
        a @ b
        synchronize(device)
        best = min(best, time.perf_counter() - start)
    return 2 * size**3 / best


class MemoryMeter:
    """Peak memory added during a step: the CUDA allocator's peak, or on CPU the peak RSS (VmHWM, reset per step)."""

    def __init__(self, device: torch.device):
        self.device = device
        self._libc = None
        self.available = device.type == "cuda"
        if device.type == "cpu":
            try:
                with open("/proc/self/clear_refs", "w") as handle:
                    handle.write("5")
                self._libc = ctypes.CDLL("libc.so.6")
                self.available = True
            except OSError:
                self.available = False

    @staticmethod
    def _status_kib(key: str) -> int:
        with open("/proc/self/status") as handle:
            for line in handle:
                if line.startswith(key):
                    return int(line.split()[1])
        raise KeyError(key)

    def start(self) -> None:
        if not self.available:
            return
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self._base = torch.cuda.memory_allocated(self.device)
        else:
            gc.collect()
            self._libc.malloc_trim(0)  # hand freed memory back, so that RSS measures live memory
            with open("/proc/self/clear_refs", "w") as handle:
                handle.write("5")
            self._base = self._status_kib("VmRSS") * 1024

    def stop(self) -> int | None:
        """Bytes above the start level at the peak, or None where it cannot be measured."""
        if not self.available:
            return None
        if self.device.type == "cuda":
            return torch.cuda.max_memory_allocated(self.device) - self._base
        return self._status_kib("VmHWM") * 1024 - self._base


def state_bytes(modules: list[torch.nn.Module], optimizer: torch.optim.Optimizer) -> int:
    """Parameters, buffers and optimiser state."""
    total = sum(t.numel() * t.element_size() for m in modules for t in list(m.parameters()) + list(m.buffers()))
    for state in optimizer.state.values():
        total += sum(v.numel() * v.element_size() for v in state.values() if torch.is_tensor(v))
    return total


# ---------------------------------------------------------------------------------------------------------------------
# The two implementations
# ---------------------------------------------------------------------------------------------------------------------
def our_optimizer(model: IJepaForPreTraining, device: torch.device, lr: float = 1e-3, weight_decay: float = 0.04):
    """The optimiser `IJepaTrainer` builds: AdamW over encoder + predictor, no decay on biases and 1-D parameters."""
    return ijepa_optimizer(model, device_type=device.type, lr=lr, weight_decay=weight_decay)


def our_train_step(model, forward, optimizer, batch: dict, momentum: float, bf16: bool) -> float:
    """Loss (optionally under bf16 autocast), backward, AdamW step, EMA update with foreach kernels."""
    with torch.autocast(batch["pixel_values"].device.type, dtype=torch.bfloat16, enabled=bf16):
        loss = forward(batch["pixel_values"], batch["context_indices"], batch["target_indices"]).loss
    loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    model.update_target_encoder(momentum)
    return float(loss.detach())


@dataclass
class Timing:
    """Repeated timings of one implementation in one dtype, with the matmul peak measured around every step."""

    model: str
    implementation: str
    dtype: str
    batch_size: int
    flops: int
    step_seconds: list[float] = field(default_factory=list)
    peak_samples: list[float] = field(default_factory=list)
    peak_bytes: int | None = None

    @property
    def seconds(self) -> float:
        return statistics.median(self.step_seconds)

    @property
    def images_per_second(self) -> float:
        return self.batch_size / self.seconds

    @property
    def achieved_flops(self) -> float:
        return self.flops / self.seconds

    @property
    def peak_flops(self) -> float:
        return statistics.median(self.peak_samples)

    @property
    def mfu(self) -> float:
        return self.achieved_flops / self.peak_flops


def paired_speedup(slower: Timing, faster: Timing) -> str:
    """
    How much faster `faster` ran than `slower`, paired by round: each round times both back to back, so the ratio
    within a round cancels the slow drifts of a shared machine's speed. The median over rounds, with the range.
    """
    ratios = sorted(s / f for s, f in zip(slower.step_seconds, faster.step_seconds))
    return f"{statistics.median(ratios):.2f}x (rounds {ratios[0]:.2f}-{ratios[-1]:.2f})"


def time_step(run_step, timing: Timing, device: torch.device, peak_size: int) -> None:
    """
    Time one call of `run_step` and record the matmul peak of the step's dtype just before and just after it (the
    higher of the two: other processes sharing the machine change the attainable FLOP/s from minute to minute, and the
    MFU must be measured against the same conditions).
    """
    dtype = DTYPES[timing.dtype]
    peak_before = matmul_peak(device, dtype, peak_size, repeats=3)
    synchronize(device)
    start = time.perf_counter()
    run_step()
    synchronize(device)
    timing.step_seconds.append(time.perf_counter() - start)
    timing.peak_samples.append(max(peak_before, matmul_peak(device, dtype, peak_size, repeats=3)))


def measure_memory(run_step, timing: Timing, meter: MemoryMeter, state: int) -> None:
    """
    Record the peak memory of one untimed call of `run_step`: `state` bytes (parameters, buffers, optimiser state) plus
    what the step added. Kept out of the timed steps because on CPU the meter first hands freed memory back to the
    system (so that the resident size measures live memory), and the step after that re-faults every page it touches.
    """
    meter.start()
    run_step()
    added = meter.stop()
    if added is not None:
        timing.peak_bytes = state + added


def benchmark_model(name: str, args, device: torch.device) -> tuple[list[Timing], dict]:
    """Check the reference against ours, then time both for every requested dtype. Returns timings and check info."""
    torch.manual_seed(args.seed)
    config = IJepaConfig.from_preset(name, attn_implementation="sdpa")
    model = IJepaForPreTraining(config).to(device).train()
    reference = reference_from_ours(model)
    for module in (reference.encoder, reference.predictor, reference.target_encoder):
        module.train()

    collator = MultiBlockMaskSampler.from_config(config, seed=args.seed)
    context_indices, target_indices = collator.sample_masks(args.batch_size, collator.next_generator())
    generator = torch.Generator().manual_seed(args.seed)
    image_shape = (args.batch_size, config.num_channels, config.image_size, config.image_size)
    pixel_values = torch.randn(image_shape, generator=generator)
    batch = {
        "pixel_values": pixel_values.to(device),
        "context_indices": context_indices.to(device),
        "target_indices": target_indices.to(device),
    }
    masks_enc, masks_pred = official_masks(batch["context_indices"], batch["target_indices"])
    num_blocks, num_target = target_indices.shape[1:]
    flops = step_flops(config, args.batch_size, context_indices.size(1), num_blocks, num_target)

    forward = torch.compile(model) if args.compile else model
    our_opt = our_optimizer(model, device)
    ref_opt = reference_optimizer(reference)

    def run_ours(bf16: bool) -> float:
        return our_train_step(model, forward, our_opt, batch, EMA_MOMENTUM, bf16)

    def run_reference(bf16: bool) -> float:
        images = batch["pixel_values"]
        return reference_train_step(reference, ref_opt, images, masks_enc, masks_pred, EMA_MOMENTUM, bf16)

    # Same weights, batch and masks: the fp32 losses must agree before anything is timed. The losses of the first
    # fp32 steps are computed before either optimiser has changed a weight, so they serve as the check.
    warmed_up = set()
    if "fp32" in args.dtypes and args.warmup > 0:
        our_loss, ref_loss = run_ours(False), run_reference(False)
        warmed_up = {("ours", "fp32"), ("reference", "fp32")}
    else:
        with torch.no_grad():
            our_loss = model(**batch).loss.item()
            ref_loss = reference_loss(reference, batch["pixel_values"], masks_enc, masks_pred).item()
    check = {"ours": our_loss, "reference": ref_loss, "difference": abs(our_loss - ref_loss)}
    if check["difference"] > LOSS_TOLERANCE:
        raise RuntimeError(f"{name}: reference loss {ref_loss:.6f} != ours {our_loss:.6f}; the comparison is invalid.")

    implementations = {"ours": run_ours, "reference": run_reference}
    states = {
        "ours": state_bytes([model], our_opt),
        "reference": state_bytes([reference.encoder, reference.predictor, reference.target_encoder], ref_opt),
    }
    runs = [
        (label, dtype)
        for dtype in args.dtypes
        for label in implementations
        if label == "ours" or dtype in args.reference_dtypes
    ]
    for label, dtype in runs:
        for _ in range(args.warmup - ((label, dtype) in warmed_up)):
            implementations[label](dtype == "bf16")
    timings = {(label, dtype): Timing(name, label, dtype, args.batch_size, flops["step"]) for label, dtype in runs}
    # Interleave the repetitions so that changes of the machine's speed hit every implementation and dtype alike.
    for _ in range(args.steps):
        for label, dtype in runs:
            run_step = implementations[label]
            time_step(lambda: run_step(dtype == "bf16"), timings[label, dtype], device, args.peak_size)
    meter = MemoryMeter(device)
    for label, dtype in runs:
        run_step = implementations[label]
        measure_memory(lambda: run_step(dtype == "bf16"), timings[label, dtype], meter, states[label])
    check["flops"] = flops
    check["num_context"] = context_indices.size(1)
    check["num_target"] = num_target
    return list(timings.values()), check


def benchmark_collators(config: IJepaConfig, batch_size: int, seconds: float, seed: int) -> dict[str, float]:
    """Batches per second of mask sampling alone: ours (vectorised) and the reference per-image loop."""
    ours = MultiBlockMaskSampler.from_config(config, seed=seed)
    reference = ReferenceMaskCollator.from_config(config)
    generator = torch.Generator().manual_seed(seed)
    samplers = {
        "ours": lambda: ours.sample_masks(batch_size, ours.next_generator()),
        "reference": lambda: reference.sample_masks(batch_size, generator),
    }
    rates = {}
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as in a DataLoader worker, where collators run
    for label, sample in samplers.items():
        sample()
        count, start = 0, time.perf_counter()
        while count < 5 or time.perf_counter() - start < seconds:
            sample()
            count += 1
        rates[label] = count / (time.perf_counter() - start)
    torch.set_num_threads(threads)
    return rates


# ---------------------------------------------------------------------------------------------------------------------
def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--models", nargs="+", default=list(DEFAULT_MODELS), help="presets, or vit-t / vit-s / vit-b")
    parser.add_argument(
        "--batch_size", type=int, default=None, help="images per step (default 16 on CPU, 128 on CUDA)"
    )
    parser.add_argument(
        "--steps",
        type=int,
        default=4,
        help="timed rounds; a round times every implementation and dtype once, back to back (medians shown)",
    )
    parser.add_argument("--warmup", type=int, default=1, help="untimed steps before timing, per dtype")
    parser.add_argument(
        "--dtype", choices=["fp32", "bf16", "both"], default="both", help="fp32, bf16 autocast, or both (fp32 first)"
    )
    parser.add_argument("--bf16", action="store_true", help="shorthand for --dtype bf16")
    parser.add_argument(
        "--reference_bf16", action="store_true", help="time the reference under bf16 autocast too (else fp32 only)"
    )
    parser.add_argument("--compile", action="store_true", help="torch.compile our model (compilation is in warm-up)")
    parser.add_argument("--collator_seconds", type=float, default=2.0, help="time spent on each mask collator")
    parser.add_argument(
        "--peak_size",
        type=int,
        default=None,
        help="side of the square matmul that measures the peak FLOP/s around each step (default 4096 CUDA, 1024 CPU)",
    )
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda, but torch sees no CUDA device.")
    if args.bf16:
        args.dtype = "bf16"
    args.dtypes = ["fp32", "bf16"] if args.dtype == "both" else [args.dtype]
    args.reference_dtypes = {"fp32", "bf16"} if args.reference_bf16 else {"fp32"}
    if args.batch_size is None:
        args.batch_size = 128 if args.device == "cuda" else 16
    if args.peak_size is None:
        args.peak_size = 4096 if args.device == "cuda" else 1024
    args.skipped = {}
    if args.device == "cpu" and "bf16" in args.dtypes:
        support = hardware.cpu_bf16_support()
        if not support.native:
            args.skipped["bf16"] = f"this CPU has no native bf16 ({support.describe()})"
            args.dtypes = [dtype for dtype in args.dtypes if dtype != "bf16"]
            if not args.dtypes:
                parser.error(f"--dtype bf16 cannot be measured: {args.skipped['bf16']}. Use --dtype fp32.")
    args.models = [SHORT_NAMES.get(name.lower(), name) for name in args.models]
    if args.steps < 1 or args.warmup < 0 or args.batch_size < 1:
        parser.error("--steps and --batch_size must be >= 1 and --warmup >= 0.")
    return args


def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as handle:
            for line in handle:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return "CPU"


def _mib(value: int | None) -> str:
    return "n/a" if value is None else f"{value / 2**20:,.0f}"


def main(argv=None) -> None:
    args = parse_args(argv)
    device = torch.device(args.device)
    started = time.perf_counter()
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
    else:
        name = f"{cpu_name()}, {torch.get_num_threads()} threads"
    print(
        f"torch {torch.__version__} on {name}; batch {args.batch_size}, {args.warmup} warm-up + {args.steps} timed "
        f"steps (median reported); OMP_WAIT_POLICY={os.environ['OMP_WAIT_POLICY']}; load average "
        f"{os.getloadavg()[0]:.1f}",
        flush=True,
    )

    for dtype, reason in args.skipped.items():
        print(f"{dtype} skipped: {reason}; it would make every step slower, not faster.", flush=True)
    size = args.peak_size
    startup_peaks = {dtype: matmul_peak(device, DTYPES[dtype], size) for dtype in args.dtypes}
    print(
        f"matmul peak at start ({size}^3): "
        + ", ".join(f"{dtype} {peak / 1e12:.3f} TFLOP/s" for dtype, peak in startup_peaks.items())
        + " (for information; each MFU uses the peak measured around its own steps)",
        flush=True,
    )
    timings = []
    for model_name in args.models:
        model_timings, check = benchmark_model(model_name, args, device)
        gc.collect()  # the model, the reference and their optimisers went out of scope with benchmark_model
        timings.extend(model_timings)
        print(
            f"{model_name}: fp32 loss ours {check['ours']:.6f} reference {check['reference']:.6f} "
            f"|diff| {check['difference']:.1e} (<= {LOSS_TOLERANCE:g}: same weights, batch and masks); "
            f"{check['num_context']} context tokens, {check['num_target']} per target block; "
            f"{check['flops']['step'] / 1e9:,.1f} GFLOP/step",
            flush=True,
        )

    header = (
        f"{'model':<22} {'impl':<9} {'dtype':<5} {'img/s':>7} {'ms/step':>9} {'peak MiB':>9} {'TFLOP/s':>8} "
        f"{'peak TFLOP/s':>12} {'MFU':>6}"
    )
    print()
    print(header)
    print("-" * len(header))
    for t in timings:
        print(
            f"{t.model:<22} {t.implementation:<9} {t.dtype:<5} {t.images_per_second:>7.2f} {t.seconds * 1e3:>9.0f} "
            f"{_mib(t.peak_bytes):>9} {t.achieved_flops / 1e12:>8.3f} {t.peak_flops / 1e12:>12.3f} {t.mfu:>6.1%}"
        )
    print(
        "ms/step: median of the timed steps; TFLOP/s: analytic matmul FLOPs per step / ms/step; peak TFLOP/s: median "
        "over the steps of the\nhigher of two matmul peaks of the same dtype measured just before and after each "
        "step; "
        "MFU = TFLOP/s / peak TFLOP/s;\npeak MiB: parameters, buffers and optimiser state plus the peak memory added "
        "during one more, untimed step."
    )

    print()
    by_key = {(t.model, t.implementation, t.dtype): t for t in timings}
    for model_name in args.models:
        parts = []
        for dtype in args.dtypes:
            ours, ref = by_key.get((model_name, "ours", dtype)), by_key.get((model_name, "reference", dtype))
            if ours and ref:
                parts.append(f"ours/reference speed {dtype} {paired_speedup(ref, ours)}")
        ours32, ours16 = by_key.get((model_name, "ours", "fp32")), by_key.get((model_name, "ours", "bf16"))
        if ours32 and ours16:
            parts.append(f"ours bf16/fp32 speed-up {paired_speedup(ours32, ours16)}")
        if ours32:
            parts.append(f"ours fp32 MFU {ours32.mfu:.1%}")
        print(f"{model_name}: " + "; ".join(parts))

    config = IJepaConfig.from_preset(args.models[0])
    rates = benchmark_collators(config, args.batch_size, args.collator_seconds, args.seed)
    print(
        f"\nmask collator (1 thread, as in a DataLoader worker), batch {args.batch_size}, "
        f"{config.grid_size[0]}x{config.grid_size[1]} grid: ours "
        f"{rates['ours']:,.1f} batches/s, reference per-image loop {rates['reference']:,.1f} batches/s "
        f"({rates['ours'] / rates['reference']:.1f}x)"
    )
    print(f"total time {time.perf_counter() - started:.0f} s; load average {os.getloadavg()[0]:.1f}")


if __name__ == "__main__":
    main()
