"""Long runs in one process: preemption by signal, damaged checkpoints, leftover staging folders, cadences.

Signals are real: the runs send SIGTERM / SIGUSR1 to themselves through `os.kill`, and `pretrain.py` gets SIGTERM from
outside, as SLURM or Kubernetes send it. The distributed cases are in tests/test_long_runs_distributed.py.
"""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import tiny_config
from transformers import TrainerCallback

from modeling_ijepa import IJepaForPreTraining
from modeling_ijepa.checkpoints import (
    MANIFEST_NAME,
    DamagedCheckpointError,
    check_checkpoint,
    checkpoint_problem,
    resolve_checkpoint,
)
from modeling_ijepa.cli import reconcile_save_and_eval_steps
from modeling_ijepa.data import IJepaPretrainingCollator, default_image_processor, load_digits_dataset
from modeling_ijepa.lifecycle import EXIT_PREEMPTED, PREEMPTED_FILE_NAME
from modeling_ijepa.masking import MultiBlockMaskSampler
from modeling_ijepa.trainer import IJepaTrainer, IJepaTrainingArguments


ROOT = Path(__file__).resolve().parents[1]


def _trainer(output_dir, streamed: bool = False, callbacks=(), knn_monitor=None, **overrides) -> IJepaTrainer:
    torch.manual_seed(0)
    config = tiny_config()
    digits = load_digits_dataset(48)["train"].select(range(48))
    data = digits.to_iterable_dataset(num_shards=4).shuffle(seed=0, buffer_size=16) if streamed else digits
    values = dict(
        output_dir=str(output_dir),
        per_device_train_batch_size=8,
        max_steps=6,
        warmup_steps=2,
        logging_steps=1,
        save_strategy="steps",
        save_steps=100,
        report_to="none",
        disable_tqdm=True,
        use_cpu=True,
        seed=0,
    )
    values.update(overrides)
    trainer = IJepaTrainer(
        model=IJepaForPreTraining(config),
        args=IJepaTrainingArguments(**values),
        train_dataset=data,
        data_collator=IJepaPretrainingCollator(
            MultiBlockMaskSampler.from_config(config, seed=0), default_image_processor(48)
        ),
        knn_monitor=knn_monitor,
    )
    for callback in callbacks:
        trainer.add_callback(callback)
    return trainer


class _SignalAt(TrainerCallback):
    """Send `signum` to this process during optimiser step `step` (before the step ends), twice: as a launcher that
    forwards the scheduler's signal would."""

    def __init__(self, step: int, signum=signal.SIGTERM):
        self.step, self.signum = step, signum

    def on_step_begin(self, args, state, control, **kwargs):
        if state.global_step + 1 == self.step:
            os.kill(os.getpid(), self.signum)
            os.kill(os.getpid(), self.signum)


def _weights(model) -> dict[str, torch.Tensor]:
    return {key: value.detach().clone() for key, value in model.state_dict().items()}


# ---------------------------------------------------------------------------------------------------------------------
# Preemption
# ---------------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("streamed, signum", [(False, signal.SIGTERM), (True, signal.SIGUSR1)])
def test_a_signal_checkpoints_the_step_in_flight_and_resume_is_exact(tmp_path, streamed, signum):
    reference = _trainer(tmp_path / "straight", streamed=streamed)
    reference.train()
    expected = _weights(reference.model)

    preempted = _trainer(tmp_path / "run", streamed=streamed, callbacks=[_SignalAt(3, signum)])
    handler_before = signal.getsignal(signum)
    preempted.train()
    assert preempted.preemption.preempted_at_step == 3 and preempted.state.global_step == 3
    assert preempted.preemption.signal_name == signal.Signals(signum).name
    assert 0 <= preempted.preemption.seconds_to_checkpoint < 60
    assert sorted(p.name for p in (tmp_path / "run").iterdir() if p.is_dir()) == ["checkpoint-3"]
    check_checkpoint(tmp_path / "run" / "checkpoint-3")
    record = json.loads((tmp_path / "run" / PREEMPTED_FILE_NAME).read_text())
    assert record["step"] == 3 and record["checkpoint"] == "checkpoint-3" and record["exit_code"] == EXIT_PREEMPTED
    assert signal.getsignal(signum) == handler_before  # the handlers are gone once train() returns

    resumed = _trainer(tmp_path / "run", streamed=streamed)
    resumed.train(resume_from_checkpoint="last")
    assert resumed.preemption.preempted_at_step is None and resumed.state.global_step == 6
    assert not (tmp_path / "run" / PREEMPTED_FILE_NAME).exists()
    got = _weights(resumed.model)
    for key in expected:
        torch.testing.assert_close(got[key], expected[key], rtol=0, atol=1e-6, msg=key)


