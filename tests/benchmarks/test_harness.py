"""benchmarks/harness.py, records.py, targets.py, render.py: the development harness.

Smoke tests of well-formed data (no timing assertions: the machine is shared): the records
of a run, the quiet-repetition rule, both implementations on the same gradients, the
configuration, the targets and the rendering; and every docstring example of the folder's
modules runs.
"""

from __future__ import annotations

import doctest
import json
import math
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))
import cases
import harness
import records
import render
import targets


@pytest.mark.parametrize("module", [cases, records, harness, targets, render])
def test_docstring_examples_run(module):
    result = doctest.testmod(module, optionflags=doctest.ELLIPSIS)
    assert result.attempted > 0 and result.failed == 0


# --- the harness -----------------------------------------------------------------------


def small_config(**kwargs):
    return harness.BenchConfig(reps=2, min_rep_seconds=0.0, **kwargs)


def test_run_grad_set_records_are_well_formed():
    gs = cases.make_grad_set("small", [("w", (64, 48)), ("b", (48,)), ("e", (300,))])
    recs, accuracy = harness.run_grad_set(gs, small_config())
    assert [(r.norm_type, r.mode) for r in recs] == [
        (2.0, "noclip"),
        (2.0, "clip"),
        (math.inf, "noclip"),
        (math.inf, "clip"),
    ]
    for r in recs:
        assert (r.case, r.dtype, r.n_tensors, r.numel) == ("small", "float32", 3, 3420)
        assert min(r.ours_ms, r.torch_ms, r.floor_ms) > 0
        assert r.ratio_min <= r.ratio <= r.ratio_max
        assert r.ours_x_floor > 0 and r.torch_x_floor > 0
        assert 1 <= r.reps_used <= r.reps_run <= 4  # max_reps defaults to 2 x reps
        assert r.calls_per_rep >= 1
        assert r.clipped == (1.0 if r.mode == "clip" else 0.0)
    assert [a.norm_type for a in accuracy] == [2.0, math.inf]
    for a in accuracy:
        assert a.ours_rel_err < 1e-5 and a.torch_rel_err < 1e-5
    # clip mode shrinks the gradients, but the harness keeps them in a sane range
    norm = cases.reference_norm([p.grad for p in gs.params], 2.0)
    assert accuracy[0].reference / 4 <= norm <= accuracy[0].reference


@pytest.mark.parametrize(("max_seconds", "runs"), [(None, 8), (0.0, 3)])
def test_noisy_repetitions_are_retried_then_all_used(max_seconds, runs):
    cfg = harness.BenchConfig(
        norm_types=(2.0,),
        modes=("noclip",),
        reps=4,
        max_reps=8,
        max_seconds=max_seconds,
        min_rep_seconds=0.0,
        max_foreign_cores=-1.0,  # no repetition counts as quiet
    )
    gs = cases.make_grad_set("small", [("w", (8, 8))])
    (record,), _ = harness.run_grad_set(gs, cfg)
    assert (record.reps_run, record.reps_used, record.quiet) == (runs, runs, False)


def test_both_implementations_see_the_same_gradients():
    gs = cases.make_grad_set("small", [("w", (10, 10))] * 3)
    seen: dict[str, set[tuple[int, ...]]] = {"ours": set(), "torch": set()}

    def spy(name):
        def clip(params, max_norm, norm_type):
            seen[name].add(tuple(id(p.grad) for p in params))
            return torch.nn.utils.clip_grad_norm_(params, max_norm, norm_type)

        return clip

    cfg = small_config(norm_types=(2.0,), modes=("clip",))
    harness.run_grad_set(gs, cfg, ours=spy("ours"), theirs=spy("torch"))
    assert seen["ours"] == seen["torch"] == {tuple(id(p.grad) for p in gs.params)}


