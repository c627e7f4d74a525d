"""`benchmarks/study.py` and `benchmarks/evaluators.py`: specs, verdict, cache, table, and one real tiny study."""

import json

import pytest
import yaml

from benchmarks import evaluators, study
from modeling_ijepa import IJepaConfig
from modeling_ijepa.data import load_digits_dataset


@pytest.mark.parametrize("name", study.study_names())
def test_every_shipped_study_parses_with_real_recipes_and_config_fields(name):
    from modeling_ijepa.cli import resolve_recipe

    spec = study.load_spec(name)
    assert spec["reproduces"].startswith("RESULTS.md: ")
    for arm in spec["arms"].values():
        resolve_recipe(arm["recipe"])
        IJepaConfig.from_preset("vit_micro_patch4_48", **arm["overrides"])  # an override that is no field fails here


def test_the_studies_cover_every_learning_section():
    names = set(study.study_names())
    assert {"learning-check", "small-folders", "checkpoint-selection", "finetune-check", "probe-sweep"} <= names
    assert {"learning-options", "learning-options-900", "learning-options-timing", "knn-monitor-cost"} <= names


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ({"arms": {"a": {}}, "evaluators": ["knnn"]}, "Unknown evaluator 'knnn'. Did you mean 'knn'?"),
        ({"arms": {"a": {}}, "seed": [0]}, "Unknown key in spec: 'seed'. Did you mean 'seeds'?"),
        ({"arms": {"a": {"recipes": "x"}}}, "arm 'a': 'recipes'. Did you mean 'recipe'?"),
        ({"arms": {"a": {}}, "evaluators": [{"checkpoints": {"rule": ["best"]}}]}, "Did you mean 'rules'?"),
        ({"arms": {"a": {}}, "seeds": "0 1"}, "'seeds' must be"),
        ({"datasets": ["digits"]}, "needs 'arms'"),
    ],
)
def test_bad_specs_name_the_key_and_the_fix(spec, message):
    with pytest.raises(study.SpecError, match=message.replace("(", r"\(").replace("?", r"\?")):
        study.parse_spec(spec)


def test_an_unknown_study_lists_the_studies():
    with pytest.raises(study.SpecError, match="Unknown study 'learning-chek'. Did you mean 'learning-check'?"):
        study.load_spec("learning-chek")
    with pytest.raises(study.SpecError, match="Unknown arm 'tiny'"):
        study.main(["learning-check", "--arms", "tiny"])


def test_the_verdict_passes_only_when_the_gain_exceeds_the_spread():
    passing = study.verdict([95.0, 96.0, 94.0], [88.0, 90.0, 89.0])
    assert passing["pass"] is True and passing["gain"] == pytest.approx(6.0) and passing["spread"] == 2.0
    assert passing["paired_gains"] == [7.0, 6.0, 5.0]
    failing = study.verdict([95.0, 80.0, 94.0], [88.0, 90.0, 89.0])  # one bad seed: spread 15 > gain 0.67
    assert failing["pass"] is False and failing["spread"] == 15.0
    assert study.verdict([95.0], [88.0])["pass"] is None  # one seed: no spread, no verdict
    counted = study.verdict([95.0, 80.0, 94.0, 95.0], [88.0, 90.0, 89.0, 89.0], subset_size=3)
    assert counted["subsets"] == "1 of 4"  # only the subset without the 80.0 seed passes
    with pytest.raises(ValueError, match="same seeds"):
        study.verdict([1.0, 2.0], [1.0])


def test_the_cache_computes_once_per_settings(tmp_path):
    calls = []

    def compute(folder):
        calls.append(folder)
        return {"knn": 50.0 + len(calls)}

    first, folder = study.cached(tmp_path, "arm-seed0", {"a": 1}, compute)
    again, same = study.cached(tmp_path, "arm-seed0", {"a": 1}, compute)
    assert first == again == {"knn": 51.0} and folder == same and len(calls) == 1  # hit
    changed, other = study.cached(tmp_path, "arm-seed0", {"a": 2}, compute)
    assert changed == {"knn": 52.0} and other != folder and len(calls) == 2  # a changed key is a miss
    assert json.loads((folder / "result.json").read_text())["settings"] == {"a": 1}
    forced, _ = study.cached(tmp_path, "arm-seed0", {"a": 1}, compute, use_cache=False)
    assert forced == {"knn": 53.0} and len(calls) == 3


