"""
One runner for the learning evidence: pre-train over seeds, evaluate, compare with random init, print a table.

    python -m benchmarks.study learning-check                       # the spec benchmarks/studies/learning-check.yaml
    python -m benchmarks.study small-folders --seeds 3 4 5 --datasets scikit-image --arms small-folder
    python -m benchmarks.study --list

A study is a small YAML file in `benchmarks/studies/` (keys in `SPEC_KEYS`): the data sets (`digits`, a folder of the
`benchmarks.folders` registry built into `<output_dir>/data/`, or an imagefolder path with train/ and validation/),
the arms (a `pretrain.py` recipe, `IJepaConfig` overrides, extra flags), seeds, steps, the evaluators (the registry
of `benchmarks/evaluators.py`), the random-init baseline, and the metrics the verdict is applied to.

Every pre-training run and every evaluation is cached in its own folder (`result.json`), named after a digest of
what it depends on (flags, the recipe's values, the data set, the evaluators, the seed): a repeated command redoes
nothing, seeds or arms can be added later, a changed setting runs anew in a new folder, and studies sharing a
pre-training (same recipe, flags and seed) share its folder. `--no-cache` recomputes.

Verdict (one rule for every study): per metric, the mean gain over random init must exceed the seed-to-seed spread
(the largest max-min range over seeds of either encoder). Exits with status 1 unless every row in `must_pass` passes.
Writes `<output_dir>/<study>/result.json` and `table.md`.
"""

from __future__ import annotations

import argparse
import difflib
import hashlib
import inspect
import itertools
import json
import math
import os
import shutil
import statistics
import sys
import time
from pathlib import Path

import yaml


if not __package__:  # run as a file: import `benchmarks` / `training_scripts` from the repository root, as -m does
    sys.path[0] = str(Path(__file__).resolve().parents[1])

from benchmarks import folders  # noqa: E402
from benchmarks.evaluators import EVALUATORS, Target, step_times  # noqa: E402


STUDIES = Path(__file__).resolve().parent / "studies"
SPEC_KEYS = {
    "description": str,
    "reproduces": str,  # the RESULTS.md section
    "datasets": list,
    "arms": dict,  # label -> {recipe, overrides, args}
    "seeds": list,
    "steps": (int, type(None)),  # pretrain.py --max_steps; None: the recipe's
    "evaluators": list,  # names, or {name: options}
    "baseline": (str, type(None)),  # random:<preset>, or None for no baseline and no verdict
    "verdict": list,  # metrics compared with the baseline (default: every metric both have)
    "subsets": (int, type(None)),  # also count the passing k-seed subsets
    "must_pass": (list, type(None)),  # rows ("encoder" or "encoder [view]") whose verdict sets the exit status
    "step_time": (dict, type(None)),  # {batch_size, steps, repeats}: time a step of every arm's overrides
}
DEFAULTS = {"datasets": ["digits"], "seeds": [0, 1, 2], "steps": None, "baseline": "random:vit_micro_patch4_48"}
ARM_KEYS = {"recipe": str, "overrides": dict, "args": list}


class SpecError(ValueError):
    pass


def unknown(kind: str, name: str, known) -> SpecError:
    close = difflib.get_close_matches(str(name), list(known), n=1)
    hint = f" Did you mean {close[0]!r}?" if close else ""
    return SpecError(f"Unknown {kind} {name!r}.{hint} Known: {', '.join(sorted(map(str, known)))}.")


def check_keys(values: dict, allowed: dict, where: str) -> None:
    for key, value in values.items():
        if key not in allowed:
            raise unknown(f"key in {where}:", key, allowed)
        if not isinstance(value, allowed[key]):
            raise SpecError(f"{where}: {key!r} must be {allowed[key]}, got {value!r}.")


