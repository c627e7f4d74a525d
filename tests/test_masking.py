"""Specification of MultiBlockMaskSampler: the official I-JEPA multi-block rule, seeded determinism, errors."""

import math
import time
import warnings

import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader

from modeling_ijepa.masking import (
    MASK_STRATEGIES,
    MaskSampler,
    MultiBlockMaskSampler,
    RandomPatchMaskSampler,
    mask_sampler_from_config,
)
from modeling_ijepa.visualization import draw_mask_grid


GRIDS = [(12, 12), (14, 14), (16, 16), (14, 16)]


def examples(batch_size, **extra):
    return [{"pixel_values": torch.zeros(3, 2, 2), **{k: v(i) for k, v in extra.items()}} for i in range(batch_size)]


def collator_for(grid, **kwargs):
    return MultiBlockMaskSampler(image_size=(grid[0] * 4, grid[1] * 4), patch_size=4, **kwargs)


def block_size_bounds(grid, scale, aspect):
    """Smallest and largest block height/width the official size formula can produce."""
    rows, columns = grid
    heights, widths = [], []
    for s in (scale[0], scale[1]):
        for a in (aspect[0], aspect[1]):
            keep = int(rows * columns * s)
            heights.append(min(int(round(math.sqrt(keep * a))), rows - 1))
            widths.append(min(int(round(math.sqrt(keep / a))), columns - 1))
    return (min(heights) - 1, max(heights) + 1), (min(widths) - 1, max(widths) + 1)


@pytest.mark.parametrize("grid", GRIDS)
def test_every_invariant_holds_over_many_seeds(grid):
    rows, columns = grid
    num_patches = rows * columns
    (min_h, max_h), (min_w, max_w) = block_size_bounds(grid, (0.15, 0.2), (0.75, 1.5))
    for seed in range(50):
        collator = collator_for(grid, seed=seed)
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # a relaxation of the context constraint warns: none may happen here
            batch = collator(examples(8))
        context, targets = batch["context_indices"], batch["target_indices"]
        assert context.dtype == targets.dtype == torch.int64
        assert context.shape[0] == 8 and targets.shape[:2] == (8, 4)
        assert context.min() >= 0 and context.max() < num_patches
        assert targets.min() >= 0 and targets.max() < num_patches
        assert context.shape[1] > collator.min_context_patches
        for image in range(8):
            row = context[image]
            assert torch.equal(row, row.sort().values) and row.unique().numel() == row.numel()
            assert not set(row.tolist()) & set(targets[image].flatten().tolist()), "targets leak into the context"
            for block in targets[image]:
                block_rows, block_columns = block // columns, block % columns
                height = int(block_rows.max() - block_rows.min() + 1)
                width = int(block_columns.max() - block_columns.min() + 1)
                assert height * width == block.numel(), "a target block is not a full rectangle"
                assert min_h <= height <= max_h and min_w <= width <= max_w
                assert int(block_rows.max()) < rows - 1, "official corners never reach the last row"
                assert int(block_columns.max()) < columns - 1, "official corners never reach the last column"


def test_block_size_is_shared_by_the_batch_but_positions_differ():
    batch = collator_for((14, 14), seed=3)(examples(16))
    targets = batch["target_indices"]
    assert targets.shape[2] == targets[0, 0].numel()
    firsts = {tuple(block.tolist()) for block in targets[:, 0]}
    assert len(firsts) > 1


def test_allow_overlap_keeps_target_patches_in_the_context():
    overlaps = 0
    for seed in range(10):
        batch = collator_for((16, 16), seed=seed, allow_overlap=True)(examples(4))
        for image in range(4):
            overlaps += len(
                set(batch["context_indices"][image].tolist()) & set(batch["target_indices"][image].flatten().tolist())
            )
    assert overlaps > 0


