# Copyright 2026 The ijepa-hf Authors. All rights reserved.
# Licensed under the Apache License, Version 2.0.
"""The life of a training run: one run per output folder, preemption, and what the exit code says.

- **One run per `output_dir`** ([`claim_output_dir`] / [`release_output_dir`]): a lock file names the process that
  trains into the folder, so a second run into the same folder fails at start instead of mixing checkpoints.
- **Preemption** ([`PreemptionCallback`]): SIGTERM (what SLURM, Kubernetes and spot instances send before they kill a
  job) or SIGUSR1 (what `sbatch --signal=USR1@SECONDS` sends ahead of the time limit) no longer kills the run: the
  optimiser step in flight finishes, every process agrees on that step (one process receiving the signal is enough),
  a complete checkpoint is written there, the main process writes `output_dir/preempted.json` (step, checkpoint,
  signal, seconds from the signal to the checkpoint), and every process exits with [`EXIT_PREEMPTED`]. Repeated
  SIGTERM / SIGUSR1 are ignored (launchers such as torchrun forward the signal the scheduler already sent to every
  process); SIGINT (Ctrl-C) and SIGKILL stop a process at once, and a checkpoint being written then stays a staging
  folder that no resume picks (see `checkpoints.py`).
- **Exit codes** of `pretrain.py`: 0 finished, [`EXIT_PREEMPTED`] (75, `EX_TEMPFAIL`: "try again") stopped by a
  signal with a checkpoint to resume from, anything else failed (1 for a training error, 2 for a bad command line).
  Multi-process launchers (`torchrun`, `accelerate launch --num_processes N`) exit 1 whenever a worker exits non-zero,
  75 included, so a job script tells a preemption apart by `output_dir/preempted.json`, which only a preempted run
  leaves (the next start removes it).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import signal
import socket
import threading
import time

import torch
from transformers import TrainerCallback


logger = logging.getLogger(__name__)

LOCK_FILE_NAME = ".ijepa_run_lock.json"

# Exit code of a run stopped by a preemption signal after writing its checkpoint (sysexits' EX_TEMPFAIL).
EXIT_PREEMPTED = 75
# Left in output_dir by a preempted run (removed when the next run starts): what a job script checks to requeue.
PREEMPTED_FILE_NAME = "preempted.json"
PREEMPTION_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)


class OutputDirInUseError(ValueError):
    """Another live training run holds the `output_dir` (see [`claim_output_dir`])."""


# ---------------------------------------------------------------------------------------------------------------------
# One run per output folder
# ---------------------------------------------------------------------------------------------------------------------
def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def claim_output_dir(output_dir: str) -> str | None:
    """
    Claim `output_dir` for this run by writing `.ijepa_run_lock.json` (host, pid) in it; call it on the main process.

    Returns `None` on success, else a sentence naming the run that holds the folder: a live process on this host. A
    lock left by a dead process on this host is taken over; one from another host (shared file system, preempted
    job) is taken over with a warning, since its process cannot be checked from here.
    """
    os.makedirs(output_dir, exist_ok=True)
    path = os.path.join(output_dir, LOCK_FILE_NAME)
    host, pid = socket.gethostname(), os.getpid()
    try:
        with open(path, encoding="utf-8") as handle:
            holder = json.load(handle)
    except (FileNotFoundError, json.JSONDecodeError, OSError):
        holder = None
    if holder and not (holder.get("host") == host and holder.get("pid") == pid):
        if holder.get("host") == host and _pid_alive(int(holder.get("pid", -1))):
            return (
                f"output_dir {output_dir} is in use by another training run (process {holder['pid']} on this host): "
                "pass a different --output_dir, or stop that run first."
            )
        if holder.get("host") != host:
            logger.warning(
                "output_dir %s was last claimed by process %s on host %s; taking it over (make sure that run has "
                "stopped).",
                output_dir,
                holder.get("pid"),
                holder.get("host"),
            )
    temporary = f"{path}.{host}.{pid}"
    with open(temporary, "w", encoding="utf-8") as handle:
        json.dump({"host": host, "pid": pid}, handle)
    os.replace(temporary, path)
    return None


def release_output_dir(output_dir: str) -> None:
    """Remove this process's claim on `output_dir` (no-op when another process holds it)."""
    path = os.path.join(output_dir, LOCK_FILE_NAME)
    try:
        with open(path, encoding="utf-8") as handle:
            holder = json.load(handle)
    except (FileNotFoundError, json.JSONDecodeError, OSError):
        return
    if holder.get("host") == socket.gethostname() and holder.get("pid") == os.getpid():
        os.remove(path)


def _gather(value) -> list:
    """`value` of every process (a list of one without a process group)."""
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return [value]
    gathered = [None] * torch.distributed.get_world_size()
    torch.distributed.all_gather_object(gathered, value)
    return gathered


