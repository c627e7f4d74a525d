"""Data loading and collators: awkward images are converted or skipped and counted, never a crash mid-run."""

import io

import datasets
import numpy as np
import pytest
import torch
from PIL import Image

from conftest import tiny_config
from modeling_ijepa.data import (
    IJepaPretrainingCollator,
    ImageClassificationCollator,
    decode_image,
    default_image_processor,
    digits_split,
    load_digits_dataset,
    load_image_dataset,
    random_resized_crop,
)
from modeling_ijepa.masking import IJepaMaskCollator


def _png_bytes(image: Image.Image, format: str = "PNG") -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=format)
    return buffer.getvalue()


def _gradient(mode: str = "RGB", size=(20, 16)) -> Image.Image:
    array = np.linspace(0, 255, size[0] * size[1] * 3).reshape(size[1], size[0], 3).astype(np.uint8)
    return Image.fromarray(array, "RGB").convert(mode)


@pytest.mark.parametrize("mode", ["L", "P", "CMYK", "RGBA", "LA", "1"])
def test_decode_converts_colour_modes_to_rgb(mode):
    image = decode_image({"bytes": _png_bytes(_gradient(mode), "JPEG" if mode == "CMYK" else "PNG"), "path": None})
    assert image.mode == "RGB" and image.size == (20, 16)


def test_decode_scales_sixteen_bit_images():
    array = np.full((8, 8), 65535, dtype=np.uint16)
    array[:4] = 0
    sixteen = Image.fromarray(array)
    assert sixteen.mode.startswith("I;16")
    rgb = np.asarray(decode_image(_png_bytes(sixteen)))
    assert rgb.dtype == np.uint8 and rgb[:4].max() == 0 and rgb[4:].min() == 255  # scaled, not clipped to white


def test_decode_composites_transparency_on_white():
    transparent = Image.new("RGBA", (4, 4), (0, 0, 0, 0))
    assert np.asarray(decode_image(transparent)).min() == 255


@pytest.mark.parametrize(
    "value",
    [b"not an image", _png_bytes(_gradient())[:60], {"bytes": None, "path": "/no/such/file.png"}, 3.5],
    ids=["garbage", "truncated", "missing-file", "wrong-type"],
)
def test_undecodable_values_give_none(value):
    assert decode_image(value) is None


def test_random_resized_crop_upsamples_small_images():
    crop = random_resized_crop(_gradient(size=(5, 3)), (48, 48), torch.Generator().manual_seed(0))
    assert crop.size == (48, 48)


def test_pretraining_collator_skips_and_counts_bad_images():
    config = tiny_config()
    collator = IJepaPretrainingCollator(IJepaMaskCollator.from_config(config, seed=0), default_image_processor(48))
    good = {"image": {"bytes": _png_bytes(_gradient()), "path": None}}
    batch = collator([good, {"image": {"bytes": b"junk", "path": None}}, good, {"image": None}])
    assert batch["pixel_values"].shape == (2, 3, 48, 48)
    assert batch["context_indices"].shape[0] == 2 and batch["target_indices"].shape[:2] == (2, 4)
    assert collator.num_dropped == 2
    with pytest.raises(ValueError, match="failed to decode"):
        collator([{"image": {"bytes": b"junk", "path": None}}])
    with pytest.raises(ValueError, match="need an `image` entry"):
        collator([{"pixels": 1}])


def test_pretraining_batches_depend_only_on_seed_and_batch_index():
    config = tiny_config()
    examples = [{"image": _gradient(size=(30, 40))} for _ in range(3)]

    def batch(index: int):
        collator = IJepaPretrainingCollator(IJepaMaskCollator.from_config(config, seed=7), default_image_processor(48))
        collator.set_batch_index(index)
        return collator(examples)

    first, again, other = batch(5), batch(5), batch(6)
    for key in first:
        assert torch.equal(first[key], again[key])
    assert not torch.equal(first["pixel_values"], other["pixel_values"])


def test_classification_collator_keeps_labels_aligned_with_kept_images():
    collator = ImageClassificationCollator(default_image_processor(48))
    batch = collator([{"image": _gradient(), "label": 3}, {"image": b"junk", "label": 4}, {"image": _gradient(), "label": 5}])
    assert batch["labels"].tolist() == [3, 5] and batch["pixel_values"].shape == (2, 3, 48, 48)


def test_embedded_digits_are_real_images():
    digits = load_digits_dataset(48)
    assert (len(digits["train"]), len(digits["test"])) == (1200, 597)
    assert sorted(set(digits["train"]["label"])) == list(range(10))
    image = decode_image(load_image_dataset()[0]["image"])
    assert image.size == (48, 48) and np.asarray(image).std() > 20


def test_embedded_digits_are_dark_ink_on_white():
    from sklearn.datasets import load_digits

    raw = load_digits()
    train_index = np.sort(digits_split(raw.target)[0])
    pixels = np.stack([np.asarray(image.convert("L")) for image in load_digits_dataset(8)["train"]["image"]])
    # At the native 8x8 size the rendering is exact: blank paper (0 ink) is white, full ink (16) is black.
    expected = 255 - np.round(raw.images[train_index] / 16 * 255)
    np.testing.assert_array_equal(pixels, expected)
    assert np.median(pixels[:, :, 0]) == 255 and pixels.min() == 0  # the left margin is blank paper


def test_missing_image_column_names_the_fix(tmp_path):
    table = datasets.Dataset.from_dict({"pixels": [1, 2], "label": [0, 1]})
    table.to_parquet(str(tmp_path / "data.parquet"))
    with pytest.raises(ValueError, match="Pass --image_column"):
        load_image_dataset(train_dir=str(tmp_path))
    with pytest.raises(ValueError, match="does not exist"):
        load_image_dataset(train_dir=str(tmp_path / "nowhere"))


def test_custom_image_column_is_renamed(tmp_path):
    table = datasets.Dataset.from_dict({"picture": [{"bytes": _png_bytes(_gradient()), "path": None}], "y": [1]})
    table = table.cast_column("picture", datasets.Image())
    table.to_parquet(str(tmp_path / "data.parquet"))
    for streaming in (False, True):
        dataset = load_image_dataset(train_dir=str(tmp_path), image_column="picture", label_column="y", streaming=streaming)
        example = next(iter(dataset))
        assert set(example) == {"image", "label"} and decode_image(example["image"]).mode == "RGB"
