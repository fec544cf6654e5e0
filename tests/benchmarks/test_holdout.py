"""benchmarks/holdout.py: the default on new seeds against the saved sweep's best threshold.

The best threshold is checked against medians computed by hand from made-up runs; one short
run (a few steps of the quickest task) for the rows and the pass count. No result is judged.
"""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))
import holdout
from saved_runs import saved_runs


def test_best_fixed_is_the_sweeps_lowest_median():
    saved = saved_runs("t", {"fixed 0.1": [0.4, 0.5, 0.6], "fixed 1": [0.2, 3.0, 0.1],
                         "fixed 3": [0.3, 0.25, 0.35], "default": [0.01, 0.01, 0.01],
                         "fixed 2.5": [0.01, 0.01, 0.01]})  # a finder pick's run, not the sweep
    assert holdout.best_fixed(saved) == {"t": 1.0}  # median 0.2; 3.0 diverged, counts as inf
    saved["runs"] = [r for r in saved["runs"] if r["strategy"] == "default"]
    assert holdout.best_fixed(saved) == {}


def test_a_short_run_prints_every_strategy_and_the_pass_count(tmp_path: Path, capsys):
    saved = saved_runs("sgd-label-noise", {"fixed 0.01": [0.5], "fixed 0.1": [0.6]})
    path = tmp_path / "saved.json"
    path.write_text(json.dumps(saved))
    assert holdout.main(["--seeds", "3", "4", "--tasks", "sgd-label-noise", "--steps", "30",
                         "--jobs", "1", "--against", str(path)]) == 0  # fmt: skip
    out = capsys.readouterr().out
    (row,) = [line for line in out.splitlines() if "sgd-label-noise" in line]
    assert "best fixed 0.01:" in row and "(1.00x)" in row
    assert all(f"{s} " in row for s in holdout.STRATEGIES)
    assert "seeds 3-3" in out and "within 1.1x: default " in out


def test_bad_arguments_are_refused(tmp_path: Path):
    path = tmp_path / "saved.json"
    path.write_text(json.dumps(saved_runs("sgd-label-noise", {"fixed 1": [0.5]})))
    with pytest.raises(SystemExit):
        holdout.main(["--seeds", "5", "5", "--against", str(path)])
    with pytest.raises(SystemExit):
        holdout.main(["--tasks", "lstm-text", "--against", str(path)])  # no sweep for it
    strategy, task, seed, metric = holdout.train(("default", "sgd-label-noise", 0, 1.0, 1))
    assert (strategy, task, seed) == ("default", "sgd-label-noise", 0) and math.isfinite(metric)