def parse_spec(values: dict, name: str = "spec") -> dict:
    """Validate a study spec (the parsed YAML) and fill in its defaults; errors name the key and the fix."""
    if not isinstance(values, dict):
        raise SpecError(f"{name}: a study spec is a mapping of {', '.join(SPEC_KEYS)}.")
    check_keys(values, SPEC_KEYS, name)
    spec = {**DEFAULTS, **values}
    if not spec.get("arms"):
        raise SpecError(f"{name}: needs 'arms', e.g. arms: {{tiny-cpu: {{recipe: tiny-cpu}}}}.")
    for label, arm in spec["arms"].items():
        check_keys(arm or {}, ARM_KEYS, f"{name}: arm {label!r}")
        spec["arms"][label] = {"recipe": "tiny-cpu", "overrides": {}, "args": [], **(arm or {})}
    if not all(isinstance(seed, int) for seed in spec["seeds"]):
        raise SpecError(f"{name}: seeds must be integers, got {spec['seeds']}.")
    evaluators = []
    for entry in spec.get("evaluators", []):
        evaluator, options = (entry, {}) if isinstance(entry, str) else next(iter(entry.items()))
        if evaluator not in EVALUATORS:
            raise unknown("evaluator", evaluator, EVALUATORS)
        parameters = list(inspect.signature(EVALUATORS[evaluator]).parameters)[1:]
        for option in options or {}:
            if option not in parameters:
                raise unknown(f"option of evaluator {evaluator!r}:", option, parameters)
        evaluators.append((evaluator, options or {}))
    spec["evaluators"] = evaluators
    return spec


def load_spec(name: str) -> dict:
    """The spec `benchmarks/studies/NAME.yaml`, or a YAML file's path."""
    path = Path(name) if name.endswith((".yaml", ".yml")) else STUDIES / f"{name}.yaml"
    if not path.is_file():
        raise unknown("study", name, study_names())
    return parse_spec(yaml.safe_load(path.read_text()), path.stem)


def study_names() -> list[str]:
    return sorted(path.stem for path in STUDIES.glob("*.yaml"))


# ---------------------------------------------------------------------------------------------------------------------
# The cache
# ---------------------------------------------------------------------------------------------------------------------
def digest(settings: dict) -> str:
    return hashlib.sha256(json.dumps(settings, sort_keys=True, default=str).encode()).hexdigest()[:10]


def cached(parent: Path, label: str, settings: dict, compute, use_cache: bool = True) -> tuple[dict, Path]:
    """
    `compute(folder)` once per `settings`: it runs in `parent/<label>-<digest of settings>/`, its result is kept there
    in `result.json` (with the settings) and read back by later calls. Returns `(result, folder)`.
    """
    folder = parent / f"{label}-{digest(settings)}"
    path = folder / "result.json"
    if use_cache and path.is_file():
        return json.loads(path.read_text())["result"], folder
    shutil.rmtree(folder, ignore_errors=True)  # never resume a half-done run
    folder.mkdir(parents=True)
    result = compute(folder)
    path.write_text(json.dumps({"settings": settings, "result": result}, indent=2))
    return result, folder


def recipe_digest(recipe: str) -> str:
    """A digest of a recipe's values, so that runs of an edited recipe are not reused (a comment changes nothing)."""
    from modeling_ijepa.cli import load_recipe, resolve_recipe

    return digest(load_recipe(resolve_recipe(recipe)))


# ---------------------------------------------------------------------------------------------------------------------
# Running
# ---------------------------------------------------------------------------------------------------------------------
def dataset_folder(name: str, output_dir: Path) -> Path | None:
    """The imagefolder of `name` (registry folders built on first use), or `None` for the embedded digits."""
    if name == "digits":
        return None
    if name in folders.names():
        folder = output_dir / "data" / name
        if not (folder / "validation").is_dir():
            shutil.rmtree(folder, ignore_errors=True)
            folders.build(name, folder)
        return folder
    for split in ("train", "validation"):
        if not (Path(name) / split).is_dir():
            raise FileNotFoundError(
                f"Dataset {name!r} is neither 'digits', a folder of the registry ({', '.join(folders.names())}), nor "
                f"an imagefolder with {split}/ inside: pass one with train/<class>/ and validation/<class>/."
            )
    return Path(name)


def pretrain_args(arm: dict, steps: int | None, folder: Path | None) -> list[str]:
    overrides = ",".join(f"{key}={json.dumps(value)}" for key, value in arm["overrides"].items())
    return [
        "--config",
        arm["recipe"],
        *(["--max_steps", str(steps)] if steps else []),
        *(["--config_overrides", overrides] if overrides else []),
        *map(str, arm["args"]),
        *(["--train_dir", str(folder / "train")] if folder else []),
    ]