def test_an_edited_recipe_gets_another_digest_but_a_comment_does_not(tmp_path):
    recipe = tmp_path / "mine.yaml"
    recipe.write_text("max_steps: 300\n")
    before = study.recipe_digest(str(recipe))
    recipe.write_text("# a comment changes nothing\nmax_steps: 300\n")
    assert study.recipe_digest(str(recipe)) == before
    recipe.write_text("max_steps: 900\n")
    assert study.recipe_digest(str(recipe)) != before


def test_the_table_splits_views_into_rows_and_judges_each_against_random_init():
    runs = {
        ("digits", "random init"): {0: {"linear": 90.0, "knn": 60.0}, 1: {"linear": 91.0, "knn": 61.0}},
        ("digits", "sf"): {
            0: {"step": 300, "linear[best]": 95.0, "knn[best]": 61.0, "step[best]": 150, "scores": {"150": {}}},
            1: {"step": 250, "linear[best]": 95.0, "knn[best]": 62.0, "step[best]": 100, "scores": {"100": {}}},
        },
    }
    spec = {"seeds": [0, 1], "verdict": None}
    rows = study.rows_of(runs)
    assert list(rows) == [("digits", "random init"), ("digits", "sf"), ("digits", "sf [best]")]
    verdicts = study.verdicts_of(spec, rows)
    assert verdicts["digits", "sf"] == {}  # the saved step alone: nothing to compare
    assert verdicts["digits", "sf [best]"]["linear"]["pass"] is True
    assert verdicts["digits", "sf [best]"]["knn"]["pass"] is False  # +1.0 against a 1.0 spread
    lines = study.table(rows, verdicts)
    assert (
        lines[0] == "| dataset | encoder | linear | knn | step | linear gain / spread | knn gain / spread | verdict |"
    )
    assert "| digits | sf [best] | 95.0 ± 0.0 | 61.5 ± 0.7 | 150 100 | +4.5 / 1.0 | +1.0 / 1.0 | FAIL |" in lines
    assert "| digits | random init | 90.5 ± 0.7 | 60.5 ± 0.7 |  |  |  |  |" in lines
    assert "| digits | sf [best] | knn | 61.0 | 62.0 |" in lines


@pytest.fixture(scope="module")
def digit_folder(tmp_path_factory):
    """An imagefolder of real digits: 3 classes, 8 training and 4 validation images each."""
    root = tmp_path_factory.mktemp("digits")
    digits = load_digits_dataset(48)["train"]
    counts = {}
    for index in range(len(digits)):
        if len(counts) == 3 and min(counts.values()) == 12:
            break
        example = digits[index]
        label, count = example["label"], counts.get(example["label"], 0)
        if label < 3 and count < 12:
            folder = root / ("train" if count < 8 else "validation") / str(label)
            folder.mkdir(parents=True, exist_ok=True)
            example["image"].save(folder / f"{count}.png")
            counts[label] = count + 1
    return root


TINY_MODEL = dict(
    hidden_size=32, num_hidden_layers=2, intermediate_size=64, predictor_hidden_size=16, predictor_num_hidden_layers=2
)
FAST = ["--per_device_train_batch_size", "8", "--logging_steps", "1", "--save_steps", "1", "--eval_steps", "1"]
FAST += ["--warmup_steps", "1", "--monitor_max_train_samples", "16", "--monitor_max_eval_samples", "8"]


