"""I-JEPA pre-training with `transformers.Trainer`: schedules, target-encoder EMA, collapse monitors, safe checkpoints.

The I-JEPA step is the Trainer's own step (forward, backward, optimiser, LR scheduler) plus, after every *optimiser*
step, the EMA update of the target encoder and the weight-decay schedule (a callback, so it is correct under gradient
accumulation). Every schedule is a pure function of the global step, so resuming a checkpoint resumes them exactly.

transformers / accelerate internals this module relies on (check them when upgrading either library):
- `Trainer._save_checkpoint` and `transformers.trainer.PREFIX_CHECKPOINT_DIR` (swapped for the staging name during a
  save), `transformers.trainer.rotate_checkpoints` (re-applied after the rename): atomic checkpoints;
- `Trainer._load_from_checkpoint` (overridden to load through `from_pretrained`, which maps our vanilla key names);
- `Trainer._determine_best_metric` and `TrainerState.best_metric` / `best_global_step` (`best_model_rule`);
- `Trainer.create_accelerator_and_postprocess` and `Trainer.is_fsdp_enabled`, `Accelerator._dataloaders` (a streamed
  loader prepared here is registered like the Trainer's own); accelerate's `AcceleratorState` / `PartialState`
  distributed type and FSDP plugin (set for CPU FSDP2 in `distributed.py`, where accelerate stops at MULTI_CPU).
"""

from __future__ import annotations

import logging
import os
import shutil
import time
from dataclasses import dataclass, field

import torch
import transformers.trainer as transformers_trainer
from torch.optim.lr_scheduler import LambdaLR
from transformers import Trainer, TrainerCallback, TrainingArguments

from .data import shard_for_process
from .distributed import (
    OutputDirInUseError,
    claim_output_dir,
    describe_distributed_mode,
    enable_fsdp2_on_cpu,
    release_output_dir,
    requested_fsdp_plugin,
    use_fp32_gradient_reduction,
    validate_launch,
)
from .hardware import require_native_cpu_bf16
from .modeling_ijepa import LOSS_PARTS, IJepaForPreTraining
from .monitoring import BEST_MODEL_RULES, check_best_model_rule, choose_checkpoint, effective_rank, logged_scores
from .optimization import ijepa_ema_momentum, ijepa_learning_rate, ijepa_optimizer, ijepa_weight_decay


logger = logging.getLogger(__name__)


@dataclass
class IJepaTrainingArguments(TrainingArguments):
    """[`~transformers.TrainingArguments`] plus the I-JEPA schedules (defaults: the official ViT-H/14 recipe)."""

    learning_rate: float = field(default=1e-3, metadata={"help": "Peak learning rate, reached after warm-up."})
    start_lr: float = field(default=2e-4, metadata={"help": "Learning rate at the start of the linear warm-up."})
    final_lr: float = field(default=1e-6, metadata={"help": "Learning rate at the end of the cosine decay."})
    weight_decay: float = field(default=0.04, metadata={"help": "Weight decay at the start of its cosine schedule."})
    final_weight_decay: float = field(
        default=0.4, metadata={"help": "Weight decay at the end of its cosine schedule."}
    )
    ema_momentum_start: float = field(
        default=0.996, metadata={"help": "Target-encoder EMA momentum at the start, linear to ema_momentum_end."}
    )
    ema_momentum_end: float = field(default=1.0, metadata={"help": "Target-encoder EMA momentum at the end."})
    remove_unused_columns: bool = field(
        default=False, metadata={"help": "Kept False: the I-JEPA collator needs the raw `image` column."}
    )
    monitor_collapse: bool = field(
        default=True, metadata={"help": "Log target-feature std and effective rank at every logging step."}
    )
    best_model_rule: str = field(
        default="best",
        metadata={
            "help": "How `metric_for_best_model` picks the best checkpoint: 'best' (the Trainer's rule: the highest "
            "score) or 'latest_within_stderr' (the latest checkpoint scoring within one standard error of the "
            "highest, the one-standard-error rule: a noisy monitor does not pick an early checkpoint by luck; the "
            "evaluation must report the metric's standard error as `<metric>_stderr`, as the k-NN monitor does).",
            "choices": list(BEST_MODEL_RULES),
        },
    )

    def __post_init__(self):
        super().__post_init__()
        check_best_model_rule(self.best_model_rule)
        if self.best_model_rule != "best" and self.metric_for_best_model is None:
            raise ValueError(
                f"best_model_rule={self.best_model_rule!r} picks among evaluated checkpoints: set "
                "metric_for_best_model too (e.g. knn_accuracy with the k-NN monitor)."
            )