def pretrain(args: list[str], seed: int, run_dir: Path) -> dict:
    """`training_scripts.pretrain.main` in this process; the saved encoder and the step it comes from."""
    from training_scripts import pretrain as script

    start = time.monotonic()
    encoder = script.main([*args, "--seed", str(seed), "--output_dir", str(run_dir / "run"), "--disable_tqdm", "true"])
    state = json.loads((run_dir / "run" / "trainer_state.json").read_text())
    best = state.get("best_model_checkpoint")
    step = int(best.rsplit("-", 1)[1]) if best else state["global_step"]
    return {"encoder": str(Path(encoder).resolve()), "step": step, "minutes": (time.monotonic() - start) / 60}


def evaluate(spec: dict, target: Target) -> dict:
    metrics = {}
    for name, options in spec["evaluators"]:
        out = Target(target.model, target.seed, target.data_args, target.out / name, target.pretrain_dir)
        metrics.update(EVALUATORS[name](out, **options))
    return metrics


def run_study(spec: dict, output_dir: Path, name: str, use_cache: bool = True) -> dict[tuple[str, str], dict]:
    """Every run of the spec: `{(dataset, encoder): {seed: metrics}}`, random init first per data set."""
    runs: dict[tuple[str, str], dict] = {}
    evaluations = {"evaluators": spec["evaluators"]}
    for dataset in spec["datasets"]:
        folder = dataset_folder(dataset, output_dir)
        label = dataset if folder is None or dataset in folders.names() else folder.name
        data_args = (
            ["--train_dir", str(folder / "train"), "--validation_dir", str(folder / "validation")] if folder else []
        )
        results = output_dir / name / label
        for seed in spec["seeds"]:
            if spec["baseline"]:
                settings = {**evaluations, "model": spec["baseline"], "dataset": dataset, "seed": seed}
                metrics, _ = cached(
                    results,
                    f"random-init-seed{seed}",
                    settings,
                    lambda out: evaluate(spec, Target(spec["baseline"], seed, data_args, out)),
                    use_cache,
                )
                runs.setdefault((label, "random init"), {})[seed] = metrics
                print(f"[{label} / random init / seed {seed}] {summary(metrics)}", flush=True)
            for arm_label, arm in spec["arms"].items():
                args = pretrain_args(arm, spec["steps"], folder)
                settings = {"pretrain_args": args, "recipe": recipe_digest(arm["recipe"]), "seed": seed}
                trained, run_dir = cached(
                    output_dir / "pretrain" / label,
                    f"seed{seed}",
                    settings,
                    lambda d: pretrain(args, seed, d),
                    use_cache,
                )
                settings = {**evaluations, "pretrain": run_dir.name, "dataset": dataset, "seed": seed}

                def compute(out):
                    target = Target(trained["encoder"], seed, data_args, out, run_dir / "run")
                    return {"step": trained["step"], **evaluate(spec, target)}

                metrics, _ = cached(results, f"{arm_label}-seed{seed}", settings, compute, use_cache)
                runs.setdefault((label, arm_label), {})[seed] = metrics
                print(f"[{label} / {arm_label} / seed {seed}] {summary(metrics)}", flush=True)
    return runs


def summary(metrics: dict) -> str:
    return ", ".join(f"{key} {value:.1f}" for key, value in metrics.items() if is_number(value))


def is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


# ---------------------------------------------------------------------------------------------------------------------
# The verdict and the table
# ---------------------------------------------------------------------------------------------------------------------
def verdict(pretrained: list[float], baseline: list[float], subset_size: int | None = None) -> dict:
    """
    The learning check on per-seed scores (seeds in the same order): the mean gain over the baseline, the seed-to-seed
    spread (largest max-min range of either), `pass` (gain > spread; `None` with fewer than 2 seeds: no spread), the
    per-seed gains, the gain's standard error (the two variances added), and with `subset_size` how many of the
    `subset_size`-seed subsets pass when run alone.
    """
    if len(pretrained) != len(baseline) or not pretrained:
        raise ValueError(f"The verdict needs the same seeds for both: {len(pretrained)} and {len(baseline)} scores.")
    gain = statistics.mean(pretrained) - statistics.mean(baseline)
    spread = max(max(values) - min(values) for values in (pretrained, baseline))
    result = {"gain": gain, "spread": spread, "pass": gain > spread if len(pretrained) > 1 else None}
    result["paired_gains"] = [p - b for p, b in zip(pretrained, baseline)]
    if len(pretrained) > 1:
        result["standard_error"] = math.sqrt(
            (statistics.variance(pretrained) + statistics.variance(baseline)) / len(pretrained)
        )
    if subset_size:
        if not 2 <= subset_size <= len(pretrained):
            raise ValueError(f"Counting {subset_size}-seed subsets needs 2 to {len(pretrained)} seeds per subset.")
        subsets = list(itertools.combinations(range(len(pretrained)), subset_size))
        passing = [verdict([pretrained[i] for i in s], [baseline[i] for i in s])["pass"] for s in subsets]
        result["subsets"] = f"{sum(passing)} of {len(subsets)}"
    return result