def test_a_tiny_study_runs_end_to_end_then_comes_from_the_cache(digit_folder, tmp_path, monkeypatch):
    spec = {
        "datasets": [str(digit_folder)],
        "steps": 2,
        "arms": {"tiny": {"overrides": TINY_MODEL, "args": FAST}},
        "seeds": [0, 1],
        "evaluators": ["knn", "cost"],
        "baseline": "random:vit_micro_patch4_48",
    }
    (tmp_path / "tiny.yaml").write_text(yaml.safe_dump(spec))
    argv = [str(tmp_path / "tiny.yaml"), "--output_dir", str(tmp_path / "out")]
    status = study.main(argv)
    record = json.loads((tmp_path / "out" / "tiny" / "result.json").read_text())
    runs = record["runs"][f"{digit_folder.name} / tiny"]
    assert set(runs) == {"0", "1"} and all(run["evaluations"] == 2 for run in runs.values())
    assert all(0 < run["monitor share %"] < 100 and 0 <= run["knn"] <= 100 for run in runs.values())
    assert status == (1 if record["verdicts"][f"{digit_folder.name} / tiny"]["knn"]["pass"] is False else 0)
    table = (tmp_path / "out" / "tiny" / "table.md").read_text()
    assert f"| {digit_folder.name} | random init |" in table and "knn gain / spread" in table

    # Again: every run comes from the cache, nothing is trained or evaluated.
    monkeypatch.setattr(study, "pretrain", lambda *a: pytest.fail("pre-trained a cached run"))
    monkeypatch.setitem(evaluators.EVALUATORS, "knn", lambda *a, **k: pytest.fail("evaluated a cached run"))
    assert study.main(argv) == status
    assert (tmp_path / "out" / "tiny" / "table.md").read_text().splitlines()[2:] == table.splitlines()[2:]

    # The rules of the checkpoints evaluator, on the real monitor log of that run (scores stand in for the probes).
    run_dir = next((tmp_path / "out" / "pretrain").glob("*/seed0-*")) / "run"
    monkeypatch.setattr(evaluators, "linear", lambda target, model, out: {"linear": float(model.rsplit("-", 1)[1])})
    monkeypatch.setattr(evaluators, "knn", lambda target, model, out: {"knn": 10.0 * float(model.rsplit("-", 1)[1])})
    target = evaluators.Target(str(run_dir), 0, [], tmp_path / "eval", run_dir)
    picked = evaluators.checkpoints(target, rules=["last", "best", "latest_within_stderr"])
    monitor = {int(step): score for step, (score, _) in picked["monitor"].items()}
    assert sorted(monitor) == [1, 2] and picked["step[last]"] == 2 and picked["linear[last]"] == 2.0
    assert picked["step[best]"] == max(sorted(monitor), key=lambda step: (monitor[step], -step))
    assert picked["knn[best]"] == 10.0 * picked["step[best]"]
    assert evaluators.knn_at_steps(target, steps=[1, 2]) == {"knn@1": 10.0, "knn@2": 20.0, "knn change": 10.0}
    with pytest.raises(FileNotFoundError, match="checkpoint-3 is missing"):
        evaluators.knn_at_steps(target, steps=[3])


def test_probe_sweep_scores_the_encoder_and_the_raw_pixel_floor(tmp_path):
    import torch

    from modeling_ijepa import IJepaModel

    torch.manual_seed(3)
    IJepaModel(IJepaConfig.from_preset("vit_micro_patch4_48", **TINY_MODEL)).save_pretrained(tmp_path / "seed3")
    saved = evaluators.probe_sweep(evaluators.Target(str(tmp_path / "seed3"), 3, [], tmp_path), C=[1.0])
    assert saved["raw pixels C=1"] == pytest.approx(97.3, abs=0.05)  # RESULTS.md: raw 8x8 pixels at C = 1
    assert 10.0 < saved["C=1"] <= 100.0
    with pytest.raises(ValueError, match="embedded digits only"):
        evaluators.probe_sweep(evaluators.Target("x", 0, ["--train_dir", "d"], tmp_path), C=[1.0])
