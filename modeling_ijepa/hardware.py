# Copyright 2026 The ijepa-hf Authors. All rights reserved.
# Licensed under the Apache License, Version 2.0.
"""What this machine's CPU can do in bf16, detected once per process.

bf16 on a CPU is fast only with native instructions (AVX-512-bf16 or AMX on x86). Elsewhere torch still runs bf16
matmuls, through reference kernels that were measured 50-400x slower than fp32 (2-core AMD EPYC with AVX2 only: a
2048^3 bf16 matmul took 52-58 s against 0.13 s in fp32). Every CPU bf16 path of the project (bf16 autocast in the
trainers, the bf16 rows of the step benchmark) asks [`cpu_bf16_support`] first and refuses or skips bf16 with the
measured slow-down instead of running for hours.
"""

from __future__ import annotations

import functools
import platform
import time
from dataclasses import dataclass

import torch


# A bf16 matmul more than this many times slower than fp32 means reference kernels, not native bf16: native bf16 runs
# at 0.3-1x the time of fp32, oneDNN's AVX-512 emulation at ~1-3x, reference kernels at 50-400x.
SLOWDOWN_LIMIT = 4.0
_PROBE_SIZE = 256
_PROBE_ROUNDS = 4


@dataclass(frozen=True)
class CpuBf16Support:
    """
    Result of [`cpu_bf16_support`].

    Args:
        native: bf16 matmuls run natively and at least about as fast as fp32: bf16 autocast on this CPU is worth it.
        capability: torch's CPU kernel capability (`torch.backends.cpu.get_cpu_capability()`, e.g. `"AVX2"`).
        instructions: the bf16 instruction sets found (`"avx512_bf16"`, `"amx"`), empty if none.
        slowdown: measured time of a 256^3 bf16 matmul divided by the fp32 one on this machine.
        bf16_flops / fp32_flops: the FLOP/s of those two matmuls.
    """

    native: bool
    capability: str
    instructions: tuple[str, ...]
    slowdown: float
    bf16_flops: float
    fp32_flops: float

    def describe(self) -> str:
        """One sentence: what was found and measured, e.g. for a log line or an error message."""
        found = " and ".join(self.instructions) if self.instructions else "no AVX-512-bf16 or AMX instructions"
        ratio = f"{self.slowdown:.2f}" if self.slowdown < 10 else f"{self.slowdown:.0f}"
        return (
            f"CPU kernel capability {self.capability}, {found}; a {_PROBE_SIZE}^3 bf16 matmul ran {ratio}x the time "
            f"of fp32 here ({self.bf16_flops / 1e9:.2f} against {self.fp32_flops / 1e9:.2f} GFLOP/s)"
        )


def _bf16_instructions() -> tuple[str, ...]:
    """The native bf16 instruction sets torch's cpuinfo reports (x86); on other processors, oneDNN's own check."""
    if platform.machine().lower() in ("x86_64", "amd64", "i386", "i686"):
        found = []
        if torch.cpu._is_avx512_bf16_supported():
            found.append("avx512_bf16")
        if torch.cpu._is_amx_tile_supported():
            found.append("amx")
        return tuple(found)
    return ("onednn_bf16",) if torch.ops.mkldnn._is_mkldnn_bf16_supported() else ()


def _matmul_seconds(dtype: torch.dtype, size: int = _PROBE_SIZE, repeats: int = 2) -> float:
    """Best time of a `size x size x size` matmul in `dtype` on the CPU."""
    generator = torch.Generator().manual_seed(0)
    a = torch.randn(size, size, generator=generator).to(dtype)
    b = torch.randn(size, size, generator=generator).to(dtype)
    for _ in range(2):  # kernel selection, allocation, thread-pool start
        a @ b
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - start)
    return max(best, 1e-9)


@functools.cache
def cpu_bf16_support() -> CpuBf16Support:
    """
    Whether bf16 is native on this CPU: bf16 instructions present (AVX-512-bf16 or AMX on x86), torch's kernels built
    for them (capability AVX512 on x86), and a short probe (a few 256^3 matmuls, well under a second even without
    native bf16) confirming that bf16 is at most [`SLOWDOWN_LIMIT`] times slower than fp32. Cached per process.
    """
    capability = torch.backends.cpu.get_cpu_capability()
    instructions = _bf16_instructions()
    # Interleaved rounds, best of each: load from other processes slows both dtypes alike instead of one of them.
    fp32_seconds = bf16_seconds = float("inf")
    for _ in range(_PROBE_ROUNDS):
        fp32_seconds = min(fp32_seconds, _matmul_seconds(torch.float32))
        bf16_seconds = min(bf16_seconds, _matmul_seconds(torch.bfloat16))
    slowdown = bf16_seconds / fp32_seconds
    x86_kernels = not capability.startswith("AVX") or capability.startswith("AVX512")
    flops = 2 * _PROBE_SIZE**3
    return CpuBf16Support(
        native=bool(instructions) and x86_kernels and slowdown <= SLOWDOWN_LIMIT,
        capability=capability,
        instructions=instructions,
        slowdown=slowdown,
        bf16_flops=flops / bf16_seconds,
        fp32_flops=flops / fp32_seconds,
    )


def require_native_cpu_bf16(option: str = "--bf16") -> None:
    """
    Raise a `ValueError` naming the measured slow-down and the fix when bf16 compute is requested (through `option`)
    on a CPU without native bf16. Call it only for runs whose compute device is the CPU.
    """
    support = cpu_bf16_support()
    if support.native:
        return
    raise ValueError(
        f"{option} asks for bf16 on the CPU, but this CPU has no native bf16 ({support.describe()}): bf16 would make "
        f"the run about {support.slowdown:.0f}x slower, not faster. Pass `{option} false` to run in fp32 on this "
        "machine, or run on a GPU or on a CPU with AVX-512-bf16 or AMX."
    )


__all__ = ["CpuBf16Support", "cpu_bf16_support", "require_native_cpu_bf16", "SLOWDOWN_LIMIT"]
