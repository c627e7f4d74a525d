"""
Convert a training checkpoint of the authors' code (facebookresearch/ijepa, a `.pth.tar`) into Hugging Face folders.

The result, under `output_dir`:

- `output_dir/`: the EMA target encoder (the weights the authors release for downstream use) as an [`IJepaModel`]
  plus a default image processor. Vanilla `transformers.IJepaModel.from_pretrained(output_dir)` loads it; this
  package is not needed to use it.
- `output_dir/pretraining/`: the whole [`IJepaForPreTraining`] (context encoder, predictor, target encoder), to
  continue pre-training or to inspect the predictor.

Usage:

```bash
python -m modeling_ijepa.convert_official_checkpoint --checkpoint IN1K-vit.h.14-300e.pth.tar --output_dir ijepa-vith14
python -m modeling_ijepa.convert_official_checkpoint --checkpoint IN22K-vit.g.16-600e.pth.tar \
    --output_dir ijepa-vitg16 --model vit_giant --patch_size 16
```

The encoder geometry (width, MLP width, heads, patch and image size) comes from the preset
`{model}_patch{patch_size}_{image_size}` (or the closest preset of that model with the patch and image size
overridden) and is checked against the checkpoint; the encoder depth and the predictor depth, width and MLP width are
read from the checkpoint. Attention head counts cannot be read from weights: they come from the preset (the authors'
predictor uses as many heads as the encoder).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import tempfile
from pathlib import Path

import torch

from .configuration_ijepa import IJepaConfig, configuration_dir, list_presets
from .data import default_image_processor
from .modeling_ijepa import IJepaForPreTraining
from .output_layout import pretraining_dir, write_output_layout


MODEL_SECTIONS = ("encoder", "predictor", "target_encoder")
_DDP_PREFIX = "module."

# Official block parameter -> ours. A tuple means the official tensor is the row-wise concatenation of ours.
_BLOCK_RENAMES: dict[str, tuple[str, ...]] = {
    "norm1": ("layernorm_before",),
    "attn.qkv": ("attention.q_proj", "attention.k_proj", "attention.v_proj"),
    "attn.proj": ("attention.o_proj",),
    "norm2": ("layernorm_after",),
    "mlp.fc1": ("mlp.fc1",),
    "mlp.fc2": ("mlp.fc2",),
}
_ENCODER_RENAMES: dict[str, str] = {
    "patch_embed.proj": "embeddings.patch_embeddings.projection",
    "pos_embed": "embeddings.position_embeddings",
    "norm": "layernorm",
}
_PREDICTOR_RENAMES: dict[str, str] = {
    "predictor_embed": "embeddings",
    "mask_token": "mask_token",
    "predictor_pos_embed": "position_embeddings",
    "predictor_norm": "layernorm",
    "predictor_proj": "projection",
}
_BLOCK_PATTERN = re.compile(
    r"^(?P<blocks>blocks|predictor_blocks)\.(?P<index>\d+)\.(?P<module>.+)\.(?P<tensor>weight|bias)$"
)


# ---------------------------------------------------------------------------------------------------------------------
# Reading the official checkpoint


def strip_ddp_prefix(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Drop the `module.` prefix that `DistributedDataParallel` puts on every key (other keys are kept as they are)."""
    return {
        key[len(_DDP_PREFIX) :] if key.startswith(_DDP_PREFIX) else key: value for key, value in state_dict.items()
    }


