#!/usr/bin/env python
"""
How much of the linear-probe margin over random init depends on the probe's regularisation, on the embedded digits.

For every pre-trained encoder given and for the same architecture at random initialisation (one network per seed), the
average-pooled features of the digits train / test split are standardised with training statistics and fitted with an
L2-regularised logistic regression (scikit-learn, L-BFGS, run to convergence) at several inverse strengths `C`. The
table shows test accuracy per encoder and `C`, and per `C` the margin (mean pre-trained - mean random) against the
seed-to-seed spread (largest max-min range of either group), the quantities `learning_check.py` compares, and the
same regression on the 64 raw 8x8 pixel values as a floor any useful encoder should reach.

    python -m benchmarks.learning_check      # writes outputs/learning_check/seed{0,1,2}/pretrain
    python -m benchmarks.probe_sweep --pretrained outputs/learning_check/seed{0,1,2}/pretrain --seeds 0 1 2
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import numpy as np


if not __package__:  # run as a file: import `benchmarks` / `training_scripts` from the repository root, as -m does
    sys.path[0] = str(Path(__file__).resolve().parents[1])

from benchmarks.learning_check import gain_and_spread  # noqa: E402  (the check's own margin and spread)


os.environ.setdefault("HF_HUB_OFFLINE", "1")


def standardise(train_x: np.ndarray, test_x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Both splits standardised per feature with the training split's mean and (sample) standard deviation."""
    mean, std = train_x.mean(0), np.maximum(train_x.std(0, ddof=1), 1e-12)
    return (train_x - mean) / std, (test_x - mean) / std


def encoder_features(model_name_or_path: str, seed: int, datasets, random_init: bool) -> tuple[np.ndarray, ...]:
    """
    Standardised `(train_x, train_y, test_x, test_y)` of one encoder: the saved encoder, or with `random_init` a fresh
    network of its configuration initialised under `seed` (the network `learning_check.py` probes as random init).
    """
    from modeling_ijepa.evaluation import extract_features, freeze, load_encoder

    encoder, image_processor = load_encoder(model_name_or_path, seed, random_init=random_init)
    freeze(encoder)
    train_x, train_y = extract_features(encoder, datasets["train"], image_processor)
    test_x, test_y = extract_features(encoder, datasets["test"], image_processor)
    train_x, test_x = standardise(train_x.numpy(), test_x.numpy())
    return train_x, train_y.numpy(), test_x, test_y.numpy()


def raw_pixel_features() -> tuple[np.ndarray, ...]:
    """The digits' 64 raw 8x8 pixel values on the same train / test split, standardised like the encoder features."""
    from sklearn.datasets import load_digits

    from modeling_ijepa.data import digits_split

    digits = load_digits()
    train_index, test_index = (np.sort(index) for index in digits_split(digits.target))
    train_x, test_x = standardise(digits.data[train_index], digits.data[test_index])
    return train_x, digits.target[train_index], test_x, digits.target[test_index]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pretrained", nargs="+", required=True, help="Pre-trained encoder folders (AutoModel).")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="Seeds of the random-init networks.")
    parser.add_argument("--C", type=float, nargs="+", default=[0.01, 0.1, 1.0, 10.0, 100.0], dest="inverse_strengths")
    args = parser.parse_args(argv)

    from sklearn.linear_model import LogisticRegression
    from transformers import AutoConfig

    from modeling_ijepa.data import load_classification_datasets

    # The embedded digits, sized for the encoders, as linear_probe.py / knn_eval.py load them with no data flags.
    config = AutoConfig.from_pretrained(args.pretrained[0])
    train_dataset, test_dataset, _ = load_classification_datasets(image_size=config.image_size)
    datasets = {"train": train_dataset, "test": test_dataset}
    encoders = [("pretrained", path, seed) for path, seed in zip(args.pretrained, args.seeds)]
    encoders += [("random", args.pretrained[0], seed) for seed in args.seeds]

    accuracy: dict[tuple[str, int], list[float]] = {}
    for kind, name, seed in encoders:
        train_x, train_y, test_x, test_y = encoder_features(name, seed, datasets, random_init=kind == "random")
        row = []
        for c in args.inverse_strengths:
            probe = LogisticRegression(C=c, max_iter=10000).fit(train_x, train_y)
            row.append(100.0 * probe.score(test_x, test_y))
        accuracy[kind, seed] = row
        scores = "  ".join(f"C={c:g} {a:.1f}" for c, a in zip(args.inverse_strengths, row))
        print(f"{kind:<10} seed {seed}: {scores}", flush=True)

    train_x, train_y, test_x, test_y = raw_pixel_features()
    raw = [
        100.0 * LogisticRegression(C=c, max_iter=10000).fit(train_x, train_y).score(test_x, test_y)
        for c in args.inverse_strengths
    ]
    print("raw 8x8 pixels (no encoder): " + "  ".join(f"C={c:g} {a:.1f}" for c, a in zip(args.inverse_strengths, raw)))

    print(
        "\n| C | "
        + " | ".join(f"pre-trained s{s}" for s in args.seeds[: len(args.pretrained)])
        + " | "
        + " | ".join(f"random s{s}" for s in args.seeds)
        + " | margin | spread | raw pixels |"
    )
    print("|---" * (4 + len(args.pretrained) + len(args.seeds)) + "|")
    for index, c in enumerate(args.inverse_strengths):
        groups = {
            kind: [accuracy[kind, s][index] for k, s in accuracy if k == kind] for kind in ("pretrained", "random")
        }
        margin, spread = gain_and_spread(groups["pretrained"], groups["random"])
        cells = " | ".join(f"{a:.1f}" for a in groups["pretrained"] + groups["random"])
        print(f"| {c:g} | {cells} | {margin:+.1f} | {spread:.1f} | {raw[index]:.1f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
