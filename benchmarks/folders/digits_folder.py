"""
`digits-folder`: scikit-learn's 8 x 8 handwritten digits (1797 scans) as an imagefolder, the embedded digits'
rendering (dark ink on white, upscaled to `image_size`) and its fixed stratified split: `train/` is the 1200 training
digits, `validation/` the 597 test digits (`modeling_ijepa.data.load_digits_dataset`). Every scan is its own source, so
file names (`<index>.png`) declare no group; the monitor's hash split finds any near-identical scans.

    python -m benchmarks.folders digits-folder outputs/digits          # 10 classes, 1200 training + 597 validation
"""

from __future__ import annotations

from pathlib import Path

from modeling_ijepa.data import load_digits_dataset

from ._regions import check_empty


NAME = "digits-folder"
HELD_OUT = False


def build(output_dir: str | Path, image_size: int = 48) -> Path:
    """Write the folder under `output_dir` (which must hold no train/ or validation/) and return it."""
    root = Path(output_dir)
    check_empty(root)
    digits = load_digits_dataset(image_size)
    for split, part in (("train", "train"), ("validation", "test")):
        dataset = digits[part]
        for index, example in enumerate(dataset):
            folder = root / split / str(example["label"])
            folder.mkdir(parents=True, exist_ok=True)
            example["image"].save(folder / f"{index:04d}.png")
    return root
