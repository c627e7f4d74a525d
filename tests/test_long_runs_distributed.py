"""
Long runs across processes, proven on one machine (gloo, 1 thread per process), with tests/longrun_worker.py:

- two nodes on localhost, one process each: `torchrun --nnodes 2` under DDP and `accelerate launch --num_machines 2`
  under FSDP2. Process 1 alone gets SIGTERM during step 2: both stop there with one checkpoint, the resume of `last`
  gives the weights of a single-process run on the same global batches, the nodes read disjoint data covering the data
  set, and under FSDP2 the k-NN monitor scores the sharded target encoder as the unsharded one;
- nodes with output folders of their own: refused at start, naming the fix (with or without `--save_on_each_node`);
- one process SIGKILLed mid-run: the launch ends non-zero within the bound, naming the rank, and the last checkpoint
  stays complete and resumable.
"""

import json
import os
import re
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from benchmarks.toy_run import (
    MAX_STEPS,
    WORLD_SIZE,
    RankInterleavedCollator,
    build_dataset,
    build_model,
    training_arguments,
)
from modeling_ijepa.checkpoints import check_checkpoint
from modeling_ijepa.trainer import IJepaTrainer


ROOT = Path(__file__).resolve().parents[1]
WORKER = str(ROOT / "tests" / "longrun_worker.py")
CPU_FSDP2 = str(ROOT / "configuration" / "accelerate" / "cpu_fsdp2.yaml")
# A process that dies ends a one-machine launch at once (the launcher stops the others): this is the bound held here.
DEATH_BOUND_SECONDS = 60


def _env() -> dict:
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", OMP_NUM_THREADS="1")
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    for name in ("ACCELERATE_USE_FSDP", "FSDP_VERSION", "RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_PORT"):
        env.pop(name, None)
    return env


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _two_nodes(launcher: str, out: Path, *worker_args: str) -> list[str]:
    """Start node 0 and node 1 of a 2-node launch on localhost; returns both logs once they end."""
    port = str(_free_port())
    processes = []
    for node in (0, 1):
        if launcher == "torchrun":
            command = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--node_rank", str(node)]
            command += ["--nproc_per_node", "1", "--master_addr", "127.0.0.1", "--master_port", port]
        else:
            command = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", CPU_FSDP2]
            command += ["--num_machines", "2", "--machine_rank", str(node), "--num_processes", "2"]
            command += ["--main_process_ip", "127.0.0.1", "--main_process_port", port]
        command += [WORKER, *worker_args, str(out)]
        processes.append(
            subprocess.Popen(
                command, env=_env(), cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
            )
        )
    logs = []
    try:
        for process in processes:
            logs.append(process.communicate(timeout=400)[0])
    finally:
        for process in processes:
            process.kill()
    for node, (process, log) in enumerate(zip(processes, logs)):
        assert process.returncode == 0, f"node {node} failed:\n{log[-5000:]}\nother node:\n{logs[1 - node][-3000:]}"
    return logs


def _reports(out: Path) -> list[dict]:
    return [json.loads((out / f"rank{rank}.json").read_text()) for rank in range(WORLD_SIZE)]


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """The single-process run of the same global batches (gradient accumulation over the processes' batches)."""
    out = tmp_path_factory.mktemp("reference")
    trainer = IJepaTrainer(
        model=build_model(),
        args=training_arguments(out, gradient_accumulation_steps=WORLD_SIZE, save_strategy="no"),
        train_dataset=build_dataset(),
        data_collator=RankInterleavedCollator(),
    )
    trainer.train()
    return {key: value.detach().clone() for key, value in trainer.model.state_dict().items()}


def _assert_weights_equal(actual: dict, expected: dict, what: str) -> None:
    assert set(actual) == set(expected)
    worst = max(float((actual[key].float() - expected[key].float()).abs().max()) for key in expected)
    assert worst <= 1e-5, f"{what}: weights differ by {worst:.2e}"


