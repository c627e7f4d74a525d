"""Data for I-JEPA: one code path through `datasets` (hub streaming, local folders, the embedded digits default),
robust image decoding, the random-resized-crop transform and the collators that feed the models.

Decoding and cropping happen in the collator, inside DataLoader workers. The pre-training collator draws crops and
masks from one generator seeded by `(seed, batch index)`, so a resumed run sees exactly the batches it would have seen.
JPEGs decode through libjpeg-turbo (`simplejpeg`), crops are resized once with torch's antialiased `uint8` kernel, and
batches can leave the workers as `uint8` to be normalised on the training device (`benchmarks/benchmark_data.py`).
"""

from __future__ import annotations

import io
import logging
import math
import os
import socket
import urllib.parse
from collections.abc import Sequence
from functools import lru_cache
from pathlib import Path

import numpy as np
import simplejpeg
import torch
from PIL import Image
from torch.utils.data import default_collate
from transformers import ViTImageProcessorPil
from transformers.image_utils import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD

from .masking import IJepaMaskCollator
from .masking.base import pair

logger = logging.getLogger(__name__)

IMAGE_COLUMN_CANDIDATES = ("image", "img", "jpg", "jpeg", "png", "webp")
LABEL_COLUMN_CANDIDATES = ("label", "labels", "cls", "class")
DIGITS_TEST_SIZE = 597


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