def rows_of(runs: dict[tuple[str, str], dict]) -> dict[tuple[str, str], dict[str, dict]]:
    """Split metrics `name[view]` into rows `encoder [view]`: `{(dataset, row): {metric: {seed: value}}}`."""
    rows: dict[tuple[str, str], dict[str, dict]] = {}
    for (dataset, encoder), seeds in runs.items():
        views = {key.partition("[")[2].rstrip("]") for metrics in seeds.values() for key in metrics if "[" in key}
        for view in [None, *sorted(views)]:
            row = encoder if view is None else f"{encoder} [{view}]"
            for seed, metrics in seeds.items():
                for key, value in metrics.items():
                    metric, _, key_view = key.partition("[")
                    if is_number(value) and (key_view.rstrip("]") or None) == view:
                        rows.setdefault((dataset, row), {}).setdefault(metric, {})[seed] = value
    return rows


def verdicts_of(spec: dict, rows: dict) -> dict[tuple[str, str], dict[str, dict]]:
    """The verdict of every metric of every row against the baseline row of its data set."""
    verdicts = {}
    for (dataset, row), metrics in rows.items():
        baseline = rows.get((dataset, "random init"))
        if row == "random init" or baseline is None:
            continue
        names = [m for m in spec.get("verdict") or metrics if m in metrics and m in baseline and m != "step"]
        seeds = [seed for seed in spec["seeds"] if seed in next(iter(metrics.values()), {})]
        verdicts[dataset, row] = {
            m: verdict([metrics[m][s] for s in seeds], [baseline[m][s] for s in seeds], spec.get("subsets"))
            for m in names
        }
    return verdicts


def mean_std(values: list[float]) -> str:
    return f"{statistics.mean(values):.1f} ± {statistics.stdev(values) if len(values) > 1 else 0.0:.1f}"


def cell(metric: str, values: list) -> str:
    """The summary cell of a metric over seeds: the steps listed, else mean ± std."""
    return " ".join(map(str, values)) if metric == "step" else mean_std(values)


def verdict_word(checks: dict) -> str:
    passes = [check["pass"] for check in checks.values()]
    return "–" if not passes or None in passes else ("PASS" if all(passes) else "FAIL")


def table(rows: dict, verdicts: dict) -> list[str]:
    """Markdown: per row mean ± std of every metric (saved steps listed), gain / spread per verdict metric, verdict;
    then every metric per seed."""
    metrics = list(dict.fromkeys(m for values in rows.values() for m in values))
    checked = list(dict.fromkeys(m for checks in verdicts.values() for m in checks))
    subsets = any("subsets" in check for checks in verdicts.values() for check in checks.values())
    header = ["dataset", "encoder", *metrics, *(f"{m} gain / spread" for m in checked), "verdict"]
    header += [f"{m} passing subsets" for m in checked] if subsets else []
    lines = ["| " + " | ".join(header) + " |", "|---" * len(header) + "|"]
    for (dataset, row), values in rows.items():
        cells = [cell(m, list(values[m].values())) if m in values else "" for m in metrics]
        checks = verdicts.get((dataset, row), {})
        cells += [f"{checks[m]['gain']:+.1f} / {checks[m]['spread']:.1f}" if m in checks else "" for m in checked]
        cells += [verdict_word(checks) if checks else ""]
        cells += [checks[m].get("subsets", "") if m in checks else "" for m in checked] if subsets else []
        lines.append(f"| {dataset} | {row} | " + " | ".join(cells) + " |")
    seeds = list(dict.fromkeys(s for values in rows.values() for per_seed in values.values() for s in per_seed))
    lines += ["", "| dataset | encoder | metric | " + " | ".join(f"seed {s}" for s in seeds) + " |"]
    lines.append("|---" * (3 + len(seeds)) + "|")
    for (dataset, row), values in rows.items():
        for m, per_seed in values.items():
            cells = [
                f"{per_seed[s]:.1f}" if s in per_seed and m != "step" else str(per_seed.get(s, "")) for s in seeds
            ]
            lines.append(f"| {dataset} | {row} | {m} | " + " | ".join(cells) + " |")
    return lines


