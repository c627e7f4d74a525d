"""I-JEPA pre-training with `transformers.Trainer`: the I-JEPA step and the Trainer hooks it needs.

The I-JEPA step is the Trainer's own step (forward, backward, optimiser, LR scheduler) plus, after every *optimiser*
step, the EMA update of the target encoder and the weight-decay schedule (a callback, so it is correct under gradient
accumulation). Every schedule is a pure function of the global step, so resuming a checkpoint resumes them exactly.
The other jobs of a run live in the modules that own them and are mixed into [`IJepaTrainer`]:

Each job, its module, and the transformers / accelerate internals it overrides or reads (and why):

- checkpoints, `checkpoints.py`: `Trainer._get_output_dir` (redirects a save into its staging folder) and
  `_save_checkpoint` (flush, manifest, rename), `transformers.trainer.rotate_checkpoints` (re-applied after the
  rename); `_load_from_checkpoint` / `_load_best_model` (weights through `from_pretrained`, which maps our
  vanilla-compatible key names; the Trainer's raw load would skip them);
- evaluation, `monitoring.py`: `Trainer.evaluate` (the k-NN monitor), `_determine_best_metric` and
  `TrainerState.best_metric` / `best_global_step` (`best_model_rule`);
- distributed set-up, `distributed.py`: `Trainer.create_accelerator_and_postprocess`, `Trainer.is_fsdp_enabled`;
  accelerate's `AcceleratorState` / `PartialState` distributed type and FSDP plugin (CPU FSDP2, where accelerate
  stops at MULTI_CPU);
- the run's life cycle, `lifecycle.py`: no internal; the output-folder lock around `train()`, and preemption as a
  `TrainerCallback`;
- streamed data, this module: `Trainer.get_train_dataloader`, `Accelerator._dataloaders` (a streamed loader prepared
  here is registered like the Trainer's own).

Check those when upgrading either library.
"""

from __future__ import annotations

import logging

import torch
from torch.optim.lr_scheduler import LambdaLR
from transformers import Trainer, TrainerCallback

from .checkpoints import CheckpointingMixin
from .data import shard_for_process
from .distributed import DistributedSetupMixin
from .hardware import require_native_cpu_bf16
from .lifecycle import PreemptionCallback, end_run, start_run
from .modeling_ijepa import IJepaForPreTraining
from .monitoring import KnnEvaluationMixin, effective_rank
from .optimization import ijepa_ema_momentum, ijepa_learning_rate, ijepa_optimizer, ijepa_weight_decay
from .training_args import IJepaTrainingArguments


logger = logging.getLogger(__name__)


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


class IJepaTrainer(CheckpointingMixin, KnnEvaluationMixin, DistributedSetupMixin, Trainer):
    """
    [`~transformers.Trainer`] for [`IJepaForPreTraining`].

    - LR: linear warm-up from `start_lr` to `learning_rate` over the warm-up steps, then cosine to `final_lr`;
    - weight decay: cosine from `weight_decay` to `final_weight_decay`, never on biases, norms or other 1-D params;
    - the target encoder is not optimised; it follows the encoder by EMA once per optimiser step, momentum linear
      from `ema_momentum_start` to `ema_momentum_end`;
    - logs lr, wd, momentum, context/target token counts and collapse monitors (std of the target features over
      samples, averaged over dimensions, and the effective rank of the pooled target features), and the loss terms
      (the model output's `loss_terms`: `prediction_loss` and each regulariser that is on);
    - a non-finite loss stops the run before the optimiser step, so the last checkpoint stays the last good one;
    - checkpoints are written to a staging folder, flushed and renamed, so a kill during a save never leaves a partial
      one; `resume_from_checkpoint="last"` takes the newest complete checkpoint, a named damaged one fails at start
      (`checkpoints.py`);
    - SIGTERM / SIGUSR1 stop the run at the next optimiser-step boundary with a checkpoint there, on every process
      together (`self.preemption.preempted_at_step`; `lifecycle.py`);
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
        self.preemption = PreemptionCallback()
        self.add_callback(self.preemption)
        self._step_metrics: dict[str, float] = {}

    def train(self, resume_from_checkpoint: str | bool | None = None, **kwargs):
        """
        [`~transformers.Trainer.train`] inside [`~modeling_ijepa.lifecycle.start_run`] / `end_run`: `output_dir`
        claimed for this run, leftover staging folders of killed saves removed, and `resume_from_checkpoint` resolved
        the same way on every process (`"last"` / `True`: the newest complete checkpoint, or a fresh start when there
        is none; a path: checked). After a preemption signal it returns at the step of the checkpoint it wrote
        (`self.preemption.preempted_at_step`).
        """
        checkpoint = start_run(self.args, resume_from_checkpoint)
        try:
            return super().train(resume_from_checkpoint=checkpoint, **kwargs)
        finally:
            end_run(self.args)

    def _load_best_model(self) -> None:
        """Not after a preemption: the run is to be resumed, not finished."""
        if self.preemption.preempted_at_step is None:
            super()._load_best_model()

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
            for name, value in (outputs.loss_terms or {}).items():  # set when a regulariser is on
                self._step_metrics[name] = float(value.detach())
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


__all__ = [
    "IJepaTrainer",
    "IJepaTrainingArguments",
]
