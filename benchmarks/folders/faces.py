"""
`faces` (held out): a semantic category, face or not, from `skimage.data.lfw_subset()` (100 cropped faces of
Labeled Faces in the Wild and 100 non-face patches, 25 x 25 greyscale), upscaled to `image_size`.

Every image is its own source (no crop of one image lands in both splits): a seeded, class-stratified split of the 200
images, 75 per class for training and 25 for validation; the training images are also written flipped
(`<index>__flip.png` next to `<index>__orig.png`, one group per source image in the monitor's convention).

Held out (`HELD_OUT = True`): built before any choice of recipe or setting was made on it, and used for nothing but the
final check (see `benchmarks/studies/every-folder-held-out.yaml`).

    python -m benchmarks.folders faces outputs/faces                   # 2 classes, 150 training + 25 validation
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

from ._regions import as_rgb, check_empty


NAME = "faces"
HELD_OUT = True
CLASSES = ("face", "not-face")
TRAIN_PER_CLASS = 75


def build(output_dir: str | Path, image_size: int = 64, seed: int = 0) -> Path:
    """Write the folder under `output_dir` (which must hold no train/ or validation/) and return it."""
    try:
        import skimage.data
    except ImportError as error:
        raise ImportError("The faces folder needs scikit-image (`pip install scikit-image`).") from error
    images = skimage.data.lfw_subset()  # (200, 25, 25) floats in [0, 1]: faces first, then non-faces
    root = Path(output_dir)
    check_empty(root)
    rng = np.random.default_rng(seed)
    half = len(images) // 2
    for class_index, label in enumerate(CLASSES):
        indices = class_index * half + rng.permutation(half)
        for split, chosen in (("train", indices[:TRAIN_PER_CLASS]), ("validation", indices[TRAIN_PER_CLASS:])):
            folder = root / split / label
            folder.mkdir(parents=True)
            for index in sorted(int(i) for i in chosen):
                image = Image.fromarray(as_rgb(images[index])).resize((image_size, image_size), Image.BICUBIC)
                image.save(folder / f"{index:03d}__orig.png")
                if split == "train":
                    image.transpose(Image.FLIP_LEFT_RIGHT).save(folder / f"{index:03d}__flip.png")
    return root
