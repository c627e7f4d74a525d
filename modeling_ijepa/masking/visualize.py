# Copyright 2026 The ijepa-hf Authors. All rights reserved.
# Licensed under the Apache License, Version 2.0.
"""Pictures of masks: an image beside its patch grid, context and target blocks coloured."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from PIL import Image, ImageDraw


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


__all__ = ["draw_mask_grid"]
