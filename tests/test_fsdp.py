"""
FSDP2 pre-training through `IJepaTrainer` on CPU (2 gloo processes), checked against a single-process run of the same
global batch; and launches that cannot be honoured, which must fail at start.

One `torchrun` launch (tests/fsdp_worker.py) runs the sharded side while this process trains the single-process
reference with `gradient_accumulation_steps=2`: micro-batch `i` is process `i % 2`'s batch `i // 2`, with its crops
and masks, so the two runs see the same global batches and average the same gradients. The same launch also runs the
sharded training with activation checkpointing (both switches) and with bf16, compared with the sharded fp32 run.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from modeling_ijepa.distributed import LOCK_FILE_NAME, describe_distributed_mode
from modeling_ijepa.testing_utils import (
    FSDP2_LAUNCH_ENV,
    MAX_STEPS,
    WORLD_SIZE,
    RankInterleavedCollator,
    build_collator,
    build_dataset,
    build_model,
    training_arguments,
)
from modeling_ijepa.trainer import IJepaTrainer


ROOT = Path(__file__).resolve().parents[1]

PARTS = ("encoder.", "predictor.", "target_encoder.")


def _assert_close(actual: dict, expected: dict, what: str, atol: float = 1e-5) -> None:
    for part in PARTS:
        keys = [key for key in expected if key.startswith(part)]
        assert keys, f"no {part} weights in {what}"
        worst = max(float((actual[key].float() - expected[key].float()).abs().max()) for key in keys)
        print(f"{what}: {part[:-1]} max |difference| {worst:.2e}")
        assert worst <= atol, f"{what}: {part[:-1]} differs by {worst:.2e}"


@pytest.fixture(scope="module")
def sharded_run(tmp_path_factory):
    """The 2-process FSDP2 run (worker) and, meanwhile, the single-process reference run in this process."""
    out = tmp_path_factory.mktemp("fsdp")
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", OMP_NUM_THREADS="1", **FSDP2_LAUNCH_ENV)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc_per_node",
        str(WORLD_SIZE),
        "--standalone",
        str(ROOT / "tests" / "fsdp_worker.py"),
        str(out),
    ]
    worker = subprocess.Popen(command, env=env, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        model = build_model()
        initial = {key: value.clone() for key, value in model.state_dict().items()}
        reference = IJepaTrainer(
            model=model,
            args=training_arguments(out / "reference", gradient_accumulation_steps=WORLD_SIZE, save_strategy="no"),
            train_dataset=build_dataset(),
            data_collator=RankInterleavedCollator(),
        )
        reference.train()
        log, _ = worker.communicate(timeout=300)
    finally:
        worker.kill()
    assert worker.returncode == 0, log[-6000:]
    reports = [json.loads((out / f"rank{rank}.json").read_text()) for rank in range(WORLD_SIZE)]
    return {
        "out": out,
        "log": log,
        "reports": reports,
        "initial": initial,
        "reference": reference,
        "uninterrupted": torch.load(out / "uninterrupted.pt"),
        "resumed": torch.load(out / "resumed.pt"),
        "ac_argument": torch.load(out / "ac_argument.pt"),
        "ac_fsdp": torch.load(out / "ac_fsdp.pt"),
    }


def test_fsdp2_runs_through_the_trainer_and_says_so(sharded_run):
    for report in sharded_run["reports"]:
        assert report["distributed_mode"] == "FSDP2 full shard, 2 processes, gloo"
        assert report["dtensor_parameters"]
        for part in ("encoder", "predictor", "target_encoder"):
            assert f"{part}.layers.0" in report["fsdp_modules"] and f"{part}.layers.1" in report["fsdp_modules"]
        assert "" in report["fsdp_modules"]  # the root
    assert "distributed mode: FSDP2 full shard, 2 processes, gloo" in sharded_run["log"]


def test_sharded_weights_equal_single_process_run_on_the_same_global_batch(sharded_run):
    reference = {k: v.detach() for k, v in sharded_run["reference"].model.state_dict().items()}
    sharded = sharded_run["uninterrupted"]
    assert set(sharded) == set(reference)
    _assert_close(sharded, reference, "FSDP2 (2 processes) vs single process")
    reference_losses = [e["loss"] for e in sharded_run["reference"].state.log_history if "loss" in e]
    # The Trainer logs process 0's loss under FSDP and the accumulated mean in one process: compare the weights only,
    # but make sure the run trained: every part moved away from its initial weights.
    assert len(reference_losses) == MAX_STEPS
    for part in PARTS:
        moved = max(float((sharded[k] - sharded_run["initial"][k]).abs().max()) for k in sharded if k.startswith(part))
        assert moved > 1e-3, f"{part} did not move: the comparison would be vacuous"


def test_resume_from_sharded_checkpoint_equals_uninterrupted_run(sharded_run):
    report = sharded_run["reports"][0]
    assert "pytorch_model_fsdp_0" in report["checkpoint_files"] and "optimizer_0" in report["checkpoint_files"]
    assert report["resumed_global_step"] == MAX_STEPS
    _assert_close(sharded_run["resumed"], sharded_run["uninterrupted"], "resumed vs uninterrupted")


def test_ema_update_is_shard_local_and_target_encoder_not_optimised(sharded_run):
    for report in sharded_run["reports"]:
        assert report["ema_collectives"] == [0] * MAX_STEPS  # one EMA update per optimiser step, no collective
        assert not report["target_encoder_in_optimizer"]
        assert report["encoder_in_optimizer"]


def test_per_rank_parameter_and_optimizer_memory_is_about_one_over_world_size(sharded_run):
    reports = sharded_run["reports"]
    full = reports[0]["memory"]["full_parameter_bytes"] + reports[0]["memory"]["full_optimizer_bytes"]
    # FSDP2 shards on dim 0: tensors of shape (1, ...) (position embeddings, mask token) stay whole on process 0.
    unsplittable = sum(v.numel() * v.element_size() for v in sharded_run["uninterrupted"].values() if v.shape[0] == 1)
    locals_ = []
    for report in reports:
        memory = report["memory"]
        local = memory["local_parameter_bytes"] + memory["local_optimizer_bytes"]
        locals_.append(local)
        print(
            f"rank {report['rank']}: parameters {memory['local_parameter_bytes']} / {memory['full_parameter_bytes']} "
            f"bytes, AdamW state {memory['local_optimizer_bytes']} / {memory['full_optimizer_bytes']} bytes, "
            f"total {local / full:.3f} of unsharded"
        )
        assert local <= full / WORLD_SIZE + unsplittable
    assert sum(r["memory"]["local_parameter_bytes"] for r in reports) == reports[0]["memory"]["full_parameter_bytes"]
    assert sum(r["memory"]["local_optimizer_bytes"] for r in reports) == reports[0]["memory"]["full_optimizer_bytes"]


def test_consolidated_target_encoder_loads_in_vanilla_transformers(sharded_run):
    import transformers

    final = sharded_run["out"] / "final"
    assert (final / "model.safetensors").is_file() and (final / "pretraining" / "model.safetensors").is_file()
    encoder, info = transformers.IJepaModel.from_pretrained(final, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"], info
    sharded = sharded_run["uninterrupted"]
    for name, value in encoder.state_dict().items():
        torch.testing.assert_close(value, sharded[f"target_encoder.{name}"], rtol=0, atol=0)
    from modeling_ijepa import IJepaForPreTraining

    full = IJepaForPreTraining.from_pretrained(final / "pretraining")
    for name, value in full.state_dict().items():
        torch.testing.assert_close(value, sharded[name], rtol=0, atol=0)


@pytest.mark.parametrize(
    "name, block_class, fsdp_flag",
    [("ac_argument", "FSDPIJepaLayer", False), ("ac_fsdp", "FSDPCheckpointWrapper", True)],
    ids=["activation_checkpointing-argument", "fsdp_activation_checkpointing"],
)
def test_activation_checkpointing_under_fsdp2_gives_the_same_weights(sharded_run, name, block_class, fsdp_flag):
    # Both user-facing switches: the training argument (recipes: `activation_checkpointing: true`, transformers
    # checkpoints each IJepaLayer's forward) and the accelerate config's `fsdp_activation_checkpointing` (accelerate
    # wraps each IJepaLayer in `checkpoint_wrapper` before `fully_shard`).
    for report in sharded_run["reports"]:
        run = report[name]
        assert run["distributed_mode"] == "FSDP2 full shard, 2 processes, gloo"
        assert run["first_block"] == block_class and run["fsdp_activation_checkpointing"] is fsdp_flag
        # The first encoder block's MLP runs once per step without checkpointing, twice with it (the recomputation).
        assert report["plain_forwards"]["calls"] == MAX_STEPS and run["calls"] == 2 * MAX_STEPS
    _assert_close(sharded_run[name], sharded_run["uninterrupted"], f"{name} vs no checkpointing", atol=1e-6)


def test_bf16_under_fsdp2_reduces_gradients_in_fp32_and_follows_the_fp32_run(sharded_run):
    # The worker runs as on a CPU with native bf16 (see fsdp_worker.py), so this holds on CPUs without it as well.
    for report in sharded_run["reports"]:
        run = report["bf16"]
        assert run["distributed_mode"] == "FSDP2 full shard, 2 processes, gloo"
        assert run["plugin_policy"] == ["torch.bfloat16", "torch.float32"]
        assert run["unit_policies"] == ["torch.bfloat16 torch.float32"]  # every FSDP unit: bf16 compute, fp32 reduce
        # accelerate's FSDP2 mixed precision casts the parameters (MixedPrecisionPolicy), it does not autocast.
        assert run["output_dtype"] == "torch.bfloat16" and not run["autocast"]
        assert report["plain_forwards"]["output_dtype"] == "torch.float32"
        print(f"rank {report['rank']}: fp32 losses {report['losses']}, bf16 losses {run['losses']}")
        assert len(run["losses"]) == MAX_STEPS
        assert run["losses"] == pytest.approx(report["losses"], abs=2e-2)
        assert run["losses"] != report["losses"]  # bf16 really ran


# ------------------------------------------------------------------------------------------------------------------
# Launches that cannot be honoured fail at start
# ------------------------------------------------------------------------------------------------------------------
def _trainer(tmp_path, **overrides):
    return IJepaTrainer(
        model=build_model(),
        args=training_arguments(tmp_path, **overrides),
        train_dataset=build_dataset(),
        data_collator=build_collator(0),
    )


def test_single_process_run_logs_its_mode(tmp_path):
    trainer = _trainer(tmp_path)
    assert trainer.distributed_mode == "single process, cpu" == describe_distributed_mode(trainer.accelerator)


def test_fsdp_requested_in_one_process_fails_naming_the_fix(tmp_path, monkeypatch):
    for key, value in FSDP2_LAUNCH_ENV.items():
        monkeypatch.setenv(key, value)
    with pytest.raises(ValueError, match="FSDP was requested.*--num_processes N"):
        _trainer(tmp_path)


def test_processes_outside_one_process_group_fail_naming_the_fix(tmp_path, monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")  # a launcher started 2 processes, but this one trains alone
    with pytest.raises(ValueError, match="did not join one process group.*--use_cpu true"):
        _trainer(tmp_path, use_cpu=False)


def _multi_cpu_accelerator():
    """What `enable_fsdp2_on_cpu` reads of a 2-process CPU run's accelerator: its state, before FSDP is switched on."""
    from types import SimpleNamespace

    from accelerate.utils import DistributedType

    state = SimpleNamespace(distributed_type=DistributedType.MULTI_CPU, mixed_precision="no", fsdp_plugin=None)
    return SimpleNamespace(state=state)


