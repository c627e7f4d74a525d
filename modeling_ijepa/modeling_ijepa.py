# Copyright 2026 The ijepa-hf Authors. All rights reserved.
# Licensed under the Apache License, Version 2.0.
"""PyTorch I-JEPA: context/target ViT encoder with token dropping, narrow predictor, pre-training and classification
heads.

The encoder's parameter names are those of transformers' built-in `IJepaModel`, so checkpoints move both ways between
this package and vanilla transformers. Its patch/position embedding module is the built-in one.
"""

import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from transformers import initialization as init
from transformers.activations import ACT2FN
from transformers.configuration_utils import PreTrainedConfig
from transformers.modeling_layers import GradientCheckpointingLayer
from transformers.modeling_outputs import BaseModelOutputWithPooling, ImageClassifierOutput
from transformers.modeling_utils import PreTrainedModel
from transformers.models.ijepa.modeling_ijepa import IJepaEmbeddings
from transformers.processing_utils import Unpack
from transformers.utils import ModelOutput, TransformersKwargs, can_return_tuple
from transformers.utils.output_capturing import OutputRecorder, capture_outputs

from .configuration_ijepa import IJepaConfig
from .masking.base import CONTEXT_PADDING_INDEX
from .regularizers import LOSS_TERMS, PREDICTION_LOSS


