"""Shared test fixtures: tiny configurations so that the whole suite runs on a 2-core CPU, and no network at all."""

import os


os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

from modeling_ijepa import IJepaConfig, hardware  # noqa: E402


def tiny_config(**overrides) -> IJepaConfig:
    """A 2-layer encoder on a 12x12 patch grid (48 px, patch 4) with a 2-layer predictor."""
    values = dict(
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=64,
        image_size=48,
        patch_size=4,
        predictor_hidden_size=16,
        predictor_num_hidden_layers=2,
    )
    values.update(overrides)
    return IJepaConfig(**values)


@pytest.fixture
def config() -> IJepaConfig:
    return tiny_config()


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def simulated_cpu_bf16(native: bool) -> hardware.CpuBf16Support:
    """What `cpu_bf16_support` reports on a CPU with native bf16 (AVX-512-bf16) or without it (AVX2 only)."""
    if native:
        return hardware.CpuBf16Support(True, "AVX512", ("avx512_bf16",), 0.5, 2.0e11, 1.0e11)
    return hardware.CpuBf16Support(False, "AVX2", (), 400.0, 2.5e8, 1.0e11)


@pytest.fixture
def cpu_with_bf16(monkeypatch):
    """Run the test as on a CPU with native bf16, whatever this machine has."""
    monkeypatch.setattr(hardware, "cpu_bf16_support", lambda: simulated_cpu_bf16(native=True))


@pytest.fixture
def cpu_without_bf16(monkeypatch):
    """Run the test as on a CPU without native bf16 (AVX2 only), whatever this machine has."""
    monkeypatch.setattr(hardware, "cpu_bf16_support", lambda: simulated_cpu_bf16(native=False))
