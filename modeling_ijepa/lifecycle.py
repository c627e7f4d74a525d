# Copyright 2026 The ijepa-hf Authors. All rights reserved.
# Licensed under the Apache License, Version 2.0.
"""The life of a training run: one run per output folder, preemption, and what the exit code says.

- **One run per `output_dir`** ([`claim_output_dir`] / [`release_output_dir`]): a lock file names the process that
  trains into the folder, so a second run into the same folder fails at start instead of mixing checkpoints.
- **Preemption** ([`PreemptionCallback`]): SIGTERM (what SLURM, Kubernetes and spot instances send before they kill a
  job) or SIGUSR1 (what `sbatch --signal=USR1@SECONDS` sends ahead of the time limit) no longer kills the run: the
  optimiser step in flight finishes, every process agrees on that step (one process receiving the signal is enough),
  a complete checkpoint is written there, and the run stops with exit code [`EXIT_PREEMPTED`]. A second signal
  during that save ends the process at once; the checkpoint being written then stays a staging folder that no resume
  picks (see `checkpoints.py`).
- **Exit codes** of `pretrain.py`: 0 finished, [`EXIT_PREEMPTED`] (75, `EX_TEMPFAIL`: "try again") stopped by a
  signal with a checkpoint to resume from, anything else failed (1 for a training error, 2 for a bad command line).
"""

from __future__ import annotations

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

    # -- handlers ---------------------------------------------------------------------------------------------------
    def _handle(self, signum, frame) -> None:
        if self.received is not None:  # a second signal: stop now, as without a handler
            signal.signal(signum, signal.SIG_DFL)
            os.kill(os.getpid(), signum)
            return
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
            control.should_save = True
            control.should_training_stop = True
            control.should_evaluate = False

    def on_save(self, args, state, control, **kwargs):
        if self.preempted_at_step is not None and self.seconds_to_checkpoint is None:
            self.seconds_to_checkpoint = time.monotonic() - self.received_at
            self.signal_name = signal.Signals(self.received).name if self.received is not None else "a signal"

    def on_train_end(self, args, state, control, **kwargs):
        self._restore()


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
    "PREEMPTION_SIGNALS",
    "PreemptionCallback",
    "claim_output_dir",
    "preemption_message",
    "release_output_dir",
]
