"""
Worker of tests/test_fsdp.py, started by `torchrun --nproc_per_node 2` with the environment that
`accelerate launch --use_fsdp --fsdp_version 2` sets. Every rank runs the real `IJepaTrainer` (and pretrain.py's final
save) under FSDP2 on CPU:

1. 4 optimiser steps with a sharded checkpoint at step 2, recording the collectives of every EMA update, per-rank
   parameter and optimiser memory, and which parameters the optimiser holds;
2. pretrain.py's `save_final_model` (consolidated safetensors of the full model and of the target encoder);
3. a second trainer resuming from the sharded `checkpoint-2` up to step 4.

Rank 0 writes the gathered weights of both runs (`uninterrupted.pt`, `resumed.pt`) and every rank a `rank{r}.json` of
measurements into the folder given as the only argument; tests/test_fsdp.py compares them with a single-process run.
"""

import json
import logging
import os
import sys
from pathlib import Path

import torch

# Run as a file by torchrun: tests/ is on the import path as the script's folder, the repository root through the
# PYTHONPATH that tests/test_fsdp.py sets.
from fsdp_common import (
    MAX_STEPS,
    SAVE_STEPS,
    build_collator,
    build_dataset,
    build_model,
    training_arguments,
)

from training_scripts import pretrain


def _local(tensor: torch.Tensor) -> torch.Tensor:
    from torch.distributed.tensor import DTensor

    return tensor.to_local() if isinstance(tensor, DTensor) else tensor


def main(out: Path) -> None:
    from torch.distributed.tensor.debug import CommDebugMode

    from modeling_ijepa.data import default_image_processor
    from modeling_ijepa.trainer import IJepaTrainer

    logging.basicConfig(format="%(levelname)s %(name)s: %(message)s", level=logging.WARNING)
    logging.getLogger("modeling_ijepa").setLevel(logging.INFO)
    rank = int(os.environ["RANK"])
    dataset = build_dataset()
    report: dict = {"rank": rank}

    # -- 1. uninterrupted run ---------------------------------------------------------------------------------------
    model = build_model()
    full_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    trainable_bytes = sum(p.numel() * p.element_size() for p in model.parameters() if p.requires_grad)
    trainer = IJepaTrainer(
        model=model, args=training_arguments(out / "run"), train_dataset=dataset, data_collator=build_collator(rank)
    )
    report["distributed_mode"] = trainer.distributed_mode

    ema_collectives = []
    update = trainer.model.update_target_encoder

    def counted_update(momentum: float) -> None:
        with CommDebugMode() as comm:
            update(momentum)
        ema_collectives.append(comm.get_total_counts())

    trainer.model.update_target_encoder = counted_update
    trainer.train()
    del trainer.model.update_target_encoder
    report["ema_collectives"] = ema_collectives

    wrapped = trainer.model
    from torch.distributed.fsdp import FSDPModule

    report["fsdp_modules"] = [name for name, module in wrapped.named_modules() if isinstance(module, FSDPModule)]
    report["dtensor_parameters"] = all(type(p).__name__ == "DTensor" for p in wrapped.parameters())
    optimised = {id(p) for group in trainer.optimizer.param_groups for p in group["params"]}
    report["target_encoder_in_optimizer"] = any(id(p) in optimised for p in wrapped.target_encoder.parameters())
    report["encoder_in_optimizer"] = all(id(p) in optimised for p in wrapped.encoder.parameters() if p.requires_grad)
    local_parameter_bytes = sum(_local(p).numel() * p.element_size() for p in wrapped.parameters())
    local_optimizer_bytes = sum(
        _local(value).numel() * value.element_size()
        for state in trainer.optimizer.state.values()
        for value in state.values()
        if torch.is_tensor(value) and value.dim() > 0
    )
    report["memory"] = {
        "full_parameter_bytes": full_bytes,
        "full_optimizer_bytes": 2 * trainable_bytes,  # AdamW: exp_avg and exp_avg_sq per trainable parameter
        "local_parameter_bytes": local_parameter_bytes,
        "local_optimizer_bytes": local_optimizer_bytes,
    }
    report["losses"] = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]

    state_dict = trainer.accelerator.get_state_dict(wrapped)
    if rank == 0:
        torch.save(state_dict, out / "uninterrupted.pt")

    # -- 2. pretrain.py's final save (consolidated files) -----------------------------------------------------------
    pretrain.save_final_model(trainer, wrapped.config, default_image_processor(48), str(out / "final"))

    # -- 3. resume from the sharded checkpoint of step SAVE_STEPS ---------------------------------------------------
    resumed = IJepaTrainer(
        model=build_model(seed=123),
        args=training_arguments(out / "run"),
        train_dataset=dataset,
        data_collator=build_collator(rank),
    )
    resumed.train(resume_from_checkpoint=str(out / "run" / f"checkpoint-{SAVE_STEPS}"))
    report["resumed_global_step"] = resumed.state.global_step
    state_dict = resumed.accelerator.get_state_dict(resumed.model)
    if rank == 0:
        torch.save(state_dict, out / "resumed.pt")
    report["checkpoint_files"] = sorted(os.listdir(out / "run" / f"checkpoint-{SAVE_STEPS}"))
    report["max_steps"] = MAX_STEPS
    (out / f"rank{rank}.json").write_text(json.dumps(report), encoding="utf-8")


if __name__ == "__main__":
    main(Path(sys.argv[1]))
