#!/usr/bin/env python
"""
Per-GPU memory of the I-JEPA training state (parameters, gradients, AdamW moments) with DDP and FSDP2 full shard,
computed from the shipped model presets (models built on the meta device, nothing allocated).

    python benchmarks/fsdp_memory.py            # markdown table to stdout

Counts fp32 master weights for encoder + predictor + EMA target encoder, fp32 gradients and two fp32 AdamW moments
for the trainable parameters (the target encoder and the fixed position embeddings have neither). FSDP2 shards every
parameter on dim 0 over the processes, so each holds 1/N of all three. Activations, the all-gathered working copy of
one block (a few MB to a few hundred MB), bf16 autocast buffers and the allocator's slack come on top and depend on
the batch: only a GPU run measures those.
"""

from __future__ import annotations

import argparse

import torch

from modeling_ijepa import IJepaConfig, IJepaForPreTraining


# (preset, overrides): the predictor depth of the official recipes (ViT-g/16: 16 layers, configuration/recipes).
MODELS = [
    ("vit_base_patch16_224", {}),
    ("vit_large_patch16_224", {}),
    ("vit_huge_patch14_224", {}),
    ("vit_giant_patch16_224", {"predictor_num_hidden_layers": 16}),
]
WORLD_SIZES = (8, 16, 32, 64)
GIB = 1024**3


def training_state_bytes(preset: str, overrides: dict) -> dict[str, int]:
    config = IJepaConfig.from_preset(preset, **overrides)
    with torch.device("meta"):
        model = IJepaForPreTraining(config)
    parameters = sum(p.numel() for p in model.parameters())
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return {
        "parameters": parameters,
        "trainable": trainable,
        "bytes": 4 * parameters + 4 * trainable + 8 * trainable,  # weights + gradients + AdamW exp_avg/exp_avg_sq
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.parse_args()
    header = ["model", "params (all / trainable)", "DDP (any N)"] + [f"FSDP2, {n} GPUs" for n in WORLD_SIZES]
    print("| " + " | ".join(header) + " |")
    print("|" + "---|" * len(header))
    for preset, overrides in MODELS:
        counts = training_state_bytes(preset, overrides)
        name = preset + ("" if not overrides else f" ({', '.join(f'{k}={v}' for k, v in overrides.items())})")
        cells = [
            name,
            f"{counts['parameters'] / 1e6:.0f} M / {counts['trainable'] / 1e6:.0f} M",
            f"{counts['bytes'] / GIB:.1f} GiB",
        ] + [f"{counts['bytes'] / n / GIB:.2f} GiB" for n in WORLD_SIZES]
        print("| " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
