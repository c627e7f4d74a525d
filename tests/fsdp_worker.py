"""
Worker of tests/test_fsdp.py, started by `torchrun --nproc_per_node 2` with the environment that
`accelerate launch --use_fsdp --fsdp_version 2` sets. Every rank runs the real `IJepaTrainer` (and pretrain.py's final
save) under FSDP2 on CPU:

1. 4 optimiser steps with a sharded checkpoint at step 2, recording the collectives of every EMA update, per-rank
   parameter and optimiser memory, and which parameters the optimiser holds;
2. pretrain.py's `save_final_model` (consolidated safetensors of the full model and of the target encoder);
3. a second trainer resuming from the sharded `checkpoint-2` up to step 4;
4. composability, each run from the same initial weights for 4 steps: activation checkpointing through the training
   argument (`--activation_checkpointing`, what the ViT-g recipe sets), FSDP's own activation checkpointing
   (`fsdp_activation_checkpointing` of the accelerate configs), and `--bf16` (accelerate's FSDP2 mixed precision,
   bf16 compute with the fp32 gradient reduction `IJepaTrainer` sets).

Rank 0 writes the gathered weights of the runs (`uninterrupted.pt`, `resumed.pt`, `ac_argument.pt`, `ac_fsdp.pt`) and
every rank a `rank{r}.json` of measurements into the folder given as the only argument; tests/test_fsdp.py compares
them with a single-process run and with each other.
"""

import json
import logging
import os
import sys
from pathlib import Path

import torch

# Run as a file by torchrun: the repository root is on the import path through the PYTHONPATH that tests/test_fsdp.py
# sets.
from modeling_ijepa.testing_utils import (
    MAX_STEPS,
    SAVE_STEPS,
    build_collator,
    build_dataset,
    build_model,
    training_arguments,
)
from modeling_ijepa.trainer import IJepaTrainer
from training_scripts import pretrain


def _local(tensor: torch.Tensor) -> torch.Tensor:
    from torch.distributed.tensor import DTensor

    return tensor.to_local() if isinstance(tensor, DTensor) else tensor


def _count_forwards(module: torch.nn.Module, record: dict) -> None:
    """
    Count `module`'s forward calls in `record["calls"]` (a pre-hook: a recomputation under activation checkpointing
    stops as soon as the saved tensors are rebuilt, which can be before a forward hook would fire), and note the dtype
    of its output and whether autocast was on.
    """

    def count(_module, _inputs):
        record["calls"] = record.get("calls", 0) + 1

    def note(_module, _inputs, output):
        record["output_dtype"] = str(output.dtype)
        record["autocast"] = torch.is_autocast_enabled("cpu")

    module.register_forward_pre_hook(count)
    module.register_forward_hook(note)


def _composed_run(out: Path, name: str, rank: int, dataset, **overrides) -> tuple[IJepaTrainer, dict]:
    """4 optimiser steps from the uninterrupted run's initial weights with `overrides`; rank 0 saves `{name}.pt`."""
    model = build_model()
    record: dict = {}
    # On a module inside the first encoder block: with activation checkpointing it runs twice per step (forward, then
    # its recomputation in backward). transformers checkpoints the block's `forward`, not its hooks.
    _count_forwards(model.encoder.layers[0].mlp, record)
    trainer = IJepaTrainer(
        model=model,
        args=training_arguments(out / name, save_strategy="no", **overrides),
        train_dataset=dataset,
        data_collator=build_collator(rank),
    )
    trainer.train()
    record["losses"] = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    record["distributed_mode"] = trainer.distributed_mode
    record["first_block"] = type(trainer.model.encoder.layers[0]).__name__
    record["fsdp_activation_checkpointing"] = trainer.accelerator.state.fsdp_plugin.activation_checkpointing
    state_dict = trainer.accelerator.get_state_dict(trainer.model)
    if rank == 0 and name.startswith("ac_"):
        torch.save(state_dict, out / f"{name}.pt")
    return trainer, record


def main(out: Path) -> None:
    from torch.distributed.fsdp import FSDPModule
    from torch.distributed.tensor.debug import CommDebugMode

    from modeling_ijepa.data import default_image_processor

    logging.basicConfig(format="%(levelname)s %(name)s: %(message)s", level=logging.WARNING)
    logging.getLogger("modeling_ijepa").setLevel(logging.INFO)
    rank = int(os.environ["RANK"])
    dataset = build_dataset()
    report: dict = {"rank": rank}

    # -- 1. uninterrupted run ---------------------------------------------------------------------------------------
    model = build_model()
    plain_forwards: dict = {}
    _count_forwards(model.encoder.layers[0].mlp, plain_forwards)
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
    report["plain_forwards"] = plain_forwards

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

    # -- 4. composability -------------------------------------------------------------------------------------------
    _, report["ac_argument"] = _composed_run(out, "ac_argument", rank, dataset, activation_checkpointing=True)
    os.environ["FSDP_ACTIVATION_CHECKPOINTING"] = "true"  # what `fsdp_activation_checkpointing: true` sets
    try:
        _, report["ac_fsdp"] = _composed_run(out, "ac_fsdp", rank, dataset)
    finally:
        del os.environ["FSDP_ACTIVATION_CHECKPOINTING"]
    # The trainer refuses --bf16 on CPUs without native bf16. On torch's reference bf16 kernels this 2-block width-32
    # model costs about 2 s for the 4 steps (estimated in benchmarks/RESULTS.md), so the worker runs as on a
    # bf16-capable CPU (as the `cpu_with_bf16` fixture of tests/conftest.py does): the check then runs the same on
    # CPUs with and without native bf16.
    from conftest import simulated_cpu_bf16

    from modeling_ijepa import hardware

    hardware.cpu_bf16_support = lambda: simulated_cpu_bf16(native=True)
    bf16_trainer, report["bf16"] = _composed_run(out, "bf16", rank, dataset, bf16=True)
    policy = bf16_trainer.accelerator.state.fsdp_plugin.mixed_precision_policy
    report["bf16"]["plugin_policy"] = [str(policy.param_dtype), str(policy.reduce_dtype)]
    # The policy each FSDP unit was built with (what its reduce-scatter really uses).
    report["bf16"]["unit_policies"] = sorted(
        {
            f"{group.mp_policy.param_dtype} {group.mp_policy.reduce_dtype}"
            for module in bf16_trainer.model.modules()
            if isinstance(module, FSDPModule)
            for group in [module._get_fsdp_state()._fsdp_param_group]
            if group is not None
        }
    )
    report["max_steps"] = MAX_STEPS
    (out / f"rank{rank}.json").write_text(json.dumps(report), encoding="utf-8")


if __name__ == "__main__":
    main(Path(sys.argv[1]))