def load_official_checkpoint(checkpoint_path: str | os.PathLike) -> dict[str, dict[str, torch.Tensor]]:
    """
    Read the model state dicts of an official training checkpoint (tensors only: `weights_only=True`).

    Returns:
        `{"encoder": ..., "predictor": ..., "target_encoder": ...}`, each a state dict without the DDP prefix.
    """
    checkpoint_path = Path(checkpoint_path)
    if not checkpoint_path.is_file():
        raise FileNotFoundError(
            f"No checkpoint at {checkpoint_path}: pass the path of an official I-JEPA .pth.tar file."
        )
    try:
        # Memory-mapped, the optimiser state (twice the model's size) is never read into memory.
        checkpoint = torch.load(checkpoint_path, map_location="cpu", weights_only=True, mmap=True)
    except RuntimeError:  # legacy (non-zip) torch.save format, which cannot be memory-mapped
        checkpoint = torch.load(checkpoint_path, map_location="cpu", weights_only=True)
    if not isinstance(checkpoint, dict):
        raise ValueError(
            f"{checkpoint_path} holds a {type(checkpoint).__name__}, not the dict of an I-JEPA training checkpoint: "
            f"pass a checkpoint saved by the authors' training script (keys {', '.join(MODEL_SECTIONS)}, opt, ...)."
        )
    missing = [name for name in MODEL_SECTIONS if not isinstance(checkpoint.get(name), dict)]
    if missing:
        raise ValueError(
            f"{checkpoint_path} has no {', '.join(repr(m) for m in missing)} state dict (found keys "
            f"{sorted(map(str, checkpoint))}): pass a full training checkpoint of the authors' code, which stores the "
            f"{', '.join(MODEL_SECTIONS)} state dicts."
        )
    return {name: strip_ddp_prefix(checkpoint[name]) for name in MODEL_SECTIONS}


def _block_indices(state_dict: dict[str, torch.Tensor], blocks: str) -> list[int]:
    indices = {
        int(match["index"]) for key in state_dict if (match := _BLOCK_PATTERN.match(key)) and match["blocks"] == blocks
    }
    return sorted(indices)


def _num_blocks(section: str, state_dict: dict[str, torch.Tensor], blocks: str) -> int:
    indices = _block_indices(state_dict, blocks)
    if indices != list(range(len(indices))):
        absent = sorted(set(range(max(indices) + 1)) - set(indices))
        raise ValueError(
            f"{section}: the checkpoint has {blocks}.{{i}} for i in {indices} but lacks {blocks}.{absent[0]}: the "
            "file is truncated or edited; convert an unmodified checkpoint of the authors' code."
        )
    return len(indices)


def _required(section: str, state_dict: dict[str, torch.Tensor], key: str, ndim: int) -> torch.Tensor:
    if key not in state_dict:
        raise ValueError(
            f"{section}: missing key {key!r} (found {len(state_dict)} keys, e.g. {sorted(state_dict)[:4]}): this is "
            "not an I-JEPA ViT checkpoint of the authors' code (vision_transformer.py layout)."
        )
    tensor = state_dict[key]
    if tensor.dim() != ndim:
        raise ValueError(
            f"{section}: {key!r} has shape {tuple(tensor.shape)}, expected a {ndim}-d tensor: this is not an I-JEPA "
            "ViT checkpoint of the authors' code (vision_transformer.py layout)."
        )
    return tensor


def infer_checkpoint_geometry(state_dicts: dict[str, dict[str, torch.Tensor]]) -> dict[str, int | None]:
    """
    Everything the weights tell about the architecture: encoder width, depth, MLP width, patch size, number of
    channels, image size (`None` unless the patch grid is square), and predictor depth, width and MLP width.
    """
    encoder, predictor = state_dicts["target_encoder"], state_dicts["predictor"]
    patch_weight = _required("target_encoder", encoder, "patch_embed.proj.weight", ndim=4)  # (D, C, p, p)
    pos_embed = _required("target_encoder", encoder, "pos_embed", ndim=3)  # (1, N, D)
    grid_side = round(pos_embed.shape[1] ** 0.5)
    predictor_embed = _required("predictor", predictor, "predictor_embed.weight", ndim=2)  # (Dp, D)
    predictor_fc1 = predictor.get("predictor_blocks.0.mlp.fc1.weight")
    encoder_fc1 = encoder.get("blocks.0.mlp.fc1.weight")
    return {
        "hidden_size": patch_weight.shape[0],
        "num_channels": patch_weight.shape[1],
        "patch_size": patch_weight.shape[2] if patch_weight.shape[2] == patch_weight.shape[3] else None,
        "image_size": grid_side * patch_weight.shape[2] if grid_side**2 == pos_embed.shape[1] else None,
        "intermediate_size": encoder_fc1.shape[0] if encoder_fc1 is not None else None,
        "num_hidden_layers": _num_blocks("target_encoder", encoder, "blocks"),
        "predictor_hidden_size": predictor_embed.shape[0],
        "predictor_intermediate_size": predictor_fc1.shape[0] if predictor_fc1 is not None else None,
        "predictor_num_hidden_layers": _num_blocks("predictor", predictor, "predictor_blocks"),
    }


