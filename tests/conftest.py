"""Shared test fixtures: tiny configurations so that the whole suite runs on a 2-core CPU, and no network at all."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

from modeling_ijepa import IJepaConfig  # noqa: E402


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
