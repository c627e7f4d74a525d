"""I-JEPA multi-block masking as a data collator (the official rule of `src/masks/multiblock.py`, vectorised).

Per batch, one target-block size and one context-block size are drawn; per image, `num_target_blocks` target blocks and
one context block are placed at random, the target patches are removed from the context, and every index list is cut to
the shortest one in the batch so that the tensors stack.
"""

from __future__ import annotations

import logging
import math
import warnings
from collections.abc import Sequence

import numpy as np
import torch
from PIL import Image, ImageDraw
from torch.utils.data import default_collate, get_worker_info

logger = logging.getLogger(__name__)

# After this many consecutive invalid context draws, one fewer target block constrains the context (official rule).
_DRAWS_PER_RELAXATION = 20
_MAX_RELAXATIONS_BEFORE_ERROR = 1000


def _pair(value: int | Sequence[int]) -> tuple[int, int]:
    if isinstance(value, (list, tuple)):
        return int(value[0]), int(value[1])
    return int(value), int(value)


def check_mask_ranges(
    num_target_blocks: int,
    target_scale: Sequence[float],
    target_aspect_ratio: Sequence[float],
    context_scale: Sequence[float],
    context_aspect_ratio: Sequence[float],
    min_context_patches: int,
) -> None:
    """Raise `ValueError`, saying what to change, for mask settings that are invalid on any patch grid."""
    for name, value in (
        ("target_scale", target_scale),
        ("context_scale", context_scale),
        ("target_aspect_ratio", target_aspect_ratio),
        ("context_aspect_ratio", context_aspect_ratio),
    ):
        if len(value) != 2:
            raise ValueError(f"{name} must be a (min, max) pair, got {value!r}.")
        low, high = float(value[0]), float(value[1])
        if name.endswith("scale") and not 0.0 < low <= high <= 1.0:
            raise ValueError(
                f"{name}={[low, high]} is not a valid area range: it must satisfy 0 < min <= max <= 1 "
                "(fractions of the patch grid)."
            )
        if name.endswith("aspect_ratio") and not 0.0 < low <= high:
            raise ValueError(f"{name}={[low, high]} is not a valid aspect range: it must satisfy 0 < min <= max.")
    if num_target_blocks < 1:
        raise ValueError(f"num_target_blocks={num_target_blocks}: I-JEPA needs at least one target block.")
    if min_context_patches < 0:
        raise ValueError(f"min_context_patches={min_context_patches} must be >= 0.")


def check_mask_settings(
    grid_size: tuple[int, int],
    num_target_blocks: int,
    target_scale: Sequence[float],
    target_aspect_ratio: Sequence[float],
    context_scale: Sequence[float],
    context_aspect_ratio: Sequence[float],
    min_context_patches: int,
) -> None:
    """Raise `ValueError`, saying what to change, for mask settings that can never give a valid mask on this grid."""
    check_mask_ranges(
        num_target_blocks, target_scale, target_aspect_ratio, context_scale, context_aspect_ratio, min_context_patches
    )
    rows, columns = grid_size
    num_patches = rows * columns
    largest_context = int(num_patches * float(context_scale[1]))
    if min_context_patches >= min(largest_context, num_patches):
        raise ValueError(
            f"min_context_patches={min_context_patches} cannot be met on a {rows}x{columns} patch grid whose largest "
            f"context block has {largest_context} patches: lower min_context_patches or use a larger image / smaller "
            "patch size."
        )


