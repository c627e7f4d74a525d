"""
`textures`: texture and material identity, with validation crops from parts of each texture that training never saw.

Six textured images that scikit-image ships in `skimage.data` (brick wall, grass, gravel, the Hubble deep field, a
stained tissue section, a retina fundus); the class is the texture. Each source is split by rows: training crops from
its top 75 %, validation crops from its bottom 25 % (a 2 % gap between, so no crop shares a pixel with the other
split). Crops are random squares (50-100 % of a tile's shorter side) inside one of 4 tiles per part, resized to
`image_size`, flipped at random; named `<texture>-<part>-t<tile>__<index>.png` (the monitor's group convention).

    python -m benchmarks.folders textures outputs/textures      # 6 classes, 200 training + 50 validation each
"""

from __future__ import annotations

from pathlib import Path

from ._regions import as_rgb, write_region_split


NAME = "textures"
HELD_OUT = False
SOURCES = ("brick", "grass", "gravel", "hubble_deep_field", "immunohistochemistry", "retina")


def build(
    output_dir: str | Path,
    train_per_class: int = 200,
    validation_per_class: int = 50,
    image_size: int = 64,
    seed: int = 0,
) -> Path:
    """Write the folder under `output_dir` (which must hold no train/ or validation/) and return it."""
    try:
        import skimage.data
    except ImportError as error:
        raise ImportError("The textures folder needs scikit-image (`pip install scikit-image`).") from error
    sources = {name.replace("_", "-"): as_rgb(getattr(skimage.data, name)()) for name in SOURCES}
    root = Path(output_dir)
    write_region_split(root, sources, (train_per_class, validation_per_class), image_size, seed)
    return root