def _check_preempted_run(out: Path, reports: list[dict], reference: dict, mode: str) -> None:
    for report in reports:
        assert report["distributed_mode"] == mode
        assert report["preempted_at_step"] == 2 and report["stopped_global_step"] == 2  # both stop, at one step
        assert report["checkpoints"] == ["checkpoint-2"]
        assert report["resumed_global_step"] == MAX_STEPS
    check_checkpoint(out / "run" / "checkpoint-2")
    assert not (out / "run" / "preempted.json").exists()  # removed by the resume
    seen = [report["epoch_indices"] for report in reports]
    assert not set(seen[0]) & set(seen[1]), "the nodes read the same examples"
    assert sorted(seen[0] + seen[1]) == list(range(len(build_dataset())))
    _assert_weights_equal(torch.load(out / "resumed.pt"), reference, f"{mode}, preempted and resumed")


def test_two_torchrun_nodes_ddp_preempted_by_one_signal_resume_to_the_single_process_weights(tmp_path, reference):
    logs = _two_nodes("torchrun", tmp_path, "preempt", "--unshared")
    reports = _reports(tmp_path)
    _check_preempted_run(tmp_path, reports, reference, "DDP, 2 processes, gloo")
    assert "preempted at step" not in logs[0]  # the library logs nothing by itself; pretrain.py logs the line
    for report in reports:  # nodes that do not share the folder fail at start, whatever save_on_each_node says
        for save_on_each_node in (False, True):
            refusal = report[f"unshared_refusal_{save_on_each_node}"]
            assert "do not share output_dir" in refusal and "a file system that every node mounts" in refusal


def test_two_accelerate_nodes_fsdp2_preempted_resume_and_the_knn_monitor_scores_as_unsharded(tmp_path, reference):
    _two_nodes("accelerate", tmp_path, "preempt")
    reports = _reports(tmp_path)
    _check_preempted_run(tmp_path, reports, reference, "FSDP2 full shard, 2 processes, gloo")
    # The same weights, unsharded, in this process.
    from longrun_worker import _knn_monitor

    from modeling_ijepa import IJepaForPreTraining

    model = build_model()
    model.load_state_dict(torch.load(tmp_path / "resumed.pt"))
    assert isinstance(model, IJepaForPreTraining)
    unsharded = _knn_monitor().evaluate(model.get_encoder())
    for report in reports:
        assert report["knn"]["eval_knn_accuracy"] == pytest.approx(unsharded["knn_accuracy"], abs=1e-9)


def test_a_killed_process_ends_the_launch_within_the_bound_and_the_last_checkpoint_resumes(tmp_path):
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    command += [WORKER, "die", str(tmp_path)]
    start = time.monotonic()
    run = subprocess.run(command, env=_env(), cwd=ROOT, capture_output=True, text=True, timeout=300)
    elapsed = time.monotonic() - start
    log = run.stdout + run.stderr
    assert run.returncode != 0, log[-4000:]
    assert re.search(r"rank\s*:\s*1 \(local_rank", log), log[-4000:]  # torchrun's failure summary names the rank
    assert "Signal 9" in log or "SIGKILL" in log or "-9" in log
    assert not (tmp_path / "rank0.json").exists() or not json.loads((tmp_path / "rank0.json").read_text()).get(
        "finished"
    )
    assert elapsed < DEATH_BOUND_SECONDS + 60  # the bound after training reached step 3, plus start-up
    check_checkpoint(tmp_path / "run" / "checkpoint-2")
    assert not (tmp_path / "run" / "checkpoint-4").exists()
    resumed = IJepaTrainer(
        model=build_model(),
        args=training_arguments(tmp_path / "run", gradient_accumulation_steps=WORLD_SIZE, save_strategy="no"),
        train_dataset=build_dataset(),
        data_collator=RankInterleavedCollator(),
    )
    resumed.train(resume_from_checkpoint="last")
    assert resumed.state.global_step == MAX_STEPS