def get_2d_sincos_pos_embed(embed_dim: int, grid_size: tuple[int, int]) -> torch.Tensor:
    """
    Fixed 2-D sine-cosine position embedding of I-JEPA (MAE style, no CLS token).

    The first half of the channels encodes the column index, the second half the row index, each as
    `[sin(pos * omega), cos(pos * omega)]` with `omega = 1 / 10000 ** (arange(d/4) / (d/4))`.

    Returns:
        `torch.FloatTensor` of shape `(rows * columns, embed_dim)`, patches in row-major order.
    """
    if embed_dim % 4:
        raise ValueError(f"The sin-cos position embedding needs a width divisible by 4, got {embed_dim}.")
    rows, columns = grid_size
    row_index, column_index = np.meshgrid(
        np.arange(rows, dtype=np.float64), np.arange(columns, dtype=np.float64), indexing="ij"
    )

    def encode_1d(positions: np.ndarray) -> np.ndarray:
        omega = np.arange(embed_dim // 4, dtype=np.float64) / (embed_dim / 4.0)
        omega = 1.0 / 10000**omega
        angles = np.outer(positions.reshape(-1), omega)
        return np.concatenate([np.sin(angles), np.cos(angles)], axis=1)

    embedding = np.concatenate([encode_1d(column_index), encode_1d(row_index)], axis=1)
    return torch.from_numpy(embedding).float()


def gather_tokens(hidden_states: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
    """
    Select tokens per sample.

    Args:
        hidden_states: `(batch_size, sequence_length, hidden_size)`.
        indices: `(batch_size, num_selected)` LongTensor of positions in `[0, sequence_length)`.

    Returns:
        `(batch_size, num_selected, hidden_size)`.
    """
    return torch.gather(hidden_states, 1, indices.unsqueeze(-1).expand(-1, -1, hidden_states.size(-1)))


def _check_indices(name: str, indices: torch.Tensor, batch_size: int, num_patches: int, ndim: int) -> None:
    if indices.dtype not in (torch.int64, torch.int32) or indices.dim() != ndim or indices.size(0) != batch_size:
        expected = "(batch_size, num_context)" if ndim == 2 else "(batch_size, num_target_blocks, num_target)"
        raise ValueError(
            f"{name} must be an integer tensor of shape {expected} with batch_size={batch_size}, got dtype "
            f"{indices.dtype} and shape {tuple(indices.shape)}. Build it with a mask sampler "
            "(modeling_ijepa.masking.mask_sampler_from_config)."
        )
    # A range check costs a device sync on accelerators, where an out-of-range gather fails loudly anyway.
    # Skipped under torch.compile, where the data-dependent branch would split the graph.
    checkable = indices.device.type == "cpu" and not torch.compiler.is_compiling()
    if checkable and indices.numel() and (indices.min() < 0 or indices.max() >= num_patches):
        padding = (
            f" A {name} row padded with {CONTEXT_PADDING_INDEX} comes from full-context masks: build the model with "
            "context_truncation='none' (or pass context_mask to the encoder)."
            if name == "context_indices" and bool((indices == CONTEXT_PADDING_INDEX).any())
            else ""
        )
        raise ValueError(
            f"{name} holds patch indices outside [0, {num_patches}) for this image size: indices refer to the "
            f"flattened patch grid of the input image.{padding}"
        )


def _check_context_mask(context_mask: torch.Tensor, context_indices: torch.Tensor | None) -> None:
    if context_indices is None:
        raise ValueError(
            "context_mask marks the padding of context_indices: pass context_indices too (the full image has no "
            "padding)."
        )
    if context_mask.dtype != torch.bool or context_mask.shape != context_indices.shape:
        raise ValueError(
            f"context_mask must be a boolean tensor shaped like context_indices {tuple(context_indices.shape)} (True "
            f"at real context tokens, False at padding), got dtype {context_mask.dtype} and shape "
            f"{tuple(context_mask.shape)}."
        )


def key_padding_mask(token_mask: torch.Tensor) -> torch.Tensor:
    """`(batch_size, sequence_length)` boolean, `True` at real tokens -> the `(batch_size, 1, 1, sequence_length)`
    `attention_mask` of the attention functions (every query ignores the padding keys)."""
    return token_mask[:, None, None, :]


def masked_mean(hidden_states: torch.Tensor, token_mask: torch.Tensor | None) -> torch.Tensor:
    """Mean over tokens of `(batch_size, num_tokens, hidden_size)`, over the `True` tokens of `token_mask` if given."""
    if token_mask is None:
        return hidden_states.mean(dim=1)
    weights = token_mask.unsqueeze(-1).to(hidden_states.dtype)
    return (hidden_states * weights).sum(dim=1) / weights.sum(dim=1).clamp_min(1.0)


def eager_attention_forward(
    module: nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    scaling: float,
    dropout: float = 0.0,
    attention_mask: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """
    Explicit softmax attention. `query`, `key`, `value`: `(batch_size, num_heads, sequence_length, head_dim)`;
    `attention_mask`: optional boolean `(batch_size, 1, 1, sequence_length)`, `False` at keys never attended (padding).

    Returns:
        The attention output `(batch_size, sequence_length, num_heads, head_dim)` and the attention weights
        `(batch_size, num_heads, sequence_length, sequence_length)`.
    """
    scores = torch.matmul(query, key.transpose(-2, -1)) * scaling
    if attention_mask is not None:
        scores = scores.masked_fill(~attention_mask, float("-inf"))
    weights = scores.softmax(dim=-1, dtype=torch.float32).to(query.dtype)
    output = torch.matmul(F.dropout(weights, p=dropout, training=module.training), value)
    return output.transpose(1, 2), weights


def sdpa_attention_forward(
    module: nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    scaling: float,
    dropout: float = 0.0,
    attention_mask: torch.Tensor | None = None,
) -> tuple[torch.Tensor, None]:
    """
    `torch.nn.functional.scaled_dot_product_attention` (flash / memory-efficient kernels on GPU); same shapes as
    [`eager_attention_forward`], without attention weights.

    On CPU in bf16, two matmuls and a softmax replace torch's CPU flash kernel, which is 2-4x slower there (its
    backward above all): a bf16 pre-training step of ViT-S/16 ran ~1.2x faster. The query (smaller than the scores) is
    scaled, and torch's CPU softmax, which accumulates bf16 in float32 itself, writes bf16 directly: no float32 copy of
    the scores in forward or backward.
    """
    if attention_mask is not None and module.config.padded_attention == "nested":
        return nested_sdpa_attention_forward(module, query, key, value, scaling, dropout, attention_mask)
    if query.device.type == "cpu" and query.dtype == torch.bfloat16:
        scores = torch.matmul(query * scaling, key.transpose(-2, -1))
        if attention_mask is not None:
            scores = scores.masked_fill(~attention_mask, float("-inf"))
        probabilities = F.dropout(scores.softmax(dim=-1), p=dropout, training=module.training)
        return torch.matmul(probabilities, value).transpose(1, 2), None
    output = F.scaled_dot_product_attention(
        query, key, value, attn_mask=attention_mask, dropout_p=dropout, scale=scaling
    )
    return output.transpose(1, 2), None


def nested_sdpa_attention_forward(
    module: nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    scaling: float,
    dropout: float = 0.0,
    attention_mask: torch.Tensor | None = None,
) -> tuple[torch.Tensor, None]:
    """
    Variable-length SDPA (`config.padded_attention="nested"`): the real tokens of every sequence (`True` in the key
    padding `attention_mask`, `(batch_size, 1, 1, sequence_length)`) are packed into torch jagged nested tensors, so
    no padding is computed and torch dispatches to its variable-length kernels where it has them (flash /
    memory-efficient on GPU). Same shapes as [`sdpa_attention_forward`]; outputs at padding positions are zeros.
    """
    batch_size, num_heads, sequence_length, head_dim = query.shape
    real = attention_mask.reshape(batch_size, sequence_length)
    offsets = F.pad(real.sum(dim=1).cumsum(dim=0), (1, 0))

    def pack(states: torch.Tensor) -> torch.Tensor:  # (B, H, L, D) -> jagged (B, H, j, D)
        return torch.nested.nested_tensor_from_jagged(states.transpose(1, 2)[real], offsets).transpose(1, 2)

    packed = F.scaled_dot_product_attention(pack(query), pack(key), pack(value), dropout_p=dropout, scale=scaling)
    output = query.new_zeros(batch_size, sequence_length, num_heads, head_dim)
    output[real] = packed.transpose(1, 2).values()
    return output, None


# The attention functions `config._attn_implementation` selects (transformers' convention).
ATTENTION_FUNCTIONS = {"eager": eager_attention_forward, "sdpa": sdpa_attention_forward}


class IJepaSelfAttention(nn.Module):
    """
    Multi-head self-attention with separate q/k/v projections (the built-in IJepa parameter names).

    The attention function is `ATTENTION_FUNCTIONS[config._attn_implementation]`, read at every call (so
    `set_attn_implementation` switches it); attention weights, when asked for, always come from the eager function.
    """

    def __init__(self, config: IJepaConfig, hidden_size: int, num_attention_heads: int):
        super().__init__()
        if hidden_size % num_attention_heads:
            raise ValueError(
                f"The hidden size ({hidden_size}) is not a multiple of the number of attention heads "
                f"({num_attention_heads}): pick a head count that divides the width (e.g. hidden_size // 64)."
            )
        self.config = config
        self.num_attention_heads = num_attention_heads
        self.head_dim = hidden_size // num_attention_heads
        self.scaling = self.head_dim**-0.5
        self.q_proj = nn.Linear(hidden_size, hidden_size, bias=config.qkv_bias)
        self.k_proj = nn.Linear(hidden_size, hidden_size, bias=config.qkv_bias)
        self.v_proj = nn.Linear(hidden_size, hidden_size, bias=config.qkv_bias)
        self.o_proj = nn.Linear(hidden_size, hidden_size)

    def _can_fuse_qkv(self) -> bool:
        """Plain, unhooked `nn.Linear` projections only: adapters (LoRA) or hooks on q/k/v must see their own calls."""
        projections = (self.q_proj, self.k_proj, self.v_proj)
        return all(
            type(p) is nn.Linear
            and not (p._forward_hooks or p._forward_pre_hooks)
            and (p.bias is None) == (self.q_proj.bias is None)
            for p in projections
        )

    def _query_key_value(self, hidden_states: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        batch_size, sequence_length, _ = hidden_states.shape
        if self._can_fuse_qkv():
            # One matmul for q, k and v (weights concatenated on the fly; parameter names and files stay vanilla).
            weight = torch.cat([self.q_proj.weight, self.k_proj.weight, self.v_proj.weight])
            bias = (
                None if self.q_proj.bias is None else torch.cat([self.q_proj.bias, self.k_proj.bias, self.v_proj.bias])
            )
            qkv = F.linear(hidden_states, weight, bias)
            qkv = qkv.view(batch_size, sequence_length, 3, self.num_attention_heads, self.head_dim).permute(
                2, 0, 3, 1, 4
            )
            return qkv.unbind(0)
        head_shape = (batch_size, sequence_length, self.num_attention_heads, self.head_dim)
        return tuple(
            projection(hidden_states).view(head_shape).transpose(1, 2)
            for projection in (self.q_proj, self.k_proj, self.v_proj)
        )

    def forward(
        self,
        hidden_states: torch.Tensor,
        output_attentions: bool = False,
        attention_mask: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """
        `hidden_states`: `(batch_size, sequence_length, hidden_size)`; `attention_mask`: optional boolean
        `(batch_size, 1, 1, sequence_length)`, `False` at padding keys. Returns the same shape as `hidden_states` and
        the attention weights `(batch_size, num_heads, sequence_length, sequence_length)` if `output_attentions`.
        """
        batch_size, sequence_length, _ = hidden_states.shape
        query, key, value = self._query_key_value(hidden_states)
        implementation = self.config._attn_implementation or "sdpa"
        if implementation not in ATTENTION_FUNCTIONS:
            raise ValueError(
                f"attn_implementation={implementation!r} is not supported by I-JEPA: use one of "
                f"{sorted(ATTENTION_FUNCTIONS)}."
            )
        attention = eager_attention_forward if output_attentions else ATTENTION_FUNCTIONS[implementation]
        dropout = self.config.attention_probs_dropout_prob if self.training else 0.0
        context, weights = attention(
            self, query, key, value, scaling=self.scaling, dropout=dropout, attention_mask=attention_mask
        )
        return self.o_proj(context.reshape(batch_size, sequence_length, -1)), weights


class IJepaMLP(nn.Module):
    def __init__(self, config: IJepaConfig, hidden_size: int, intermediate_size: int):
        super().__init__()
        self.activation_fn = ACT2FN[config.hidden_act]
        self.fc1 = nn.Linear(hidden_size, intermediate_size)
        self.fc2 = nn.Linear(intermediate_size, hidden_size)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.activation_fn(self.fc1(hidden_states)))


class IJepaLayer(GradientCheckpointingLayer):
    """Pre-norm transformer block. `layer_index` (0-based) sets the depth-scaled init of the residual projections."""

    def __init__(
        self, config: IJepaConfig, hidden_size: int, num_attention_heads: int, intermediate_size: int, layer_index: int
    ):
        super().__init__()
        self.layernorm_before = nn.LayerNorm(hidden_size, eps=config.layer_norm_eps)
        self.attention = IJepaSelfAttention(config, hidden_size, num_attention_heads)
        self.layernorm_after = nn.LayerNorm(hidden_size, eps=config.layer_norm_eps)
        self.mlp = IJepaMLP(config, hidden_size, intermediate_size)
        self.dropout = nn.Dropout(config.hidden_dropout_prob)
        # I-JEPA divides the residual-branch output weights of block i (1-based) by sqrt(2 * i) at init.
        depth_scale = 1.0 / math.sqrt(2.0 * (layer_index + 1))
        self.attention.o_proj._ijepa_init_scale = depth_scale
        self.mlp.fc2._ijepa_init_scale = depth_scale

    def forward(
        self,
        hidden_states: torch.Tensor,
        output_attentions: bool = False,
        attention_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """`(batch_size, sequence_length, hidden_size)` in and out; `attention_mask` as in [`IJepaSelfAttention`];
        attention weights are captured from the attention module by `capture_outputs`."""
        attention_output, _ = self.attention(self.layernorm_before(hidden_states), output_attentions, attention_mask)
        hidden_states = hidden_states + self.dropout(attention_output)
        return hidden_states + self.dropout(self.mlp(self.layernorm_after(hidden_states)))


# Keywords every model forward accepts besides its own arguments: transformers' `TransformersKwargs` (e.g.
# `output_hidden_states`, `output_attentions`, the Trainer's `num_items_in_batch`) and `return_dict`.
_FORWARD_KWARGS = frozenset(TransformersKwargs.__annotations__) | {"return_dict"}


def _check_forward_kwargs(model: nn.Module, kwargs: dict) -> None:
    unknown = sorted(set(kwargs) - _FORWARD_KWARGS)
    if unknown:
        raise TypeError(
            f"{type(model).__name__}.forward() got unexpected keyword argument(s) {unknown}: it takes its documented "
            f"arguments and transformers' common keywords ({', '.join(sorted(_FORWARD_KWARGS))})."
        )


_CONFIG_DOWNLOAD_KWARGS = (
    "cache_dir",
    "force_download",
    "proxies",
    "token",
    "local_files_only",
    "revision",
    "subfolder",
)


def _checkpoint_config(pretrained_model_name_or_path, kwargs: dict) -> dict | PreTrainedConfig | None:
    """The configuration `from_pretrained` will use: the `config` passed in, else the checkpoint's raw config dict."""
    config = kwargs.get("config")
    if isinstance(config, PreTrainedConfig):
        return config
    if pretrained_model_name_or_path is None:
        return None
    download_kwargs = {name: kwargs[name] for name in _CONFIG_DOWNLOAD_KWARGS if name in kwargs}
    config_dict, _ = PreTrainedConfig.get_config_dict(config or pretrained_model_name_or_path, **download_kwargs)
    return config_dict


def _is_pretraining_checkpoint(pretrained_model_name_or_path, kwargs: dict) -> bool:
    config = _checkpoint_config(pretrained_model_name_or_path, kwargs)
    architectures = config.get("architectures") if isinstance(config, dict) else getattr(config, "architectures", None)
    return "IJepaForPreTraining" in (architectures or [])


class IJepaPreTrainedModel(PreTrainedModel):
    config_class = IJepaConfig
    config: IJepaConfig
    base_model_prefix = "ijepa"
    main_input_name = "pixel_values"
    input_modalities = ("image",)
    supports_gradient_checkpointing = True
    _no_split_modules = ["IJepaEmbeddings", "IJepaLayer"]
    _supports_sdpa = True
    # `output_hidden_states` / `output_attentions` (flags or layer-index lists) are captured from these modules.
    _can_record_outputs = {
        "hidden_states": OutputRecorder(IJepaLayer, index=0),
        "attentions": OutputRecorder(IJepaSelfAttention, index=1),
    }

    @classmethod
    def _can_set_attn_implementation(cls) -> bool:
        # transformers' source heuristic looks for its attention-interface registry; our attention reads
        # `config._attn_implementation` at every call, so `set_attn_implementation` can switch it safely.
        return True

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, *model_args, **kwargs):
        """
        [`~transformers.PreTrainedModel.from_pretrained`], refusing checkpoints of another architecture: their weight
        names partly overlap ours (e.g. a ViT's), so transformers would otherwise load them half-initialised.
        """
        config = _checkpoint_config(pretrained_model_name_or_path, kwargs)
        if isinstance(config, dict) and config.get("model_type", IJepaConfig.model_type) != IJepaConfig.model_type:
            raise ValueError(
                f"{pretrained_model_name_or_path} holds a {config['model_type']!r} checkpoint "
                f"(architectures {config.get('architectures')}), not an I-JEPA ('ijepa') one: load it with its own "
                f"class (e.g. transformers.AutoModel) instead of {cls.__name__}, or convert official I-JEPA weights "
                "with modeling_ijepa.convert_official_checkpoint."
            )
        loaded = super().from_pretrained(pretrained_model_name_or_path, *model_args, **kwargs)
        # Loading replaces every parameter by a new, trainable one: freeze the fixed ones again.
        (loaded[0] if isinstance(loaded, tuple) else loaded)._freeze_fixed_parameters()
        return loaded

    def _freeze_fixed_parameters(self) -> None:
        """The sin-cos position embeddings are fixed, never trained."""
        for module in self.modules():
            if isinstance(module, (IJepaEmbeddings, IJepaPredictor)):
                module.position_embeddings.requires_grad_(False)

    def _init_weights(self, module: nn.Module) -> None:
        """Truncated-normal init (`initializer_range`, depth-scaled on residual outputs); fixed sin-cos positions."""
        if isinstance(module, (nn.Linear, nn.Conv2d)):
            std = self.config.initializer_range * getattr(module, "_ijepa_init_scale", 1.0)
            init.trunc_normal_(module.weight, mean=0.0, std=std)
            if module.bias is not None:
                init.zeros_(module.bias)
        elif isinstance(module, nn.LayerNorm):
            init.ones_(module.weight)
            init.zeros_(module.bias)
        elif isinstance(module, IJepaEmbeddings):
            grid = module.position_embeddings.shape[1]
            init.copy_(
                module.position_embeddings,
                get_2d_sincos_pos_embed(module.position_embeddings.shape[-1], self.config.grid_size).view(1, grid, -1),
            )
        elif isinstance(module, IJepaPredictor):
            init.trunc_normal_(module.mask_token, mean=0.0, std=self.config.initializer_range)
            pos = get_2d_sincos_pos_embed(self.config.predictor_hidden_size, self.config.grid_size)
            init.copy_(module.position_embeddings, pos.unsqueeze(0))


class IJepaModel(IJepaPreTrainedModel):
    """
    The I-JEPA ViT encoder (no CLS token, fixed sin-cos positions, final LayerNorm). Used as context encoder, target
    encoder and downstream backbone. Parameter names match transformers' built-in `IJepaModel`.
    """

    def __init__(self, config: IJepaConfig):
        super().__init__(config)
        config.check_image_and_patch_size()
        self.embeddings = IJepaEmbeddings(config)
        self.embeddings.position_embeddings.requires_grad_(False)
        self.layers = nn.ModuleList(
            IJepaLayer(config, config.hidden_size, config.num_attention_heads, config.intermediate_size, index)
            for index in range(config.num_hidden_layers)
        )
        self.layernorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.post_init()

    def get_input_embeddings(self) -> nn.Module:
        return self.embeddings.patch_embeddings

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, *model_args, **kwargs):
        """
        [`~transformers.PreTrainedModel.from_pretrained`]; given a saved [`IJepaForPreTraining`] (e.g. through
        `AutoModel`), returns its EMA target encoder, the encoder I-JEPA uses downstream, rather than an encoder left
        at random init because its weights are stored under the `target_encoder.` prefix.
        """
        if not _is_pretraining_checkpoint(pretrained_model_name_or_path, kwargs):
            return super().from_pretrained(pretrained_model_name_or_path, *model_args, **kwargs)
        loaded = IJepaForPreTraining.from_pretrained(pretrained_model_name_or_path, *model_args, **kwargs)
        pretraining_model, loading_info = loaded if kwargs.get("output_loading_info") else (loaded, None)
        encoder = pretraining_model.get_encoder()
        # Unfreeze the EMA copy like any loaded model; the sin-cos position embedding stays fixed.
        encoder.requires_grad_(True)
        encoder._freeze_fixed_parameters()
        return (encoder, loading_info) if loading_info is not None else encoder

    @capture_outputs(tie_last_hidden_states=False)
    def forward(
        self,
        pixel_values: torch.Tensor,
        context_indices: torch.LongTensor | None = None,
        interpolate_pos_encoding: bool | None = None,
        context_mask: torch.BoolTensor | None = None,
        **kwargs: Unpack[TransformersKwargs],
    ) -> BaseModelOutputWithPooling:
        """
        Args:
            pixel_values: `(batch_size, num_channels, height, width)`.
            context_indices: optional `(batch_size, num_context)` LongTensor of flattened patch indices. Only these
                tokens (after the position embedding is added) go through the transformer: the others are dropped.
            interpolate_pos_encoding: bicubically resize the position embedding for another input resolution.
            context_mask: optional boolean `(batch_size, num_context)`, `False` where `context_indices` is padding
                (contexts of different lengths in one batch). Padding tokens are never attended to and are left out of
                `pooler_output`; their entries of `last_hidden_state` carry no meaning.
            output_hidden_states: `True` for the input of the first layer and every layer's output
                (`num_hidden_layers + 1` tensors `(batch_size, num_tokens, hidden_size)`, before the final LayerNorm),
                or a list of indices into them (the others are `None`).
            output_attentions: every layer's attention weights `(batch_size, num_heads, num_tokens, num_tokens)`,
                computed eagerly whatever the attention implementation.
            return_dict: `False` for a tuple.

        Returns:
            [`BaseModelOutputWithPooling`] with `last_hidden_state` `(batch_size, num_tokens, hidden_size)` (after the
            final LayerNorm) and `pooler_output` `(batch_size, hidden_size)`, the mean over output tokens (real tokens
            only when `context_mask` is given).
        """
        _check_forward_kwargs(self, kwargs)
        output_attentions = kwargs.get("output_attentions", self.config.output_attentions)
        if pixel_values is None:
            raise ValueError("IJepaModel needs `pixel_values` of shape (batch_size, num_channels, height, width).")
        if pixel_values.dim() != 4:
            raise ValueError(
                "pixel_values must be (batch_size, num_channels, height, width), got shape "
                f"{tuple(pixel_values.shape)}."
            )
        expected_dtype = self.embeddings.patch_embeddings.projection.weight.dtype
        if pixel_values.dtype != expected_dtype:
            pixel_values = pixel_values.to(expected_dtype)
        height, width = pixel_values.shape[-2:]
        patch_height, patch_width = self.embeddings.patch_embeddings.patch_size
        if height % patch_height or width % patch_width:
            raise ValueError(
                f"Input images of {height}x{width} pixels are not divisible by the patch size "
                f"{patch_height}x{patch_width}: resize or crop them to a multiple of the patch size "
                f"(the model was configured for {self.config.image_size})."
            )

        hidden_states = self.embeddings(pixel_values, interpolate_pos_encoding=bool(interpolate_pos_encoding))
        attention_mask = None
        if context_mask is not None:
            _check_context_mask(context_mask, context_indices)
            context_indices = context_indices.masked_fill(~context_mask, 0)  # padding gathers any patch, masked below
            attention_mask = key_padding_mask(context_mask)
        if context_indices is not None:
            _check_indices("context_indices", context_indices, hidden_states.size(0), hidden_states.size(1), ndim=2)
            hidden_states = gather_tokens(hidden_states, context_indices)
        else:
            # The patch embedding is a transposed view of the conv output (strides (N*D, 1, N)) and element-wise ops
            # keep that layout: one copy here spares every LayerNorm and residual add of the full-image pass a strided
            # one.
            hidden_states = hidden_states.contiguous()

        for layer in self.layers:
            hidden_states = layer(hidden_states, bool(output_attentions), attention_mask)
        sequence_output = self.layernorm(hidden_states)
        return BaseModelOutputWithPooling(
            last_hidden_state=sequence_output, pooler_output=masked_mean(sequence_output, context_mask)
        )


class IJepaPredictor(nn.Module):
    """
    The narrow I-JEPA predictor ViT.

    Context features are projected to the predictor width and given their predictor position embedding; for each
    target block, learned mask tokens carrying the position embedding of the block's patches are appended, the
    sequence goes through the predictor blocks, and the outputs at the mask tokens are projected back to the encoder
    width. Each target block is predicted from the context independently (the batch is repeated per block).
    """

    def __init__(self, config: IJepaConfig):
        super().__init__()
        if config.predictor_hidden_size % config.predictor_num_attention_heads:
            raise ValueError(
                f"predictor_num_attention_heads={config.predictor_num_attention_heads} does not divide "
                f"predictor_hidden_size={config.predictor_hidden_size}: set predictor_num_attention_heads to a "
                "divisor "
                "of the predictor width."
            )
        self.config = config
        self.embeddings = nn.Linear(config.hidden_size, config.predictor_hidden_size)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, config.predictor_hidden_size))
        self.position_embeddings = nn.Parameter(
            torch.zeros(1, config.num_patches, config.predictor_hidden_size), requires_grad=False
        )
        self.layers = nn.ModuleList(
            IJepaLayer(
                config,
                config.predictor_hidden_size,
                config.predictor_num_attention_heads,
                config.predictor_intermediate_size,
                index,
            )
            for index in range(config.predictor_num_hidden_layers)
        )
        self.layernorm = nn.LayerNorm(config.predictor_hidden_size, eps=config.layer_norm_eps)
        self.projection = nn.Linear(config.predictor_hidden_size, config.hidden_size)

    def forward(
        self,
        context_hidden_states: torch.Tensor,
        context_indices: torch.LongTensor,
        target_indices: torch.LongTensor,
        context_mask: torch.BoolTensor | None = None,
        target_mask: torch.BoolTensor | None = None,
    ) -> torch.Tensor:
        """
        Args:
            context_hidden_states: `(batch_size, num_context, hidden_size)`, the context encoder output.
            context_indices: `(batch_size, num_context)`.
            target_indices: `(batch_size, num_target_blocks, num_target)`.
            context_mask: optional boolean `(batch_size, num_context)`, `False` at padding context tokens, which no
                token attends to.
            target_mask: optional boolean `(batch_size, num_target_blocks, num_target)`, `False` at padding target
                tokens (token-count buckets, `modeling_ijepa.data.TokenBuckets`), which no token attends to; their
                predictions are meaningless.

        Returns:
            Predictions `(batch_size, num_target_blocks, num_target, hidden_size)`.
        """
        batch_size, num_blocks, num_target = target_indices.shape
        num_context = context_indices.size(1)
        position_embeddings = self.position_embeddings.expand(batch_size, -1, -1)
        attention_mask = None
        if context_mask is not None or target_mask is not None:
            if context_mask is None:
                context_mask = context_indices.new_ones(context_indices.shape, dtype=torch.bool)
            _check_context_mask(context_mask, context_indices)
            context_indices = context_indices.masked_fill(~context_mask, 0)
            if target_mask is None:
                target_mask = target_indices.new_ones(target_indices.shape, dtype=torch.bool)
            target_indices = target_indices.masked_fill(~target_mask, 0)
            # Every block's sequence is [context, its mask tokens]: keys are the real context and target tokens.
            context_part = context_mask.unsqueeze(1).expand(-1, num_blocks, -1)
            attention_mask = key_padding_mask(torch.cat([context_part, target_mask], dim=2).flatten(0, 1))

        context = self.embeddings(context_hidden_states) + gather_tokens(position_embeddings, context_indices)
        # (batch, blocks, context + target, width) -> (batch * blocks, ...): every block sees its own copy of the
        # context.
        context = context.unsqueeze(1).expand(-1, num_blocks, -1, -1)
        targets = gather_tokens(position_embeddings, target_indices.reshape(batch_size, num_blocks * num_target))
        targets = (targets + self.mask_token).view(batch_size, num_blocks, num_target, -1)
        hidden_states = torch.cat([context, targets], dim=2).flatten(0, 1)

        for layer in self.layers:
            hidden_states = layer(hidden_states, False, attention_mask)
        predictions = self.projection(self.layernorm(hidden_states[:, num_context:]))
        return predictions.view(batch_size, num_blocks, num_target, -1)


@dataclass
class IJepaForPreTrainingOutput(ModelOutput):
    """
    Output of [`IJepaForPreTraining`].

    Args:
        loss: scalar smooth-L1 loss between predictions and targets.
        predictions: `(batch_size, num_target_blocks, num_target, hidden_size)` predictor outputs.
        targets: same shape; layer-normed (no affine) target-encoder features gathered at the target patches.
        context_hidden_state: `(batch_size, num_context, hidden_size)` context-encoder output.
        target_pooler_output: `(batch_size, hidden_size)` mean of the target-encoder output over all patches (the
            features used downstream; handy for collapse monitors).
        context_mask: `(batch_size, num_context)` boolean, `False` at padding context tokens (full-context batches,
            `context_truncation="none"`); `None` when no context is padded.
        loss_terms: set only when a regulariser of `modeling_ijepa.regularizers.LOSS_TERMS` is on: `{name: scalar}`
            of the smooth-L1 term alone (`"prediction_loss"`) and of each regulariser that is on, before weighting
            (`loss` is then the prediction loss plus the weighted regularisers); the trainer logs each.
    """

    loss: torch.FloatTensor | None = None
    predictions: torch.FloatTensor | None = None
    targets: torch.FloatTensor | None = None
    context_hidden_state: torch.FloatTensor | None = None
    target_pooler_output: torch.FloatTensor | None = None
    context_mask: torch.BoolTensor | None = None
    loss_terms: dict[str, torch.FloatTensor] | None = None


class IJepaForPreTraining(IJepaPreTrainedModel):
    """
    I-JEPA pre-training: context encoder + predictor, and an EMA target encoder whose parameters never get gradients.

    `forward(pixel_values, context_indices, target_indices)` returns the smooth-L1 loss between the predictor output
    and the layer-normed target-encoder features at the target patches. Call [`update_target_encoder`] after each
    optimiser step.

    Options of the configuration, all off by default (the official loss, bit for bit):
    - `vicreg_variance_weight`, `vicreg_covariance_weight`, `sigreg_weight`: regularisers added to the loss, on the
      features chosen by `regularized_features`;
    - `target_normalization="dyn_tanh"`: targets `tanh(dyn_tanh_alpha * features)` instead of a LayerNorm;
    - `context_truncation="none"`: `context_indices` rows padded with `CONTEXT_PADDING_INDEX` (-1); the padding is
      masked out of attention in the encoder and the predictor and left out of the regularisers.
    """

    def __init__(self, config: IJepaConfig):
        super().__init__(config)
        config.check_mask_settings()  # a pre-training model is only useful with masks that fit its patch grid
        self.encoder = IJepaModel(config)
        self.predictor = IJepaPredictor(config)
        self.target_encoder = IJepaModel(config)
        self.target_encoder.requires_grad_(False)
        self.post_init()
        self.target_encoder.load_state_dict(self.encoder.state_dict())

    def get_encoder(self) -> IJepaModel:
        """The encoder to use downstream: the EMA target encoder, as the authors released it."""
        return self.target_encoder

    def get_input_embeddings(self) -> nn.Module:
        """The context encoder's patch embedding (looked up by transformers utilities and accelerate's FSDP2)."""
        return self.encoder.get_input_embeddings()

    def _freeze_fixed_parameters(self) -> None:
        """Fixed position embeddings, and the whole target encoder: it follows the encoder by EMA, not by gradients."""
        super()._freeze_fixed_parameters()
        self.target_encoder.requires_grad_(False)

    def train(self, mode: bool = True) -> "IJepaForPreTraining":
        super().train(mode)
        self.target_encoder.eval()  # no dropout on targets, as in the authors' code
        return self

    @torch.no_grad()
    def update_target_encoder(self, momentum: float) -> None:
        """EMA step `target = momentum * target + (1 - momentum) * encoder` over all parameters (one foreach lerp)."""
        target_params = [p.data for p in self.target_encoder.parameters()]
        online_params = [p.data for p in self.encoder.parameters()]
        torch._foreach_lerp_(target_params, online_params, 1.0 - momentum)

    def forward(
        self,
        pixel_values: torch.Tensor,
        context_indices: torch.LongTensor,
        target_indices: torch.LongTensor,
        context_mask: torch.BoolTensor | None = None,
        target_mask: torch.BoolTensor | None = None,
        return_dict: bool | None = None,
        **kwargs: Unpack[TransformersKwargs],
    ) -> IJepaForPreTrainingOutput | tuple:
        """
        Args:
            pixel_values: `(batch_size, num_channels, height, width)`.
            context_indices: `(batch_size, num_context)` flattened patch indices of the context; with
                `config.context_truncation="none"`, shorter rows end in `CONTEXT_PADDING_INDEX` (-1).
            target_indices: `(batch_size, num_target_blocks, num_target)` flattened patch indices of each target block.
            context_mask / target_mask: optional booleans shaped like `context_indices` / `target_indices`, `False` at
                padding (indices there are ignored): batches padded to a few token counts for `torch.compile`
                (`modeling_ijepa.data.TokenBuckets`). The loss is the unpadded one.
        """
        _check_forward_kwargs(self, kwargs)
        return_dict = self.config.return_dict if return_dict is None else return_dict
        if context_indices is None or target_indices is None:
            raise ValueError(
                "IJepaForPreTraining needs `context_indices` and `target_indices`: batch your images with "
                "a mask sampler (modeling_ijepa.masking.mask_sampler_from_config), which samples the I-JEPA "
                "context and target blocks."
            )
        batch_size = pixel_values.size(0)
        num_patches = self.encoder.embeddings.position_embeddings.size(1)
        if target_mask is not None:
            if target_mask.dtype != torch.bool or target_mask.shape != target_indices.shape:
                raise ValueError(
                    f"target_mask must be a boolean tensor shaped like target_indices {tuple(target_indices.shape)} "
                    f"(True at real target tokens), got dtype {target_mask.dtype} and shape "
                    f"{tuple(target_mask.shape)}."
                )
            target_indices = target_indices.masked_fill(~target_mask, 0)
        _check_indices("target_indices", target_indices, batch_size, num_patches, ndim=3)

        # A static choice of the configuration, so that the official path never pays for (or syncs on) a mask.
        if context_mask is None and self.config.context_truncation == "none":
            context_mask = context_indices != CONTEXT_PADDING_INDEX

        with torch.no_grad():
            target_output = self.target_encoder(pixel_values).last_hidden_state
            if self.config.target_normalization == "dyn_tanh":
                target_features = torch.tanh(self.config.dyn_tanh_alpha * target_output)
            else:
                target_features = F.layer_norm(target_output, (target_output.size(-1),))
            num_blocks, num_target = target_indices.shape[1:]
            targets = gather_tokens(target_features, target_indices.reshape(batch_size, -1))
            targets = targets.view(batch_size, num_blocks, num_target, -1)

        context_hidden_state = self.encoder(
            pixel_values, context_indices=context_indices, context_mask=context_mask
        ).last_hidden_state
        predictions = self.predictor(context_hidden_state, context_indices, target_indices, context_mask, target_mask)
        if target_mask is None:
            loss = F.smooth_l1_loss(predictions.float(), targets.float())
        else:  # the mean over the real target tokens only
            errors = F.smooth_l1_loss(predictions.float(), targets.float(), reduction="none").sum(dim=-1)
            loss = (errors * target_mask).sum() / (target_mask.sum() * errors.new_tensor(predictions.size(-1)))
        loss_terms = None
        if self.config.uses_regularizers:
            loss_terms = {PREDICTION_LOSS: loss}
            features = self._regularized_features(predictions, context_hidden_state, context_mask, target_mask)
            for term in LOSS_TERMS:
                weight = getattr(self.config, term.weight_field)
                if weight:
                    loss_terms[term.name] = term.function(features, self.config)
                    loss = loss + weight * loss_terms[term.name]

        output = IJepaForPreTrainingOutput(
            loss=loss,
            predictions=predictions,
            targets=targets,
            context_hidden_state=context_hidden_state,
            target_pooler_output=target_output.mean(dim=1),
            context_mask=context_mask,
            loss_terms=loss_terms,
        )
        return output if return_dict else output.to_tuple()

    def _regularized_features(
        self,
        predictions: torch.Tensor,
        context_hidden_state: torch.Tensor,
        context_mask: torch.Tensor | None,
        target_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """The `(num_samples, hidden_size)` features the regularisers act on (`config.regularized_features`)."""
        if self.config.regularized_features == "predictions":
            return predictions.flatten(0, 2) if target_mask is None else predictions[target_mask]
        if self.config.regularized_features == "context":
            return (
                context_hidden_state[context_mask] if context_mask is not None else context_hidden_state.flatten(0, 1)
            )
        return masked_mean(context_hidden_state, context_mask)  # "pooled_context": one sample per image


class IJepaForImageClassification(IJepaPreTrainedModel):
    """
    I-JEPA encoder with a linear head on the average-pooled patch features (same layout as transformers' built-in
    `IJepaForImageClassification`). `labels` `(batch_size,)` give a cross-entropy loss (or MSE for one label).
    """

    def __init__(self, config: IJepaConfig):
        super().__init__(config)
        self.num_labels = config.num_labels
        self.ijepa = IJepaModel(config)
        self.classifier = nn.Linear(config.hidden_size, config.num_labels) if config.num_labels > 0 else nn.Identity()
        self.post_init()

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, *model_args, **kwargs):
        """
        [`~transformers.PreTrainedModel.from_pretrained`]; given a saved [`IJepaForPreTraining`], the backbone is its
        EMA target encoder (see [`IJepaModel.from_pretrained`]) and the head is newly initialised.
        """
        if not _is_pretraining_checkpoint(pretrained_model_name_or_path, kwargs):
            return super().from_pretrained(pretrained_model_name_or_path, *model_args, **kwargs)
        output_loading_info = kwargs.pop("output_loading_info", False)
        encoder, loading_info = IJepaModel.from_pretrained(
            pretrained_model_name_or_path, *model_args, output_loading_info=True, **kwargs
        )
        model = cls(encoder.config).to(device=encoder.device, dtype=encoder.dtype).eval()
        model.ijepa = encoder
        loading_info["missing_keys"] |= {f"classifier.{name}" for name, _ in model.classifier.named_parameters()}
        return (model, loading_info) if output_loading_info else model

    @can_return_tuple
    def forward(
        self,
        pixel_values: torch.Tensor,
        labels: torch.Tensor | None = None,
        interpolate_pos_encoding: bool | None = None,
        **kwargs: Unpack[TransformersKwargs],
    ) -> ImageClassifierOutput:
        """
        `pixel_values` `(batch_size, num_channels, height, width)`; returns logits `(batch_size, num_labels)`.
        `output_hidden_states` / `output_attentions` / `return_dict` as in [`IJepaModel.forward`].
        """
        _check_forward_kwargs(self, kwargs)
        outputs = self.ijepa(pixel_values, interpolate_pos_encoding=interpolate_pos_encoding, **kwargs)
        logits = self.classifier(outputs.pooler_output)
        loss = self.loss_function(labels, logits, self.config, **kwargs) if labels is not None else None
        return ImageClassifierOutput(
            loss=loss, logits=logits, hidden_states=outputs.hidden_states, attentions=outputs.attentions
        )


__all__ = [
    "IJepaPreTrainedModel",
    "IJepaModel",
    "IJepaPredictor",
    "IJepaForPreTraining",
    "IJepaForPreTrainingOutput",
    "IJepaForImageClassification",
    "get_2d_sincos_pos_embed",
    "gather_tokens",
]
