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
    PixelNormalizer,
    decode_image,
    decode_image_array,
    default_image_processor,
    digits_split,
    load_digits_dataset,
    load_image_dataset,
    random_resized_crop,
    random_resized_crop_box,
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


# ------------------------------------------------------------------------------------------------------------------
# The fast path (libjpeg-turbo decode, one antialiased uint8 resize, torch normalisation) keeps the PIL semantics
# ------------------------------------------------------------------------------------------------------------------
def _photo(size=(120, 90), seed: int = 0) -> Image.Image:
    """A smooth colour image (JPEG-friendly) of `size` = (width, height)."""
    y, x = np.mgrid[0 : size[1], 0 : size[0]]
    phase = np.random.default_rng(seed).random(3) * 6
    channels = [127 + 120 * np.sin(x / (7 + 3 * c) + y / (11 + c) + phase[c]) for c in range(3)]
    return Image.fromarray(np.stack(channels, axis=-1).astype(np.uint8), "RGB")


def _one_grey_level(image_processor) -> float:
    return 1.0 / 255.0 / min(image_processor.image_std) + 1e-5


@pytest.mark.parametrize("mode", ["RGB", "L", "CMYK"])
@pytest.mark.parametrize("progressive", [False, True])
def test_decode_image_array_gives_pil_pixels_for_jpegs(mode, progressive):
    buffer = io.BytesIO()
    _photo().convert(mode).save(buffer, "JPEG", quality=90, progressive=progressive)
    data = buffer.getvalue()
    array = decode_image_array({"bytes": data, "path": None})
    assert array.dtype == np.uint8 and array.shape == (90, 120, 3)
    np.testing.assert_array_equal(array, np.asarray(decode_image(data)))


