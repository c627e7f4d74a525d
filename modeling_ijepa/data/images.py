# Copyright 2026 The ijepa-hf Authors. All rights reserved.
# Licensed under the Apache License, Version 2.0.
"""Pixels: decoding any image to RGB (JPEGs through libjpeg-turbo via `simplejpeg`, everything else through PIL),
the random-resized-crop box and its crop + resize, and the image processor's rescale and normalisation in torch.

Crops are resized once with torch's antialiased `uint8` kernel; the normalisation can run on the training device, so
batches may leave DataLoader workers as `uint8` (`benchmarks/benchmark_data.py` measures the pipeline).
"""

from __future__ import annotations

import io
import logging
import math
import os
from collections.abc import Sequence

import numpy as np
import simplejpeg
import torch
from PIL import Image
from transformers import ViTImageProcessorPil
from transformers.image_utils import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD

from ..masking.base import pair


logger = logging.getLogger(__name__)


def default_image_processor(image_size: int | Sequence[int] = 224) -> ViTImageProcessorPil:
    """
    Resize to `image_size` (an int, or a model config's `(height, width)`), rescale to [0, 1], normalise with the
    ImageNet mean/std.
    """
    height, width = pair(image_size)
    return ViTImageProcessorPil(
        do_resize=True,
        size={"height": height, "width": width},
        resample=Image.BICUBIC,
        image_mean=list(IMAGENET_DEFAULT_MEAN),
        image_std=list(IMAGENET_DEFAULT_STD),
    )


def _to_eight_bit(image: Image.Image) -> Image.Image:
    """16-bit and float images scaled (not clipped) to 8-bit."""
    array = np.asarray(image).astype(np.float64)
    if image.mode.startswith("I;16") or (image.mode == "I" and array.max() > 255):
        array = array / 65535.0 * 255.0
    elif image.mode == "F":
        low, high = float(array.min()), float(array.max())
        array = (array - low) / max(high - low, 1e-12) * 255.0
    return Image.fromarray(np.clip(array, 0, 255).round().astype(np.uint8), mode="L")


def decode_image(value) -> Image.Image | None:
    """
    Decode one image to RGB: PIL images, numpy arrays, bytes, file paths, or `datasets`' `{"bytes", "path"}` dicts;
    grayscale, palette, CMYK, alpha and 16-bit images are converted. Returns `None` for undecodable data.
    """
    try:
        if isinstance(value, dict):
            value = value.get("bytes") or value.get("path")
        if isinstance(value, (bytes, bytearray)):
            image = Image.open(io.BytesIO(value))
        elif isinstance(value, (str, os.PathLike)):
            image = Image.open(value)
        elif isinstance(value, np.ndarray):
            image = Image.fromarray(value)
        elif isinstance(value, Image.Image):
            image = value
        else:
            return None
        image.load()  # truncated and corrupt files fail here rather than later in the batch
        if image.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
            image = _to_eight_bit(image)
        if image.mode in ("RGBA", "LA") or (image.mode == "P" and "transparency" in image.info):
            image = image.convert("RGBA")
            background = Image.new("RGBA", image.size, (255, 255, 255, 255))
            image = Image.alpha_composite(background, image)
        return image.convert("RGB")
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as error:
        logger.warning("Skipping an undecodable image: %s", error)
        return None


def _read_bytes(value) -> bytes | None:
    """The encoded bytes of `value` when it is bytes, a path or a `datasets` `{"bytes", "path"}` dict, else `None`."""
    if isinstance(value, dict):
        value = value.get("bytes") or value.get("path")
    if isinstance(value, (bytes, bytearray)):
        return bytes(value)
    if isinstance(value, (str, os.PathLike)):
        try:
            with open(value, "rb") as file:
                return file.read()
        except OSError:
            return None  # `decode_image` reports it
    return None


def decode_image_array(value) -> np.ndarray | None:
    """
    Decode one image to an RGB `uint8` array `(height, width, 3)`, accepting what `decode_image` accepts.

    Baseline and progressive JPEGs in YCbCr or grayscale are decoded by libjpeg-turbo through `simplejpeg` (the same
    pixels as PIL's decoder, about 1.4x faster); every other format, and any JPEG that `simplejpeg` refuses (CMYK,
    truncated, corrupt), goes through `decode_image`, so what PIL cannot read is still `None`.
    """
    data = _read_bytes(value)
    if data is not None and simplejpeg.is_jpeg(data):
        try:
            if simplejpeg.decode_jpeg_header(data)[2] in ("YCbCr", "Gray"):
                return simplejpeg.decode_jpeg(data, colorspace="RGB")
        except ValueError:
            pass  # strict libjpeg-turbo refused it: PIL decides whether the file is readable
    image = decode_image(value if data is None else data)
    return None if image is None else np.array(image)