def step_time_table(timings: dict[str, dict]) -> list[str]:
    """Median ms per step, and its ratio to the first arm's (median and range over the interleaved repeats)."""
    reference, *_ = timings
    lines = [f"| arm | ms / step | × {reference} (range) | context tokens / image |", "|---|---|---|---|"]
    for name, timing in timings.items():
        ratios = [value / base for value, base in zip(timing["step_ms"], timings[reference]["step_ms"])]
        lines.append(
            f"| {name} | {statistics.median(timing['step_ms']):.0f} | {statistics.median(ratios):.2f} "
            f"({min(ratios):.2f}–{max(ratios):.2f}) | {timing['context_tokens']:.1f} |"
        )
    return lines


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("name", nargs="?", help="A study of benchmarks/studies/ (or a spec file).")
    parser.add_argument("--list", action="store_true", help="List the studies and what they reproduce.")
    parser.add_argument("--seeds", type=int, nargs="+", help="Instead of the spec's seeds.")
    parser.add_argument("--steps", type=int, help="pretrain.py --max_steps instead of the spec's.")
    parser.add_argument("--datasets", nargs="+", help="Only these of the spec's data sets (or others).")
    parser.add_argument("--arms", nargs="+", help="Only these of the spec's arms.")
    parser.add_argument("--output_dir", default="outputs/studies", help="Shared by studies: runs are shared too.")
    parser.add_argument("--subsets", type=int, help="Also count the passing k-seed subsets of the seeds.")
    parser.add_argument("--no-cache", dest="use_cache", action="store_false", help="Recompute every run.")
    args = parser.parse_args(argv)
    if args.list or not args.name:
        for name in study_names():
            print(f"{name:<28} {load_spec(name).get('reproduces', '')}")
        return 0
    spec = load_spec(args.name)
    for arm in args.arms or []:
        if arm not in spec["arms"]:
            raise unknown("arm", arm, spec["arms"])
    spec["arms"] = {k: v for k, v in spec["arms"].items() if not args.arms or k in args.arms}
    spec.update({k: v for k, v in (("seeds", args.seeds), ("datasets", args.datasets)) if v})
    spec["steps"], spec["subsets"] = args.steps or spec["steps"], args.subsets or spec.get("subsets")
    name, output_dir = Path(args.name).stem, Path(args.output_dir)

    runs = run_study(spec, output_dir, name, args.use_cache) if spec["evaluators"] else {}
    rows = rows_of(runs)
    verdicts = verdicts_of(spec, rows)
    lines = [f"`python -m benchmarks.study {' '.join(argv if argv is not None else sys.argv[1:])}`", ""]
    lines += table(rows, verdicts) if rows else []
    timings = {}
    if spec.get("step_time"):
        overrides = {label: arm["overrides"] for label, arm in spec["arms"].items()}
        timings = step_times(overrides, **spec["step_time"])
        lines += ["", *step_time_table(timings)]
    print("\n".join(lines))
    (output_dir / name).mkdir(parents=True, exist_ok=True)
    record = {"runs": {f"{d} / {e}": seeds for (d, e), seeds in runs.items()}, "timings": timings}
    record["verdicts"] = {f"{d} / {r}": checks for (d, r), checks in verdicts.items()}
    (output_dir / name / "result.json").write_text(json.dumps(record, indent=2, default=str))
    (output_dir / name / "table.md").write_text("\n".join(lines) + "\n")
    required = spec.get("must_pass")
    judged = [w for (_, row), c in verdicts.items() if required is None or row in required for w in [verdict_word(c)]]
    return 1 if "FAIL" in judged else 0


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    sys.exit(main())
