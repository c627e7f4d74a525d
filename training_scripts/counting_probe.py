"""Counting probe of a frozen I-JEPA encoder: how much local information (where things are) its features keep, offline.

The data are canvases of the encoder's input size holding 1 to `--max_count` handwritten digits (the embedded digits'
scans, train and test canvases from disjoint scans) at random non-overlapping positions, built deterministically from
`--seed` (`modeling_ijepa.evaluation.counting`); the label is the number of digits. Frozen probes predict it: a linear
head on average-pooled features and the attentive probe on the patch tokens (and k-NN), each with its learning rate
and weight decay chosen on a validation split of the training canvases (`frozen_probe_scores`).

    python training_scripts/counting_probe.py --model_name_or_path outputs/ijepa-digits
    python training_scripts/counting_probe.py --model_name_or_path outputs/ijepa-digits --random_init   # baseline
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import torch
from transformers import set_seed

from modeling_ijepa.cli import EvaluationModelArguments, RecipeArgumentParser
from modeling_ijepa.evaluation import load_encoder, save_metrics
from modeling_ijepa.evaluation.counting import build_counting_splits
from modeling_ijepa.evaluation.scores import PROBES, frozen_probe_scores


@dataclass
class CountingArguments:
    """The counting data, the probes and the run."""

    output_dir: str = field(default="outputs/counting_probe", metadata={"help": "Where the metrics JSON is written."})
    num_train: int = field(default=1200, metadata={"help": "Training canvases."})
    num_test: int = field(default=600, metadata={"help": "Test canvases (from digit scans no training canvas uses)."})
    max_count: int = field(default=5, metadata={"help": "Canvases hold 1 to max_count digits (the classes)."})
    digit_sizes: list[int] | None = field(
        default=None,
        metadata={"help": "Smallest and largest digit size in pixels (default: image size / 8 and / 3)."},
    )
    probes: list[str] = field(
        default_factory=lambda: list(PROBES), metadata={"help": "Probes to run, among linear, attentive, knn."}
    )
    linear_epochs: float = field(default=100.0, metadata={"help": "Epochs of the linear heads."})
    attentive_epochs: float = field(default=20.0, metadata={"help": "Epochs of the attentive heads."})
    pooled_layers: int = field(default=1, metadata={"help": "Probe the last k layers (concatenated)."})
    random_init: bool = field(
        default=False, metadata={"help": "Probe a fresh network of the checkpoint's architecture (seeded by --seed)."}
    )
    seed: int = field(default=0, metadata={"help": "Seed of the canvases, the validation split and the heads."})
    device: str | None = field(default=None, metadata={"help": "Device (default: cuda if available)."})

    def __post_init__(self) -> None:
        unknown = set(self.probes) - set(PROBES)
        if unknown:
            raise ValueError(f"--probes takes {' '.join(PROBES)}, got {' '.join(sorted(unknown))}.")
        if self.digit_sizes is not None and len(self.digit_sizes) != 2:
            raise ValueError(f"--digit_sizes takes two values (smallest largest), got {self.digit_sizes}.")
        if self.max_count < 2:
            raise ValueError(f"--max_count must be at least 2 (one class per count), got {self.max_count}.")


def main(argv: list[str] | None = None) -> dict:
    """Build the counting splits, run the probes; returns the metrics, also written to `output_dir`."""
    parser = RecipeArgumentParser(
        (EvaluationModelArguments, CountingArguments), prog="counting_probe.py", description=__doc__
    )
    model_args, args = parser.parse(argv)[:2]
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", level=logging.INFO)
    set_seed(args.seed)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    encoder, image_processor = load_encoder(
        model_args.model_name_or_path, args.seed, model_args.cache_dir, random_init=args.random_init
    )
    image_size = encoder.config.image_size
    splits = build_counting_splits(
        args.num_train,
        args.num_test,
        max_count=args.max_count,
        image_size=image_size if isinstance(image_size, int) else image_size[0],
        digit_sizes=tuple(args.digit_sizes) if args.digit_sizes else None,
        seed=args.seed,
    )
    scores = frozen_probe_scores(
        encoder,
        splits["train"],
        splits["test"],
        image_processor=image_processor,
        probes=args.probes,
        seed=args.seed,
        layers=args.pooled_layers,
        linear_epochs=args.linear_epochs,
        attentive_epochs=args.attentive_epochs,
        device=device,
    )
    metrics = {
        **scores,
        "max_count": args.max_count,
        "num_train_samples": args.num_train,
        "num_eval_samples": args.num_test,
        "random_init": args.random_init,
        "model_name_or_path": model_args.model_name_or_path,
    }
    save_metrics(args.output_dir, "counting_probe", metrics)
    chance = 1.0 / args.max_count
    print(
        "counting accuracy: "
        + ", ".join(f"{probe} {scores[probe]:.4f}" for probe in args.probes)
        + f" (chance {chance:.2f}; {args.num_train} training / {args.num_test} test canvases)"
    )
    return metrics


if __name__ == "__main__":
    main()
