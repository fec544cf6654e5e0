"""benchmarks/variants.py: a default variant against a saved sweep.

The comparison is checked against medians computed by hand from made-up runs; an empty
variant trains exactly as the acceptance script's default does (the baseline it claims).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))
import acceptance
import variants
from saved_runs import saved_runs


def test_the_variant_and_the_saved_default_against_the_best_fixed_threshold():
    saved = saved_runs("t", {"fixed 0.1": [0.4, 0.5, 0.6], "fixed 1": [0.2, 0.3, 0.1],
                         "fixed 2.5": [0.01, 0.01, 0.01],  # a pick's run, not the sweep
                         "default": [0.3, 0.9, 2.0]})  # fmt: skip
    (row,) = variants.compare([("t", 0, 0.25), ("t", 1, 0.1), ("t", 2, 5.0)], saved)
    assert row.best == "fixed 1"  # median 0.2, the sweep's best
    assert row.variant == 0.25 and row.variant_ratio == pytest.approx(0.25 / 0.2)
    assert row.default == 0.9 and row.default_ratio == pytest.approx(0.9 / 0.2)
    assert row.seeds == (0.25, 0.1, 5.0)
    # each seed's pair: the variant's and the best threshold's run of that seed
    assert row.interval == acceptance.interval([(0.25, 0.2), (0.1, 0.3), (5.0, 0.1)])
    text = variants.render([row], {"window": 64})
    low, high = row.interval
    assert '{"window": 64}' in text and f"(1.25x [{low:.2f}-{high:.2f}])" in text and "(4.50x)" in text


def test_a_diverged_run_counts_as_inf_and_a_missing_sweep_is_refused():
    saved = saved_runs("t", {"fixed 1": [0.2, 3.0, 0.1], "default": [0.3, 0.9, 0.5]})
    (row,) = variants.compare([("t", 0, 0.25), ("t", 1, 0.1), ("t", 2, 0.3)], saved)
    assert row.best == "fixed 1" and row.variant_ratio == pytest.approx(0.25 / 0.2)
    with pytest.raises(ValueError, match="no sweep for u"):
        variants.compare([("u", 0, 0.2)], saved)


@pytest.mark.parametrize("options", ['{"bogus": 1}', "[1, 2]", "not json"])
def test_bad_options_exit_2_naming_them(options, capsys):
    with pytest.raises(SystemExit) as exc:
        variants.main([options])
    assert exc.value.code == 2 and "options:" in capsys.readouterr().err


def test_no_options_train_the_acceptance_default():
    task, seed = "sgd-heavy-tail", 0
    record, _ = acceptance.run_strategy(task, "default", seed)
    assert variants.train(({}, task, seed)) == (task, seed, record.metric)


def test_the_saved_sweep_it_compares_against_is_in_the_repository():
    saved = json.loads(variants.SAVED.read_text())
    assert {r["strategy"] for r in saved["runs"]} >= {"default", "fixed 0.1", "fixed 100"}


def test_several_saved_results_are_read_as_one(tmp_path, monkeypatch, capsys):
    # seeds 0-1 in one file, seed 2 in another (seeds added later): the sweep over all three
    runs = saved_runs("t", {"fixed 1": [0.2, 0.3, 0.1], "default": [0.3, 0.9, 0.5]})["runs"]
    parts = [tmp_path / "a.json", tmp_path / "b.json"]
    parts[0].write_text(json.dumps({"runs": [r for r in runs if r["seed"] < 2]}))
    parts[1].write_text(json.dumps({"runs": [r for r in runs if r["seed"] == 2]}))
    monkeypatch.setattr(variants, "TASKS", {"t": None})
    monkeypatch.setattr(variants, "map_jobs", lambda fn, work, jobs: [(t, k, 0.4) for _, t, k in work])
    assert variants.main(["{}", "--seeds", "3", "--against", *map(str, parts)]) == 0
    # a resample's median of the best's three seeds is 0.1 or 0.3 with chance 7/27 each: 0.4
    # over them bounds the interval
    assert "variant 0.4 (2.00x [1.33-4.00])  default 0.5 (2.50x)  best fixed 1" in capsys.readouterr().out