def _uniform(generator: torch.Generator, low: float, high: float) -> float:
    return low + (high - low) * float(torch.rand(1, generator=generator))


def random_resized_crop_box(
    width: int,
    height: int,
    generator: torch.Generator,
    scale: Sequence[float] = (0.3, 1.0),
    ratio: Sequence[float] = (3 / 4, 4 / 3),
) -> tuple[int, int, int, int]:
    """
    Draw a RandomResizedCrop box `(left, top, crop_width, crop_height)` in a `width` x `height` image: area fraction
    uniform in `scale`, aspect ratio log-uniform in `ratio`, 10 tries, then the largest centred box within `ratio`.
    Every random number comes from `generator`, in a fixed order.
    """
    area = width * height
    for _ in range(10):
        target_area = area * _uniform(generator, scale[0], scale[1])
        aspect = math.exp(_uniform(generator, math.log(ratio[0]), math.log(ratio[1])))
        crop_width = int(round(math.sqrt(target_area * aspect)))
        crop_height = int(round(math.sqrt(target_area / aspect)))
        if 0 < crop_width <= width and 0 < crop_height <= height:
            top = int(torch.randint(0, height - crop_height + 1, (1,), generator=generator))
            left = int(torch.randint(0, width - crop_width + 1, (1,), generator=generator))
            return left, top, crop_width, crop_height
    in_ratio = width / height
    if in_ratio < min(ratio):
        crop_width, crop_height = width, int(round(width / min(ratio)))
    elif in_ratio > max(ratio):
        crop_width, crop_height = int(round(height * max(ratio))), height
    else:
        crop_width, crop_height = width, height
    return (width - crop_width) // 2, (height - crop_height) // 2, crop_width, crop_height


_DCT_REDUCTIONS = (8, 4, 2)  # libjpeg-turbo's SIMD-accelerated reduced-size decodes


def _reduced_box(
    box: tuple[int, int, int, int], width: int, height: int, size: tuple[int, int]
) -> tuple[int, tuple[int, int, int, int]]:
    """
    The largest reduction `factor` in 8, 4, 2 (else 1) at which the crop `box` of a `width` x `height` image still
    covers at least `size` = `(height, width)` pixels, and the box in the pixels of the image decoded at `1 / factor`
    (edges rounded to the nearest decoded pixel).
    """
    left, top, crop_width, crop_height = box
    for factor in _DCT_REDUCTIONS:
        reduced_width, reduced_height = math.ceil(width / factor), math.ceil(height / factor)
        x0, x1 = (min(int(math.floor(x / factor + 0.5)), reduced_width) for x in (left, left + crop_width))
        y0, y1 = (min(int(math.floor(y / factor + 0.5)), reduced_height) for y in (top, top + crop_height))
        if x1 - x0 >= size[1] and y1 - y0 >= size[0]:
            return factor, (x0, y0, x1 - x0, y1 - y0)
    return 1, box


