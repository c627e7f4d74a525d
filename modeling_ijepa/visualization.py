# Copyright 2026 The ijepa-hf Authors. All rights reserved.
# Licensed under the Apache License, Version 2.0.
"""Pictures of what an I-JEPA encoder and predictor compute, and two numbers that tell trained features from random.

- PCA of patch features mapped to RGB (the DINOv2 picture): one PCA basis fitted on all patches of all images shown,
  so colours mean the same thing across images (and across the predictor's and target encoder's features);
- last-layer attention maps: per head, the attention each patch receives, averaged over queries (I-JEPA has no
  class token to query from);
- the context and target masks over the image ([`draw_mask_grid`]);
- the predictor's predicted target features beside the target encoder's, in the target features' PCA basis, one row
  per target block.

Numbers: [`position_share`] (the fraction of patch-feature variance that only says where a patch is: a random-init
ViT with fixed sin-cos position embeddings is near 0.9, and its PCA picture is a map of positions, the same for every
image), [`spatial_coherence`] (how alike neighbouring patch features are once each image's mean is removed) and
[`attention_entropy`] (1 = uniform attention, as at random initialisation). The PCA picture has a second map with the
per-position mean over the images shown removed, which shows what the features say about each image's content.

Everything is deterministic: no random number is drawn here (masks come from a sampler and an explicit generator).
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw
from torch import nn


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


# ------------------------------------------------------------------------------------------------------------------
# Features and numbers
# ------------------------------------------------------------------------------------------------------------------
@torch.no_grad()
def patch_features(
    encoder: nn.Module, pixel_values: torch.Tensor, grid_size: tuple[int, int], output_attentions: bool = False
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """
    Last-layer patch features of `encoder` (eval mode, no gradients) as feature maps.

    Args:
        pixel_values: `(batch_size, 3, height, width)` normalised images.
        grid_size: the patch grid `(rows, columns)`.
        output_attentions: also return the last layer's attention weights.

    Returns:
        `features` `(batch_size, rows, columns, hidden_size)` float32, and `attentions`
        `(batch_size, num_heads, num_patches, num_patches)` float32 or `None`.
    """
    was_training = encoder.training
    encoder.eval()
    try:
        output = encoder(pixel_values=pixel_values, output_attentions=output_attentions)
    finally:
        encoder.train(was_training)
    features = output.last_hidden_state.float()
    features = features.reshape(features.size(0), grid_size[0], grid_size[1], features.size(-1))
    attentions = output.attentions[-1].float() if output_attentions else None
    return features, attentions


def spatial_coherence(feature_maps: torch.Tensor) -> float:
    """
    Mean cosine similarity of horizontally and vertically neighbouring patch features after each image's mean patch
    feature is removed: near 1 when features vary smoothly over the image (regions), near 0 when neighbours are
    unrelated. `feature_maps`: `(batch_size, rows, columns, hidden_size)`.
    """
    centred = feature_maps.float() - feature_maps.float().mean(dim=(1, 2), keepdim=True)
    centred = F.normalize(centred, dim=-1)
    horizontal = (centred[:, :, 1:] * centred[:, :, :-1]).sum(-1)
    vertical = (centred[:, 1:] * centred[:, :-1]).sum(-1)
    return float(torch.cat([horizontal.flatten(), vertical.flatten()]).mean())


def position_share(feature_maps: torch.Tensor) -> float:
    """
    Fraction of the variance of patch features `(batch_size, rows, columns, hidden_size)` explained by the patch
    position: the variance of the per-position mean over images, over the total variance. 1 = features depend only on
    where a patch is; 0 = only on what the image shows there.
    """
    features = feature_maps.float().flatten(1, 2)  # (batch, patches, hidden)
    total = features.var(dim=(0, 1), unbiased=False).sum()
    positional = features.mean(dim=0).var(dim=0, unbiased=False).sum()
    return float(positional / total.clamp_min(1e-12))


def remove_position_mean(feature_maps: torch.Tensor) -> torch.Tensor:
    """`feature_maps` `(batch_size, rows, columns, hidden_size)` minus their mean over the batch at each position."""
    return feature_maps - feature_maps.mean(dim=0, keepdim=True)


def attention_entropy(attentions: torch.Tensor) -> float:
    """
    Entropy of the attention distributions `(batch_size, num_heads, num_queries, num_keys)` over the keys, divided by
    `log(num_keys)` and averaged: 1 for uniform attention (a random-init ViT), lower for focused attention.
    """
    probabilities = attentions.float().clamp_min(1e-12)
    entropy = -(probabilities * probabilities.log()).sum(dim=-1)
    return float(entropy.mean() / math.log(attentions.size(-1)))


@dataclass
class PcaBasis:
    """
    A PCA basis of features and the scaling of its components to [0, 1] (RGB).

    `mean` `(hidden_size,)`, `components` `(num_components, hidden_size)` (each signed so its largest loading is
    positive), `low` / `high` `(num_components,)`: the 1st and 99th percentiles of the fitted projections.
    """

    mean: torch.Tensor
    components: torch.Tensor
    low: torch.Tensor
    high: torch.Tensor

    @classmethod
    def fit(cls, features: torch.Tensor, num_components: int = 3) -> PcaBasis:
        """Fit on `features` `(..., hidden_size)` (every leading position is one sample)."""
        samples = features.reshape(-1, features.size(-1)).double()
        mean = samples.mean(dim=0)
        _, _, right = torch.linalg.svd(samples - mean, full_matrices=False)
        components = right[:num_components]
        signs = torch.sign(components.gather(1, components.abs().argmax(dim=1, keepdim=True)))
        components = components * signs
        projections = (samples - mean) @ components.T
        low = torch.quantile(projections, 0.01, dim=0)
        high = torch.quantile(projections, 0.99, dim=0)
        return cls(mean.float(), components.float(), low.float(), high.float())

    def to_rgb(self, features: torch.Tensor) -> np.ndarray:
        """`features` `(..., hidden_size)` -> float array `(..., num_components)` in [0, 1]."""
        projections = (features.float() - self.mean) @ self.components.T
        scaled = (projections - self.low) / (self.high - self.low).clamp_min(1e-8)
        return scaled.clamp(0.0, 1.0).numpy()


@torch.no_grad()
def predict_target_blocks(
    model: nn.Module, pixel_values: torch.Tensor, context_indices: torch.Tensor, target_indices: torch.Tensor
) -> dict[str, torch.Tensor]:
    """
    The pre-training model's view of one batch: `IJepaForPreTraining` in eval mode, no gradients.

    Args:
        pixel_values: `(batch_size, 3, height, width)`; context_indices: `(batch_size, num_context)`;
        target_indices: `(batch_size, num_target_blocks, num_target)`.

    Returns:
        `predictions` and `targets` `(batch_size, num_target_blocks, num_target, hidden_size)` (targets: layer-normed
        target-encoder features, the regression targets) and `target_features` `(batch_size, num_patches,
        hidden_size)`, the same layer-normed features at every patch.
    """
    was_training = model.training
    model.eval()
    try:
        output = model(pixel_values=pixel_values, context_indices=context_indices, target_indices=target_indices)
        hidden = model.get_encoder()(pixel_values=pixel_values).last_hidden_state.float()
    finally:
        model.train(was_training)
    return {
        "predictions": output.predictions.float(),
        "targets": output.targets.float(),
        "target_features": F.layer_norm(hidden, (hidden.size(-1),)),
    }


# ------------------------------------------------------------------------------------------------------------------
# Pictures
# ------------------------------------------------------------------------------------------------------------------
def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(figure, path: str | os.PathLike) -> str:
    plt = _pyplot()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    figure.savefig(path, dpi=100, metadata={"Software": None})
    plt.close(figure)
    return str(path)


def _hide_axes(axes) -> None:
    for axis in np.asarray(axes).reshape(-1):
        axis.set_xticks([])
        axis.set_yticks([])


def save_pca_picture(
    images: Sequence[np.ndarray],
    rgb_maps: np.ndarray,
    path: str | os.PathLike,
    content_rgb_maps: np.ndarray | None = None,
    title: str | None = None,
) -> str:
    """
    PNG: each image (top row) above its patch features' PCA map in RGB and, if given, the PCA map of the features
    with the per-position mean removed (`remove_position_mean`).

    Args:
        images: `num_images` RGB `uint8` arrays `(height, width, 3)`.
        rgb_maps / content_rgb_maps: `(num_images, rows, columns, 3)` in [0, 1] (e.g. `PcaBasis.to_rgb`).
    """
    plt = _pyplot()
    count = len(images)
    rows = [("image", images), ("PCA (RGB)", rgb_maps)]
    if content_rgb_maps is not None:
        rows.append(("PCA, position\nmean removed", content_rgb_maps))
    figure, axes = plt.subplots(len(rows), count, figsize=(1.6 * count, 1.7 * len(rows) + 0.3), squeeze=False)
    for row, (label, pictures) in enumerate(rows):
        for column in range(count):
            axes[row, column].imshow(pictures[column], interpolation="nearest")
        axes[row, 0].set_ylabel(label, fontsize=8)
    _hide_axes(axes)
    if title:
        figure.suptitle(title, fontsize=9)
    figure.tight_layout()
    return _save(figure, path)


def attention_maps(attentions: torch.Tensor, grid_size: tuple[int, int]) -> torch.Tensor:
    """Attention each patch receives, averaged over queries: `(batch, heads, N, N)` -> `(batch, heads, rows, cols)`."""
    received = attentions.float().mean(dim=2)
    return received.reshape(*received.shape[:2], *grid_size)


def save_attention_picture(
    images: Sequence[np.ndarray], maps: torch.Tensor, path: str | os.PathLike, title: str | None = None
) -> str:
    """PNG: one row per image, the image then one heat map per head (`maps` `(num_images, heads, rows, columns)`)."""
    plt = _pyplot()
    count, heads = maps.shape[:2]
    figure, axes = plt.subplots(count, heads + 1, figsize=(1.5 * (heads + 1), 1.5 * count + 0.4), squeeze=False)
    for row in range(count):
        axes[row, 0].imshow(images[row])
        for head in range(heads):
            axes[row, head + 1].imshow(maps[row, head].numpy(), cmap="inferno", interpolation="nearest")
            if row == 0:
                axes[0, head + 1].set_title(f"head {head}", fontsize=8)
    _hide_axes(axes)
    if title:
        figure.suptitle(title, fontsize=9)
    figure.tight_layout()
    return _save(figure, path)


def save_mask_picture(
    images: Sequence[np.ndarray],
    context_indices: torch.Tensor,
    target_indices: torch.Tensor,
    grid_size: tuple[int, int],
    path: str | os.PathLike,
) -> str:
    """PNG: per image (one row each), the image beside its patch grid, context in blue, each target block coloured."""
    rows = [
        draw_mask_grid(Image.fromarray(image), context, targets, grid_size)
        for image, context, targets in zip(images, context_indices, target_indices)
    ]
    canvas = Image.new("RGB", (max(r.width for r in rows), sum(r.height for r in rows) + 4 * len(rows)), "white")
    top = 0
    for row in rows:
        canvas.paste(row, (0, top))
        top += row.height + 4
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    canvas.save(path)
    return str(path)


def _block_picture(rgb: np.ndarray, indices: torch.Tensor, grid_size: tuple[int, int]) -> np.ndarray:
    """A grey patch grid with `rgb` `(len(indices), 3)` painted at the flattened patch `indices`."""
    picture = np.full((grid_size[0] * grid_size[1], 3), 0.85)
    picture[indices.numpy()] = rgb
    return picture.reshape(*grid_size, 3)


def save_prediction_picture(
    image: np.ndarray,
    context_indices: torch.Tensor,
    target_indices: torch.Tensor,
    predictions: torch.Tensor,
    targets: torch.Tensor,
    target_features: torch.Tensor,
    grid_size: tuple[int, int],
    path: str | os.PathLike,
) -> str:
    """
    PNG for one image: top row, the image, its masks and the target encoder's PCA map; then one row per target
    block: the target encoder's features and the predictor's predictions at the block's patches, both in the PCA
    basis of the target features of the whole image, with their cosine similarity.

    Args:
        context_indices: `(num_context,)`; target_indices: `(num_target_blocks, num_target)`.
        predictions / targets: `(num_target_blocks, num_target, hidden_size)`.
        target_features: `(num_patches, hidden_size)`, layer-normed like the targets.
    """
    plt = _pyplot()
    basis = PcaBasis.fit(target_features)
    blocks = target_indices.size(0)
    figure, axes = plt.subplots(blocks + 1, 3, figsize=(5.4, 1.8 * (blocks + 1)), squeeze=False)
    axes[0, 0].imshow(image)
    axes[0, 0].set_title("image", fontsize=8)
    masks = draw_mask_grid(Image.fromarray(image), context_indices, target_indices, grid_size)
    axes[0, 1].imshow(masks.crop((masks.width // 2, 0, masks.width, masks.height)))  # the grid half
    axes[0, 1].set_title("context / targets", fontsize=8)
    axes[0, 2].imshow(basis.to_rgb(target_features).reshape(*grid_size, 3), interpolation="nearest")
    axes[0, 2].set_title("target features", fontsize=8)
    for block in range(blocks):
        indices = target_indices[block]
        similarity = float(F.cosine_similarity(predictions[block], targets[block], dim=-1).mean())
        axes[block + 1, 0].imshow(_block_picture(basis.to_rgb(targets[block]), indices, grid_size))
        axes[block + 1, 0].set_ylabel(f"block {block}", fontsize=8)
        axes[block + 1, 1].imshow(_block_picture(basis.to_rgb(predictions[block]), indices, grid_size))
        axes[block + 1, 2].axis("off")
        axes[block + 1, 2].text(0.0, 0.5, f"cosine(prediction,\ntarget) = {similarity:.3f}", fontsize=8)
        if block == 0:
            axes[1, 0].set_title("target encoder", fontsize=8)
            axes[1, 1].set_title("predictor", fontsize=8)
    _hide_axes(axes)
    figure.tight_layout()
    return _save(figure, path)


__all__ = [
    "draw_mask_grid",
    "PcaBasis",
    "attention_entropy",
    "attention_maps",
    "patch_features",
    "position_share",
    "predict_target_blocks",
    "remove_position_mean",
    "save_attention_picture",
    "save_mask_picture",
    "save_pca_picture",
    "save_prediction_picture",
    "spatial_coherence",
]
