"""`benchmarks/learning_options.py`: its options are valid configurations, its steps and tables (no training here)."""

import argparse

import pytest

from benchmarks import learning_options
from modeling_ijepa import IJepaConfig
from modeling_ijepa.cli import parse_config_overrides


def test_every_option_is_a_valid_configuration_through_the_config_overrides_flag():
    args = argparse.Namespace(vicreg_variance_weight=0.1, vicreg_covariance_weight=0.004, sigreg_weight=0.01)
    options = learning_options.option_overrides(args)
    assert tuple(options) == learning_options.OPTION_NAMES and options["plain"] == {}
    for name, overrides in options.items():
        parsed = parse_config_overrides(learning_options.overrides_flag(overrides))
        assert parsed == overrides, name
        config = IJepaConfig.from_preset("vit_micro_patch4_48", **parsed)
        assert {key: getattr(config, key) for key in overrides} == overrides


@pytest.mark.parametrize(
    ("max_steps", "requested", "expected"),
    [(300, None, [300]), (900, None, [300, 600, 900]), (20, [10], [10, 20]), (900, [600, 300], [300, 600, 900])],
)
def test_evaluation_steps(max_steps, requested, expected):
    assert learning_options.evaluation_steps(max_steps, requested) == expected


def test_evaluation_steps_beyond_the_run_raise():
    with pytest.raises(ValueError, match="must lie in"):
        learning_options.evaluation_steps(300, [600])


def test_tables_compare_each_option_with_random_init_and_follow_knn_over_steps():
    random_init = [{"seed": s, "linear": 90.0 + s, "knn": 60.0 + s} for s in range(3)]
    runs = {
        "plain": [
            {
                "seed": s,
                "saved": {"linear": 95.0, "knn": 60.0 + s},
                "saved_step": 300 * (s + 1),
                "evaluations": {"300": {"knn": 80.0 + s}, "900": {"knn": 60.0 + s}},
            }
            for s in range(3)
        ],
    }
    table = "\n".join(learning_options.learning_table(runs, random_init))
    # Linear: gain 95 - 91 = +4.0, spread 2.0 -> but 20-NN: gain 0 -> not both.
    assert "| plain | 95.0 ± 0.0 | +4.0 (2.0) | 61.0 ± 1.0 | +0.0 (2.0) | no | 300, 600, 900 |" in table
    knn = "\n".join(learning_options.knn_over_steps_table(runs, [300, 900]))
    assert "| plain | 81.0 ± 1.0 | 61.0 ± 1.0 | -20.0 ± 0.0 |" in knn
    timings = {
        "plain": {"step_ms": [100.0, 110.0], "context_tokens": 38.0},
        "full_context": {"step_ms": [150.0, 176.0], "context_tokens": 80.5},
    }
    times = "\n".join(learning_options.step_time_table(timings, "plain"))
    assert "| full_context | 163 | 1.55 (1.50–1.60) | 80.5 |" in times
