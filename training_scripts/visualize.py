#!/usr/bin/env python
"""
Pictures of a saved I-JEPA encoder (PNG): PCA of its patch features in RGB, its last-layer attention maps, the
context/target masks over the images, and, given a pre-training folder, the predictor's predicted target features
beside the target encoder's for each target block. Also prints (and writes to `numbers.json`) the share of the
patch-feature variance due to position alone, the spatial coherence of the features and the attention entropy
(`modeling_ijepa.visualization`), which tell trained features from random ones.

    python training_scripts/visualize.py --model_name_or_path outputs/ijepa-digits          # after pretrain.py
    python training_scripts/visualize.py --model_name_or_path random:vit_micro_patch4_48 --output_dir outputs/random
    python training_scripts/visualize.py --model_name_or_path outputs/run --train_dir my_images/ --num_images 6

`--model_name_or_path`: a pre-training `output_dir` (its target encoder at the top, the full model in
`pretraining/`), a `pretraining/` folder itself, any encoder folder or hub id (no predictor picture then), or
`random:<preset>` for a random-init model. Images: the embedded digits' test split by default, `--train_dir` (a
folder of images) or `--dataset_name` (hub); `--seed` picks the images and the masks.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from modeling_ijepa import IJepaConfig, IJepaForPreTraining
from modeling_ijepa.cli import RecipeArgumentParser
from modeling_ijepa.data import ImageClassificationCollator, decode_image, default_image_processor, load_image_dataset
from modeling_ijepa.masking import mask_sampler_from_config
from modeling_ijepa.output_layout import pretraining_dir
from modeling_ijepa.visualization import (
    PcaBasis,
    attention_entropy,
    attention_maps,
    patch_features,
    position_share,
    predict_target_blocks,
    remove_position_mean,
    save_attention_picture,
    save_mask_picture,
    save_pca_picture,
    save_prediction_picture,
    spatial_coherence,
)


logger = logging.getLogger("visualize")
RANDOM_PREFIX = "random:"


@dataclass
class VisualizeArguments:
    """What to draw, from which model and images."""

    model_name_or_path: str = field(
        default="outputs/ijepa-digits",
        metadata={
            "help": "A pre-training output_dir, its pretraining/ folder, an encoder folder or hub id, or "
            "random:<preset>."
        },
    )
    output_dir: str | None = field(default=None, metadata={"help": "Where the PNGs go (default: <model>/pictures)."})
    dataset_name: str | None = field(default=None, metadata={"help": "Hub dataset of images."})
    dataset_config_name: str | None = field(default=None, metadata={"help": "Hub dataset configuration."})
    split: str = field(default="test", metadata={"help": "Split (the embedded digits: train or test)."})
    train_dir: str | None = field(default=None, metadata={"help": "Local folder of images (imagefolder/parquet)."})
    image_column: str | None = field(default=None, metadata={"help": "Image column (default: auto-detected)."})
    num_images: int = field(default=8, metadata={"help": "Images drawn (one PCA basis is fitted over all of them)."})
    seed: int = field(default=0, metadata={"help": "Picks the images, the masks and a random-init model."})

    def __post_init__(self) -> None:
        if self.num_images < 1:
            raise ValueError(f"--num_images must be at least 1, got {self.num_images}.")


def load_models(model_name_or_path: str, seed: int = 0):
    """`(encoder, pretraining_model or None, image_processor)` for `model_name_or_path` (see the module docstring)."""
    from transformers import AutoImageProcessor, AutoModel

    if model_name_or_path.startswith(RANDOM_PREFIX):
        torch.manual_seed(seed)
        model = IJepaForPreTraining(IJepaConfig.from_preset(model_name_or_path[len(RANDOM_PREFIX) :]))
        return model.get_encoder(), model, default_image_processor(model.config.image_size)
    path = Path(model_name_or_path)
    pretraining = None
    if pretraining_dir(path).is_dir():
        pretraining = IJepaForPreTraining.from_pretrained(pretraining_dir(path))
    elif path.is_dir() and "IJepaForPreTraining" in (IJepaConfig.from_pretrained(path).architectures or []):
        pretraining = IJepaForPreTraining.from_pretrained(path)
    encoder = pretraining.get_encoder() if pretraining is not None else AutoModel.from_pretrained(model_name_or_path)
    try:
        processor = AutoImageProcessor.from_pretrained(model_name_or_path)
    except (OSError, ValueError):
        processor = default_image_processor(encoder.config.image_size)
    return encoder, pretraining, processor


def load_images(args: VisualizeArguments, image_size: int) -> list[np.ndarray]:
    """`num_images` decodable images, chosen by `seed`, as RGB `uint8` arrays at the model's resolution."""
    dataset = load_image_dataset(
        dataset_name=args.dataset_name,
        dataset_config_name=args.dataset_config_name,
        train_dir=args.train_dir,
        split=args.split,
        image_column=args.image_column,
        image_size=image_size,
    )
    order = np.random.default_rng(args.seed).permutation(len(dataset))
    images = []
    for index in order:
        image = decode_image(dataset[int(index)]["image"])
        if image is not None:
            images.append(np.asarray(image.resize((image_size, image_size))))
        if len(images) == args.num_images:
            break
    if not images:
        raise ValueError("No decodable image found: check --train_dir / --dataset_name.")
    return images