def test_preemption_keeps_its_checkpoint_when_the_run_keeps_one_checkpoint_and_the_best_model(tmp_path):
    from modeling_ijepa.monitoring import KnnMonitor

    digits = load_digits_dataset(48)
    monitor = KnnMonitor(
        digits["train"].select(range(60)), digits["test"].select(range(30)), default_image_processor(48)
    )
    trainer = _trainer(
        tmp_path,
        callbacks=[_SignalAt(3)],
        save_steps=2,
        eval_strategy="steps",
        eval_steps=2,
        save_total_limit=1,
        load_best_model_at_end=True,
        metric_for_best_model="knn_accuracy",
        knn_monitor=monitor,
    )
    trainer.train()
    assert trainer.preemption.preempted_at_step == 3
    assert checkpoint_problem(tmp_path / "checkpoint-3") is None  # not deleted as "not the best"
    assert resolve_checkpoint("last", tmp_path) == str(tmp_path / "checkpoint-3")
    assert trainer.args.save_total_limit == 1


def test_pretrain_script_on_sigterm_writes_a_checkpoint_logs_it_and_exits_with_the_preempted_code(tmp_path):
    output_dir = tmp_path / "run"
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    command = [
        sys.executable,
        str(ROOT / "training_scripts" / "pretrain.py"),
        "--output_dir",
        str(output_dir),
        "--max_steps",
        "300",
        "--logging_steps",
        "1",
        "--eval_strategy",
        "no",
        "--load_best_model_at_end",
        "false",
        "--per_device_train_batch_size",
        "8",
        "--disable_tqdm",
        "true",
    ]
    process = subprocess.Popen(
        command, cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    lines = []
    try:
        for line in process.stdout:  # the first logged step: training is under way
            lines.append(line)
            if "'loss'" in line:
                break
        sent = time.monotonic()
        process.send_signal(signal.SIGTERM)
        rest, _ = process.communicate(timeout=120)
    finally:
        process.kill()
    log = "".join(lines) + rest
    assert process.returncode == EXIT_PREEMPTED, log[-3000:]
    assert time.monotonic() - sent < 60
    line = next(line for line in log.splitlines() if "preempted at step" in line)
    step = int(line.split("preempted at step ")[1].split(":")[0])
    assert f"checkpoint-{step} written; resume with --resume_from_checkpoint last" in line
    assert 1 <= step < 300
    check_checkpoint(output_dir / f"checkpoint-{step}")
    assert json.loads((output_dir / PREEMPTED_FILE_NAME).read_text())["step"] == step
    assert not (output_dir / "model.safetensors").exists()  # no final encoder: the run is to be resumed
    assert not (output_dir / ".ijepa_run_lock.json").exists()


def test_a_signal_during_the_final_save_acts_only_once_the_files_are_complete(tmp_path):
    from modeling_ijepa.lifecycle import signals_deferred

    received = []
    previous = signal.signal(signal.SIGUSR1, lambda signum, frame: received.append(signum))
    try:
        with signals_deferred():
            os.kill(os.getpid(), signal.SIGUSR1)
            (tmp_path / "final").write_text("complete")
            assert received == []  # held back while the block writes
        assert received == [signal.SIGUSR1]
    finally:
        signal.signal(signal.SIGUSR1, previous)


# ---------------------------------------------------------------------------------------------------------------------
# Damaged checkpoints
# ---------------------------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def saved_run(tmp_path_factory):
    """A run with checkpoints at steps 2, 4 and 6, copied fresh for each test by `run_copy`."""
    folder = tmp_path_factory.mktemp("saved")
    trainer = _trainer(folder, save_steps=2)
    trainer.train()
    return folder


@pytest.fixture
def run_copy(saved_run, tmp_path):
    import shutil

    shutil.copytree(saved_run, tmp_path / "run")
    return tmp_path / "run"


def _truncate(path: Path, keep: int = 100) -> None:
    data = path.read_bytes()
    path.write_bytes(data[:keep])


def test_every_checkpoint_is_complete_and_carries_its_manifest(run_copy):
    for step in (2, 4, 6):
        checkpoint = run_copy / f"checkpoint-{step}"
        manifest = json.loads((checkpoint / MANIFEST_NAME).read_text())
        assert manifest["step"] == step and "model.safetensors" in manifest["files"]
        assert checkpoint_problem(checkpoint) is None
    assert not list(run_copy.glob("tmp-checkpoint-*"))


@pytest.mark.parametrize(
    "damage, named",
    [
        (lambda c: _truncate(c / "model.safetensors"), "model.safetensors"),
        (lambda c: (c / "model.safetensors").write_bytes(b""), "model.safetensors"),
        (lambda c: (c / "trainer_state.json").write_text('{"global_step": '), "trainer_state.json"),
        (lambda c: (c / "optimizer.pt").unlink(), "optimizer.pt"),
        (lambda c: _truncate(c / "optimizer.pt", keep=4000), "optimizer.pt"),
        (lambda c: (c / MANIFEST_NAME).unlink() or _truncate(c / "model.safetensors"), "model.safetensors"),
    ],
    ids=["truncated-weights", "empty-weights", "cut-state", "missing-optimizer", "cut-optimizer", "no-manifest"],
)
def test_last_skips_a_damaged_checkpoint_and_a_named_one_is_refused(run_copy, damage, named, caplog):
    damage(run_copy / "checkpoint-6")
    with caplog.at_level("WARNING", logger="modeling_ijepa.checkpoints"):
        assert resolve_checkpoint("last", run_copy) == str(run_copy / "checkpoint-4")
    assert "checkpoint-6" in caplog.text and named in caplog.text
    with pytest.raises(DamagedCheckpointError, match=rf"checkpoint-6 is damaged: {named}.*checkpoint-4"):
        resolve_checkpoint(str(run_copy / "checkpoint-6"), run_copy)


def test_resume_last_past_a_damaged_checkpoint_trains_on_from_the_good_one(run_copy):
    _truncate(run_copy / "checkpoint-6" / "model.safetensors")
    (run_copy / "tmp-checkpoint-8" / "checkpoint-8").mkdir(parents=True)  # a save killed half-way
    resumed = _trainer(run_copy, save_steps=2, max_steps=8)
    resumed.train(resume_from_checkpoint="last")
    assert resumed.state.global_step == 8
    assert not (run_copy / "tmp-checkpoint-8").exists()
    assert checkpoint_problem(run_copy / "checkpoint-6") is None  # saved again, complete, by the resumed run
    named = _trainer(run_copy, save_steps=2, max_steps=8)
    _truncate(run_copy / "checkpoint-8" / "model.safetensors")
    with pytest.raises(DamagedCheckpointError, match="checkpoint-8 is damaged: model.safetensors"):
        named.train(resume_from_checkpoint=str(run_copy / "checkpoint-8"))
    assert not (run_copy / ".ijepa_run_lock.json").exists()


def test_last_without_any_complete_checkpoint_starts_from_scratch(tmp_path):
    (tmp_path / "checkpoint-5").mkdir()
    assert resolve_checkpoint("last", tmp_path) is None
    assert resolve_checkpoint(None, tmp_path) is None
    with pytest.raises(DamagedCheckpointError, match="no complete checkpoint is left"):
        check_checkpoint(tmp_path / "checkpoint-5")
    with pytest.raises(DamagedCheckpointError, match=r"checkpoint-9 does not exist: pass one of \['checkpoint-5'\]"):
        resolve_checkpoint(str(tmp_path / "checkpoint-9"), tmp_path)


# ---------------------------------------------------------------------------------------------------------------------
# Checkpoint and evaluation cadences
# ---------------------------------------------------------------------------------------------------------------------
def test_setting_only_save_steps_or_only_eval_steps_gives_a_consistent_pair():
    recipe = dict(load_best_model_at_end=True, eval_strategy="steps", save_strategy="steps", eval_steps=50)
    values = dict(recipe, save_steps=40)
    assert "--eval_steps 40" in reconcile_save_and_eval_steps(values, {"save_steps", "max_steps"})
    assert values["eval_steps"] == 40
    values = dict(recipe, save_steps=50, eval_steps=30)
    assert "--save_steps 30" in reconcile_save_and_eval_steps(values, {"eval_steps"})
    assert values["save_steps"] == 30
    with pytest.raises(ValueError, match="--save_steps 40 is not a multiple of --eval_steps 30.*--eval_steps 40"):
        reconcile_save_and_eval_steps(dict(recipe, save_steps=40, eval_steps=30), {"save_steps", "eval_steps"})
    consistent = dict(recipe, save_steps=100)
    assert reconcile_save_and_eval_steps(consistent, {"save_steps"}) is None and consistent["eval_steps"] == 50


def test_max_steps_40_save_steps_40_runs_on_the_default_recipe(tmp_path):
    from training_scripts import pretrain

    output_dir = pretrain.main(
        ["--output_dir", str(tmp_path / "run"), "--max_steps", "40", "--save_steps", "40", "--disable_tqdm", "true"]
        # Smaller batches and monitor than the recipe's, to keep the test short; the cadences are the recipe's.
        + [
            "--per_device_train_batch_size",
            "16",
            "--monitor_max_train_samples",
            "300",
            "--monitor_max_eval_samples",
            "100",
        ]
    )
    state = json.loads((Path(output_dir) / "trainer_state.json").read_text())
    assert state["global_step"] == 40
    assert any(entry.get("step") == 40 and "eval_knn_accuracy" in entry for entry in state["log_history"])
    assert (Path(output_dir) / "model.safetensors").is_file()
    check_checkpoint(Path(output_dir) / "checkpoint-40")