# ---------------------------------------------------------------------------------------------------------------------
# Choosing the configuration


def _preset_values(name: str) -> dict:
    return json.loads((configuration_dir() / "models" / f"{name}.json").read_text())


def resolve_preset(model: str, patch_size: int, image_size: int) -> tuple[str, dict]:
    """
    The preset `{model}_patch{patch_size}_{image_size}`, or else the closest preset of `model` (same patch size
    first, then same image size) with `patch_size` and `image_size` overridden.

    Returns:
        `(description, config_values)`, e.g. `("vit_huge_patch14_224", {...})`.
    """
    exact = f"{model}_patch{patch_size}_{image_size}"
    presets = list_presets()
    if exact in presets:
        return exact, _preset_values(exact)
    same_model = [name for name in presets if name.startswith(f"{model}_patch")]
    if not same_model:
        models = sorted({name.rsplit("_patch", 1)[0] for name in presets})
        raise ValueError(f"Unknown --model {model!r}: choose one of {', '.join(models)}.")

    def distance(name: str) -> tuple[bool, bool, str]:
        values = _preset_values(name)
        return values["patch_size"] != patch_size, values["image_size"] != image_size, name

    closest = min(same_model, key=distance)
    values = {**_preset_values(closest), "patch_size": patch_size, "image_size": image_size}
    return f"{closest} with patch_size={patch_size}, image_size={image_size}", values


def _suggest_fix(geometry: dict[str, int | None], current_flags: str | None = None) -> str:
    """
    A sentence naming the preset flags that fit the checkpoint, or the `--config_json` fields to write. If the flags
    that fit are `current_flags` (those in use), the geometry is right and the layout itself is off.
    """
    matches = []
    for name in list_presets():
        values = _preset_values(name)
        if values["hidden_size"] == geometry["hidden_size"] and values["patch_size"] == geometry["patch_size"]:
            if values.get("intermediate_size", 4 * values["hidden_size"]) == geometry["intermediate_size"]:
                matches.append(name)
    image_size = geometry["image_size"]
    if matches:
        model = sorted(matches, key=lambda name: _preset_values(name)["image_size"] != image_size)[0].rsplit(
            "_patch", 1
        )[0]
        flags = f"--model {model} --patch_size {geometry['patch_size']} --image_size {image_size}"
        if flags != current_flags:
            return f"The checkpoint's shapes fit another preset: pass {flags}."
        return (
            "The checkpoint's layout differs from the authors' vision_transformer.py: convert an unmodified training "
            "checkpoint of their code."
        )
    fields = {k: geometry[k] for k in ("hidden_size", "intermediate_size", "patch_size", "image_size") if geometry[k]}
    return (
        f"No preset fits this checkpoint ({fields}): pass --config_json with a configuration holding these fields and "
        "the encoder's num_attention_heads."
    )


def build_config(
    state_dicts: dict[str, dict[str, torch.Tensor]],
    model: str = "vit_huge",
    patch_size: int = 14,
    image_size: int = 224,
    predictor_depth: int | None = None,
    config: IJepaConfig | None = None,
) -> tuple[IJepaConfig, str]:
    """
    The configuration to convert into: `config` if given, else the preset for (`model`, `patch_size`, `image_size`),
    with the encoder depth and the predictor depth, width and MLP width taken from the checkpoint.

    Returns:
        `(config, description)`; the description names the source in error messages.
    """
    geometry = infer_checkpoint_geometry(state_dicts)
    if predictor_depth is not None and predictor_depth != geometry["predictor_num_hidden_layers"]:
        raise ValueError(
            f"predictor: --predictor_depth {predictor_depth} was given but the checkpoint has "
            f"{geometry['predictor_num_hidden_layers']} predictor_blocks: pass --predictor_depth "
            f"{geometry['predictor_num_hidden_layers']} or leave it out to use the checkpoint's depth."
        )
    if config is not None:
        description, values = "the given configuration", config.to_dict()
        for key in ("architectures", "transformers_version", "model_type"):
            values.pop(key, None)
    else:
        description, values = resolve_preset(model, patch_size, image_size)
    from_checkpoint = {
        "num_hidden_layers": geometry["num_hidden_layers"],
        "predictor_num_hidden_layers": geometry["predictor_num_hidden_layers"],
        "predictor_hidden_size": geometry["predictor_hidden_size"],
    }
    if geometry["predictor_intermediate_size"] is not None:
        from_checkpoint["predictor_intermediate_size"] = geometry["predictor_intermediate_size"]
    values.update(from_checkpoint)
    try:
        return IJepaConfig(**values), description
    except ValueError as error:
        current_flags = (
            None if config is not None else f"--model {model} --patch_size {patch_size} --image_size {image_size}"
        )
        raise ValueError(
            f"The checkpoint does not fit {description}: {error} {_suggest_fix(geometry, current_flags)}"
        ) from error