def _lock_holder(output_dir: str) -> tuple | None:
    try:
        with open(os.path.join(output_dir, LOCK_FILE_NAME), encoding="utf-8") as handle:
            holder = json.load(handle)
        return holder.get("host"), holder.get("pid")
    except (FileNotFoundError, json.JSONDecodeError, OSError):
        return None


def start_run(args, resume_from_checkpoint: str | bool | None) -> str | None:
    """
    Start a training run into `args.output_dir` on every process; returns the checkpoint to resume (or `None`).

    The main process claims the folder ([`claim_output_dir`]); each node's first process then checks that it sees
    that claim, i.e. that the nodes share the folder. Nodes with folders of their own (`--output_dir` on local disks)
    fail here, naming the fix: transformers writes the model weights of a checkpoint on the main process only (also
    with `--save_on_each_node`), so the other nodes' checkpoints would be incomplete and a resume would fail. The main
    process then removes the staging folders of killed saves and resolves `resume_from_checkpoint`
    ([`~modeling_ijepa.checkpoints.resolve_checkpoint`]) for every process.

    Raises:
        OutputDirInUseError: another live run holds the folder.
        DamagedCheckpointError: the named checkpoint is damaged.
        ValueError: the nodes do not share the folder.
    """
    from .checkpoints import DamagedCheckpointError, remove_staging_dirs, resolve_checkpoint

    output_dir = args.output_dir
    refusal = claim_output_dir(output_dir) if args.process_index == 0 else None
    holder = (socket.gethostname(), os.getpid()) if args.process_index == 0 else None
    refusal, holder = next(item for item in _gather((refusal, holder)) if item[1] is not None)
    if refusal is not None:
        raise OutputDirInUseError(refusal)
    if args.process_index == 0 and os.path.exists(os.path.join(output_dir, PREEMPTED_FILE_NAME)):
        os.remove(os.path.join(output_dir, PREEMPTED_FILE_NAME))  # this run resumes (or restarts) the preempted one
    report = None
    if args.local_process_index == 0:  # one process per node looks at its folder
        shared = args.process_index == 0 or _lock_holder(output_dir) == tuple(holder)
        checkpoint = error = None
        if args.process_index == 0:  # cleans and resolves the folder every node shares (the others must see it)
            removed = remove_staging_dirs(output_dir)
            if removed:
                logger.warning("removed unfinished checkpoint saves of an earlier run: %s", ", ".join(removed))
            try:
                checkpoint = resolve_checkpoint(resume_from_checkpoint, output_dir)
            except DamagedCheckpointError as damaged:
                error = str(damaged)
        report = (socket.gethostname(), shared, None if checkpoint is None else os.path.basename(checkpoint), error)
    reports = [item for item in _gather(report) if item is not None]
    try:
        unshared = [host for host, shared, _, _ in reports if not shared]
        if unshared:
            raise ValueError(
                f"The nodes do not share output_dir {output_dir}: node(s) {', '.join(map(str, unshared))} do not see "
                "the main process's claim on it, so checkpoints would be incomplete on every node but the first "
                "(transformers writes the model weights on the main process only, even with --save_on_each_node) and "
                "a resume would fail. Put --output_dir on a file system that every node mounts, at the same path."
            )
        errors = [error for *_, error in reports if error]
        if errors:
            raise DamagedCheckpointError(errors[0])
    except ValueError:
        end_run(args)
        raise
    name = reports[0][2]  # the main process resolved the shared folder for every node
    if name is None:
        if resume_from_checkpoint not in (None, False):
            logger.info("no complete checkpoint to resume in %s: starting from scratch", output_dir)
        return None
    checkpoint = os.path.join(output_dir, name)
    logger.info("resuming from %s", checkpoint)
    return checkpoint


def end_run(args) -> None:
    """Release the main process's claim on `args.output_dir` (see [`start_run`])."""
    if args.process_index == 0:
        release_output_dir(args.output_dir)