def decode_random_crop(
    value,
    generator: torch.Generator,
    size: tuple[int, int],
    scale: Sequence[float] = (0.3, 1.0),
    ratio: Sequence[float] = (3 / 4, 4 / 3),
    reduced_decode: bool = True,
) -> tuple[np.ndarray, tuple[int, int, int, int]] | None:
    """
    Decode one image (anything `decode_image_array` accepts) and draw its RandomResizedCrop box with
    `random_resized_crop_box(width, height, generator, scale, ratio)`: the same draws, in the same order, as decoding
    first and drawing on the decoded size.

    With `reduced_decode`, a JPEG that libjpeg-turbo reads is decoded at 1/2, 1/4 or 1/8 of its size (a reduced-size
    DCT, much cheaper than a full decode) whenever the crop, at that size, still has at least `size` =
    `(height, width)` pixels, so no resolution is lost: only crops at least twice the output size on each side
    qualify. The box is then mapped to the decoded pixels, its edges rounded to the nearest one: they move by at most
    half a decoded pixel, which is at most half a pixel of the output. Images that do not qualify decode at full size,
    exactly as without `reduced_decode`.

    Returns:
        `(image, box)`: the RGB `uint8` array `(height, width, 3)` and the box `(left, top, crop_width, crop_height)`
        in its pixels, for `crop_and_resize`; or `None` for undecodable data, with `generator` left as it was.
    """
    data = _read_bytes(value)
    if reduced_decode and data is not None and simplejpeg.is_jpeg(data):
        state = generator.get_state()
        try:
            height, width, colorspace, _ = simplejpeg.decode_jpeg_header(data)
            if colorspace in ("YCbCr", "Gray"):
                box = random_resized_crop_box(width, height, generator, scale=scale, ratio=ratio)
                factor, reduced = _reduced_box(box, width, height, size)
                if factor == 1:
                    return simplejpeg.decode_jpeg(data, colorspace="RGB"), box
                expected = (math.ceil(height / factor), math.ceil(width / factor))
                image = simplejpeg.decode_jpeg(data, colorspace="RGB", min_height=expected[0], min_width=expected[1])
                if image.shape[:2] == expected:
                    return image, reduced
        except ValueError:
            pass  # strict libjpeg-turbo refused it: the path below decides, with the generator as it was
        generator.set_state(state)
    image = decode_image_array(value if data is None else data)
    if image is None:
        return None
    return image, random_resized_crop_box(image.shape[1], image.shape[0], generator, scale=scale, ratio=ratio)


def random_resized_crop(
    image: Image.Image,
    size: tuple[int, int],
    generator: torch.Generator,
    scale: Sequence[float] = (0.3, 1.0),
    ratio: Sequence[float] = (3 / 4, 4 / 3),
) -> Image.Image:
    """
    The usual RandomResizedCrop (box drawn by `random_resized_crop_box`) on a PIL image, resized bilinearly to
    `size` = `(height, width)`. Images smaller than `size` are upsampled.
    """
    left, top, crop_width, crop_height = random_resized_crop_box(*image.size, generator, scale=scale, ratio=ratio)
    crop = image.crop((left, top, left + crop_width, top + crop_height))
    return crop.resize((size[1], size[0]), Image.BILINEAR)


def crop_and_resize(
    image: np.ndarray, box: tuple[int, int, int, int], size: tuple[int, int], mode: str = "bilinear"
) -> torch.Tensor:
    """
    Cut `box` = `(left, top, crop_width, crop_height)` out of an RGB `uint8` array `(height, width, 3)` and resize it
    to `size` = `(height, width)` with torch's antialiased `uint8` kernel (`mode` "bilinear" or "bicubic"), which gives
    PIL's `resize` results within one grey level at a fraction of its cost.

    Returns:
        `torch.uint8` tensor `(3, size[0], size[1])`.
    """
    left, top, crop_width, crop_height = box
    crop = torch.from_numpy(image[top : top + crop_height, left : left + crop_width]).permute(2, 0, 1).unsqueeze(0)
    if tuple(crop.shape[-2:]) == tuple(size):
        return crop[0]
    return torch.nn.functional.interpolate(crop, size=tuple(size), mode=mode, antialias=True, align_corners=False)[0]


class PixelNormalizer:
    """
    The image processor's rescale and normalisation applied to a `uint8` batch, on whatever device the batch is:
    `(pixel_values * rescale_factor - mean) / std`, each step only if the processor enables it.
    """

    def __init__(self, image_processor) -> None:
        self.rescale_factor = float(image_processor.rescale_factor) if image_processor.do_rescale else 1.0
        do_normalize = image_processor.do_normalize
        self.mean = tuple(float(v) for v in image_processor.image_mean) if do_normalize else (0.0, 0.0, 0.0)
        self.std = tuple(float(v) for v in image_processor.image_std) if do_normalize else (1.0, 1.0, 1.0)

    def __call__(self, pixel_values: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """`uint8` `(batch, 3, height, width)` -> `dtype` `(batch, 3, height, width)`."""
        if pixel_values.dtype != torch.uint8:
            raise TypeError(f"PixelNormalizer expects uint8 pixel_values, got {pixel_values.dtype}.")
        mean = torch.tensor(self.mean, dtype=torch.float64)
        std = torch.tensor(self.std, dtype=torch.float64)
        scale = (self.rescale_factor / std).to(dtype=dtype, device=pixel_values.device).view(1, -1, 1, 1)
        shift = (mean / std).to(dtype=dtype, device=pixel_values.device).view(1, -1, 1, 1)
        return pixel_values.to(dtype).mul_(scale).sub_(shift)
