"""benchmarks/spread.py: which multiples of the median norm are within 1.1x on each task.

Checked on made-up sweeps and bands, against answers worked out by hand."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))
import spread


def test_good_keeps_the_thresholds_within_the_limit_of_the_best():
    best, good = spread.good({0.1: 2.0, 0.3: 1.0, 1.0: 1.09, 3.0: 1.11})
    assert best == 0.3 and good == (0.3, 1.0)


def test_the_sweep_takes_only_complete_fixed_rows_of_the_task():
    runs = [{"task": "t", "strategy": f"fixed {c:g}", "seed": k, "metric": c * (k + 1)}
            for c in (0.1, 1.0) for k in range(3)]  # fmt: skip
    runs += [{"task": "t", "strategy": "fixed 3", "seed": 0, "metric": 0.0},   # one seed only
             {"task": "u", "strategy": "fixed 0.1", "seed": 0, "metric": 0.0},
             {"task": "t", "strategy": "default", "seed": 0, "metric": 0.0}]
    assert spread._sweep({"runs": runs}, "t", 3) == {0.1: pytest.approx(0.2), 1.0: 2.0}


def _band(task: str, kind: str, median: float, good: tuple[float, ...]) -> spread.Band:
    return spread.Band(task, "SGD", 0.1, good[0], median, good, kind, 2.0)


def test_the_verdict_says_whether_one_multiple_fits_every_task_of_a_kind():
    fits = [_band("a", "SGD-like", 1.0, (0.3, 1.0)), _band("b", "SGD-like", 2.0, (1.0, 3.0))]
    text = spread.render(fits)
    assert "SGD-like: one multiple fits all 2: 0.5 to 1" in text   # [0.3, 1] and [0.5, 1.5]
    apart = [*fits, _band("c", "SGD-like", 1.0, (10.0,)), _band("d", "normalising", 1.0, (3.0,))]
    text = spread.render(apart)
    assert "SGD-like: no multiple fits all 3 (the bands' highest floor 10 lies above their lowest ceiling 1)" in text
    assert "normalising: one multiple fits all 1: 3 to 3" in text


def test_the_step_ratio_is_for_sgd_like_optimizers_with_weights_only():
    assert _band("a", "SGD-like", 1.0, (3.0,)).step_ratio == pytest.approx(0.1 * 3.0 / 2.0)
    assert _band("b", "normalising", 1.0, (3.0,)).step_ratio is None
    zero = spread.Band("c", "SGD", 0.1, 3.0, 1.0, (3.0,), "SGD-like", 0.0)
    assert zero.step_ratio is None
    text = spread.render([_band("a", "SGD-like", 1.0, (3.0,)), _band("d", "SGD-like", 1.0, (0.3,))])
    assert "lr·c*/|θ0| (SGD-like, weights not initialised at zero): 0.015 to 0.15, a factor 10" in text
