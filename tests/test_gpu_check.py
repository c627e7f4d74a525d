"""`python -m benchmarks.gpu_check --smoke`: every section of the GPU check runs on CPU with tiny sizes and writes
sane values to gpu_check.json / gpu_check.md; the batch-size search steps down on out-of-memory only."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from benchmarks import gpu_check


ROOT = Path(__file__).resolve().parents[1]


def test_find_batch_size_steps_down_on_out_of_memory_only():
    def fits_up_to_32(size):
        if size > 32:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    size, attempts = gpu_check.find_batch_size(fits_up_to_32, [128, 64, 32, 16])
    assert size == 32 and attempts == ["128: out of memory", "64: out of memory", "32: ok"]
    assert gpu_check.find_batch_size(lambda size: fits_up_to_32(1000), [128, 64]) == (
        None,
        ["128: out of memory", "64: out of memory"],
    )

    def broken(size):
        raise RuntimeError("shape mismatch")

    with pytest.raises(RuntimeError, match="shape mismatch"):
        gpu_check.find_batch_size(broken, [128, 64])


def test_sdpa_verdict_fails_on_the_math_kernel():
    assert gpu_check.sdpa_verdict(["flash"]) == "ok"
    assert gpu_check.sdpa_verdict(["math", "flash"]).startswith("FAIL")
    assert gpu_check.sdpa_verdict([]).startswith("FAIL")
    assert gpu_check.datasheet_peak("NVIDIA H100 80GB HBM3") == 989e12
    assert gpu_check.datasheet_peak("NVIDIA A100-SXM4-80GB") == 312e12
    assert gpu_check.datasheet_peak("Tesla T4") is None


def test_deadline_cuts_a_measurement_off():
    with pytest.raises(gpu_check.BudgetExceeded):
        with gpu_check.deadline(0.2):
            while True:
                pass


def test_smoke_run_writes_every_section(tmp_path):
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    done = subprocess.run(
        # The budget only stops a run that went astray: on a busy shared CPU the sections take several times longer.
        [sys.executable, "-m", "benchmarks.gpu_check", "--smoke", "--output_dir", str(tmp_path), "--budget_s", "600"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    report = json.loads((tmp_path / "gpu_check.json").read_text())
    markdown = (tmp_path / "gpu_check.md").read_text()
    sections = report["sections"]
    for name in ("environment", "step", "context", "data", "end_to_end", "summary"):
        assert name in sections and f"## {name}" in markdown
        if name != "context":  # on CPU the nested path runs torch's math kernel, a FAIL by the check's rule
            assert not sections[name]["status"].startswith("FAIL"), (name, sections[name])
    assert sections["environment"]["measured_peak_tflops"] > 0
    assert sections["environment"]["cpu_capability"] == torch.backends.cpu.get_cpu_capability()

    model = sections["step"]["models"]["vit_micro_patch4_48"]
    assert model["loss_parity"]["status"] == "ok" and model["loss_parity"]["difference"] <= 1e-4
    assert model["batch_size"] == 8
    variants = {row["variant"]: row for row in model["variants"]}
    assert set(variants) == {
        "ours, eager",
        "reference, eager",
        "ours, compiled per layer",
        "ours, eager, checkpointing",
        "ours, compiled per layer, checkpointing",
    }
    measured = [row for row in variants.values() if row["status"] == "ok"]
    assert variants["ours, eager"]["status"] == "ok"
    for row in measured:
        assert row["images_per_second"] > 0 and 0 < row["mfu_measured_peak"] < 1.5
        assert row["sdpa_kernels"]
    assert "math" not in variants["ours, eager"]["sdpa_kernels"]

    modes = {row["mode"]: row for row in sections["context"]["modes"]}
    official = modes["official truncation"]
    assert official["status"] == "ok" and official["context_tokens_padded"] == round(official["context_tokens_mean"])
    assert modes["official truncation, token buckets"]["status"] == "ok"
    full = modes["full contexts, padded (mask)"]
    assert full["status"] == "ok" and full["context_tokens_mean"] > official["context_tokens_mean"]
    # torch has no CPU kernel for jagged nested SDPA: the detector must see the math fallback and fail the mode.
    nested = modes["full contexts, nested"]
    assert "math" in nested["sdpa_kernels"] and nested["status"] == "FAIL: math kernel"
    assert sections["context"]["status"] == "FAIL: full contexts, nested"

    data = sections["data"]
    assert data["images_per_second_per_worker"] > 0 and data["workers_needed"]["vit_micro_patch4_48"] >= 1

    end_to_end = sections["end_to_end"]
    assert end_to_end["status"] == "ok", end_to_end
    assert end_to_end["trainer_state"]["global_step"] == 4 and end_to_end["steady_images_per_second"] > 0
    assert 0 <= end_to_end["data_wait_share"] <= 1
