"""
`photo-regions`: regions of colour photographs, with validation crops from parts of each region that training never
saw.

Seven photographs shipped by installed packages (scikit-image's astronaut, coffee, cat and rocket; scikit-learn's
`china.jpg` and `flower.jpg`; matplotlib's `grace_hopper.jpg`), each cut into a 2 x 2 grid of regions; the class is the
region (`<photo>-r<row>c<col>`), so classes of one photo share its colours. Unlike the `shipped` / `scikit-image`
folders of `photos.py` (whose training and validation crops overlap), each region is split by rows: training crops
from its top 75 %, validation crops from its bottom 25 %, 4 tiles per part, crops named
`<region>-<part>-t<tile>__<index>.png`.

    python -m benchmarks.folders photo-regions outputs/photo-regions   # 28 classes, 100 training + 25 validation
"""

from __future__ import annotations

from pathlib import Path

from ._regions import as_rgb, write_region_split
from .photos import regions, scikit_image_photographs, shipped_photographs


NAME = "photo-regions"
HELD_OUT = False
SCIKIT_IMAGE_SOURCES = ("astronaut", "coffee", "chelsea", "rocket")


def build(
    output_dir: str | Path,
    train_per_class: int = 100,
    validation_per_class: int = 25,
    image_size: int = 64,
    seed: int = 0,
) -> Path:
    """Write the folder under `output_dir` (which must hold no train/ or validation/) and return it."""
    photos = {**shipped_photographs(), **scikit_image_photographs(SCIKIT_IMAGE_SOURCES)}
    sources = {label.replace("_", "-"): as_rgb(region) for label, region in regions(photos, 2).items()}
    root = Path(output_dir)
    write_region_split(root, sources, (train_per_class, validation_per_class), image_size, seed)
    return root
