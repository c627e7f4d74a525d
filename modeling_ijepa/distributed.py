"""
Distributed pre-training: which mode a run is really in, FSDP2 on CPU (gloo), and launches that cannot be honoured.

accelerate turns FSDP on only for accelerator devices: `AcceleratorState` promotes `MULTI_GPU` / `MULTI_XPU` / ... to
`DistributedType.FSDP` when `ACCELERATE_USE_FSDP` is set or an FSDP plugin is passed, but leaves `MULTI_CPU` as it is
and drops the plugin, so `accelerate launch --use_fsdp` (or `TrainingArguments(fsdp=...)`) on a CPU machine trains
with plain DDP and says nothing. torch's own FSDP2 (`fully_shard`) does run on CPU tensors with the gloo backend, and
accelerate's FSDP2 code path (`Accelerator._prepare_fsdp2`, sharded distributed checkpoints, DTensor-aware gradient
clipping) has nothing CUDA-specific in it. [`enable_fsdp2_on_cpu`] therefore finishes what accelerate leaves undone:
it records the plugin on the accelerator state and sets the FSDP distributed type, exactly as `AcceleratorState` does
for GPUs, so a CPU run goes through the same wrapping, step and checkpoint code as a GPU run. Any other request that
cannot be honoured raises a `ValueError` naming the fix.
"""

from __future__ import annotations

import logging
import os

import torch

# The output-folder lock lives with the rest of a run's life cycle; importable from here as before.
from .lifecycle import LOCK_FILE_NAME, OutputDirInUseError, claim_output_dir, release_output_dir


logger = logging.getLogger(__name__)


def requested_fsdp_plugin(training_args) -> accelerate.utils.FullyShardedDataParallelPlugin | None:  # noqa: F821
    """
    The FSDP plugin a launch asks for: from `TrainingArguments.fsdp` / `fsdp_config`, else from the environment that
    `accelerate launch --use_fsdp` (or an accelerate config with `distributed_type: FSDP`) sets; `None` when no FSDP
    was requested.
    """
    from accelerate.utils import FullyShardedDataParallelPlugin

    if getattr(training_args, "fsdp_plugin_args", None) is not None:
        return FullyShardedDataParallelPlugin(**training_args.fsdp_plugin_args)
    if os.environ.get("ACCELERATE_USE_FSDP", "false").lower() == "true":
        return FullyShardedDataParallelPlugin()
    return None


def _backend() -> str | None:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return str(torch.distributed.get_backend())
    return None


def enable_fsdp2_on_cpu(accelerator, plugin) -> None:
    """
    Put a multi-process CPU (gloo) run into accelerate's FSDP2 mode with `plugin` (what `AcceleratorState` does for
    GPUs, see the module docstring). Raises `ValueError` when the run cannot shard: a single process, FSDP1, or a
    backend other than gloo.
    """
    from accelerate.state import PartialState
    from accelerate.utils import DistributedType

    state = accelerator.state
    if state.distributed_type == DistributedType.FSDP:
        return
    if state.distributed_type != DistributedType.MULTI_CPU:
        raise ValueError(
            f"FSDP was requested, but this run is '{describe_distributed_mode(accelerator)}' and accelerate did not "
            "enable FSDP for it: FSDP shards across several processes, so launch with "
            "`accelerate launch --num_processes N` (N > 1) or `torchrun --nproc_per_node N`, or drop --use_fsdp / "
            "--fsdp."
        )
    if plugin.fsdp_version != 2:
        raise ValueError(
            f"FSDP version {plugin.fsdp_version} was requested on CPU: only FSDP2 (`fully_shard`) shards CPU tensors. "
            "Pass --fsdp_version 2 to accelerate launch (or fsdp_config={'version': 2})."
        )
    if _backend() != "gloo":
        raise ValueError(
            f"FSDP2 on CPU needs the gloo process-group backend, this run uses {_backend()!r}: unset the MPI "
            "launcher variables or launch with accelerate launch / torchrun."
        )
    if state.mixed_precision != "no":
        plugin.set_mixed_precision(state.mixed_precision)
    state.fsdp_plugin = plugin
    state.distributed_type = DistributedType.FSDP
    # As `AcceleratorState.__init__` does: every later `AcceleratorState()` re-reads the type from the partial state.
    PartialState._shared_state["distributed_type"] = DistributedType.FSDP
    os.environ["ACCELERATE_USE_FSDP"] = "true"


def use_fp32_gradient_reduction(plugin) -> None:
    """
    Under bf16/fp16 FSDP2, keep bf16/fp16 compute but reduce-scatter gradients in fp32, as DDP with autocast does (and
    the authors' recipe): accelerate's default policy reduces in the compute dtype.
    """
    policy = plugin.mixed_precision_policy
    if policy is None or getattr(policy, "param_dtype", None) in (None, torch.float32):
        return
    if policy.reduce_dtype != torch.float32:
        from torch.distributed.fsdp import MixedPrecisionPolicy

        plugin.mixed_precision_policy = MixedPrecisionPolicy(
            param_dtype=policy.param_dtype,
            reduce_dtype=torch.float32,
            output_dtype=policy.output_dtype,
            cast_forward_inputs=policy.cast_forward_inputs,
        )
        logger.info("FSDP2 mixed precision: %s compute, fp32 gradient reduction", policy.param_dtype)