class IJepaMaskCollator:
    """
    Collate images and sample I-JEPA context and target blocks on the patch grid.

    Args:
        image_size / patch_size: int or `(height, width)`; the patch grid is `image_size // patch_size`.
        num_target_blocks: target blocks per image (4 in I-JEPA).
        target_scale / target_aspect_ratio: ranges of a target block's area (fraction of the grid) and height/width.
        num_context_blocks: context blocks per image (1 in I-JEPA; only 1 is supported).
        context_scale / context_aspect_ratio: the same for the context block.
        min_context_patches: a context (and a target block) must keep more patches than this (official `min_keep`).
        allow_overlap: keep target patches in the context (off in I-JEPA).
        seed: masks depend only on `(seed, batch index)`, whatever the number of DataLoader workers.

    Calling it on a list of examples (dicts with `pixel_values` `(num_channels, height, width)` and optionally other
    keys, e.g. `labels`) returns those keys collated, plus:
        - `context_indices`: LongTensor `(batch_size, num_context)`, sorted flattened patch indices of the context;
        - `target_indices`: LongTensor `(batch_size, num_target_blocks, num_target)`, sorted indices of each block.
    """

    def __init__(
        self,
        image_size: int | Sequence[int] = 224,
        patch_size: int | Sequence[int] = 16,
        num_target_blocks: int = 4,
        target_scale: Sequence[float] = (0.15, 0.2),
        target_aspect_ratio: Sequence[float] = (0.75, 1.5),
        num_context_blocks: int = 1,
        context_scale: Sequence[float] = (0.85, 1.0),
        context_aspect_ratio: Sequence[float] = (1.0, 1.0),
        min_context_patches: int = 10,
        allow_overlap: bool = False,
        seed: int = 0,
    ):
        image_height, image_width = _pair(image_size)
        patch_height, patch_width = _pair(patch_size)
        if image_height % patch_height or image_width % patch_width:
            raise ValueError(
                f"image_size {image_size} is not divisible by patch_size {patch_size}: choose an image size that is a "
                "multiple of the patch size."
            )
        if num_context_blocks != 1:
            raise ValueError(f"num_context_blocks={num_context_blocks}: I-JEPA uses exactly one context block.")
        self.grid_size = (image_height // patch_height, image_width // patch_width)
        check_mask_settings(
            self.grid_size,
            num_target_blocks,
            target_scale,
            target_aspect_ratio,
            context_scale,
            context_aspect_ratio,
            min_context_patches,
        )
        self.num_target_blocks = int(num_target_blocks)
        self.target_scale = tuple(float(v) for v in target_scale)
        self.target_aspect_ratio = tuple(float(v) for v in target_aspect_ratio)
        self.context_scale = tuple(float(v) for v in context_scale)
        self.context_aspect_ratio = tuple(float(v) for v in context_aspect_ratio)
        self.min_context_patches = int(min_context_patches)
        self.allow_overlap = bool(allow_overlap)
        self.seed = int(seed)
        self.num_relaxations = 0
        self._start_batch = 0
        self._local_count = 0

    @classmethod
    def from_config(cls, config, seed: int = 0) -> "IJepaMaskCollator":
        """Build the collator from an [`IJepaConfig`] (or any object with the same attribute names)."""
        defaults = cls.__init__.__defaults__
        names = cls.__init__.__code__.co_varnames[1 : 1 + len(defaults)]
        values = {name: getattr(config, name, default) for name, default in zip(names, defaults) if name != "seed"}
        values["num_context_blocks"] = 1
        return cls(**values, seed=seed)

    # -- determinism ------------------------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, int]:
        return {"seed": self.seed, "batches_drawn": self._start_batch + self._local_count}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.seed = int(state["seed"])
        self.set_batch_index(int(state["batches_drawn"]))

    def set_batch_index(self, batch_index: int) -> None:
        """The next batch drawn in the main process is batch `batch_index` (e.g. after resuming a run)."""
        self._start_batch = int(batch_index)
        self._local_count = 0

    def next_generator(self) -> torch.Generator:
        """The generator of the next batch, seeded by `(seed, global batch index)`; advances the batch counter."""
        worker = get_worker_info()
        worker_id, num_workers = (worker.id, worker.num_workers) if worker is not None else (0, 1)
        batch_index = self._start_batch + worker_id + num_workers * self._local_count
        self._local_count += 1
        generator = torch.Generator()
        # A fixed affine mix keeps (seed, batch) pairs apart without Python's salted hashing.
        generator.manual_seed((self.seed * 0x9E3779B97F4A7C15 + batch_index) % (2**63 - 1))
        return generator

    # -- sampling ---------------------------------------------------------------------------------------------------
    def _sample_block_size(
        self, generator: torch.Generator, scale: tuple[float, float], aspect_ratio: tuple[float, float]
    ) -> tuple[int, int]:
        rows, columns = self.grid_size
        # As the authors' sampler: ONE uniform draw sets both the scale and the aspect ratio (larger blocks are taller).
        draw = float(torch.rand(1, generator=generator))
        max_keep = int(rows * columns * (scale[0] + draw * (scale[1] - scale[0])))
        ratio = aspect_ratio[0] + draw * (aspect_ratio[1] - aspect_ratio[0])
        height = min(int(round(math.sqrt(max_keep * ratio))), rows - 1)
        width = min(int(round(math.sqrt(max_keep / ratio))), columns - 1)
        return height, width

    def _block_masks(self, tops: torch.Tensor, lefts: torch.Tensor, height: int, width: int) -> torch.Tensor:
        """Boolean masks `(*tops.shape, rows, columns)` of `height x width` blocks at the given corners."""
        rows, columns = self.grid_size
        row_range = torch.arange(rows)
        column_range = torch.arange(columns)
        in_rows = (row_range >= tops.unsqueeze(-1)) & (row_range < (tops + height).unsqueeze(-1))
        in_columns = (column_range >= lefts.unsqueeze(-1)) & (column_range < (lefts + width).unsqueeze(-1))
        return in_rows.unsqueeze(-1) & in_columns.unsqueeze(-2)

    def _random_corners(self, generator: torch.Generator, shape: tuple[int, ...], height: int, width: int):
        rows, columns = self.grid_size
        # Exclusive upper bound `rows - height`, as the official `torch.randint(0, H - h, ...)`.
        tops = torch.randint(0, rows - height, shape, generator=generator)
        lefts = torch.randint(0, columns - width, shape, generator=generator)
        return tops, lefts

    def sample_masks(self, batch_size: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        """
        Draw the masks of one batch.

        Returns:
            `context_indices` `(batch_size, num_context)` and `target_indices`
            `(batch_size, num_target_blocks, num_target)`, both sorted per row.
        """
        rows, columns = self.grid_size
        target_height, target_width = self._sample_block_size(generator, self.target_scale, self.target_aspect_ratio)
        context_height, context_width = self._sample_block_size(generator, self.context_scale, self.context_aspect_ratio)
        if target_height * target_width <= self.min_context_patches:
            raise ValueError(
                f"Target blocks of {target_height}x{target_width} patches on a {rows}x{columns} grid can never keep more "
                f"than min_context_patches={self.min_context_patches} patches: use a larger image / smaller patch "
                "size, larger target_scale, or lower min_context_patches."
            )

        # Targets are unconstrained, so every block is a full rectangle: its indices need no truncation.
        target_tops, target_lefts = self._random_corners(
            generator, (batch_size, self.num_target_blocks), target_height, target_width
        )
        block_rows = target_tops.unsqueeze(-1) + torch.arange(target_height)  # (batch, blocks, height)
        block_columns = target_lefts.unsqueeze(-1) + torch.arange(target_width)  # (batch, blocks, width)
        target_indices = (block_rows.unsqueeze(-1) * columns + block_columns.unsqueeze(-2)).flatten(2)
        target_masks = self._block_masks(target_tops, target_lefts, target_height, target_width)

        context_masks = self._sample_context(generator, batch_size, target_masks, context_height, context_width)
        context_masks = context_masks.flatten(1)
        counts = context_masks.sum(dim=1)
        # Stable sort puts each row's kept patches first, in increasing index order; keep the batch's shortest count.
        order = torch.argsort((~context_masks).to(torch.uint8), dim=1, stable=True)
        context_indices = order[:, : int(counts.min())]
        return context_indices, target_indices

    def _sample_context(
        self,
        generator: torch.Generator,
        batch_size: int,
        target_masks: torch.Tensor,
        height: int,
        width: int,
    ) -> torch.Tensor:
        """Context masks `(batch, rows, columns)`: a block minus the target patches, redrawn until large enough."""
        rows, columns = self.grid_size
        context_masks = torch.zeros(batch_size, rows, columns, dtype=torch.bool)
        pending = torch.arange(batch_size)
        relaxation = 0
        while pending.numel():
            # One round is the official run of consecutive draws before a relaxation, drawn for all pending images.
            tops, lefts = self._random_corners(generator, (pending.numel(), _DRAWS_PER_RELAXATION), height, width)
            candidates = self._block_masks(tops, lefts, height, width)  # (pending, draws, rows, columns)
            if not self.allow_overlap:
                constraining = max(self.num_target_blocks - relaxation, 0)
                covered = target_masks[pending, :constraining].any(dim=1)
                candidates = candidates & ~covered.unsqueeze(1)
            valid = candidates.flatten(2).sum(-1) > self.min_context_patches  # (pending, draws)
            found = valid.any(dim=1)
            first_valid = valid.to(torch.uint8).argmax(dim=1)
            chosen = candidates[torch.arange(pending.numel()), first_valid]
            context_masks[pending[found]] = chosen[found]
            pending = pending[~found]
            if pending.numel():
                relaxation += 1
                self.num_relaxations += int(pending.numel())
                message = (
                    f"IJepaMaskCollator: no valid context block after {_DRAWS_PER_RELAXATION * relaxation} draws for "
                    f"{pending.numel()} image(s); dropping one target block from the constraint (official rule). Use "
                    "a larger patch grid or smaller target_scale to avoid this."
                )
                warnings.warn(message, stacklevel=3)
                if relaxation > _MAX_RELAXATIONS_BEFORE_ERROR:
                    raise ValueError(
                        f"No context block of {height}x{width} patches keeps more than min_context_patches="
                        f"{self.min_context_patches} patches on a {rows}x{columns} grid: lower min_context_patches."
                    )
        return context_masks

    def __call__(self, examples: list[dict]) -> dict[str, torch.Tensor]:
        if not examples:
            raise ValueError("IJepaMaskCollator received an empty batch.")
        if any("pixel_values" not in example for example in examples):
            found = sorted({key for example in examples for key in example})
            raise ValueError(
                f"Every example needs a `pixel_values` entry (num_channels, height, width); found keys {found}. Apply "
                "the image transform (e.g. modeling_ijepa.data.PretrainingTransform) before collating."
            )
        pixel_values = torch.stack([torch.as_tensor(example["pixel_values"]) for example in examples])
        others = [{key: value for key, value in example.items() if key != "pixel_values"} for example in examples]
        batch = default_collate(others) if others[0] else {}
        batch["pixel_values"] = pixel_values
        context_indices, target_indices = self.sample_masks(len(examples), self.next_generator())
        batch["context_indices"] = context_indices
        batch["target_indices"] = target_indices
        return batch


def draw_mask_grid(
    image: Image.Image | torch.Tensor | np.ndarray,
    context_indices: torch.Tensor | Sequence[int],
    target_indices: torch.Tensor | Sequence[Sequence[int]],
    grid_size: tuple[int, int],
    cell_pixels: int | None = None,
) -> Image.Image:
    """
    Picture of one image's masks: the image on the left; on the right the patch grid, context patches in blue and each
    target block in its own colour (overlaps with the context show the target colour).

    Args:
        image: PIL image, or `(num_channels, height, width)` tensor/array (any range: rescaled for display).
        context_indices: `(num_context,)` flattened patch indices.
        target_indices: `(num_target_blocks, num_target)` flattened patch indices.
        grid_size: patch grid `(rows, columns)`.
        cell_pixels: side of one grid cell in the drawing; defaults to the image's patch size (at least 8 px).

    Returns:
        An RGB `PIL.Image.Image` twice as wide as the (resized) image.
    """
    if not isinstance(image, Image.Image):
        array = torch.as_tensor(image).detach().float().cpu()
        if array.dim() == 3 and array.shape[0] in (1, 3):
            array = array.permute(1, 2, 0)
        array = array - array.min()
        array = (array / array.max().clamp_min(1e-8) * 255).to(torch.uint8).numpy()
        image = Image.fromarray(array.squeeze(-1) if array.shape[-1] == 1 else array)
    image = image.convert("RGB")
    rows, columns = grid_size
    cell = cell_pixels or max(8, image.width // columns)
    picture = image.resize((columns * cell, rows * cell), Image.NEAREST)

    colours = np.full((rows * columns, 3), 235, dtype=np.uint8)
    colours[torch.as_tensor(context_indices).reshape(-1).numpy()] = (80, 130, 230)
    palette = [(220, 50, 50), (245, 150, 30), (40, 170, 80), (150, 70, 200)]
    for block, indices in enumerate(torch.as_tensor(target_indices).reshape(len(target_indices), -1)):
        colours[indices.numpy()] = palette[block % len(palette)]
    grid = Image.fromarray(colours.reshape(rows, columns, 3)).resize((columns * cell, rows * cell), Image.NEAREST)
    draw = ImageDraw.Draw(grid)
    for row in range(1, rows):
        draw.line([(0, row * cell), (columns * cell, row * cell)], fill=(255, 255, 255))
    for column in range(1, columns):
        draw.line([(column * cell, 0), (column * cell, rows * cell)], fill=(255, 255, 255))

    canvas = Image.new("RGB", (2 * columns * cell, rows * cell), (255, 255, 255))
    canvas.paste(picture, (0, 0))
    canvas.paste(grid, (columns * cell, 0))
    return canvas


__all__ = ["IJepaMaskCollator", "check_mask_ranges", "check_mask_settings", "draw_mask_grid"]
