"""The verdict and the seed-subset summary of `benchmarks/learning_check.py`, on hand-made per-seed results."""

import json

import pytest

from benchmarks import learning_check


def _row(seed: int, pretrained: float, random_init: float) -> dict:
    """One seed's results with the same accuracies for both metrics."""
    return {
        "seed": seed,
        "pretrain_minutes": 1.0 + seed,
        "pretrained": {"linear": pretrained, "knn": pretrained},
        "random": {"linear": random_init, "knn": random_init},
    }


def test_verdict_compares_the_gain_with_the_largest_range():
    # Gain 90 - 80 = 10; random ranges over 4 points, pre-trained over 2: spread 4 -> pass.
    rows = [_row(0, 89.0, 78.0), _row(1, 91.0, 82.0), _row(2, 90.0, 80.0)]
    verdict = learning_check.verdicts_for(rows)["linear"]
    assert verdict == {"gain": pytest.approx(10.0), "spread": pytest.approx(4.0), "pass": True}
    # One random network far from the others: the gain (90 - 75.7 = 14.3) no longer exceeds the spread (65 -> 82 = 17).
    rows[0] = _row(0, 89.0, 65.0)
    verdict = learning_check.verdicts_for(rows)["linear"]
    assert verdict["gain"] == pytest.approx(90.0 - 227.0 / 3) and verdict["spread"] == pytest.approx(17.0)
    assert not verdict["pass"]


def test_seed_subsets_count_the_outlier():
    # Seeds 0-3 are consistent; seed 4's random network is an outlier. The 4 three-seed subsets of seeds 0-3 pass,
    # and the 6 subsets that contain seed 4 fail (gain <= 11, spread >= 20).
    rows = [_row(seed, 90.0, 80.0 + 0.1 * seed) for seed in range(4)] + [_row(4, 90.0, 60.0)]
    summary = learning_check.seed_subset_summary(rows, subset_size=3)
    assert summary["linear"]["subsets"] == 10
    assert summary["linear"]["passing_subsets"] == 4
    assert summary["linear"]["paired_gains"] == pytest.approx([10.0, 9.9, 9.8, 9.7, 30.0])
    assert summary["linear"]["gain"] == pytest.approx(90.0 - (4 * 80.0 + 0.6 + 60.0) / 5)
    with pytest.raises(ValueError, match="Need at least 3 seeds"):
        learning_check.seed_subset_summary(rows[:2], subset_size=3)


def test_combine_merges_result_files(tmp_path, capsys):
    first = tmp_path / "a.json"
    second = tmp_path / "b.json"
    first.write_text(json.dumps({"runs": [_row(0, 90.0, 80.0), _row(1, 91.0, 81.0)]}))
    # Seed 1 again (another run's timing, same accuracies) is the same seed, not a new one.
    second.write_text(json.dumps({"runs": [{**_row(1, 91.0, 81.0), "pretrain_minutes": 9.0}, _row(2, 92.0, 79.0)]}))
    assert learning_check.main(["--combine", str(first), str(second)]) == 0
    out = capsys.readouterr().out
    assert "| seed 0 | seed 1 | seed 2 |" in out and "1 of 1 3-seed subsets pass" in out

    second.write_text(json.dumps({"runs": [_row(1, 50.0, 81.0)]}))
    with pytest.raises(ValueError, match="Seed 1 appears in more than one result file"):
        learning_check.main(["--combine", str(first), str(second)])

    second.write_text(json.dumps({"seed": 1}))
    with pytest.raises(ValueError, match="is not a learning_check.json"):
        learning_check.main(["--combine", str(first), str(second)])