class _IJepaScheduleCallback(TrainerCallback):
    """After each optimiser step: EMA update of the target encoder, then the weight decay of the next step."""

    def __init__(self, trainer: IJepaTrainer):
        self.trainer = trainer

    def on_train_begin(self, args, state, control, **kwargs):
        self.trainer._set_weight_decay(state.global_step + 1)
        self.trainer._sync_collator(state.global_step)

    def on_epoch_begin(self, args, state, control, **kwargs):
        self.trainer._sync_collator(state.global_step)

    def on_step_end(self, args, state, control, **kwargs):
        self.trainer._update_target_encoder(state.global_step - 1)
        self.trainer._set_weight_decay(state.global_step + 1)


class IJepaTrainer(Trainer):
    """
    [`~transformers.Trainer`] for [`IJepaForPreTraining`].

    - LR: linear warm-up from `start_lr` to `learning_rate` over the warm-up steps, then cosine to `final_lr`;
    - weight decay: cosine from `weight_decay` to `final_weight_decay`, never on biases, norms or other 1-D params;
    - the target encoder is not optimised; it follows the encoder by EMA once per optimiser step, momentum linear
      from `ema_momentum_start` to `ema_momentum_end`;
    - logs lr, wd, momentum, context/target token counts and collapse monitors (std of the target features over
      samples, averaged over dimensions, and the effective rank of the pooled target features), and the loss terms
      (`prediction_loss`, `vicreg_*_loss`, `sigreg_loss`) when a regulariser of the configuration is on;
    - a non-finite loss stops the run before the optimiser step, so the last checkpoint stays the last good one;
    - checkpoints are written to a staging folder and renamed, so a kill during a save never leaves a partial one;
    - with a `knn_monitor` ([`~modeling_ijepa.monitoring.KnnMonitor`]), [`evaluate`] scores the frozen target encoder
      by k-NN on labelled images (`eval_knn_accuracy`), so `eval_strategy` / `eval_steps` schedule it and
      `metric_for_best_model="knn_accuracy"` with `load_best_model_at_end` keeps the best encoder, not the last
      (`best_model_rule="latest_within_stderr"`: the latest one within a standard error of the best score);
    - distributed runs: the mode the run really trains in is logged (`distributed_mode`); FSDP2 (`--use_fsdp
      --fsdp_version 2`, or `fsdp`/`fsdp_config` arguments) shards encoder, predictor and target encoder per
      `IJepaLayer` and at the root, on GPUs and on CPU (gloo) alike, with the EMA update on the local shards;
      launches that cannot be honoured fail at start, and two runs never share an `output_dir` unknowingly.
    """

    args: IJepaTrainingArguments

    def __init__(self, model: IJepaForPreTraining, args: IJepaTrainingArguments, knn_monitor=None, **kwargs):
        if args.bf16 and args.device.type == "cpu":
            require_native_cpu_bf16("--bf16")
        self.knn_monitor = knn_monitor
        if knn_monitor is not None:
            if kwargs.get("eval_dataset") is not None:
                raise ValueError(
                    "Pass either eval_dataset or knn_monitor to IJepaTrainer, not both: with a k-NN monitor, "
                    "evaluation scores the monitor's labelled images."
                )
            kwargs["eval_dataset"] = knn_monitor.eval_dataset  # what `evaluate` scores; satisfies eval_strategy
        super().__init__(model=model, args=args, **kwargs)
        self.add_callback(_IJepaScheduleCallback(self))
        self._step_metrics: dict[str, float] = {}

    # -- distributed set-up ------------------------------------------------------------------------------------------
    def create_accelerator_and_postprocess(self) -> None:
        """The Trainer's accelerator, then FSDP2 on CPU where accelerate leaves it off, launch checks, and the log."""
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
        if self.is_fsdp_enabled and self.knn_monitor is not None:
            raise ValueError(
                "The k-NN monitor does not run under FSDP yet (the target encoder's root parameters stay sharded "
                "outside the model's forward): set --eval_strategy no, or train with DDP."
            )
        if self.is_fsdp_enabled:
            use_fp32_gradient_reduction(self.accelerator.state.fsdp_plugin)
        self.distributed_mode = describe_distributed_mode(self.accelerator)
        logger.info("distributed mode: %s (process %d)", self.distributed_mode, self.accelerator.process_index)

    def train(self, *args, **kwargs):
        """[`~transformers.Trainer.train`], with `output_dir` claimed for this run while it trains."""
        from accelerate.utils import broadcast_object_list

        output_dir = self.args.output_dir
        refusal = [claim_output_dir(output_dir) if self.args.should_save else None]
        if self.accelerator.num_processes > 1:
            broadcast_object_list(refusal)
        if refusal[0] is not None:
            raise OutputDirInUseError(refusal[0])
        try:
            return super().train(*args, **kwargs)
        finally:
            if self.args.should_save:
                release_output_dir(output_dir)

    # -- optimiser and schedules ------------------------------------------------------------------------------------
    def _ijepa_model(self) -> IJepaForPreTraining:
        return self.accelerator.unwrap_model(self.model)

    def create_optimizer(self, model=None) -> torch.optim.Optimizer:
        if self.optimizer is None:
            self.optimizer = ijepa_optimizer(
                self.model if model is None else model,
                device_type=self.args.device.type,
                lr=self.args.learning_rate,
                weight_decay=self.args.weight_decay,
                betas=(self.args.adam_beta1, self.args.adam_beta2),
                eps=self.args.adam_epsilon,
            )
        return self.optimizer

    def create_scheduler(self, num_training_steps: int, optimizer: torch.optim.Optimizer | None = None):
        if self.lr_scheduler is None:
            optimizer = optimizer or self.optimizer
            warmup = self.args.get_warmup_steps(num_training_steps)
            args = self.args

            def factor(steps_done: int) -> float:
                # LambdaLR sets the LR of the *next* step, the (steps_done + 1)-th.
                lr = ijepa_learning_rate(
                    steps_done + 1, num_training_steps, warmup, args.start_lr, args.learning_rate, args.final_lr
                )
                return lr / args.learning_rate

            self.lr_scheduler = LambdaLR(optimizer, factor)
        return self.lr_scheduler

    def _total_steps(self) -> int:
        return max(1, self.state.max_steps)

    def _set_weight_decay(self, step: int) -> None:
        if self.optimizer is None:
            return
        weight_decay = ijepa_weight_decay(
            step, self._total_steps(), self.args.weight_decay, self.args.final_weight_decay
        )
        for group in self.optimizer.param_groups:
            if group.get("ijepa_weight_decay"):
                group["weight_decay"] = weight_decay
        self._step_metrics["weight_decay"] = weight_decay

    def _update_target_encoder(self, update: int) -> None:
        args = self.args
        momentum = ijepa_ema_momentum(update, self._total_steps(), args.ema_momentum_start, args.ema_momentum_end)
        self._ijepa_model().update_target_encoder(momentum)
        self._step_metrics["ema_momentum"] = momentum

    def _sync_collator(self, global_step: int) -> None:
        """Point the collator at the next micro-batch so crops and masks match an uninterrupted run."""
        import datasets

        # Streams are resumed by re-reading the consumed batches, which advances the collator by itself.
        streaming = isinstance(self.train_dataset, (torch.utils.data.IterableDataset, datasets.IterableDataset))
        if hasattr(self.data_collator, "set_batch_index") and not streaming:
            self.data_collator.set_batch_index(global_step * self.args.gradient_accumulation_steps)

    # -- data -------------------------------------------------------------------------------------------------------
    def get_train_dataloader(self) -> torch.utils.data.DataLoader:
        """
        Streamed (`datasets.IterableDataset`) training data is split between processes with `split_dataset_by_node`
        (whole shards when the stream has enough of them, otherwise every `world_size`-th example), each process
        reading only its own part. The loader is then prepared as a single-process one, so accelerate neither reads the
        stream on the main process only (`dispatch_batches`) nor shards it a second time. Map-style data uses the
        Trainer's own distributed sampler.
        """
        import datasets
        from accelerate.data_loader import prepare_data_loader

        dataset = self.train_dataset
        if not isinstance(dataset, datasets.IterableDataset):
            return super().get_train_dataloader()
        dataset = shard_for_process(dataset, self.args.process_index, self.args.world_size)
        workers = self.args.dataloader_num_workers
        loader = torch.utils.data.DataLoader(
            dataset,
            batch_size=self._train_batch_size,
            collate_fn=self.data_collator,
            num_workers=workers,
            pin_memory=self.args.dataloader_pin_memory,
            persistent_workers=self.args.dataloader_persistent_workers and workers > 0,
            prefetch_factor=self.args.dataloader_prefetch_factor if workers > 0 else None,
            drop_last=self.args.dataloader_drop_last,
        )
        prepared = prepare_data_loader(
            loader,
            device=self.args.device,
            num_processes=1,
            process_index=0,
            put_on_device=True,
            dispatch_batches=False,
        )
        self.accelerator._dataloaders.append(prepared)
        return prepared

    # -- step -------------------------------------------------------------------------------------------------------
    def compute_loss(self, model, inputs, return_outputs: bool = False, num_items_in_batch=None):
        outputs = model(
            pixel_values=self._float_pixel_values(inputs["pixel_values"]),
            context_indices=inputs["context_indices"],
            target_indices=inputs["target_indices"],
            context_mask=inputs.get("context_mask"),  # set by bucketed batches (TokenBuckets)
            target_mask=inputs.get("target_mask"),
        )
        loss = outputs.loss
        if not torch.isfinite(loss.detach()):
            raise FloatingPointError(
                f"The I-JEPA loss became {loss.item()} at step {self.state.global_step}: training stopped before the "
                "optimiser step, so the last saved checkpoint is the last good one. Lower the learning rate, use "
                "bf16 instead of fp16, or check the input data."
            )
        if self._is_logging_step():
            # Real context tokens per image (padded full-context batches end their rows in -1 indices).
            self._step_metrics["context_tokens"] = float((inputs["context_indices"] >= 0).sum(dim=1).float().mean())
            self._step_metrics["target_tokens"] = float((inputs["target_indices"][0] >= 0).sum())
            dropped = getattr(self.data_collator, "num_dropped", None)
            if dropped is not None:  # counted in this process (DataLoader workers keep their own counts)
                self._step_metrics["skipped_images"] = float(dropped)
            for name in LOSS_PARTS:  # the loss terms, when a regulariser is on
                if getattr(outputs, name, None) is not None:
                    self._step_metrics[name] = float(getattr(outputs, name).detach())
            if self.args.monitor_collapse:
                with torch.no_grad():
                    targets, target_mask = outputs.targets.detach().float(), inputs.get("target_mask")
                    targets = targets.flatten(0, 2) if target_mask is None else targets[target_mask]  # real tokens
                    self._step_metrics["target_feature_std"] = float(targets.std(dim=0).mean())
                    self._step_metrics["pooled_effective_rank"] = effective_rank(outputs.target_pooler_output.detach())
        return (loss, outputs) if return_outputs else loss

    def _float_pixel_values(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """Normalise `uint8` batches (`IJepaPretrainingCollator(output_uint8=True)`) here, on the training device."""
        if pixel_values.dtype != torch.uint8:
            return pixel_values
        normalize = getattr(self.data_collator, "normalize", None)
        if normalize is None:
            raise TypeError(
                "pixel_values arrived as uint8 but the data collator has no `normalize` method to turn them into "
                "normalised floats: use IJepaPretrainingCollator, or return float pixel_values from the collator."
            )
        return normalize(pixel_values)

    def _is_logging_step(self) -> bool:
        # compute_loss runs before the step counter moves: the step being computed is global_step + 1.
        return self.args.logging_steps > 0 and (self.state.global_step + 1) % int(self.args.logging_steps) == 0

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        if "loss" in logs:
            logs.update(self._step_metrics)
        super().log(logs, start_time)

    # -- evaluation -------------------------------------------------------------------------------------------------
    def evaluate(self, eval_dataset=None, ignore_keys=None, metric_key_prefix: str = "eval") -> dict[str, float]:
        """
        With a `knn_monitor`: k-NN accuracy of the frozen target encoder on the monitor's images, logged and returned
        as `{prefix}_knn_accuracy` with its standard error `{prefix}_knn_accuracy_stderr` (plus `{prefix}_runtime`);
        no gradient, no random number, no data-loader state is touched, so the training that follows is the same as
        without evaluation. Without one: the Trainer's own evaluation of `eval_dataset`.
        """
        if self.knn_monitor is None:
            return super().evaluate(eval_dataset, ignore_keys=ignore_keys, metric_key_prefix=metric_key_prefix)
        if eval_dataset is not None:
            raise ValueError(
                "This trainer's evaluation is its k-NN monitor, which scores its own images: call evaluate() without "
                "eval_dataset, or build a KnnMonitor for the other images."
            )
        start = time.perf_counter()
        scores = self.knn_monitor.evaluate(
            self._ijepa_model().get_encoder(), device=self.args.device, autocast=self.autocast_smart_context_manager
        )
        names = [name for name in ("knn_accuracy", "knn_accuracy_stderr") if name in scores]
        metrics = {f"{metric_key_prefix}_{name}": scores[name] for name in names}
        metrics[f"{metric_key_prefix}_runtime"] = round(time.perf_counter() - start, 4)
        self.log(metrics)
        self.control = self.callback_handler.on_evaluate(self.args, self.state, self.control, metrics)
        return metrics

    def _determine_best_metric(self, metrics: dict[str, float], trial) -> bool:
        """
        Whether this evaluation's checkpoint becomes the best one. `best_model_rule="best"`: the Trainer's rule.
        `"latest_within_stderr"`: [`choose_checkpoint`] over every score logged so far (the log history holds them,
        so the rule survives a resume); `state.best_metric` is the chosen checkpoint's score.
        """
        if self.args.best_model_rule == "best":
            return super()._determine_best_metric(metrics=metrics, trial=trial)
        key = self.args.metric_for_best_model
        key = key if key.startswith("eval_") else f"eval_{key}"
        for name in (key, f"{key}_stderr"):
            if name not in metrics:
                raise KeyError(
                    f"best_model_rule={self.args.best_model_rule!r} needs {name!r} in the evaluation metrics, which "
                    f"has {sorted(metrics)}: evaluate with the k-NN monitor (metric_for_best_model knn_accuracy), or "
                    "use best_model_rule best."
                )
        step = self.state.global_step
        scores = logged_scores(self.state.log_history, key)
        scores[step] = (metrics[key], metrics[f"{key}_stderr"])
        if choose_checkpoint(scores, self.args.best_model_rule, self.args.greater_is_better) != step:
            return False
        self.state.best_metric = metrics[key]
        if self.args.save_strategy in ("steps", "epoch", "best"):
            self.state.best_global_step = step
        return True

    # -- checkpoints ------------------------------------------------------------------------------------------------
    def _load_from_checkpoint(self, resume_from_checkpoint: str, model=None) -> None:
        """
        Restore the weights through `from_pretrained`, which maps the vanilla-compatible key names of our files back
        onto the modules (the Trainer's raw `load_state_dict` would silently skip them). FSDP / DeepSpeed checkpoints
        hold module names already and go through the Trainer's own loader.
        """
        model = self.model if model is None else model
        if self.is_fsdp_enabled or self.is_deepspeed_enabled:
            return super()._load_from_checkpoint(resume_from_checkpoint, model=model)
        target = self.accelerator.unwrap_model(model)
        loaded = type(target).from_pretrained(resume_from_checkpoint)
        state = loaded.state_dict()
        missing = set(target.state_dict()) ^ set(state)
        if missing:
            raise ValueError(
                f"Checkpoint {resume_from_checkpoint} does not match the model (keys differ: {sorted(missing)[:5]}): "
                "resume with the same --model_preset and --config_overrides it was trained with."
            )
        target.load_state_dict(state)

    def _load_best_model(self) -> None:
        """
        `load_best_model_at_end`, through [`_load_from_checkpoint`]: the Trainer's own loader is not strict and would
        skip our vanilla-compatible key names.
        """
        if self.is_fsdp_enabled or self.is_deepspeed_enabled:
            return super()._load_best_model()
        logger.info("loading the best model, %s (score %s)", self.state.best_model_checkpoint, self.state.best_metric)
        self._load_from_checkpoint(self.state.best_model_checkpoint)

    def save_model(self, output_dir: str | None = None, _internal_call: bool = False) -> None:
        """
        [`~transformers.Trainer.save_model`]; under FSDP with sharded state dicts the Trainer writes nothing here (its
        checkpoints hold the sharded state), so the final model is gathered and saved as one safetensors file that
        `from_pretrained` loads. Collective: call it on every process.
        """
        plugin = self.accelerator.state.fsdp_plugin if self.is_fsdp_enabled else None
        sharded = plugin is not None and "SHARDED_STATE_DICT" in str(plugin.state_dict_type)
        if not sharded or _internal_call:
            return super().save_model(output_dir, _internal_call=_internal_call)
        output_dir = self.args.output_dir if output_dir is None else output_dir
        state_dict = self.accelerator.get_state_dict(self.model)  # gathered on the main process
        if self.args.should_save:
            # A plain (unsharded) copy built on the meta device holds the gathered tensors without copying them.
            model = self._ijepa_model()
            with torch.device("meta"):
                plain = type(model)(model.config)
            plain.load_state_dict(state_dict, assign=True)
            plain.save_pretrained(output_dir)
        self.accelerator.wait_for_everyone()

    def _save_checkpoint(self, model, trial) -> None:
        """Write `checkpoint-N` under a staging name, renamed when complete (a kill never leaves a partial one)."""
        final_dir = os.path.join(self._get_output_dir(trial=trial), f"checkpoint-{self.state.global_step}")
        staging_prefix = "tmp-checkpoint"
        staging_dir = os.path.join(self._get_output_dir(trial=trial), f"{staging_prefix}-{self.state.global_step}")
        original_prefix = transformers_trainer.PREFIX_CHECKPOINT_DIR
        transformers_trainer.PREFIX_CHECKPOINT_DIR = staging_prefix
        try:
            super()._save_checkpoint(model, trial)
        finally:
            transformers_trainer.PREFIX_CHECKPOINT_DIR = original_prefix
        # The Trainer recorded the best checkpoint under the staging name (or missed it): point it at its final name.
        best_step = self.state.best_global_step
        best_dir = os.path.join(self._get_output_dir(trial=trial), f"checkpoint-{best_step}")
        best_moved = bool(best_step) and (best_step == self.state.global_step or os.path.isdir(best_dir))
        if best_moved:
            self.state.best_model_checkpoint = best_dir
        self.accelerator.wait_for_everyone()
        if self.args.should_save:
            if best_moved:  # the copy of the state inside the checkpoint, read on resume
                self.state.save_to_json(os.path.join(staging_dir, transformers_trainer.TRAINER_STATE_NAME))
            if os.path.isdir(final_dir):
                shutil.rmtree(final_dir)
            os.replace(staging_dir, final_dir)
            # The Trainer rotated old checkpoints before the rename; apply `save_total_limit` to the new set.
            transformers_trainer.rotate_checkpoints(
                output_dir=self._get_output_dir(trial=trial),
                save_total_limit=self.args.save_total_limit,
                best_model_checkpoint=self.state.best_model_checkpoint,
                use_mtime=True,
            )
        self.accelerator.wait_for_everyone()


__all__ = [
    "IJepaTrainer",
    "IJepaTrainingArguments",
]
