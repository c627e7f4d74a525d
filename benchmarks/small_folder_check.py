#!/usr/bin/env python
"""
Does pre-training beat random init on small image sets that are not the embedded digits? For every dataset, recipe and
seed: pre-train with `pretrain.py --config RECIPE`, then linear-probe and 20-NN the pre-trained target encoder and the
same architecture at random init (the functions of `learning_check.py`), all on CPU and offline.

    python -m benchmarks.small_folder_check          # digits + shipped photos, tiny-cpu vs small-folder, 3 seeds
    python -m benchmarks.small_folder_check --datasets scikit-image --recipes small-folder
    python -m benchmarks.small_folder_check --datasets /path/to/folder   # your own: train/ and validation/ sub-folders

Datasets: `digits` (the embedded default), `shipped`, `scikit-image` and `scikit-image-grey` (real-photo
imagefolders that `benchmarks/photo_folder.py` builds into `<output_dir>/data/`), or the path of an imagefolder with
`train/` and `validation/` sub-folders (one sub-folder per class in each). Pre-training reads only `train/` (its
labels feed the k-NN monitor of recipes that have one); the evaluations fit on `train/` and score `validation/`.

Every run writes its `result.json`; a repeated command skips the runs already done, so seeds and datasets can be added
later. Prints, per dataset, mean ± std over seeds of both evaluations and, per recipe, the verdict of the learning
check: the mean gain over random init must exceed the seed-to-seed spread (the largest max-min range over seeds of
either encoder) on both metrics. Exits with status 1 unless every recipe passes on every dataset. Writes
`small_folder_check.json` / `.md` to `--output_dir`.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path


if not __package__:  # run as a file: import `benchmarks` / `training_scripts` from the repository root, as -m does
    sys.path[0] = str(Path(__file__).resolve().parents[1])

from benchmarks.learning_check import (  # noqa: E402
    METRICS,
    evaluate_encoder,
    gain_and_spread,
    pretrain_seed,
    pretrain_settings,
    run_once,
)
from benchmarks.photo_folder import PHOTO_SETS, write_photo_folder  # noqa: E402


def dataset_folder(name: str, output_dir: Path) -> Path | None:
    """The imagefolder of dataset `name` (built on first use for the photo sets), or `None` for the digits."""
    if name == "digits":
        return None
    if name in PHOTO_SETS:
        folder = output_dir / "data" / name
        if not (folder / "validation").is_dir():
            write_photo_folder(folder, photos=name)
        return folder
    folder = Path(name)
    for split in ("train", "validation"):
        if not (folder / split).is_dir():
            raise FileNotFoundError(
                f"Dataset {name!r} is neither 'digits', one of {PHOTO_SETS}, nor a folder with {split}/ inside: pass "
                "an imagefolder with train/<class>/ and validation/<class>/ sub-folders."
            )
    return folder


def dataset_label(name: str) -> str:
    return name if name == "digits" or name in PHOTO_SETS else Path(name).name


def recipe_label(recipe: str) -> str:
    """A shipped recipe's name, or a recipe file's stem."""
    return Path(recipe).stem


def evaluation_data_args(folder: Path | None) -> list[str]:
    """The evaluation scripts' data flags for a dataset folder (none for the embedded digits)."""
    if folder is None:
        return []
    return ["--train_dir", str(folder / "train"), "--validation_dir", str(folder / "validation")]


def random_init_row(seed: int, base: Path, preset: str, data_args: list[str]) -> dict:
    """Linear probe and 20-NN of `preset` at random init under `seed`, cached in `base/random-seed{seed}`."""
    from training_scripts import knn_eval, linear_probe

    random_dir = base / f"random-seed{seed}"
    model = f"random:{preset}"
    return run_once(
        random_dir,
        lambda: {"seed": seed, **evaluate_encoder(model, seed, random_dir, linear_probe, knn_eval, data_args)},
        {"model": model},
    )


def metric_verdicts(pretrained: list[dict], random_init: list[dict]) -> dict[str, dict]:
    """Per metric, the learning check's gain, spread and verdict from per-seed rows of both encoders."""
    verdicts = {}
    for metric, _ in METRICS:
        gain, spread = gain_and_spread([row[metric] for row in pretrained], [row[metric] for row in random_init])
        verdicts[metric] = {"gain": gain, "spread": spread, "pass": gain > spread}
    return verdicts


def mean_std(values: list[float]) -> str:
    std = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{statistics.mean(values):.1f} ± {std:.1f}"


