"""benchmarks/recommend_grid.py: recommendations from logs at every threshold of the grid.

The loss trend is checked against NumPy's least-squares fit and its covariance; the table
against medians computed by hand from made-up runs.
"""

from __future__ import annotations

import math
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))
import gradclip
import recommend_grid
from saved_runs import saved_runs


def numpy_falling(losses, z=2.0):
    tail = np.log(np.asarray(losses[-max(8, len(losses) // 4):]))
    n = len(tail)
    means = [block.mean() for block in np.split(tail, [i * n // 8 for i in range(1, 8)])]
    (slope, _), cov = np.polyfit(np.arange(8), means, 1, cov=True)
    return bool(slope < -z * math.sqrt(cov[0, 0]))


@pytest.mark.parametrize(
    "curve",
    [
        lambda i, e: 2.0 * math.exp(-i / 300) * (1 + 0.05 * e),  # falls
        lambda i, e: 1.0 + 0.05 * e,  # flat noise
        lambda i, e: 1.0 + i / 500 + 0.05 * e,  # rises
        lambda i, e: 1.0 + 0.002 * math.sin(i) - 1e-5 * i + 0.2 * e,  # a faint fall in noise
    ],
)
def test_the_loss_trend_is_a_least_squares_slope_against_its_standard_error(curve):
    rng = np.random.default_rng(0)
    losses = [curve(i, e) for i, e in enumerate(rng.standard_normal(400))]
    assert recommend_grid.falling(losses) == numpy_falling(losses)


def test_the_trend_of_clear_cases():
    rng = np.random.default_rng(1)
    noise = rng.standard_normal(400)
    assert recommend_grid.falling([math.exp(-i / 100) * (1 + 0.01 * e) for i, e in enumerate(noise)])
    assert not recommend_grid.falling([1 + 0.1 * e for e in noise])
    assert not recommend_grid.falling([1.0] * 5)  # too short to tell


def test_nearest_grid_threshold_on_a_log_scale():
    assert recommend_grid.nearest(0.33) == "fixed 0.3"
    assert recommend_grid.nearest(2.0) == "fixed 3"  # ln(3/2) < ln(2/1)
    assert recommend_grid.nearest(0.0045) == "fixed 0.01"  # below the grid: its lowest
    assert recommend_grid.nearest(150.0) == "fixed 100"
    assert recommend_grid.nearest(1e3) == recommend_grid.nearest(None) == "none"


def test_the_rules_on_a_log_clipped_to_the_end():
    rng = np.random.default_rng(2)
    norms = list(np.exp(rng.normal(1.0, 0.2, 400)))  # ~2.7, clipped at 1 on every step
    flat = list(1 + 0.1 * rng.standard_normal(400))
    fall = [math.exp(-i / 100) for i in range(400)]
    by_norms = gradclip.recommend_max_norm(gradclip.History.from_norms(norms, threshold=1.0))
    assert recommend_grid.recommend("norms", norms, flat, 1.0) == by_norms.max_norm == 3.0
    assert recommend_grid.recommend("plateau", norms, flat, 1.0) == pytest.approx(1 / 3)
    assert recommend_grid.recommend("plateau", norms, fall, 1.0) == 3.0  # still falling
    # under Adam clipping is no learning-rate cut: both rules clip every step (norms steady)
    adam = torch.optim.Adam([torch.nn.Parameter(torch.zeros(1))])
    under_adam = gradclip.recommend_max_norm(gradclip.History.from_norms(norms, threshold=1.0),
                                             optimizer=adam).max_norm  # fmt: skip
    assert under_adam < min(norms) * 1.1
    for rule in recommend_grid.RULES:
        assert recommend_grid.recommend(rule, norms, flat, 1.0, adam) == under_adam
    # where the threshold stopped clipping, both rules follow the norms
    assert recommend_grid.recommend("plateau", norms, flat, 100.0) == \
        recommend_grid.recommend("norms", norms, flat, 100.0)  # fmt: skip


def test_table_is_the_median_ratio_to_the_best_on_the_same_seeds():
    sweep = {f"fixed {c:g}": [0.5, 0.5] for c in recommend_grid.FIXED}
    sweep["fixed 0.3"] = [0.1, 0.3]  # the best: median 0.2
    sweep["fixed 3"] = [0.4, 0.8]
    sweep["none"] = [2.0, 2.0]
    records = [
        {"task": "t", "threshold": c, "seed": s,
         "picks": {"norms": "fixed 3", "plateau": "fixed 0.3" if c == 1.0 else "none"}}
        for c in recommend_grid.FIXED for s in (0, 1)
    ]  # fmt: skip
    text = recommend_grid.table(records, saved_runs("t", sweep), seeds=2)
    rows = {line.split()[0]: line.split()[1:] for line in text.splitlines()[3:]}
    assert "t (best fixed 0.3)" in text
    assert rows["norms"] == [f"{0.6 / 0.2:7.3g}".strip()] * len(recommend_grid.FIXED)
    plateau = rows["plateau"]
    assert plateau[recommend_grid.FIXED.index(1.0)] == "1"
    assert plateau[0] == f"{2.0 / 0.2:7.3g}".strip()  # no clipping: diverged, with its metric
