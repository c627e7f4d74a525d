"""
Worker of tests/test_long_runs_distributed.py: one process of a 2-process run (two "nodes" on localhost, or two
processes of one launch), started by torchrun or accelerate launch. `python longrun_worker.py MODE [--unshared] OUT`:

- `preempt`: (1) the data each process reads in one epoch; (2) 4 optimiser steps into `OUT/run` where process 1
  alone sends itself SIGTERM during step 2, so every process must stop at step 2 with one checkpoint; (3) a resume of
  `last` up to step 4. Process 0 writes the gathered weights (`resumed.pt`); under FSDP2 every process also scores the
  resumed target encoder with the k-NN monitor (sharded). With `--unshared`, first (0) runs whose nodes write into
  different folders, with and without `save_on_each_node` (both must fail at start).
- `die`: 4 steps with a checkpoint every 2; process 1 SIGKILLs itself during step 3.

Every process writes `OUT/rank{r}.json`.
"""

import json
import os
import signal
import sys
from pathlib import Path

import torch
from transformers import TrainerCallback

from benchmarks.toy_run import MAX_STEPS, build_collator, build_dataset, build_model, training_arguments
from modeling_ijepa.trainer import IJepaTrainer


class _SignalAt(TrainerCallback):
    def __init__(self, step: int, signum):
        self.step, self.signum = step, signum

    def on_step_begin(self, args, state, control, **kwargs):
        if state.global_step + 1 == self.step:
            os.kill(os.getpid(), self.signum)


class _IndexRecorder:
    """The collator of this process, noting the `index` of every example it collates."""

    def __init__(self, collator):
        self.collator, self.seen = collator, []

    def set_batch_index(self, batch_index: int) -> None:
        self.collator.set_batch_index(batch_index)

    def __call__(self, examples):
        self.seen.extend(int(example["index"]) for example in examples)
        return self.collator([{k: v for k, v in example.items() if k != "index"} for example in examples])


def _trainer(output_dir, rank, callbacks=(), knn_monitor=None, **overrides):
    values = dict(save_steps=100)
    values.update(overrides)
    trainer = IJepaTrainer(
        model=build_model(),
        args=training_arguments(output_dir, **values),
        train_dataset=build_dataset().map(lambda example, index: {"index": index}, with_indices=True),
        data_collator=_IndexRecorder(build_collator(rank)),
        knn_monitor=knn_monitor,
    )
    for callback in callbacks:
        trainer.add_callback(callback)
    return trainer


def _gathered(trainer) -> dict:
    state = trainer.accelerator.get_state_dict(trainer.model)
    return {key: value.detach().cpu().clone() for key, value in state.items()}


def _knn_monitor():
    from modeling_ijepa.data import default_image_processor, load_digits_dataset
    from modeling_ijepa.monitoring import KnnMonitor

    digits = load_digits_dataset(48)
    return KnnMonitor(
        digits["train"].select(range(200)), digits["test"].select(range(100)), default_image_processor(48), k=5
    )


def preempt(out: Path, rank: int, report: dict, unshared: bool) -> None:
    if unshared:
        own = out / f"node{rank}"
        for save_on_each_node in (False, True):
            try:
                _trainer(own / "refused", rank, save_on_each_node=save_on_each_node).train()
                report[f"unshared_refusal_{save_on_each_node}"] = None
            except ValueError as error:
                report[f"unshared_refusal_{save_on_each_node}"] = str(error)

    epoch = _trainer(out / "epoch", rank)
    for _ in epoch.get_train_dataloader():
        pass
    report["epoch_indices"] = epoch.data_collator.seen

    preempted = _trainer(out / "run", rank, callbacks=[_SignalAt(2, signal.SIGTERM)] if rank == 1 else [])
    preempted.train()
    report["preempted_at_step"] = preempted.preemption.preempted_at_step
    report["stopped_global_step"] = preempted.state.global_step
    report["checkpoints"] = sorted(p.name for p in (out / "run").glob("checkpoint-*"))
    report["distributed_mode"] = preempted.distributed_mode

    monitor = _knn_monitor() if preempted.is_fsdp_enabled else None
    resumed = _trainer(
        out / "run", rank, knn_monitor=monitor, **({"eval_strategy": "no"} if monitor is not None else {})
    )
    resumed.train(resume_from_checkpoint="last")
    report["resumed_global_step"] = resumed.state.global_step
    weights = _gathered(resumed)
    if monitor is not None:
        report["knn"] = resumed.evaluate()
    if rank == 0:
        torch.save(weights, out / "resumed.pt")


def die(out: Path, rank: int, report: dict) -> None:
    trainer = _trainer(out / "run", rank, save_steps=2)
    if rank == 1:
        trainer.add_callback(_SignalAt(3, signal.SIGKILL))
    trainer.train()
    report["finished"] = True  # process 0 must never get here: the launcher stops it


def main() -> None:
    mode, out = sys.argv[1], Path(sys.argv[-1])
    rank = int(os.environ.get("RANK", "0"))
    torch.set_num_threads(1)
    report: dict = {"rank": rank}
    try:
        if mode == "preempt":
            preempt(out, rank, report, unshared="--unshared" in sys.argv)
        else:
            die(out, rank, report)
    finally:
        (out / f"rank{rank}.json").write_text(json.dumps(report, default=str))


if __name__ == "__main__":
    assert MAX_STEPS == 4
    main()
