"""Data loading and collators: awkward images are converted or skipped and counted, never a crash mid-run."""

import io

import datasets
import numpy as np
import pytest
import torch
from conftest import tiny_config
from PIL import Image

from modeling_ijepa.data import (
    IJepaPretrainingCollator,
    ImageClassificationCollator,
    PixelNormalizer,
    crop_and_resize,
    decode_image,
    decode_image_array,
    decode_random_crop,
    default_image_processor,
    digits_split,
    load_digits_dataset,
    load_image_dataset,
    random_resized_crop,
    random_resized_crop_box,
)
from modeling_ijepa.masking import MultiBlockMaskSampler


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
    collator = IJepaPretrainingCollator(MultiBlockMaskSampler.from_config(config, seed=0), default_image_processor(48))
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
        collator = IJepaPretrainingCollator(
            MultiBlockMaskSampler.from_config(config, seed=7), default_image_processor(48)
        )
        collator.set_batch_index(index)
        return collator(examples)

    first, again, other = batch(5), batch(5), batch(6)
    for key in first:
        assert torch.equal(first[key], again[key])
    assert not torch.equal(first["pixel_values"], other["pixel_values"])


def test_classification_collator_keeps_labels_aligned_with_kept_images():
    collator = ImageClassificationCollator(default_image_processor(48))
    examples = [{"image": _gradient(), "label": 3}, {"image": b"junk", "label": 4}, {"image": _gradient(), "label": 5}]
    batch = collator(examples)
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
        dataset = load_image_dataset(
            train_dir=str(tmp_path), image_column="picture", label_column="y", streaming=streaming
        )
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
    collator = IJepaPretrainingCollator(MultiBlockMaskSampler.from_config(config, seed=3), processor)
    collator.set_batch_index(11)
    batch = collator(examples)

    reference = MultiBlockMaskSampler.from_config(config, seed=3)
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
            MultiBlockMaskSampler.from_config(config, seed=1), default_image_processor(48), output_uint8=output_uint8
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

    collator = IJepaPretrainingCollator(MultiBlockMaskSampler.from_config(tiny_config()), default_image_processor(48))
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


def _jpeg(image: Image.Image, **options) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, "JPEG", quality=90, **options)
    return buffer.getvalue()


def _smooth_photo(size, seed: int = 0) -> Image.Image:
    """A photo-like image without detail near the output's pixel pitch, so sub-pixel box shifts barely change it."""
    return _photo((size[0] // 8, size[1] // 8), seed).resize(size, Image.BICUBIC)


def test_reduced_decode_keeps_the_draws_and_the_output_resolution():
    """A large JPEG decodes at a reduced size only when the crop keeps at least the output size; same boxes."""
    data = _jpeg(_smooth_photo((480, 360), seed=1))
    for seed in range(20):
        reduced, full = torch.Generator().manual_seed(seed), torch.Generator().manual_seed(seed)
        image, box = decode_random_crop(data, reduced, (48, 48), scale=(0.08, 1.0))
        full_image, full_box = decode_random_crop(data, full, (48, 48), scale=(0.08, 1.0), reduced_decode=False)
        assert torch.equal(reduced.get_state(), full.get_state())  # the same draws, in the same order
        factor = full_image.shape[1] // image.shape[1]
        assert factor in (1, 2, 4, 8) and image.shape[:2] == (-(-360 // factor), -(-480 // factor))
        assert box[2] >= 48 and box[3] >= 48  # never below the output resolution
        assert factor == 1 or min(full_box[2], full_box[3]) >= 2 * 48
        for edge, full_edge in zip(box, full_box):
            assert abs(edge * factor - full_edge) <= factor  # edges within one decoded pixel
        # The reduced-size decode of the box equals the full-size decode of the same (rounded) box within the JPEG's
        # own error: the DCT does the downscaling the resize would do.
        crop = crop_and_resize(image, box, (48, 48)).float()
        same_box = crop_and_resize(full_image, tuple(factor * v for v in box), (48, 48)).float()
        assert (crop - same_box).abs().mean() < 1.0
        # Against the unrounded box: edges at most half a decoded pixel apart, so still the same crop here.
        assert (crop - crop_and_resize(full_image, full_box, (48, 48)).float()).abs().mean() < 3.0


def test_reduced_decode_batches_match_full_decode_batches():
    config = tiny_config()
    examples = [{"image": {"bytes": _jpeg(_smooth_photo((400, 300), seed)), "path": None}} for seed in range(4)]
    examples.append({"image": {"bytes": _jpeg(_photo((400, 300)))[:3000], "path": None}})  # truncated: skipped

    def batch(reduced_decode: bool):
        collator = IJepaPretrainingCollator(
            MultiBlockMaskSampler.from_config(config, seed=2),
            default_image_processor(48),
            output_uint8=True,
            reduced_decode=reduced_decode,
        )
        collator.set_batch_index(4)
        return collator(examples), collator.num_dropped

    (reduced, reduced_dropped), (full, full_dropped) = batch(True), batch(False)
    assert reduced_dropped == full_dropped == 1
    assert torch.equal(reduced["context_indices"], full["context_indices"])
    assert torch.equal(reduced["target_indices"], full["target_indices"])
    difference = (reduced["pixel_values"].float() - full["pixel_values"].float()).abs()
    assert 0 < difference.mean() < 3.0  # reduced-size decodes were used, and they give the same crops


def test_decode_random_crop_leaves_the_generator_alone_for_bad_jpegs():
    data = _jpeg(_photo((400, 300)))
    generator = torch.Generator().manual_seed(0)
    state = generator.get_state()
    assert decode_random_crop(data[:3000], generator, (48, 48)) is None  # the header reads, the body does not
    assert decode_random_crop(b"\xff\xd8\xff garbage", generator, (48, 48)) is None
    assert torch.equal(generator.get_state(), state)