# ---------------------------------------------------------------------------------------------------------------------
# Renaming


def _rename(section: str, official_key: str) -> tuple[str, ...] | None:
    """Our key(s) for one official key of an encoder or predictor state dict; `None` when the key is unknown."""
    match = _BLOCK_PATTERN.match(official_key)
    if match:
        expected_blocks = "predictor_blocks" if section == "predictor" else "blocks"
        if match["blocks"] != expected_blocks or match["module"] not in _BLOCK_RENAMES:
            return None
        return tuple(f"layers.{match['index']}.{ours}.{match['tensor']}" for ours in _BLOCK_RENAMES[match["module"]])
    renames = _PREDICTOR_RENAMES if section == "predictor" else _ENCODER_RENAMES
    for official, ours in renames.items():
        if official_key == official:
            return (ours,)
        if official_key.startswith(official + ".") and official_key.rsplit(".", 1)[-1] in ("weight", "bias"):
            if official_key.count(".") == official.count(".") + 1:
                return (f"{ours}.{official_key.rsplit('.', 1)[-1]}",)
    return None


def _official_name(section: str, our_name: str) -> str:
    """The official key holding our parameter `our_name` of `section` (for error messages)."""
    match = re.match(r"^layers\.(?P<index>\d+)\.(?P<module>.+)\.(?P<tensor>weight|bias)$", our_name)
    if match:
        blocks = "predictor_blocks" if section == "predictor" else "blocks"
        for official, ours in _BLOCK_RENAMES.items():
            if match["module"] in ours:
                return f"{blocks}.{match['index']}.{official}.{match['tensor']}"
    renames = _PREDICTOR_RENAMES if section == "predictor" else _ENCODER_RENAMES
    for official, ours in renames.items():
        if our_name == ours:
            return official
        if our_name.startswith(ours + "."):
            return official + our_name[len(ours) :]
    return our_name


def convert_state_dicts(
    state_dicts: dict[str, dict[str, torch.Tensor]], expected_shapes: dict[str, torch.Size], description: str, fix: str
) -> dict[str, torch.Tensor]:
    """
    Rename the official state dicts into one `IJepaForPreTraining` state dict (fused qkv split into q, k, v; float32),
    checking every key and shape against `expected_shapes` (our key -> shape).

    Raises:
        ValueError naming the key, the expected and found shapes and `fix`, for any unknown, missing or misshapen key.
    """
    converted: dict[str, torch.Tensor] = {}
    for section in MODEL_SECTIONS:
        for official_key, tensor in state_dicts[section].items():
            ours = _rename(section, official_key)
            if ours is None:
                raise ValueError(
                    f"{section}: unexpected key {official_key!r} with shape {tuple(tensor.shape)}; an I-JEPA ViT of "
                    f"the authors' code has no such parameter. {fix}"
                )
            names = [f"{section}.{name}" for name in ours]
            if any(name not in expected_shapes for name in names):
                raise ValueError(
                    f"{section}: unexpected key {official_key!r} with shape {tuple(tensor.shape)}: {description} has "
                    f"no such parameter (is the checkpoint deeper than the configuration?). {fix}"
                )
            part_shape = expected_shapes[names[0]]
            expected = torch.Size([part_shape[0] * len(names), *part_shape[1:]])
            if tensor.shape != expected:
                raise ValueError(
                    f"{section}: {official_key!r} has shape {tuple(tensor.shape)} in the checkpoint but {description} "
                    f"expects {tuple(expected)}. {fix}"
                )
            # Clone so that every tensor owns its memory: q, k and v would be views of one fused tensor (which
            # safetensors refuses) and the others would stay backed by the memory-mapped checkpoint file.
            for name, part in zip(names, tensor.float().chunk(len(names), dim=0)):
                converted[name] = part.clone()
    missing = sorted(set(expected_shapes) - set(converted))
    if missing:
        section, name = missing[0].split(".", 1)
        raise ValueError(
            f"{section}: the checkpoint lacks {_official_name(section, name)!r} (our {name!r}, shape "
            f"{tuple(expected_shapes[missing[0]])}), which {description} needs ({len(missing)} missing in all). {fix}"
        )
    return converted


