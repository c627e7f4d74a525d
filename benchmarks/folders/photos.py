#!/usr/bin/env python
"""
Small real-photo image folders, built offline from photographs that installed packages ship, for measuring learning
on data that is not the digits (the `small-folders` and `checkpoint-selection` studies of `benchmarks/study.py`).
A builder of the `benchmarks.folders` registry (`NAMES`, `build`).

    python -m benchmarks.folders shipped outputs/photos-shipped              # 12 classes, 3,600 images
    python -m benchmarks.folders scikit-image outputs/photos-skimage         # 40 classes, 5,000

Three photo sets; each photo is cut into a 2 x 2 grid of regions and the label is the region, so classes of one photo
share colours and textures (with the photo as the label, a random network already scores ~97 % on ten photos):
- `shipped`: the photographs of the project's own dependencies (scikit-learn's `china.jpg` and `flower.jpg`,
  matplotlib's `grace_hopper.jpg`): 12 classes (sky, roof, trees, petals, face, uniform, ...), 250 training and 50
  validation images each;
- `scikit-image`: ten photographs of scikit-image's `skimage.data` (astronaut, coffee, cat, rocket, galaxies, retina,
  stained tissue, gravel, brick, grass), when scikit-image is installed: 40 classes, 100 training and 25 validation
  images each;
- `scikit-image-grey`: seven greyscale images of `skimage.data` (camera man, coins, moon, printed page, clock, text
  on a sign, cells under a microscope): 28 classes, 100 training and 25 validation images each.

Every image is a random square crop (side 25-60 % of the region's shorter side), resized to `--image_size` px, flipped
at random and saved as JPEG (quality 90) into `<output_dir>/train/<class>/` and `<output_dir>/validation/<class>/`,
the layout `datasets`' imagefolder, `pretrain.py --train_dir` and the evaluation scripts read. Seeded: the same
arguments give the same files.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image


NAMES = ("shipped", "scikit-image", "scikit-image-grey")
SCIKIT_IMAGE_PHOTOS = (
    "astronaut",
    "coffee",
    "chelsea",
    "rocket",
    "hubble_deep_field",
    "retina",
    "immunohistochemistry",
    "gravel",
    "brick",
    "grass",
)
SCIKIT_IMAGE_GREY_PHOTOS = ("camera", "coins", "moon", "page", "clock", "text", "cell")


def shipped_photographs() -> dict[str, np.ndarray]:
    """The photographs of scikit-learn and matplotlib (runtime dependencies), `name -> (H, W, 3) uint8`."""
    import matplotlib.cbook
    from sklearn.datasets import load_sample_images

    samples = load_sample_images()
    photos = {Path(name).stem: image for name, image in zip(samples.filenames, samples.images)}
    with Image.open(matplotlib.cbook.get_sample_data("grace_hopper.jpg", asfileobj=False)) as image:
        photos["grace_hopper"] = np.asarray(image.convert("RGB"))
    return photos


def scikit_image_photographs(names: tuple[str, ...] = SCIKIT_IMAGE_PHOTOS) -> dict[str, np.ndarray]:
    """Photographs of `skimage.data`, `name -> (H, W, 3) uint8` (grey ones repeated over 3 channels)."""
    try:
        import skimage.data
    except ImportError as error:
        raise ImportError(
            "The scikit-image photo sets need scikit-image (`pip install scikit-image`); `shipped` needs nothing."
        ) from error
    photos = {}
    for name in names:
        image = np.asarray(getattr(skimage.data, name)())
        photos[name] = np.repeat(image[..., None], 3, axis=-1) if image.ndim == 2 else image[..., :3]
    return photos


def regions(photos: dict[str, np.ndarray], grid: int) -> dict[str, np.ndarray]:
    """Every photo cut into `grid` x `grid` regions, `"<photo>_r<row>c<col>" -> region` (grid 1: the whole photo)."""
    if grid < 1:
        raise ValueError(f"--grid must be at least 1, got {grid}.")
    out = {}
    for name, photo in sorted(photos.items()):
        height, width = photo.shape[0] // grid, photo.shape[1] // grid
        for row in range(grid):
            for col in range(grid):
                label = name if grid == 1 else f"{name}_r{row}c{col}"
                out[label] = photo[row * height : (row + 1) * height, col * width : (col + 1) * width]
    return out


def random_patch(region: np.ndarray, rng: np.random.Generator, image_size: int) -> Image.Image:
    """A random square crop (side 25-60 % of the region's shorter side), resized, flipped with probability 1/2."""
    height, width = region.shape[:2]
    side = max(8, int(rng.uniform(0.25, 0.6) * min(height, width)))
    top = int(rng.integers(0, height - side + 1))
    left = int(rng.integers(0, width - side + 1))
    patch = Image.fromarray(np.ascontiguousarray(region[top : top + side, left : left + side]))
    patch = patch.resize((image_size, image_size), Image.BICUBIC)
    return patch.transpose(Image.FLIP_LEFT_RIGHT) if rng.random() < 0.5 else patch


# Per photo set: images per class (training, validation), so that both sets hold a few thousand images.
IMAGES_PER_CLASS = {"shipped": (250, 50), "scikit-image": (100, 25), "scikit-image-grey": (100, 25)}


def build(
    output_dir: str | Path,
    name: str = "shipped",
    grid: int = 2,
    train_per_class: int | None = None,
    validation_per_class: int | None = None,
    image_size: int = 64,
    seed: int = 0,
) -> Path:
    """
    Write the imagefolder (`train/<class>/*.jpg`, `validation/<class>/*.jpg`) of one photo set and return its root.

    Args:
        output_dir: created; must not already hold a `train` or `validation` folder (nothing is overwritten).
        name: `"shipped"`, `"scikit-image"` or `"scikit-image-grey"` (see the module docstring).
        grid: regions per side of every photo (a class per region; 1: the photo is the class).
        train_per_class / validation_per_class: images per class in each split (default: `IMAGES_PER_CLASS`).
        image_size: side of the saved images, in pixels.
        seed: seeds the crops.
    """
    if name not in NAMES:
        raise ValueError(f"Unknown photo set {name!r}; choose one of {NAMES}.")
    default_train, default_validation = IMAGES_PER_CLASS[name]
    train_per_class = default_train if train_per_class is None else train_per_class
    validation_per_class = default_validation if validation_per_class is None else validation_per_class
    if train_per_class < 1 or validation_per_class < 1:
        raise ValueError("Need at least one training and one validation image per class.")
    root = Path(output_dir)
    for split in ("train", "validation"):
        if (root / split).exists():
            raise FileExistsError(f"{root / split} exists; pass an empty folder (nothing is overwritten).")
    if name == "shipped":
        source = shipped_photographs()
    elif name == "scikit-image":
        source = scikit_image_photographs(SCIKIT_IMAGE_PHOTOS)
    else:
        source = scikit_image_photographs(SCIKIT_IMAGE_GREY_PHOTOS)
    classes = regions(source, grid)
    rng = np.random.default_rng(seed)
    for label, region in classes.items():
        for split, count in (("train", train_per_class), ("validation", validation_per_class)):
            folder = root / split / label
            folder.mkdir(parents=True)
            for index in range(count):
                random_patch(region, rng, image_size).save(folder / f"{index:04d}.jpg", "JPEG", quality=90)
    return root