def _fsdp_plugin(version: int):
    from accelerate.utils import FullyShardedDataParallelPlugin

    return FullyShardedDataParallelPlugin(fsdp_version=version)


def test_fsdp1_requested_on_cpu_fails_naming_the_fix(monkeypatch):
    from accelerate.utils import DistributedType

    from modeling_ijepa import distributed

    monkeypatch.setattr(distributed, "_backend", lambda: "gloo")  # a gloo group, as accelerate launch --use_cpu forms
    accelerator = _multi_cpu_accelerator()
    with pytest.raises(ValueError, match=r"FSDP version 1 was requested on CPU.*--fsdp_version 2"):
        distributed.enable_fsdp2_on_cpu(accelerator, _fsdp_plugin(1))
    assert accelerator.state.distributed_type == DistributedType.MULTI_CPU and accelerator.state.fsdp_plugin is None


def test_cpu_backend_other_than_gloo_fails_naming_the_fix(monkeypatch):
    from accelerate.utils import DistributedType

    from modeling_ijepa import distributed

    monkeypatch.setattr(distributed, "_backend", lambda: "mpi")  # e.g. a run started by mpirun
    accelerator = _multi_cpu_accelerator()
    with pytest.raises(ValueError, match=r"needs the gloo process-group backend, this run uses 'mpi'.*torchrun"):
        distributed.enable_fsdp2_on_cpu(accelerator, _fsdp_plugin(2))
    assert accelerator.state.distributed_type == DistributedType.MULTI_CPU and accelerator.state.fsdp_plugin is None