# ---------------------------------------------------------------------------------------------------------------------
# Preemption
# ---------------------------------------------------------------------------------------------------------------------
class PreemptionCallback(TrainerCallback):
    """
    Stop at the next optimiser-step boundary after SIGTERM / SIGUSR1, with a checkpoint there (module docstring).

    After `train()` returns, `preempted_at_step` is the step of that checkpoint (`None` when no signal came),
    `signal_name` the signal and `seconds_to_checkpoint` the time from the signal to the written checkpoint. The
    handlers are installed for the duration of `train()` and only in the main thread (where Python delivers signals).
    In a distributed run the processes compare their flags after every optimiser step (one all-reduce of one number),
    so all of them stop at the same step and write one checkpoint together.
    """

    def __init__(self, signals=PREEMPTION_SIGNALS):
        self.signals = tuple(signals)
        self.received: int | None = None
        self.received_at: float | None = None
        self.preempted_at_step: int | None = None
        self.signal_name: str | None = None
        self.seconds_to_checkpoint: float | None = None
        self._previous: dict = {}
        self._save_total_limit = None

    # -- handlers ---------------------------------------------------------------------------------------------------
    def _handle(self, signum, frame) -> None:
        if self.received is None:  # repeated signals (e.g. forwarded by the launcher) change nothing
            self.received, self.received_at = signum, time.monotonic()

    def _install(self) -> None:
        if threading.current_thread() is not threading.main_thread():
            logger.warning("training outside the main thread: SIGTERM / SIGUSR1 will not write a checkpoint")
            return
        for signum in self.signals:
            self._previous[signum] = signal.signal(signum, self._handle)

    def _restore(self) -> None:
        for signum, previous in self._previous.items():
            signal.signal(signum, previous if previous is not None else signal.SIG_DFL)
        self._previous = {}

    # -- agreement --------------------------------------------------------------------------------------------------
    def _any_process_signalled(self, args) -> bool:
        flag = self.received is not None
        if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
            return flag
        if torch.distributed.get_world_size() == 1:
            return flag
        backend = str(torch.distributed.get_backend())
        device = args.device if backend != "gloo" else torch.device("cpu")
        value = torch.tensor([float(flag)], device=device)
        torch.distributed.all_reduce(value, op=torch.distributed.ReduceOp.MAX)
        return bool(value.item())

    # -- callback events --------------------------------------------------------------------------------------------
    def on_train_begin(self, args, state, control, **kwargs):
        self.received = self.received_at = self.preempted_at_step = None
        self._install()

    def on_step_end(self, args, state, control, **kwargs):
        if self._any_process_signalled(args):
            if self.received_at is None:  # the signal reached another process
                self.received_at = time.monotonic()
            self.preempted_at_step = state.global_step
            # The Trainer's end of training deletes every checkpoint but the best when save_total_limit is 1: keep the
            # one written now, which the resume needs (restored in on_train_end).
            self._save_total_limit, args.save_total_limit = args.save_total_limit, None
            control.should_save = True
            control.should_training_stop = True
            control.should_evaluate = False

    def on_save(self, args, state, control, **kwargs):
        if self.preempted_at_step is not None and self.seconds_to_checkpoint is None:
            self.seconds_to_checkpoint = time.monotonic() - self.received_at
            self.signal_name = signal.Signals(self.received).name if self.received is not None else None
            if args.process_index == 0:
                record = {
                    "step": self.preempted_at_step,
                    "checkpoint": f"checkpoint-{self.preempted_at_step}",
                    "signal": self.signal_name or "received by another process",
                    "seconds_to_checkpoint": round(self.seconds_to_checkpoint, 3),
                    "exit_code": EXIT_PREEMPTED,
                }
                path = os.path.join(args.output_dir, PREEMPTED_FILE_NAME)
                with open(f"{path}.tmp", "w", encoding="utf-8") as handle:
                    json.dump(record, handle, indent=1)
                os.replace(f"{path}.tmp", path)

    def on_train_end(self, args, state, control, **kwargs):
        self._restore()
        if self.preempted_at_step is not None:
            args.save_total_limit = self._save_total_limit


@contextlib.contextmanager
def signals_deferred(signals=PREEMPTION_SIGNALS):
    """
    Hold SIGTERM / SIGUSR1 back while the block runs (e.g. the final save after training), then let them act as they
    would have (default action or the previous handler): a signal that arrives meanwhile stops the process only once
    the files are complete. A no-op outside the main thread, where Python cannot install handlers.
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    held: list[int] = []
    previous = {signum: signal.signal(signum, lambda signum, frame: held.append(signum)) for signum in signals}
    try:
        yield
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler if handler is not None else signal.SIG_DFL)
        for signum in dict.fromkeys(held):
            signal.raise_signal(signum)


def preemption_message(callback: PreemptionCallback) -> str:
    """The one line a preempted run logs."""
    step = callback.preempted_at_step
    received = callback.signal_name or "a signal on another process"
    seconds = callback.seconds_to_checkpoint
    timing = f" ({received}; {seconds:.1f} s from the signal to the checkpoint)" if seconds is not None else ""
    return (
        f"preempted at step {step}: checkpoint-{step} written; resume with --resume_from_checkpoint last{timing}; "
        f"exit code {EXIT_PREEMPTED}"
    )


__all__ = [
    "EXIT_PREEMPTED",
    "LOCK_FILE_NAME",
    "OutputDirInUseError",
    "PREEMPTED_FILE_NAME",
    "PREEMPTION_SIGNALS",
    "PreemptionCallback",
    "claim_output_dir",
    "end_run",
    "preemption_message",
    "release_output_dir",
    "signals_deferred",
    "start_run",
]