def main(argv: list[str] | None = None) -> dict:
    """Write the pictures; returns `{"pictures": [paths], "spatial_coherence": ..., "attention_entropy": ...}`."""
    parser = RecipeArgumentParser((VisualizeArguments,), prog="visualize.py", description=__doc__)
    (args, _) = parser.parse(argv)
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", level=logging.INFO)
    try:
        encoder, pretraining, processor = load_models(args.model_name_or_path, args.seed)
    except (OSError, ValueError) as error:
        raise SystemExit(f"visualize.py: error: cannot load {args.model_name_or_path!r}: {error}") from None
    config = encoder.config
    size = int(config.image_size[0] if isinstance(config.image_size, (list, tuple)) else config.image_size)
    grid = (size // _patch(config), size // _patch(config))
    output_dir = Path(args.output_dir or _default_output_dir(args.model_name_or_path))
    try:
        images = load_images(args, size)
    except (ConnectionError, ValueError, FileNotFoundError) as error:
        raise SystemExit(f"visualize.py: error: {error}") from None

    collator = ImageClassificationCollator(processor, augment=False)
    pixel_values = collator([{"image": image} for image in images])["pixel_values"]
    features, attentions = patch_features(encoder, pixel_values, grid, output_attentions=True)
    basis = PcaBasis.fit(features)
    name = args.model_name_or_path
    content = remove_position_mean(features)
    numbers = {
        "position_share": position_share(features),
        "spatial_coherence": spatial_coherence(features),
        "attention_entropy": attention_entropy(attentions),
    }
    pictures = [
        save_pca_picture(
            images,
            basis.to_rgb(features),
            output_dir / "pca_features.png",
            content_rgb_maps=PcaBasis.fit(content).to_rgb(content),
            title=f"{name}: PCA of patch features",
        ),
        save_attention_picture(
            images[: min(4, len(images))],
            attention_maps(attentions[:4], grid),
            output_dir / "attention.png",
            title=f"{name}: last-layer attention received per head",
        ),
    ]
    sampler = mask_sampler_from_config(config, seed=args.seed)
    context_indices, target_indices = sampler.sample_masks(len(images), torch.Generator().manual_seed(args.seed))
    pictures.append(save_mask_picture(images, context_indices, target_indices, grid, output_dir / "masks.png"))
    if pretraining is not None:
        views = predict_target_blocks(pretraining, pixel_values[:1], context_indices[:1], target_indices[:1])
        pictures.append(
            save_prediction_picture(
                images[0],
                context_indices[0],
                target_indices[0],
                views["predictions"][0],
                views["targets"][0],
                views["target_features"][0],
                grid,
                output_dir / "predictions.png",
            )
        )
    else:
        logger.info("%s has no predictor (not a pre-training folder): no predictions.png.", name)
    output_dir.mkdir(parents=True, exist_ok=True)
    (output_dir / "numbers.json").write_text(json.dumps({"model": name, **numbers}, indent=2) + "\n")
    print(
        f"position share {numbers['position_share']:.3f}, spatial coherence {numbers['spatial_coherence']:.3f}, "
        f"attention entropy {numbers['attention_entropy']:.3f} (1 = uniform); pictures: {', '.join(pictures)}"
    )
    return {"pictures": pictures, **numbers}


def _patch(config) -> int:
    return int(config.patch_size[0] if isinstance(config.patch_size, (list, tuple)) else config.patch_size)


def _default_output_dir(model_name_or_path: str) -> Path:
    if model_name_or_path.startswith(RANDOM_PREFIX) or not Path(model_name_or_path).is_dir():
        return Path("outputs/pictures")
    return Path(model_name_or_path) / "pictures"


if __name__ == "__main__":
    main()