def test_decode_image_array_reads_paths_and_rejects_what_pil_rejects(tmp_path):
    buffer = io.BytesIO()
    _photo().save(buffer, "JPEG", quality=90)
    data = buffer.getvalue()
    (tmp_path / "photo.jpg").write_bytes(data)
    np.testing.assert_array_equal(decode_image_array(str(tmp_path / "photo.jpg")), np.asarray(decode_image(data)))
    assert decode_image_array(data[: len(data) // 2]) is None  # truncated JPEG: refused by both decoders
    assert decode_image_array(b"\xff\xd8\xff garbage") is None
    assert decode_image_array(str(tmp_path / "missing.jpg")) is None
    np.testing.assert_array_equal(decode_image_array(_gradient("P")), np.asarray(_gradient("P").convert("RGB")))


def test_crop_boxes_follow_random_resized_crop_distribution():
    generator = torch.Generator().manual_seed(0)
    boxes = [random_resized_crop_box(500, 375, generator, scale=(0.3, 1.0)) for _ in range(2000)]
    areas = np.array([w * h / (500 * 375) for _, _, w, h in boxes])
    log_aspects = np.log([w / h for _, _, w, h in boxes])
    assert all(0 <= left and 0 <= top and left + w <= 500 and top + h <= 375 for left, top, w, h in boxes)
    # Large boxes of extreme aspect do not fit and are redrawn, which pulls the median area below 0.65.
    assert areas.min() > 0.29 and areas.max() <= 1.0 and 0.5 < np.median(areas) < 0.6
    assert log_aspects.min() > np.log(3 / 4) - 0.02 and log_aspects.max() < np.log(4 / 3) + 0.02
    # A tall, narrow image never fits the aspect range: the centred fallback box is used.
    assert random_resized_crop_box(10, 400, torch.Generator().manual_seed(0)) == (0, 193, 10, 13)


@pytest.mark.parametrize("image_format", ["JPEG", "PNG"])
def test_pretraining_collator_draws_the_same_crops_and_masks_as_the_pil_path(image_format):
    """Same generator draws as `random_resized_crop` on PIL images; pixels equal within one grey level."""
    config = tiny_config()
    processor = default_image_processor(48)
    examples = []
    for seed, size in enumerate([(120, 90), (50, 70), (30, 20)]):
        buffer = io.BytesIO()
        _photo(size, seed).save(buffer, image_format, **({"quality": 90} if image_format == "JPEG" else {}))
        examples.append({"image": {"bytes": buffer.getvalue(), "path": None}})
    collator = IJepaPretrainingCollator(IJepaMaskCollator.from_config(config, seed=3), processor)
    collator.set_batch_index(11)
    batch = collator(examples)

    reference = IJepaMaskCollator.from_config(config, seed=3)
    reference.set_batch_index(11)
    generator = reference.next_generator()
    crops = [random_resized_crop(decode_image(e["image"]), (48, 48), generator) for e in examples]
    expected = processor(images=crops, return_tensors="pt")["pixel_values"]
    context_indices, target_indices = reference.sample_masks(len(crops), generator)
    assert torch.equal(batch["context_indices"], context_indices)
    assert torch.equal(batch["target_indices"], target_indices)
    assert batch["pixel_values"].dtype == torch.float32
    assert (batch["pixel_values"] - expected).abs().max() <= _one_grey_level(processor)


def test_uint8_batches_normalise_to_the_float_batches():
    config = tiny_config()
    examples = [{"image": _photo((60 + 10 * i, 50), i)} for i in range(4)]

    def batch(output_uint8: bool):
        collator = IJepaPretrainingCollator(
            IJepaMaskCollator.from_config(config, seed=1), default_image_processor(48), output_uint8=output_uint8
        )
        collator.set_batch_index(2)
        return collator, collator(examples)

    collator, as_uint8 = batch(True)
    _, as_float = batch(False)
    assert as_uint8["pixel_values"].dtype == torch.uint8 and as_uint8["pixel_values"].shape == (4, 3, 48, 48)
    assert torch.allclose(collator.normalize(as_uint8["pixel_values"]), as_float["pixel_values"], atol=1e-6)
    assert torch.equal(as_uint8["target_indices"], as_float["target_indices"])
    with pytest.raises(TypeError, match="uint8"):
        collator.normalize(as_float["pixel_values"])


def test_trainer_normalises_uint8_batches_with_the_collator():
    from types import SimpleNamespace

    from modeling_ijepa.trainer import IJepaTrainer

    collator = IJepaPretrainingCollator(IJepaMaskCollator.from_config(tiny_config()), default_image_processor(48))
    pixels = torch.randint(0, 256, (2, 3, 48, 48), dtype=torch.uint8)
    normalised = IJepaTrainer._float_pixel_values(SimpleNamespace(data_collator=collator), pixels)
    assert torch.equal(normalised, PixelNormalizer(default_image_processor(48))(pixels))
    floats = torch.zeros(2, 3, 48, 48)
    assert IJepaTrainer._float_pixel_values(SimpleNamespace(data_collator=None), floats) is floats
    with pytest.raises(TypeError, match="no `normalize` method"):
        IJepaTrainer._float_pixel_values(SimpleNamespace(data_collator=None), pixels)


@pytest.mark.parametrize("augment", [False, True])
def test_classification_collator_matches_the_processor(augment):
    processor = default_image_processor(32)
    examples = [{"image": _photo((90, 60), i), "label": i} for i in range(3)]
    batch = ImageClassificationCollator(processor, augment=augment, seed=5)(examples)
    if augment:
        generator = torch.Generator().manual_seed(5)
        images = [random_resized_crop(e["image"], (32, 32), generator, scale=(0.08, 1.0)) for e in examples]
        flips = torch.rand(len(images), generator=generator) < 0.5
        images = [image.transpose(Image.FLIP_LEFT_RIGHT) if flip else image for image, flip in zip(images, flips)]
    else:
        images = [e["image"] for e in examples]
    expected = processor(images=images, return_tensors="pt")["pixel_values"]
    assert (batch["pixel_values"] - expected).abs().max() <= _one_grey_level(processor)
    assert batch["labels"].tolist() == [0, 1, 2]


def test_classification_collator_calls_processors_it_cannot_restate():
    processor = default_image_processor(32)
    processor.resample = Image.LANCZOS
    examples = [{"image": _photo((90, 60), i)} for i in range(2)]
    batch = ImageClassificationCollator(processor)(examples)
    expected = processor(images=[e["image"] for e in examples], return_tensors="pt")["pixel_values"]
    assert torch.equal(batch["pixel_values"], expected)