# ------------------------------------------------------------------------------------------------------------------
# Datasets
# ------------------------------------------------------------------------------------------------------------------
def digits_split(targets: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The fixed, stratified train / test indices of the embedded digits (1200 / 597 of scikit-learn's 1797)."""
    from sklearn.model_selection import train_test_split

    return train_test_split(np.arange(len(targets)), test_size=DIGITS_TEST_SIZE, random_state=0, stratify=targets)


@lru_cache(maxsize=4)
def load_digits_dataset(image_size: int = 48):
    """
    The embedded offline default: scikit-learn's bundled 8x8 digits (1797 real scans) as RGB images upscaled to
    `image_size`, split into a fixed, stratified `train` (1200) and `test` (597) `datasets.DatasetDict` with columns
    `image` and `label` (ClassLabel "0".."9").

    The 0-16 ink counts are drawn as dark ink on white paper, as the forms were written. This rendering reproduces the
    random-init baselines of the calibration in `shared/DESIGN.md` §4 (87.8-91.0 % linear probe, 60.8-70.7 % 20-NN);
    white ink on black gives a different and more seed-dependent baseline (85-91 % linear, 45-55 % 20-NN).
    """
    import datasets
    from sklearn.datasets import load_digits

    digits = load_digits()
    pixels = 255 - (digits.images / 16.0 * 255.0).round().astype(np.uint8)  # dark ink on white paper
    images = [Image.fromarray(p, mode="L").resize((image_size, image_size), Image.BICUBIC).convert("RGB") for p in pixels]
    train_index, test_index = digits_split(digits.target)
    features = datasets.Features(
        {"image": datasets.Image(), "label": datasets.ClassLabel(names=[str(d) for d in range(10)])}
    )

    def split(indices):
        return datasets.Dataset.from_dict(
            {"image": [images[i] for i in indices], "label": [int(digits.target[i]) for i in indices]}, features=features
        )

    return datasets.DatasetDict({"train": split(sorted(train_index)), "test": split(sorted(test_index))})


def hub_is_reachable(timeout: float = 3.0) -> bool:
    """Whether the Hugging Face Hub can be reached right now (offline mode, or a TCP connect within `timeout` s)."""
    from huggingface_hub import constants

    if constants.HF_HUB_OFFLINE or os.environ.get("HF_DATASETS_OFFLINE", "0").upper() in ("1", "ON", "YES", "TRUE"):
        return False
    endpoint = urllib.parse.urlparse(constants.ENDPOINT)
    port = endpoint.port or (443 if endpoint.scheme == "https" else 80)
    try:
        with socket.create_connection((endpoint.hostname, port), timeout=timeout):
            return True
    except OSError:
        return False


def _data_files(folder: Path) -> dict[str, list[str]] | None:
    parquet = sorted(str(p) for p in folder.rglob("*.parquet"))
    return {"train": parquet} if parquet else None


def load_image_dataset(
    dataset_name: str | None = None,
    dataset_config_name: str | None = None,
    train_dir: str | None = None,
    validation_dir: str | None = None,
    split: str = "train",
    streaming: bool = False,
    image_column: str | None = None,
    label_column: str | None = None,
    cache_dir: str | None = None,
    image_size: int = 48,
):
    """
    Load images through `datasets`, with columns renamed to `image` (left undecoded: the collators decode robustly)
    and, when present, `label`.

    Sources, in order: `dataset_name` (the hub, e.g. `"ILSVRC/imagenet-1k"`, optionally `streaming`); `train_dir` /
    `validation_dir` (an imagefolder with class sub-folders, or parquet files); otherwise the embedded digits default
    (`split` `"train"`, or `"test"` / `"validation"`).

    Returns:
        `datasets.Dataset`, or `datasets.IterableDataset` when `streaming`.
    """
    import datasets

    if dataset_name and (train_dir or validation_dir):
        raise ValueError("Pass either --dataset_name (hub) or --train_dir/--validation_dir (local files), not both.")
    if dataset_name:
        if not hub_is_reachable():
            raise ConnectionError(
                f"Cannot reach the Hugging Face Hub to load {dataset_name!r} (offline). Download the dataset first and "
                "pass its folder with --train_dir, or run without data arguments to use the embedded digits."
            )
        dataset = datasets.load_dataset(
            dataset_name, dataset_config_name, split=split, streaming=streaming, cache_dir=cache_dir
        )
    elif train_dir or validation_dir:
        folder = Path(validation_dir if split in ("validation", "test") and validation_dir else train_dir or validation_dir)
        if not folder.exists():
            raise ValueError(f"Data folder {str(folder)!r} does not exist: check --train_dir / --validation_dir.")
        data_files = _data_files(folder)
        if data_files:
            dataset = datasets.load_dataset("parquet", data_files=data_files, split="train", streaming=streaming)
        else:
            dataset = datasets.load_dataset(
                "imagefolder", data_dir=str(folder), split="train", streaming=streaming, cache_dir=cache_dir
            )
    else:
        digits = load_digits_dataset(image_size)
        dataset = digits["test" if split in ("test", "validation") else "train"]
        if streaming:
            dataset = dataset.to_iterable_dataset()

    return _standardise_columns(dataset, image_column, label_column)


def _standardise_columns(dataset, image_column: str | None, label_column: str | None):
    import datasets

    columns = list(dataset.column_names or (dataset.features or {}).keys())
    image_column = image_column or next((c for c in IMAGE_COLUMN_CANDIDATES if c in columns), None)
    if image_column not in columns:
        raise ValueError(
            f"No image column found (looked for {image_column or list(IMAGE_COLUMN_CANDIDATES)}); the dataset has "
            f"columns {columns}. Pass --image_column with the right name."
        )
    label_column = label_column or next((c for c in LABEL_COLUMN_CANDIDATES if c in columns), None)
    if label_column is not None and label_column not in columns:
        raise ValueError(f"Label column {label_column!r} not found; the dataset has columns {columns}.")
    # Decoding inside `datasets` would crash the run on the first corrupt file; our collators skip it instead. It must
    # be off before the renames below: streams apply every step lazily, and their inner steps would decode.
    if isinstance(dataset, datasets.IterableDataset):
        dataset = dataset.decode(False)
    if dataset.features is not None and isinstance(dataset.features.get(image_column), datasets.Image):
        dataset = dataset.cast_column(image_column, datasets.Image(decode=False))
    renames = {image_column: "image"}
    if label_column:
        renames[label_column] = "label"
    dataset = dataset.rename_columns({k: v for k, v in renames.items() if k != v})
    keep = [c for c in ("image", "label") if c in (dataset.column_names or ["image", "label"])]
    if dataset.column_names and set(dataset.column_names) - set(keep):
        dataset = dataset.select_columns(keep)
    return dataset


def shard_for_process(dataset, rank: int, world_size: int):
    """Give each of `world_size` processes its own disjoint part of an iterable dataset (`split_dataset_by_node`)."""
    from datasets.distributed import split_dataset_by_node

    if world_size <= 1:
        return dataset
    return split_dataset_by_node(dataset, rank=rank, world_size=world_size)


# ------------------------------------------------------------------------------------------------------------------
# Images
# ------------------------------------------------------------------------------------------------------------------
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


def _processor_size(image_processor) -> tuple[int, int]:
    size = image_processor.size
    if "height" in size:
        return int(size["height"]), int(size["width"])
    edge = int(size.get("shortest_edge", 224))
    return edge, edge


def _normalise(images: list[Image.Image], image_processor) -> torch.Tensor:
    return image_processor(images=images, return_tensors="pt")["pixel_values"]


_TORCH_RESAMPLING = {int(Image.BILINEAR): "bilinear", int(Image.BICUBIC): "bicubic"}


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


class _SkippingCollator:
    """Decodes `image` entries to RGB arrays, drops undecodable ones and counts them in `num_dropped`."""

    def __init__(self) -> None:
        self.num_dropped = 0

    def _decode(self, examples: list[dict]) -> tuple[list[np.ndarray], list[dict]]:
        if examples and "image" not in examples[0]:
            raise ValueError(
                f"Examples need an `image` entry; found keys {sorted(examples[0])}. Load data with "
                "modeling_ijepa.data.load_image_dataset or pass --image_column."
            )
        images, kept = [], []
        for example in examples:
            image = decode_image_array(example["image"])
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
    is a pure function of its examples and its index: resuming from `state_dict()` reproduces the run exactly.

    JPEGs are decoded with libjpeg-turbo (`decode_image_array`), each crop is resized once, straight to the
    processor's size, with an antialiased bilinear kernel (`crop_and_resize`), and the processor's rescale and
    normalisation run once per batch in torch (`normalize`).

    Args:
        mask_collator: draws the per-batch generator and the masks.
        image_processor: gives the output size and the mean / std.
        crop_scale: RandomResizedCrop area fraction range.
        output_uint8: return `uint8` `pixel_values` (0-255) and leave the normalisation to the training device
            (`IJepaTrainer` calls `normalize`): 4x less data between DataLoader workers, host and device.

    Returns the mask collator's batch: `pixel_values` `(batch, 3, height, width)` (float32 normalised, or uint8 with
    `output_uint8`), `context_indices`, `target_indices`.
    """

    def __init__(
        self,
        mask_collator: IJepaMaskCollator,
        image_processor,
        crop_scale: Sequence[float] = (0.3, 1.0),
        output_uint8: bool = False,
    ):
        super().__init__()
        self.mask_collator = mask_collator
        self.image_processor = image_processor
        self.crop_scale = tuple(crop_scale)
        self.size = _processor_size(image_processor)
        self.output_uint8 = bool(output_uint8)
        self.normalize = PixelNormalizer(image_processor)

    def state_dict(self) -> dict[str, int]:
        return self.mask_collator.state_dict()

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.mask_collator.load_state_dict(state)

    def set_batch_index(self, batch_index: int) -> None:
        self.mask_collator.set_batch_index(batch_index)

    def __call__(self, examples: list[dict]) -> dict[str, torch.Tensor]:
        images, _ = self._decode(examples)
        generator = self.mask_collator.next_generator()
        crops = []
        for image in images:
            box = random_resized_crop_box(image.shape[1], image.shape[0], generator, scale=self.crop_scale)
            crops.append(crop_and_resize(image, box, self.size))
        pixel_values = torch.stack(crops)
        if not self.output_uint8:
            pixel_values = self.normalize(pixel_values)
        context_indices, target_indices = self.mask_collator.sample_masks(len(crops), generator)
        return {"pixel_values": pixel_values, "context_indices": context_indices, "target_indices": target_indices}


class ImageClassificationCollator(_SkippingCollator):
    """
    Evaluation / fine-tuning batches: `pixel_values` `(batch, 3, height, width)` float32 and `labels`. With `augment`,
    a random-resized crop (area fraction in `crop_scale`) and, if `horizontal_flip`, a random horizontal flip, seeded
    by `seed`; otherwise the processor's deterministic resize. Processors that resize to a fixed height and width
    with bilinear or bicubic resampling run in torch (`crop_and_resize`); any other processor is called as is.
    """

    def __init__(
        self,
        image_processor,
        augment: bool = False,
        seed: int = 0,
        crop_scale: Sequence[float] = (0.08, 1.0),
        horizontal_flip: bool = True,
    ):
        super().__init__()
        self.image_processor = image_processor
        self.augment = augment
        self.crop_scale = tuple(crop_scale)
        self.horizontal_flip = horizontal_flip
        self.size = _processor_size(image_processor)
        self.generator = torch.Generator().manual_seed(seed)
        self.normalize = PixelNormalizer(image_processor)
        size = image_processor.size
        fixed_size = getattr(image_processor, "do_resize", False) and "height" in size and "width" in size
        self._resize_mode = _TORCH_RESAMPLING.get(int(image_processor.resample)) if fixed_size else None

    def __call__(self, examples: list[dict]) -> dict[str, torch.Tensor]:
        images, kept = self._decode(examples)
        if self.augment:
            crops = []
            for image in images:
                box = random_resized_crop_box(image.shape[1], image.shape[0], self.generator, scale=self.crop_scale)
                crops.append(crop_and_resize(image, box, self.size))
            flips = (torch.rand(len(crops), generator=self.generator) < 0.5) & self.horizontal_flip
            pixel_values = torch.stack([crop.flip(-1) if flip else crop for crop, flip in zip(crops, flips)])
            pixel_values = self.normalize(pixel_values)
        elif self._resize_mode is not None:
            boxes = [(0, 0, image.shape[1], image.shape[0]) for image in images]
            resized = [crop_and_resize(image, box, self.size, self._resize_mode) for image, box in zip(images, boxes)]
            pixel_values = self.normalize(torch.stack(resized))
        else:
            pixel_values = _normalise([Image.fromarray(image) for image in images], self.image_processor)
        batch = {"pixel_values": pixel_values}
        if "label" in kept[0]:
            batch["labels"] = default_collate([int(example["label"]) for example in kept])
        return batch


__all__ = [
    "default_image_processor",
    "load_digits_dataset",
    "load_image_dataset",
    "hub_is_reachable",
    "shard_for_process",
    "decode_image",
    "decode_image_array",
    "random_resized_crop",
    "random_resized_crop_box",
    "crop_and_resize",
    "PixelNormalizer",
    "IJepaPretrainingCollator",
    "ImageClassificationCollator",
]