# ---------------------------------------------------------------------------------------------------------------------
# Writing


def _is_nonempty_dir(path: Path) -> bool:
    return path.is_dir() and any(path.iterdir())


def _check_output_dir(output_dir: Path, overwrite: bool) -> None:
    if output_dir.exists() and not output_dir.is_dir():
        raise FileExistsError(f"--output_dir {output_dir} is a file: choose a directory path.")
    if _is_nonempty_dir(output_dir) and not overwrite:
        raise FileExistsError(
            f"--output_dir {output_dir} is not empty: choose a new directory, or pass --overwrite to replace the "
            "converted model files in it (other files are kept)."
        )


def _stale_model_files(output_dir: Path) -> list[Path]:
    """Files of an earlier conversion that would be loaded alongside, or instead of, the new ones."""
    patterns = (
        "model*.safetensors",
        "model.safetensors.index.json",
        "pytorch_model*.bin",
        "pytorch_model.bin.index.json",
    )
    return sorted({path for pattern in patterns for path in output_dir.glob(pattern)})


def _publish(staging_dir: Path, output_dir: Path) -> None:
    """
    Move the staged files into `output_dir`. A new or empty `output_dir` is replaced in one rename; otherwise (with
    `--overwrite`) only the entries the conversion writes, and earlier weight files, are replaced; other files stay.
    """
    if not output_dir.exists():
        os.replace(staging_dir, output_dir)
        return
    if not any(output_dir.iterdir()):
        output_dir.rmdir()
        os.replace(staging_dir, output_dir)
        return
    replaced_dir = Path(tempfile.mkdtemp(prefix=f".{output_dir.name}.replaced-", dir=output_dir.parent))
    try:
        old_entries = {output_dir / entry.name for entry in staging_dir.iterdir()} | set(
            _stale_model_files(output_dir)
        )
        for old in old_entries:
            if old.exists() or old.is_symlink():
                os.replace(old, replaced_dir / old.name)
        for entry in staging_dir.iterdir():
            os.replace(entry, output_dir / entry.name)
    finally:
        shutil.rmtree(replaced_dir, ignore_errors=True)
        shutil.rmtree(staging_dir, ignore_errors=True)


