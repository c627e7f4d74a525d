"""
The toy distributed run that `tests/test_fsdp.py` (with `tests/fsdp_worker.py`) and `benchmarks/compile_check.py`
train: a 2-block width-32 encoder and predictor on the 48 px / patch-4 grid, 4 digits per process and step, crops and
masks seeded per process as `pretrain.py` seeds them, and the launch environment of `accelerate launch --use_fsdp
--fsdp_version 2`. One definition, so the test and the benchmark train the same thing.
"""

from pathlib import Path

import torch


MAX_STEPS = 4
SAVE_STEPS = 2
PER_RANK_BATCH = 4
WORLD_SIZE = 2
MASK_SEED = 1
# What `accelerate launch --use_fsdp --fsdp_version 2 --fsdp_auto_wrap_policy TRANSFORMER_BASED_WRAP
# --fsdp_transformer_layer_cls_to_wrap IJepaLayer --fsdp_state_dict_type SHARDED_STATE_DICT` puts in the environment.
FSDP2_LAUNCH_ENV = {
    "ACCELERATE_USE_FSDP": "true",
    "FSDP_VERSION": "2",
    "FSDP_AUTO_WRAP_POLICY": "TRANSFORMER_BASED_WRAP",
    "FSDP_TRANSFORMER_CLS_TO_WRAP": "IJepaLayer",
    "FSDP_STATE_DICT_TYPE": "SHARDED_STATE_DICT",
}


def build_model(seed: int = 0):
    """A 2-block encoder (width 32) on a 12x12 patch grid with a 2-block predictor, fp32."""
    from modeling_ijepa import IJepaConfig, IJepaForPreTraining

    config = IJepaConfig.from_preset(
        "vit_micro_patch4_48",
        hidden_size=32,
        num_hidden_layers=2,
        intermediate_size=64,
        predictor_hidden_size=16,
        predictor_num_hidden_layers=2,
    )
    torch.manual_seed(seed)
    return IJepaForPreTraining(config)


def build_dataset():
    from modeling_ijepa.data import load_digits_dataset

    return load_digits_dataset(48)["train"].select(range(64))


def build_collator(rank: int):
    """Crops and masks of process `rank`, seeded as pretrain.py seeds them."""
    from modeling_ijepa.data import IJepaPretrainingCollator, default_image_processor
    from modeling_ijepa.masking import MultiBlockMaskSampler

    config = build_model().config
    masks = MultiBlockMaskSampler.from_config(config, seed=MASK_SEED + 1_000_003 * rank)
    return IJepaPretrainingCollator(masks, default_image_processor(config.image_size))


class RankInterleavedCollator:
    """
    The single-process view of a `WORLD_SIZE`-process global batch: with `gradient_accumulation_steps=WORLD_SIZE`,
    micro-batch `i` is what process `i % WORLD_SIZE` collates as its batch `i // WORLD_SIZE` (accelerate's
    `BatchSamplerShard` deals batch `i` of the same seeded sampler to that process).
    """

    def __init__(self):
        self.collators = [build_collator(rank) for rank in range(WORLD_SIZE)]
        self.index = 0

    def set_batch_index(self, batch_index: int) -> None:
        self.index = batch_index
        for rank, collator in enumerate(self.collators):
            collator.set_batch_index((batch_index + WORLD_SIZE - 1 - rank) // WORLD_SIZE)

    def __call__(self, examples):
        batch = self.collators[self.index % WORLD_SIZE](examples)
        self.index += 1
        return batch


def training_arguments(output_dir: Path, **overrides):
    from modeling_ijepa.trainer import IJepaTrainingArguments

    values = dict(
        output_dir=str(output_dir),
        use_cpu=True,
        max_steps=MAX_STEPS,
        per_device_train_batch_size=PER_RANK_BATCH,
        learning_rate=3e-3,
        start_lr=1e-3,
        warmup_steps=1,
        max_grad_norm=1.0,
        ema_momentum_start=0.5,
        ema_momentum_end=0.9,
        save_strategy="steps",
        save_steps=SAVE_STEPS,
        logging_steps=1,
        report_to=[],
        disable_tqdm=True,
        dataloader_num_workers=0,
        seed=0,
    )
    values.update(overrides)
    return IJepaTrainingArguments(**values)