def score_cells(rows: list[dict], verdict: dict | None = None) -> str:
    """
    Markdown cells of one encoder over seeds: mean ± std of every metric, then (with the [`metric_verdicts`] of the
    rows) gain / spread of every metric and PASS or FAIL; left empty without a verdict (random init).
    """
    cells = " | ".join(mean_std([row[metric] for row in rows]) for metric, _ in METRICS)
    if verdict is None:
        return cells + " |" * (len(METRICS) + 1)
    gains = " | ".join(f"{verdict[m]['gain']:+.1f} / {verdict[m]['spread']:.1f}" for m, _ in METRICS)
    return f"{cells} | {gains} | {'PASS' if all(verdict[m]['pass'] for m, _ in METRICS) else 'FAIL'}"


def check_dataset(name: str, recipes: list[str], seeds: list[int], args: argparse.Namespace) -> dict:
    """Per-seed results of every recipe and of random init on one dataset, plus the verdict of every recipe."""
    from training_scripts import knn_eval, linear_probe

    output_dir = Path(args.output_dir)
    folder = dataset_folder(name, output_dir)
    data_args = evaluation_data_args(folder)
    base = output_dir / dataset_label(name)
    results = {"random": [], **{recipe_label(recipe): [] for recipe in recipes}}
    for seed in seeds:
        results["random"].append(random_init_row(seed, base, args.preset, data_args))
        for recipe in recipes:
            run_dir = base / f"{recipe_label(recipe)}-seed{seed}"

            pretrain_args = ["--config", recipe, *args.pretrain_args]
            if folder is not None:
                pretrain_args += ["--train_dir", str(folder / "train")]

            def pretrained(seed=seed, run_dir=run_dir, pretrain_args=pretrain_args):
                start = time.monotonic()
                encoder = pretrain_seed(seed, run_dir / "pretrain", pretrain_args)
                minutes = (time.monotonic() - start) / 60
                scores = evaluate_encoder(encoder, seed, run_dir, linear_probe, knn_eval, data_args)
                return {"seed": seed, "pretrain_minutes": minutes, **scores}

            results[recipe_label(recipe)].append(run_once(run_dir, pretrained, pretrain_settings(pretrain_args)))
            row, random_row = results[recipe_label(recipe)][-1], results["random"][-1]
            print(
                f"[{dataset_label(name)} / {recipe} / seed {seed}] linear {row['linear']:.1f} 20-NN {row['knn']:.1f} "
                f"(random init: linear {random_row['linear']:.1f} 20-NN {random_row['knn']:.1f})",
                flush=True,
            )
    verdicts = {
        recipe_label(recipe): metric_verdicts(results[recipe_label(recipe)], results["random"]) for recipe in recipes
    }
    return {"runs": results, "verdicts": verdicts}


def results_table(checks: dict[str, dict], seeds: list[int]) -> list[str]:
    """Markdown: per dataset and encoder, mean ± std of both metrics, then gain / spread / verdict per recipe."""
    lines = [
        f"Seeds {', '.join(map(str, seeds))}; gain = mean over seeds minus random init's; spread = largest max-min "
        "range over seeds of either encoder; PASS when gain > spread.",
        "",
        "| dataset | encoder | linear probe (%) | 20-NN (%) | linear gain / spread | 20-NN gain / spread | verdict |",
        "|---|---|---|---|---|---|---|",
    ]
    for name, check in checks.items():
        runs = check["runs"]
        lines.append(f"| {name} | random init | {score_cells(runs['random'])} |")
        for recipe, verdict in check["verdicts"].items():
            lines.append(f"| {name} | `{recipe}` | {score_cells(runs[recipe], verdict)} |")
    return lines


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--datasets", nargs="+", default=["digits", "shipped"], help=f"digits, {', '.join(PHOTO_SETS)} or folders."
    )
    parser.add_argument("--recipes", nargs="+", default=["tiny-cpu", "small-folder"], help="pretrain.py --config.")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--output_dir", default="outputs/small_folder_check")
    parser.add_argument("--preset", default="vit_micro_patch4_48", help="Architecture of the random-init baseline.")
    parser.add_argument("--pretrain_args", nargs=argparse.REMAINDER, default=[], help="Extra pretrain.py flags.")
    args = parser.parse_args(argv)
    if len(args.seeds) < 2:
        parser.error("The verdict compares the gain with the seed-to-seed spread: pass at least 2 --seeds.")

    checks = {dataset_label(name): check_dataset(name, args.recipes, args.seeds, args) for name in args.datasets}
    lines = results_table(checks, args.seeds)
    print("\n".join(lines))
    output_dir = Path(args.output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    (output_dir / "small_folder_check.json").write_text(json.dumps(checks, indent=2))
    (output_dir / "small_folder_check.md").write_text("\n".join(lines) + "\n")
    passed = all(v[m]["pass"] for check in checks.values() for v in check["verdicts"].values() for m, _ in METRICS)
    return 0 if passed else 1


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    sys.exit(main())