@pytest.mark.parametrize(("limit", "expected"), [(1, 1), (5, 5)])
def test_calls_per_rep_are_capped(limit, expected):
    # a repetition of 10 s could hold thousands of these calls: the cap decides
    cfg = harness.BenchConfig(norm_types=(2.0,), modes=("noclip",), reps=1,
                              min_rep_seconds=10.0, max_calls_per_rep=limit)  # fmt: skip
    gs = cases.make_grad_set("small", [("w", (4, 4))])
    (record,), _ = harness.run_grad_set(gs, cfg)
    assert record.calls_per_rep == expected


def test_run_with_progress(monkeypatch):
    monkeypatch.setitem(
        cases.CASES,
        "tiny2000",
        cases.Case("tiny2000", lambda: [("t", (100,))] * 5, torch.float32, "5 x 100"),
    )
    lines: list[str] = []
    cfg = small_config(cases=("tiny2000",), norm_types=(2.0,), modes=("noclip",))
    result = harness.run(cfg, progress=lines.append)
    assert [r.case for r in result.records] == ["tiny2000"]
    assert lines[0].startswith("building tiny2000") and "p=2 noclip" in lines[1]
    assert result.wall_seconds > 0 and result.env["torch"] == torch.__version__


def test_config():
    quick = harness.config(quick=True)
    assert quick.cases == cases.QUICK_CASES and "huge100M" not in quick.cases
    assert quick.max_seconds is not None
    full = harness.config()
    assert full.cases == tuple(cases.CASES) and full.reps > quick.reps
    custom = harness.config(quick=True, cases=["gpt2"], norm_types=[math.inf], reps=3)
    assert (custom.cases, custom.norm_types, custom.reps, custom.max_reps) == (
        ("gpt2",),
        (math.inf,),
        3,
        6,
    )


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"cases": ("gpt3",)}, "valid cases"),
        ({"modes": ("sometimes",)}, "valid modes"),
        ({"reps": 0}, "reps"),
        ({"reps": 5, "max_reps": 2}, "max_reps"),
        ({"max_calls_per_rep": 0}, "max_calls_per_rep"),
    ],
)
def test_config_rejects_bad_values(kwargs, match):
    with pytest.raises(ValueError, match=match):
        harness.BenchConfig(**kwargs)


# --- targets and rendering ---------------------------------------------------------------


def fake_record(case, p, mode, ratio):
    return harness.BenchRecord(
        case=case, dtype="float32", n_tensors=1, numel=1, norm_type=p, mode=mode,
        ours_ms=1.0, torch_ms=1.0 / ratio, floor_ms=0.5, ratio=ratio, ratio_min=ratio,
        ratio_max=ratio, ours_x_floor=2.0, torch_x_floor=2.0 / ratio, reps_used=3,
        reps_run=3, calls_per_rep=1, quiet=True, clipped=float(mode == "clip"),
    )  # fmt: skip


def fake_result():
    recs = [fake_record("gpt2", 2.0, "noclip", 0.4), fake_record("gpt2", 2.0, "clip", 0.95)]
    accuracy = [harness.AccuracyRecord("gpt2", "float32", 2.0, 1.0, 1.0, 1.001, 0.0, 1e-3)]
    return harness.BenchResult(recs, accuracy, harness.BenchConfig(), {"torch": "x"}, 1.0)


def test_check_targets():
    checks = {
        (c.target.case, c.target.norm_type, c.target.mode, c.target.metric): c
        for c in targets.check_targets(fake_result())
    }
    assert checks["gpt2", 2.0, "noclip", "ratio"].met is True
    assert checks["gpt2", 2.0, "clip", "ratio"].met is False
    assert checks["gpt2", 2.0, None, "rel_err"].met is True
    assert checks["resnet50", 2.0, "noclip", "ratio"].met is None


def test_render_and_json():
    result = fake_result()
    text = render.render(result)
    assert "gpt2" in text and "MISS gpt2 p=2 clip" in text
    data = json.loads(render.to_json(result))
    assert data["records"][0]["ratio"] == 0.4
    assert data["config"]["norm_types"] == [2.0, "inf"]
    assert any(t["met"] is False for t in data["targets"])
