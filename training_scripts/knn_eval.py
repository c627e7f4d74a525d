"""k-nearest-neighbour evaluation of a frozen I-JEPA encoder on average-pooled features of the last layer, or of the
last k layers concatenated (`--pooled_layers k`; each layer through the encoder's final LayerNorm, as DINOv2's
`n_last_blocks`).

Each evaluation image takes the `k` training images with the most similar features (cosine similarity). By default
the neighbours vote with weight `exp(similarity / temperature)` (the weighted k-NN of Wu et al. 2018, used by DINO);
`--majority_vote` gives every neighbour one vote instead. No training, no gradients.

Embedded digits (no data arguments), random-init baseline:

    python training_scripts/knn_eval.py --model_name_or_path random:vit_micro_patch4_48

Options also come from a YAML / JSON recipe, flags overriding it:

    python training_scripts/knn_eval.py --config knn.yaml --k 10

DINO's settings on the last 4 layers: `--k 20 --temperature 0.07 --pooled_layers 4`.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import torch
from transformers import set_seed

from modeling_ijepa.cli import EvaluationDataArguments, EvaluationModelArguments, RecipeArgumentParser
from modeling_ijepa.data import load_classification_datasets
from modeling_ijepa.evaluation import extract_features, freeze, knn_accuracy, load_encoder, save_metrics


logger = logging.getLogger(__name__)


@dataclass
class KnnArguments:
    """The k-NN classifier and the run."""

    output_dir: str = field(default="outputs/knn_eval", metadata={"help": "Where the metrics JSON is written."})
    k: int = field(default=20, metadata={"help": "Number of neighbours."})
    temperature: float = field(default=0.07, metadata={"help": "Temperature of the exp(similarity / T) vote weights."})
    majority_vote: bool = field(default=False, metadata={"help": "One vote per neighbour instead of weighted votes."})
    pooled_layers: int = field(
        default=1,
        metadata={
            "help": "Average-pool the last k layers and concatenate them (each through the final LayerNorm); "
            "1: the last layer only."
        },
    )
    batch_size: int = field(default=128, metadata={"help": "Batch size of the feature extraction."})
    dataloader_num_workers: int = field(default=0, metadata={"help": "Image decoding worker processes."})
    seed: int = field(default=42, metadata={"help": "Seed of the random-init encoder and the label subset."})
    device: str | None = field(default=None, metadata={"help": "Device of the encoder (default: cuda if available)."})

    def __post_init__(self) -> None:
        if self.k < 1:
            raise ValueError(f"--k must be at least 1, got {self.k}.")
        if self.temperature <= 0:
            raise ValueError(f"--temperature must be positive, got {self.temperature}; use --majority_vote instead.")
        if self.pooled_layers < 1:
            raise ValueError(f"--pooled_layers must be at least 1, got {self.pooled_layers}.")


def parse_args(
    argv: list[str] | None = None,
) -> tuple[EvaluationModelArguments, EvaluationDataArguments, KnnArguments]:
    """A recipe (`--config FILE`, or a single .yaml / .json argument) gives the defaults; flags override them."""
    parser = RecipeArgumentParser(
        (EvaluationModelArguments, EvaluationDataArguments, KnnArguments), prog="knn_eval.py", description=__doc__
    )
    return parser.parse(argv)[:3]


def main(argv: list[str] | None = None) -> dict:
    """Run the k-NN evaluation; returns the metrics (`accuracy` in [0, 1], ...), also written to `output_dir`."""
    model_args, data_args, knn_args = parse_args(argv)
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", level=logging.INFO)
    set_seed(knn_args.seed)
    device = torch.device(knn_args.device or ("cuda" if torch.cuda.is_available() else "cpu"))

    encoder, image_processor = load_encoder(model_args.model_name_or_path, knn_args.seed, model_args.cache_dir)
    freeze(encoder).to(device)
    train_dataset, eval_dataset, names = load_classification_datasets(
        **data_args.dataset_kwargs(), seed=knn_args.seed, image_size=encoder.config.image_size
    )
    extract = dict(
        batch_size=knn_args.batch_size,
        num_workers=knn_args.dataloader_num_workers,
        device=device,
        pooled_layers=knn_args.pooled_layers,
    )
    train_features, train_labels = extract_features(encoder, train_dataset, image_processor, **extract)
    eval_features, eval_labels = extract_features(encoder, eval_dataset, image_processor, **extract)

    temperature = None if knn_args.majority_vote else knn_args.temperature
    accuracy = knn_accuracy(train_features, train_labels, eval_features, eval_labels, knn_args.k, temperature)
    metrics = {
        "accuracy": accuracy,
        "k": knn_args.k,
        "temperature": temperature,
        "pooled_layers": knn_args.pooled_layers,
        "num_train_samples": len(train_labels),
        "num_eval_samples": len(eval_labels),
        "num_classes": len(names),
        "label_fraction": data_args.label_fraction,
        "model_name_or_path": model_args.model_name_or_path,
    }
    save_metrics(knn_args.output_dir, "knn", metrics)
    voting = "majority vote" if temperature is None else f"weighted vote, T={temperature}"
    print(
        f"{knn_args.k}-NN accuracy: {accuracy:.4f} ({voting}; {len(train_labels)} training / "
        f"{len(eval_labels)} evaluation images)"
    )
    return metrics


if __name__ == "__main__":
    main()
