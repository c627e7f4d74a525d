"""A plain re-statement of the authors' I-JEPA pre-training step (facebookresearch/ijepa), the benchmark's baseline.

It follows the implementation choices of the official code, so that `benchmark_step.py` measures what this package
changes, not what it leaves out:

- ViT blocks with one fused `qkv` projection and eager attention with an explicit softmax;
- the encoder drops tokens with one `gather` per mask and concatenates the results along the batch;
- the predictor repeats the context once per target block and runs `batch_size * num_target_blocks` sequences;
- targets are gathered per block from the layer-normed target-encoder output;
- masks are drawn by a collator that loops over the images of a batch in Python, one block at a time;
- the EMA update is a Python loop over parameter pairs;
- the optimiser is `torch.optim.AdamW` with its default (per-parameter, for-loop on CPU) implementation.

[`reference_from_ours`] copies the weights of an [`IJepaForPreTraining`] into these modules (separate q/k/v
projections are stacked into the fused `qkv`), and [`official_masks`] turns this package's index tensors into the
official list-of-tensors mask format, so both implementations can run on the same weights, batch and masks.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn


# ---------------------------------------------------------------------------------------------------------------------
# Masks in the official format: a list of LongTensors, one per block, each `(batch_size, num_kept)`.
# ---------------------------------------------------------------------------------------------------------------------
def apply_masks(tokens: torch.Tensor, masks: list[torch.Tensor]) -> torch.Tensor:
    """
    Keep the listed tokens, one mask at a time, and stack the results along the batch (block-major order).

    Args:
        tokens: `(batch_size, sequence_length, width)`.
        masks: list of `(batch_size, num_kept)` LongTensors.

    Returns:
        `(len(masks) * batch_size, num_kept, width)`.
    """
    kept = []
    for mask in masks:
        index = mask.unsqueeze(-1).repeat(1, 1, tokens.size(-1))
        kept.append(torch.gather(tokens, dim=1, index=index))
    return torch.cat(kept, dim=0)


def repeat_interleave_batch(tokens: torch.Tensor, batch_size: int, repeat: int) -> torch.Tensor:
    """Repeat every consecutive chunk of `batch_size` rows `repeat` times, chunk by chunk (the official helper)."""
    num_chunks = len(tokens) // batch_size
    chunks = []
    for chunk_index in range(num_chunks):
        chunk = tokens[chunk_index * batch_size : (chunk_index + 1) * batch_size]
        chunks.append(torch.cat([chunk] * repeat, dim=0))
    return torch.cat(chunks, dim=0)


def official_masks(
    context_indices: torch.Tensor, target_indices: torch.Tensor
) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """
    This package's masks as the official lists.

    Args:
        context_indices: `(batch_size, num_context)`.
        target_indices: `(batch_size, num_target_blocks, num_target)`.

    Returns:
        `masks_enc` (one `(batch_size, num_context)` tensor) and `masks_pred` (`num_target_blocks` tensors of shape
        `(batch_size, num_target)`).
    """
    return [context_indices], [target_indices[:, block] for block in range(target_indices.size(1))]


# ---------------------------------------------------------------------------------------------------------------------
# Modules
# ---------------------------------------------------------------------------------------------------------------------
class ReferenceAttention(nn.Module):
    """Fused-qkv multi-head attention with an explicit softmax."""

    def __init__(self, width: int, num_heads: int):
        super().__init__()
        self.num_heads = num_heads
        self.scale = (width // num_heads) ** -0.5
        self.qkv = nn.Linear(width, 3 * width, bias=True)
        self.proj = nn.Linear(width, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """`x`: `(batch_size, sequence_length, width)` -> same shape."""
        batch_size, length, width = x.shape
        qkv = (
            self.qkv(x).reshape(batch_size, length, 3, self.num_heads, width // self.num_heads).permute(2, 0, 3, 1, 4)
        )
        q, k, v = qkv[0], qkv[1], qkv[2]
        attn = (q @ k.transpose(-2, -1)) * self.scale
        attn = attn.softmax(dim=-1)
        x = (attn @ v).transpose(1, 2).reshape(batch_size, length, width)
        return self.proj(x)


class ReferenceMLP(nn.Module):
    def __init__(self, width: int, hidden: int):
        super().__init__()
        self.fc1 = nn.Linear(width, hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class ReferenceBlock(nn.Module):
    """Pre-norm transformer block (`norm1`, `attn`, `norm2`, `mlp`)."""

    def __init__(self, width: int, num_heads: int, hidden: int, eps: float):
        super().__init__()
        self.norm1 = nn.LayerNorm(width, eps=eps)
        self.attn = ReferenceAttention(width, num_heads)
        self.norm2 = nn.LayerNorm(width, eps=eps)
        self.mlp = ReferenceMLP(width, hidden)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class ReferenceVisionTransformer(nn.Module):
    """ViT encoder without CLS token, fixed position embedding, final LayerNorm; optional token dropping by masks."""

    def __init__(self, config):
        super().__init__()
        width = config.hidden_size
        patch = config.patch_size
        self.patch_embed = nn.Conv2d(config.num_channels, width, kernel_size=patch, stride=patch)
        self.pos_embed = nn.Parameter(torch.zeros(1, config.num_patches, width), requires_grad=False)
        self.blocks = nn.ModuleList(
            ReferenceBlock(width, config.num_attention_heads, config.intermediate_size, config.layer_norm_eps)
            for _ in range(config.num_hidden_layers)
        )
        self.norm = nn.LayerNorm(width, eps=config.layer_norm_eps)

    def forward(self, x: torch.Tensor, masks: list[torch.Tensor] | None = None) -> torch.Tensor:
        """`x`: `(batch_size, channels, height, width)` -> `(len(masks) * batch_size, num_kept, hidden_size)`."""
        x = self.patch_embed(x).flatten(2).transpose(1, 2)
        x = x + self.pos_embed
        if masks is not None:
            x = apply_masks(x, masks)
        for block in self.blocks:
            x = block(x)
        return self.norm(x)


class ReferencePredictor(nn.Module):
    """The narrow predictor: every target block gets its own copy of the context (batch repeated per block)."""

    def __init__(self, config):
        super().__init__()
        width = config.predictor_hidden_size
        self.predictor_embed = nn.Linear(config.hidden_size, width)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, width))
        self.predictor_pos_embed = nn.Parameter(torch.zeros(1, config.num_patches, width), requires_grad=False)
        self.predictor_blocks = nn.ModuleList(
            ReferenceBlock(
                width, config.predictor_num_attention_heads, config.predictor_intermediate_size, config.layer_norm_eps
            )
            for _ in range(config.predictor_num_hidden_layers)
        )
        self.predictor_norm = nn.LayerNorm(width, eps=config.layer_norm_eps)
        self.predictor_proj = nn.Linear(width, config.hidden_size)

    def forward(self, x: torch.Tensor, masks_x: list[torch.Tensor], masks: list[torch.Tensor]) -> torch.Tensor:
        """
        Args:
            x: `(len(masks_x) * batch_size, num_context, hidden_size)` context-encoder output.
            masks_x / masks: context and target masks (official lists).

        Returns:
            `(len(masks) * len(masks_x) * batch_size, num_target, hidden_size)`, block-major.
        """
        batch_size = len(x) // len(masks_x)
        x = self.predictor_embed(x)
        x = x + apply_masks(self.predictor_pos_embed.repeat(batch_size, 1, 1), masks_x)
        num_context = x.size(1)

        pos_embs = apply_masks(self.predictor_pos_embed.repeat(batch_size, 1, 1), masks)
        pos_embs = repeat_interleave_batch(pos_embs, batch_size, repeat=len(masks_x))
        pred_tokens = self.mask_token.repeat(pos_embs.size(0), pos_embs.size(1), 1) + pos_embs

        x = torch.cat([x.repeat(len(masks), 1, 1), pred_tokens], dim=1)
        for block in self.predictor_blocks:
            x = block(x)
        x = self.predictor_norm(x)
        return self.predictor_proj(x[:, num_context:])


# ---------------------------------------------------------------------------------------------------------------------
# Weights from this package, optimiser, training step
# ---------------------------------------------------------------------------------------------------------------------
def _copy_block(reference: ReferenceBlock, ours: nn.Module) -> None:
    attention = ours.attention
    reference.norm1.load_state_dict(ours.layernorm_before.state_dict())
    reference.norm2.load_state_dict(ours.layernorm_after.state_dict())
    projections = (attention.q_proj, attention.k_proj, attention.v_proj)  # fused rows in q, k, v order
    reference.attn.qkv.weight.copy_(torch.cat([projection.weight for projection in projections]))
    reference.attn.qkv.bias.copy_(torch.cat([projection.bias for projection in projections]))
    reference.attn.proj.load_state_dict(attention.o_proj.state_dict())
    reference.mlp.fc1.load_state_dict(ours.mlp.fc1.state_dict())
    reference.mlp.fc2.load_state_dict(ours.mlp.fc2.state_dict())


@torch.no_grad()
def _copy_encoder(reference: ReferenceVisionTransformer, ours: nn.Module) -> None:
    reference.patch_embed.load_state_dict(ours.embeddings.patch_embeddings.projection.state_dict())
    reference.pos_embed.copy_(ours.embeddings.position_embeddings)
    for reference_block, our_block in zip(reference.blocks, ours.layers):
        _copy_block(reference_block, our_block)
    reference.norm.load_state_dict(ours.layernorm.state_dict())


@torch.no_grad()
def _copy_predictor(reference: ReferencePredictor, ours: nn.Module) -> None:
    reference.predictor_embed.load_state_dict(ours.embeddings.state_dict())
    reference.mask_token.copy_(ours.mask_token)
    reference.predictor_pos_embed.copy_(ours.position_embeddings)
    for reference_block, our_block in zip(reference.predictor_blocks, ours.layers):
        _copy_block(reference_block, our_block)
    reference.predictor_norm.load_state_dict(ours.layernorm.state_dict())
    reference.predictor_proj.load_state_dict(ours.projection.state_dict())


@dataclass
class ReferenceModels:
    encoder: ReferenceVisionTransformer
    predictor: ReferencePredictor
    target_encoder: ReferenceVisionTransformer

    def to(self, *args, **kwargs) -> ReferenceModels:
        for module in (self.encoder, self.predictor, self.target_encoder):
            module.to(*args, **kwargs)
        return self


def reference_from_ours(model: nn.Module) -> ReferenceModels:
    """Reference encoder, predictor and target encoder holding the weights of an `IJepaForPreTraining`."""
    config = model.config
    models = ReferenceModels(
        ReferenceVisionTransformer(config), ReferencePredictor(config), ReferenceVisionTransformer(config)
    )
    _copy_encoder(models.encoder, model.encoder)
    _copy_predictor(models.predictor, model.predictor)
    _copy_encoder(models.target_encoder, model.target_encoder)
    for parameter in models.target_encoder.parameters():
        parameter.requires_grad = False
    device = next(model.parameters()).device
    return models.to(device)


def reference_optimizer(models: ReferenceModels, lr: float = 1e-3, weight_decay: float = 0.04) -> torch.optim.AdamW:
    """`torch.optim.AdamW` with its defaults; biases and 1-D parameters get no weight decay (as the authors)."""
    named = list(models.encoder.named_parameters()) + list(models.predictor.named_parameters())
    decayed = [p for name, p in named if "bias" not in name and p.ndim != 1]
    not_decayed = [p for name, p in named if "bias" in name or p.ndim == 1]
    return torch.optim.AdamW(
        [{"params": decayed, "weight_decay": weight_decay}, {"params": not_decayed, "weight_decay": 0.0}], lr=lr
    )


def reference_forward(
    models: ReferenceModels, images: torch.Tensor, masks_enc: list[torch.Tensor], masks_pred: list[torch.Tensor]
) -> tuple[torch.Tensor, torch.Tensor]:
    """
    Predictions and targets of the official step, both `(num_target_blocks * batch_size, num_target, hidden_size)`,
    block-major: targets are the layer-normed target-encoder features at the target patches.
    """
    with torch.no_grad():
        h = models.target_encoder(images)
        h = F.layer_norm(h, (h.size(-1),))
        h = apply_masks(h, masks_pred)
        h = repeat_interleave_batch(h, len(images), repeat=len(masks_enc))
    z = models.encoder(images, masks_enc)
    z = models.predictor(z, masks_enc, masks_pred)
    return z, h


def reference_loss(
    models: ReferenceModels, images: torch.Tensor, masks_enc: list[torch.Tensor], masks_pred: list[torch.Tensor]
) -> torch.Tensor:
    """The official loss: smooth-L1 between predictions and targets (see [`reference_forward`])."""
    z, h = reference_forward(models, images, masks_enc, masks_pred)
    return F.smooth_l1_loss(z, h)


def reference_train_step(
    models: ReferenceModels,
    optimizer: torch.optim.Optimizer,
    images: torch.Tensor,
    masks_enc: list[torch.Tensor],
    masks_pred: list[torch.Tensor],
    momentum: float,
    bf16: bool = False,
) -> float:
    """
    One official step: loss (optionally under bf16 autocast), backward, AdamW step, per-parameter EMA loop. The
    authors'
    gradient scaler is left out: with bf16 it only multiplies and divides the loss and gradients.
    """
    with torch.autocast(images.device.type, dtype=torch.bfloat16, enabled=bf16):
        loss = reference_loss(models, images, masks_enc, masks_pred)
    loss.backward()
    optimizer.step()
    optimizer.zero_grad()
    with torch.no_grad():
        for param_q, param_k in zip(models.encoder.parameters(), models.target_encoder.parameters()):
            param_k.data.mul_(momentum).add_((1.0 - momentum) * param_q.detach().data)
    return float(loss.detach())


# ---------------------------------------------------------------------------------------------------------------------
# The official multi-block mask collator: a Python loop over images and over blocks.
# ---------------------------------------------------------------------------------------------------------------------
class ReferenceMaskCollator:
    """
    Multi-block masks drawn image by image, block by block, with the official rules: one target size and one context
    size per batch (one uniform draw sets both scale and aspect ratio), target corners and context corners redrawn
    until the context keeps more than `min_keep` patches outside the targets (relaxing one target every 20 tries), and
    every mask cut to the shortest one of the batch.

    `sample_masks(batch_size, generator)` returns `(masks_enc, masks_pred)` in the official list format. (The authors
    draw block corners from the global RNG; here every draw uses `generator`, which costs the same.)
    """

    def __init__(
        self,
        grid_size: tuple[int, int] = (14, 14),
        enc_mask_scale: tuple[float, float] = (0.85, 1.0),
        pred_mask_scale: tuple[float, float] = (0.15, 0.2),
        aspect_ratio: tuple[float, float] = (0.75, 1.5),
        nenc: int = 1,
        npred: int = 4,
        min_keep: int = 10,
        allow_overlap: bool = False,
    ):
        self.height, self.width = grid_size
        self.enc_mask_scale = enc_mask_scale
        self.pred_mask_scale = pred_mask_scale
        self.aspect_ratio = aspect_ratio
        self.nenc = nenc
        self.npred = npred
        self.min_keep = min_keep
        self.allow_overlap = allow_overlap

    @classmethod
    def from_config(cls, config) -> ReferenceMaskCollator:
        return cls(
            grid_size=config.grid_size,
            enc_mask_scale=tuple(config.context_scale),
            pred_mask_scale=tuple(config.target_scale),
            aspect_ratio=tuple(config.target_aspect_ratio),
            npred=config.num_target_blocks,
            min_keep=config.min_context_patches,
            allow_overlap=config.allow_overlap,
        )

    def _sample_block_size(self, generator: torch.Generator, scale, aspect_ratio_scale) -> tuple[int, int]:
        draw = torch.rand(1, generator=generator).item()
        max_keep = int(self.height * self.width * (scale[0] + draw * (scale[1] - scale[0])))
        aspect_ratio = aspect_ratio_scale[0] + draw * (aspect_ratio_scale[1] - aspect_ratio_scale[0])
        h = int(round(math.sqrt(max_keep * aspect_ratio)))
        w = int(round(math.sqrt(max_keep / aspect_ratio)))
        while h >= self.height:
            h -= 1
        while w >= self.width:
            w -= 1
        return h, w

    def _sample_block_mask(self, block_size, acceptable_regions=None, generator=None):
        h, w = block_size
        tries, timeout = 0, 20
        while True:
            top = torch.randint(0, self.height - h, (1,), generator=generator)
            left = torch.randint(0, self.width - w, (1,), generator=generator)
            mask = torch.zeros((self.height, self.width), dtype=torch.int32)
            mask[top : top + h, left : left + w] = 1
            if acceptable_regions is not None:
                for region in acceptable_regions[: max(len(acceptable_regions) - tries, 0)]:
                    mask *= region
            mask = torch.nonzero(mask.flatten())
            if len(mask) > self.min_keep:
                break
            timeout -= 1
            if timeout == 0:
                tries, timeout = tries + 1, 20
        complement = torch.ones((self.height, self.width), dtype=torch.int32)
        complement[top : top + h, left : left + w] = 0
        return mask.squeeze(), complement

    def sample_masks(
        self, batch_size: int, generator: torch.Generator
    ) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """
        `masks_enc`: `nenc` tensors `(batch_size, num_context)`; `masks_pred`: `npred` `(batch_size, num_target)`.
        """
        p_size = self._sample_block_size(generator, self.pred_mask_scale, self.aspect_ratio)
        e_size = self._sample_block_size(generator, self.enc_mask_scale, (1.0, 1.0))
        masks_pred, masks_enc = [], []
        min_keep_pred = min_keep_enc = self.height * self.width
        for _ in range(batch_size):
            image_pred, complements = [], []
            for _ in range(self.npred):
                mask, complement = self._sample_block_mask(p_size, generator=generator)
                image_pred.append(mask)
                complements.append(complement)
                min_keep_pred = min(min_keep_pred, len(mask))
            masks_pred.append(image_pred)
            regions = None if self.allow_overlap else complements
            image_enc = []
            for _ in range(self.nenc):
                mask, _ = self._sample_block_mask(e_size, acceptable_regions=regions, generator=generator)
                image_enc.append(mask)
                min_keep_enc = min(min_keep_enc, len(mask))
            masks_enc.append(image_enc)
        masks_pred = torch.utils.data.default_collate([[m[:min_keep_pred] for m in image] for image in masks_pred])
        masks_enc = torch.utils.data.default_collate([[m[:min_keep_enc] for m in image] for image in masks_enc])
        return masks_enc, masks_pred


__all__ = [
    "ReferenceMaskCollator",
    "ReferenceModels",
    "apply_masks",
    "official_masks",
    "reference_forward",
    "reference_from_ours",
    "reference_loss",
    "reference_optimizer",
    "reference_train_step",
    "repeat_interleave_batch",
]
