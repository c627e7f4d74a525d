"""benchmarks/finetune_check.py: its table and verdict (the fine-tuning runs are a benchmark, not a test)."""

import pytest

from benchmarks import finetune_check


def rows(pretrained: list[float], random_init: list[float]) -> list[dict]:
    return [
        {"seed": seed, "pretrained": {"accuracy": p}, "random": {"accuracy": r}}
        for seed, (p, r) in enumerate(zip(pretrained, random_init))
    ]


def test_verdict_passes_only_when_the_gain_exceeds_the_seed_to_seed_spread():
    passing = finetune_check.verdict_for(rows([95.0, 96.0, 94.0], [88.0, 90.0, 89.0]))
    assert passing["pass"] and passing["gain"] == pytest.approx(6.0) and passing["spread"] == pytest.approx(2.0)
    failing = finetune_check.verdict_for(rows([95.0, 80.0, 94.0], [88.0, 90.0, 89.0]))
    assert not failing["pass"] and failing["spread"] == pytest.approx(15.0)


def test_table_has_one_column_per_seed_and_the_mean():
    lines = finetune_check.results_table(rows([95.0, 96.0], [88.0, 90.0]))
    assert lines[0] == "| encoder | seed 0 | seed 1 | mean ± std |"
    assert lines[2].startswith("| fine-tuned from I-JEPA") and lines[2].endswith("| 95.0 | 96.0 | 95.5 ± 0.7 |")
    assert lines[3].endswith("| 88.0 | 90.0 | 89.0 ± 1.4 |")


def test_reused_encoders_must_match_the_seeds(capsys):
    with pytest.raises(SystemExit):
        finetune_check.main(["--seeds", "0", "1", "--pretrained", "only_one"])
    assert "one encoder per seed" in capsys.readouterr().err