def test_area_statistics_follow_the_scale_ranges():
    collator = collator_for((16, 16), seed=0)
    target_fractions, context_sizes = [], []
    for _ in range(200):
        generator = collator.next_generator()
        height, width = collator._sample_block_size(generator, collator.target_scale, collator.target_aspect_ratio)
        target_fractions.append(height * width / 256)
        height, width = collator._sample_block_size(generator, collator.context_scale, collator.context_aspect_ratio)
        context_sizes.append(height * width / 256)
    mean_target = sum(target_fractions) / len(target_fractions)
    assert 0.13 <= mean_target <= 0.21
    # Before target removal the context block is about 0.85-1.0 of the grid, capped at (rows - 1) x (columns - 1).
    assert all(0.7 <= fraction <= (15 * 15) / 256 for fraction in context_sizes)


def test_same_seed_gives_identical_masks_and_different_seeds_differ():
    first = [collator_for((14, 14), seed=7)(examples(4)) for _ in range(1)][0]
    again = collator_for((14, 14), seed=7)(examples(4))
    other = collator_for((14, 14), seed=8)(examples(4))
    assert torch.equal(first["context_indices"], again["context_indices"])
    assert torch.equal(first["target_indices"], again["target_indices"])
    assert not torch.equal(first["target_indices"], other["target_indices"])


def test_set_batch_index_reproduces_the_stream():
    collator = collator_for((14, 14), seed=5)
    stream = [collator(examples(4)) for _ in range(5)]
    resumed = collator_for((14, 14), seed=5)
    resumed.set_batch_index(3)
    assert torch.equal(resumed(examples(4))["target_indices"], stream[3]["target_indices"])
    assert torch.equal(resumed(examples(4))["target_indices"], stream[4]["target_indices"])
    jumped = collator_for((14, 14), seed=5)
    jumped.set_batch_index(2)
    assert torch.equal(jumped(examples(4))["context_indices"], stream[2]["context_indices"])


def test_dataloader_workers_draw_the_same_masks_as_the_main_process():
    dataset = [{"pixel_values": torch.zeros(3, 2, 2)} for _ in range(24)]
    batches = {}
    for workers in (0, 2):
        loader = DataLoader(dataset, batch_size=4, num_workers=workers, collate_fn=collator_for((12, 12), seed=11))
        batches[workers] = [batch["target_indices"] for batch in loader]
    assert all(torch.equal(a, b) for a, b in zip(batches[0], batches[2]))
    assert not torch.equal(batches[0][0], batches[0][1])


def test_other_keys_are_collated():
    batch = collator_for((12, 12))(examples(3, labels=lambda i: i))
    assert torch.equal(batch["labels"], torch.tensor([0, 1, 2]))
    assert batch["pixel_values"].shape == (3, 3, 2, 2)


def test_missing_pixel_values_names_the_keys_found():
    with pytest.raises(ValueError, match=r"pixel_values.*\['image', 'label'\]"):
        collator_for((12, 12))([{"image": 0, "label": 1}])


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(image_size=50, patch_size=4), "not divisible by patch_size"),
        (dict(target_scale=(0.3, 0.2)), "target_scale"),
        (dict(context_scale=(0.5, 1.2)), "context_scale"),
        (dict(target_aspect_ratio=(0.0, 1.0)), "target_aspect_ratio"),
        (dict(context_aspect_ratio=(2.0, 1.0)), "context_aspect_ratio"),
        (dict(num_target_blocks=0), "at least one target block"),
        (dict(min_context_patches=-1), "min_context_patches"),
        (dict(min_context_patches=200), "lower min_context_patches"),
    ],
)
def test_invalid_settings_raise_a_value_error_naming_the_fix(kwargs, message):
    values = dict(image_size=48, patch_size=4)
    values.update(kwargs)
    with pytest.raises(ValueError, match=message):
        MultiBlockMaskSampler(**values)


def test_target_blocks_too_small_for_min_keep_raise_instead_of_looping_forever():
    collator = MultiBlockMaskSampler(
        image_size=24, patch_size=4, min_context_patches=10
    )  # 6x6 grid: targets of <= 7 patches
    with pytest.raises(ValueError, match="min_context_patches"):
        collator(examples(2))


def test_from_config_reads_the_mask_fields(config):
    config.num_target_blocks = 3
    collator = MultiBlockMaskSampler.from_config(config, seed=4)
    assert collator.grid_size == config.grid_size and collator.num_target_blocks == 3 and collator.seed == 4
    assert collator(examples(2))["target_indices"].shape[1] == 3