def convert_official_checkpoint(
    checkpoint_path: str | os.PathLike,
    output_dir: str | os.PathLike,
    model: str = "vit_huge",
    patch_size: int = 14,
    image_size: int = 224,
    overwrite: bool = False,
    predictor_depth: int | None = None,
    config: IJepaConfig | str | os.PathLike | None = None,
) -> IJepaForPreTraining:
    """
    Convert an official I-JEPA training checkpoint; see the module docstring for the folders written.

    Args:
        checkpoint_path: the authors' `.pth.tar` (keys `encoder`, `predictor`, `target_encoder`, ...; with or without
            the DDP `module.` prefix).
        output_dir: where to write the encoder (`output_dir`) and the pre-training model (`output_dir/pretraining`).
        model / patch_size / image_size: pick the preset `{model}_patch{patch_size}_{image_size}`.
        overwrite: allow a non-empty `output_dir`; the converted files in it are replaced, other files are kept.
        predictor_depth: the predictor depth you expect; an error if the checkpoint's differs.
        config: an [`IJepaConfig`] or the path of a configuration JSON, used instead of the preset.

    Returns:
        The converted [`IJepaForPreTraining`] (in eval mode, on CPU).
    """
    output_dir = Path(output_dir)
    _check_output_dir(output_dir, overwrite)
    if config is not None and not isinstance(config, IJepaConfig):
        config = IJepaConfig(**json.loads(Path(config).read_text()))
    state_dicts = load_official_checkpoint(checkpoint_path)
    config_given = config is not None
    config, description = build_config(state_dicts, model, patch_size, image_size, predictor_depth, config)
    current_flags = None if config_given else f"--model {model} --patch_size {patch_size} --image_size {image_size}"
    fix = _suggest_fix(infer_checkpoint_geometry(state_dicts), current_flags)

    with torch.device("meta"):  # shapes only: every tensor is replaced by the checkpoint's below
        pretraining_model = IJepaForPreTraining(config)
    expected_shapes = {name: tensor.shape for name, tensor in pretraining_model.state_dict().items()}
    converted = convert_state_dicts(state_dicts, expected_shapes, description, fix)
    pretraining_model.load_state_dict(converted, strict=True, assign=True)
    pretraining_model.eval()

    output_dir.parent.mkdir(parents=True, exist_ok=True)
    staging_dir = Path(tempfile.mkdtemp(prefix=f".{output_dir.name}.converting-", dir=output_dir.parent))
    try:
        image_processor = default_image_processor(config.image_size)
        write_output_layout(staging_dir, pretraining_model.get_encoder(), image_processor, pretraining_model)
        _check_output_dir(output_dir, overwrite)  # it may have been filled while we converted
        _publish(staging_dir, output_dir)
    finally:
        shutil.rmtree(staging_dir, ignore_errors=True)
    return pretraining_model


# ---------------------------------------------------------------------------------------------------------------------
# Command line


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m modeling_ijepa.convert_official_checkpoint",
        description="Convert a facebookresearch/ijepa training checkpoint (.pth.tar) into an encoder folder that "
        "transformers.IJepaModel loads, plus an IJepaForPreTraining folder in OUTPUT_DIR/pretraining.",
    )
    parser.add_argument("--checkpoint", required=True, help="Path of the official .pth.tar training checkpoint.")
    parser.add_argument("--output_dir", required=True, help="Directory to write (new or empty unless --overwrite).")
    parser.add_argument("--model", default="vit_huge", help="Model family of the preset, e.g. vit_huge, vit_giant.")
    parser.add_argument(
        "--patch_size", type=int, default=14, help="Patch size of the checkpoint (14 or 16 for the released ones)."
    )
    parser.add_argument(
        "--image_size", type=int, default=224, help="Training resolution of the checkpoint (224 or 448)."
    )
    parser.add_argument(
        "--predictor_depth", type=int, default=None, help="Expected predictor depth; checked against the checkpoint."
    )
    parser.add_argument(
        "--config_json", default=None, help="IJepaConfig JSON to use instead of the preset (custom architectures)."
    )
    parser.add_argument(
        "--overwrite",
        action="store_true",
        help="Replace the converted files in a non-empty OUTPUT_DIR (others are kept).",
    )
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    try:
        model = convert_official_checkpoint(
            args.checkpoint,
            args.output_dir,
            model=args.model,
            patch_size=args.patch_size,
            image_size=args.image_size,
            overwrite=args.overwrite,
            predictor_depth=args.predictor_depth,
            config=args.config_json,
        )
    except (ValueError, FileExistsError, FileNotFoundError) as error:
        raise SystemExit(f"error: {error}") from None
    config = model.config
    print(
        f"Converted {args.checkpoint}: encoder (hidden {config.hidden_size}, depth {config.num_hidden_layers}, patch "
        f"{config.patch_size}, {config.image_size} px) -> {args.output_dir}; encoder + predictor (depth "
        f"{config.predictor_num_hidden_layers}, width {config.predictor_hidden_size}) + target encoder -> "
        f"{pretraining_dir(args.output_dir)}"
    )


if __name__ == "__main__":
    main()
