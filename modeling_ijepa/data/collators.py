# Copyright 2026 The ijepa-hf Authors. All rights reserved.
# Licensed under the Apache License, Version 2.0.
"""The collators that turn dataset rows into model batches, inside DataLoader workers: pre-training (crops + I-JEPA
masks) and image classification (evaluation / fine-tuning), on a shared base that decodes images and skips and counts
undecodable ones.

The pre-training collator draws crops and masks from one generator seeded by `(seed, batch index)`, so a resumed run
sees exactly the batches it would have seen.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from functools import partial

import torch
from PIL import Image
from torch.utils.data import default_collate

from ..masking import MaskSampler
from .images import PixelNormalizer, crop_and_resize, decode_image_array, decode_random_crop
from .token_buckets import TokenBuckets


def _processor_size(image_processor) -> tuple[int, int]:
    size = image_processor.size
    if "height" in size:
        return int(size["height"]), int(size["width"])
    edge = int(size.get("shortest_edge", 224))
    return edge, edge


def _normalise(images: list[Image.Image], image_processor) -> torch.Tensor:
    return image_processor(images=images, return_tensors="pt")["pixel_values"]


_TORCH_RESAMPLING = {int(Image.BILINEAR): "bilinear", int(Image.BICUBIC): "bicubic"}


class _SkippingCollator:
    """
    Decodes `image` entries (to RGB arrays, or with any `decode` that returns `None` for undecodable data), drops
    undecodable ones and counts them in `num_dropped`.
    """

    def __init__(self) -> None:
        self.num_dropped = 0

    def _decode(self, examples: list[dict], decode: Callable = decode_image_array) -> tuple[list, list[dict]]:
        if examples and "image" not in examples[0]:
            raise ValueError(
                f"Examples need an `image` entry; found keys {sorted(examples[0])}. Load data with "
                "modeling_ijepa.data.load_image_dataset or pass --image_column."
            )
        images, kept = [], []
        for example in examples:
            image = decode(example["image"])
            if image is None:
                self.num_dropped += 1
                continue
            images.append(image)
            kept.append(example)
        if not images:
            raise ValueError(
                f"Every image of a batch of {len(examples)} failed to decode ({self.num_dropped} dropped so far): the "
                "data source is unreadable; check the files or the image column."
            )
        return images, kept


class IJepaPretrainingCollator(_SkippingCollator):
    """
    Pre-training batches: decode, random-resized-crop and normalise each image, then sample I-JEPA masks.

    Crops and masks come from the mask collator's per-batch generator (seeded by `(seed, batch index)`), so a batch
    is a pure function of its examples and its index: a run resumed at batch `i` (`set_batch_index(i)`) sees
    the batches of an uninterrupted one.

    JPEGs are decoded with libjpeg-turbo (`decode_random_crop`; at a reduced size when the crop is at least twice the
    output size on each side), each crop is resized once, straight to the processor's size, with an antialiased
    bilinear kernel (`crop_and_resize`), and the processor's rescale and normalisation run once per batch in torch
    (`normalize`).

    Args:
        mask_sampler: draws the per-batch generator and the masks.
        image_processor: gives the output size and the mean / std.
        crop_scale: RandomResizedCrop area fraction range.
        output_uint8: return `uint8` `pixel_values` (0-255) and leave the normalisation to the training device
            (`IJepaTrainer` calls `normalize`): 4x less data between DataLoader workers, host and device.
        reduced_decode: decode JPEGs at 1/2, 1/4 or 1/8 of their size when the crop keeps at least the output size
            (`decode_random_crop`); `False` always decodes at full size (the crops then match, pixel for pixel,
            those of versions without reduced decoding).
        token_buckets: pad the masks to a few token counts (`TokenBuckets`), so that `torch.compile` settles on a
            few graphs; the batch then also holds `context_mask` and `target_mask`. `None` (default): unpadded.

    Returns the batch: `pixel_values` `(batch, 3, height, width)` (float32 normalised, or uint8 with
    `output_uint8`), `context_indices`, `target_indices` (and the masks with `token_buckets`).
    """

    def __init__(
        self,
        mask_sampler: MaskSampler,
        image_processor,
        crop_scale: Sequence[float] = (0.3, 1.0),
        output_uint8: bool = False,
        reduced_decode: bool = True,
        token_buckets: TokenBuckets | None = None,
    ):
        super().__init__()
        self.mask_sampler = mask_sampler
        self.token_buckets = token_buckets
        self.image_processor = image_processor
        self.crop_scale = tuple(crop_scale)
        self.size = _processor_size(image_processor)
        self.output_uint8 = bool(output_uint8)
        self.reduced_decode = bool(reduced_decode)
        self.normalize = PixelNormalizer(image_processor)

    def set_batch_index(self, batch_index: int) -> None:
        self.mask_sampler.set_batch_index(batch_index)

    def __call__(self, examples: list[dict]) -> dict[str, torch.Tensor]:
        generator = self.mask_sampler.next_generator()
        decode = partial(
            decode_random_crop,
            generator=generator,
            size=self.size,
            scale=self.crop_scale,
            reduced_decode=self.reduced_decode,
        )
        decoded, _ = self._decode(examples, decode)
        crops = [crop_and_resize(image, box, self.size) for image, box in decoded]
        pixel_values = torch.stack(crops)
        if not self.output_uint8:
            pixel_values = self.normalize(pixel_values)
        context_indices, target_indices = self.mask_sampler.sample_masks(len(crops), generator)
        if self.token_buckets is not None:
            return {"pixel_values": pixel_values, **self.token_buckets.pad(context_indices, target_indices)}
        return {"pixel_values": pixel_values, "context_indices": context_indices, "target_indices": target_indices}


class ImageClassificationCollator(_SkippingCollator):
    """
    Evaluation / fine-tuning batches: `pixel_values` `(batch, 3, height, width)` float32 and `labels`. With `augment`,
    a random-resized crop (area fraction in `crop_scale`) and, if `horizontal_flip`, a random horizontal flip, seeded
    by `seed`; otherwise the processor's deterministic resize. Processors that resize to a fixed height and width
    with bilinear or bicubic resampling run in torch (`crop_and_resize`); any other processor is called as is.
    Augmented crops decode JPEGs at a reduced size when the crop allows it (`reduced_decode`, see
    `IJepaPretrainingCollator`).
    """

    def __init__(
        self,
        image_processor,
        augment: bool = False,
        seed: int = 0,
        crop_scale: Sequence[float] = (0.08, 1.0),
        horizontal_flip: bool = True,
        reduced_decode: bool = True,
    ):
        super().__init__()
        self.image_processor = image_processor
        self.augment = augment
        self.crop_scale = tuple(crop_scale)
        self.horizontal_flip = horizontal_flip
        self.reduced_decode = bool(reduced_decode)
        self.size = _processor_size(image_processor)
        self.generator = torch.Generator().manual_seed(seed)
        self.normalize = PixelNormalizer(image_processor)
        size = image_processor.size
        fixed_size = getattr(image_processor, "do_resize", False) and "height" in size and "width" in size
        self._resize_mode = _TORCH_RESAMPLING.get(int(image_processor.resample)) if fixed_size else None

    def __call__(self, examples: list[dict]) -> dict[str, torch.Tensor]:
        if self.augment:
            decode = partial(
                decode_random_crop,
                generator=self.generator,
                size=self.size,
                scale=self.crop_scale,
                reduced_decode=self.reduced_decode,
            )
            decoded, kept = self._decode(examples, decode)
            crops = [crop_and_resize(image, box, self.size) for image, box in decoded]
            flips = (torch.rand(len(crops), generator=self.generator) < 0.5) & self.horizontal_flip
            pixel_values = torch.stack([crop.flip(-1) if flip else crop for crop, flip in zip(crops, flips)])
            pixel_values = self.normalize(pixel_values)
            batch = {"pixel_values": pixel_values}
        else:
            images, kept = self._decode(examples)
            batch = {"pixel_values": self._resize(images)}
        if "label" in kept[0]:
            batch["labels"] = default_collate([int(example["label"]) for example in kept])
        return batch

    def _resize(self, images: list) -> torch.Tensor:
        """The processor's deterministic resize and normalisation of whole images."""
        if self._resize_mode is not None:
            boxes = [(0, 0, image.shape[1], image.shape[0]) for image in images]
            resized = [crop_and_resize(image, box, self.size, self._resize_mode) for image, box in zip(images, boxes)]
            pixel_values = self.normalize(torch.stack(resized))
        else:
            pixel_values = _normalise([Image.fromarray(image) for image in images], self.image_processor)
        return pixel_values