def test_output_dir_in_use_by_a_live_run_is_refused(tmp_path):
    import socket

    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        tmp_path.mkdir(exist_ok=True)
        (tmp_path / LOCK_FILE_NAME).write_text(json.dumps({"host": socket.gethostname(), "pid": sleeper.pid}))
        trainer = _trainer(tmp_path, max_steps=1)
        with pytest.raises(ValueError, match="in use by another training run"):
            trainer.train()
    finally:
        sleeper.kill()
        sleeper.wait()
    trainer.train()  # the holder is gone: its stale claim is taken over
    assert not (tmp_path / LOCK_FILE_NAME).exists()


# ------------------------------------------------------------------------------------------------------------------
# benchmarks/compile_check.py (too slow for the suite: inductor compiles for minutes on 2 cores): its verdict only
# ------------------------------------------------------------------------------------------------------------------
def test_compile_check_verdict():
    sys.path.insert(0, str(ROOT / "benchmarks"))
    from compile_check import compare_losses

    eager = [0.45, 0.42, 0.41]
    assert compare_losses(eager, [0.45 + 5e-5, 0.42, 0.41 - 5e-5], 3, 1e-4) == (pytest.approx(5e-5), "")
    worst, reason = compare_losses(eager, [0.45, 0.4205, 0.41], 3, 1e-4)
    assert worst == pytest.approx(5e-4) and reason.startswith("step 2:")
    assert "expected 3 logged losses" in compare_losses(eager, eager[:2], 3, 1e-4)[1]
    assert compare_losses(eager, [0.45, float("nan"), 0.41], 3, 1e-4)[1] == "a loss is not finite"