def describe_distributed_mode(accelerator) -> str:
    """
    The mode a run actually runs in, for its log: e.g. `"FSDP2 full shard, 2 processes, gloo"`,
    `"DDP, 8 processes, nccl"`, `"DeepSpeed ZeRO-3, 16 processes, nccl"` or `"single process, cpu"`.
    """
    from accelerate.utils import DistributedType

    state = accelerator.state
    processes = f"{state.num_processes} process{'es' if state.num_processes != 1 else ''}"
    backend = _backend() or state.backend or "no process group"
    kind = state.distributed_type
    if kind == DistributedType.NO:
        return f"single process, {accelerator.device.type}"
    if kind == DistributedType.FSDP:
        plugin = state.fsdp_plugin
        if plugin.fsdp_version == 2:
            sharding = "full shard" if plugin.reshard_after_forward else "shard gradients and optimiser state"
        else:
            sharding = str(plugin.sharding_strategy).split(".")[-1].lower().replace("_", " ")
        offload = plugin.cpu_offload
        offloaded = type(offload).__name__ == "CPUOffloadPolicy" or getattr(offload, "offload_params", False)
        extras = ", parameters offloaded to CPU" if offloaded else ""
        return f"FSDP{plugin.fsdp_version} {sharding}{extras}, {processes}, {backend}"
    if kind == DistributedType.DEEPSPEED:
        return f"DeepSpeed ZeRO-{state.deepspeed_plugin.zero_stage}, {processes}, {backend}"
    if kind.name.startswith("MULTI_"):
        return f"DDP, {processes}, {backend}"
    return f"{kind.value}, {processes}, {backend}"


def validate_launch(accelerator) -> None:
    """
    Fail at start, naming the fix, when the processes the launcher started do not form the process group this run
    trains in (they would train independently and overwrite each other's `output_dir`).
    """
    launched = int(os.environ.get("WORLD_SIZE", "1"))
    joined = accelerator.state.num_processes
    if launched == joined:
        return
    mode = describe_distributed_mode(accelerator)
    if joined == 1:
        raise ValueError(
            f"The launcher started {launched} processes (WORLD_SIZE={launched}), but they did not join one process "
            f"group: each runs as '{mode}' and all would write the same output_dir. On a machine without GPUs pass "
            "--use_cpu true (TrainingArguments(use_cpu=True)) so that accelerate joins them with gloo, or launch a "
            "single process."
        )
    raise ValueError(
        f"The launcher announced WORLD_SIZE={launched} processes but the process group has {joined} ({mode}): make "
        "--num_processes (and --num_machines) of accelerate launch, or torchrun's --nnodes x --nproc_per_node, match "
        "the processes actually started on all machines."
    )


class DistributedSetupMixin:
    """
    The Trainer's accelerator set-up for I-JEPA runs (mixed into `IJepaTrainer`): overrides
    `Trainer.create_accelerator_and_postprocess` to add FSDP2 on CPU where accelerate leaves it off
    ([`enable_fsdp2_on_cpu`]), the launch checks ([`validate_launch`]), fp32 gradient reduction under mixed-precision
    FSDP2, and the log line naming the mode the run really trains in (`self.distributed_mode`).
    """

    def create_accelerator_and_postprocess(self) -> None:
        super().create_accelerator_and_postprocess()
        plugin = requested_fsdp_plugin(self.args)
        if plugin is not None and not self.is_fsdp_enabled:
            enable_fsdp2_on_cpu(self.accelerator, plugin)
            self.is_fsdp_enabled = True
            if self.args.save_only_model and "SHARDED_STATE_DICT" in str(plugin.state_dict_type):
                raise ValueError(
                    "--save_only_model cannot be combined with FSDP's SHARDED_STATE_DICT: drop --save_only_model, or "
                    "set fsdp_state_dict_type FULL_STATE_DICT."
                )
        validate_launch(self.accelerator)
        if self.is_fsdp_enabled:
            use_fp32_gradient_reduction(self.accelerator.state.fsdp_plugin)
        self.distributed_mode = describe_distributed_mode(self.accelerator)
        logger.info(
            "distributed mode: %s (process %d; process-group timeout %d s)",
            self.distributed_mode,
            self.accelerator.process_index,
            self.args.ddp_timeout,
        )


__all__ = [
    "DistributedSetupMixin",
    "LOCK_FILE_NAME",
    "OutputDirInUseError",
    "requested_fsdp_plugin",
    "enable_fsdp2_on_cpu",
    "use_fp32_gradient_reduction",
    "describe_distributed_mode",
    "validate_launch",
    "claim_output_dir",
    "release_output_dir",
]
