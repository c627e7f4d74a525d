"""
`grey-regions` (held out): regions of greyscale images, with validation crops from parts of each region that training
never saw.

Seven greyscale images of `skimage.data` (camera man, coins, moon, printed page, clock, text on a sign, cells under a
microscope), each cut into a 2 x 2 grid of regions (the class), each region split by rows as in `photo-regions`
(training crops from its top 75 %, validation from its bottom 25 %, 4 tiles per part, `<group>__<index>.png` names).

Held out (`HELD_OUT = True`): built before any choice of recipe or setting was made on it, and used for nothing but the
final check; nothing is tuned, compared or selected on it (see `benchmarks/studies/every-folder-held-out.yaml`).

    python -m benchmarks.folders grey-regions outputs/grey-regions     # 28 classes, 100 training + 25 validation
"""

from __future__ import annotations

from pathlib import Path

from ._regions import as_rgb, write_region_split
from .photos import SCIKIT_IMAGE_GREY_PHOTOS, regions, scikit_image_photographs


NAME = "grey-regions"
HELD_OUT = True


def build(
    output_dir: str | Path,
    train_per_class: int = 100,
    validation_per_class: int = 25,
    image_size: int = 64,
    seed: int = 0,
) -> Path:
    """Write the folder under `output_dir` (which must hold no train/ or validation/) and return it."""
    photos = scikit_image_photographs(SCIKIT_IMAGE_GREY_PHOTOS)
    sources = {label.replace("_", "-"): as_rgb(region) for label, region in regions(photos, 2).items()}
    root = Path(output_dir)
    write_region_split(root, sources, (train_per_class, validation_per_class), image_size, seed)
    return root