def test_draw_mask_grid_colours_the_target_patches():
    batch = collator_for((12, 12), seed=0)(examples(1))
    picture = draw_mask_grid(torch.rand(3, 48, 48), batch["context_indices"][0], batch["target_indices"][0], (12, 12))
    assert isinstance(picture, Image.Image) and picture.mode == "RGB" and picture.size == (192, 96)
    first = int(batch["target_indices"][0, -1, 0])
    row, column = divmod(first, 12)
    assert picture.getpixel((96 + column * 8 + 4, row * 8 + 4)) == (150, 70, 200)


def test_collating_a_large_batch_is_vectorised():
    collator = MultiBlockMaskSampler(image_size=224, patch_size=16)
    batch = examples(128)
    collator(batch)
    start = time.perf_counter()
    collator(batch)
    assert time.perf_counter() - start < 1.0


def test_block_size_uses_one_draw_for_scale_and_aspect_ratio():
    """The authors' sampler draws one uniform number for both; independent draws would change the block shapes."""
    import math

    collator = MultiBlockMaskSampler(image_size=48, patch_size=4)
    for seed in range(50):
        height, width = collator._sample_block_size(torch.Generator().manual_seed(seed), (0.15, 0.2), (0.75, 1.5))
        u = float(torch.rand(1, generator=torch.Generator().manual_seed(seed)))
        keep = int(144 * (0.15 + u * 0.05))
        ratio = 0.75 + u * 0.75
        assert (height, width) == (min(round(math.sqrt(keep * ratio)), 11), min(round(math.sqrt(keep / ratio)), 11))


# ---------------------------------------------------------------------------------------------------------------------
# Strategies by name


def test_the_official_rule_is_the_default_strategy(config):
    assert config.mask_strategy == "multiblock"
    assert isinstance(mask_sampler_from_config(config), MultiBlockMaskSampler)


def test_random_strategy_gives_disjoint_sorted_masks_of_the_drawn_sizes(config):
    config.mask_strategy = "random"
    sampler = mask_sampler_from_config(config, seed=3)
    assert isinstance(sampler, RandomPatchMaskSampler) and sampler.seed == 3
    batch = sampler(examples(6))
    context, targets = batch["context_indices"], batch["target_indices"]
    num_patches = config.num_patches
    assert targets.shape[:2] == (6, config.num_target_blocks) and context.shape[0] == 6
    assert int(num_patches * 0.15) <= targets.shape[2] <= int(num_patches * 0.2)
    assert context.shape[1] > config.min_context_patches
    for image in range(6):
        assert torch.equal(context[image], context[image].sort().values)
        all_targets = targets[image].flatten().tolist()
        assert len(set(all_targets)) == len(all_targets) and not set(all_targets) & set(context[image].tolist())
    again = mask_sampler_from_config(config, seed=3)(examples(6))
    assert torch.equal(again["target_indices"], targets)


def test_a_new_strategy_is_one_class_and_one_registry_entry(config, monkeypatch):
    """The protocol: a `strategy` name and `sample_masks`; settings, seeding and collating come from `MaskSampler`."""

    class FirstPatches(MaskSampler):
        strategy = "first_patches"

        def sample_masks(self, batch_size, generator):
            indices = torch.arange(self.grid_size[0] * self.grid_size[1]).expand(batch_size, -1)
            return indices[:, 20:], indices[:, :20].reshape(batch_size, 2, 10)

    monkeypatch.setitem(MASK_STRATEGIES, FirstPatches.strategy, FirstPatches)
    config.mask_strategy = "first_patches"
    sampler = mask_sampler_from_config(config)
    assert sampler.target_scale == tuple(config.target_scale) and sampler.settings.mask_strategy == "first_patches"
    batch = sampler(examples(2))
    assert batch["target_indices"].shape == (2, 2, 10) and batch["context_indices"].shape == (
        2,
        config.num_patches - 20,
    )


def test_an_unknown_strategy_is_named_with_a_hint(config):
    from modeling_ijepa import IJepaConfig

    with pytest.raises(ValueError, match=r"Unknown mask strategy 'multiblok'.*Did you mean 'multiblock'"):
        IJepaConfig(mask_strategy="multiblok")
