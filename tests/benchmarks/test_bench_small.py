"""benchmarks/bench_small.py: the ladder is what it says, and a run yields every variant.

The ladder's shapes against ``nn`` modules and published counts; one short run (one
repetition, the smallest rungs) for the rows, the summary and the result files, which never
replace an earlier result. No timing assertions.
"""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))
import bench_small

LADDER = {m.name: m for m in bench_small.LADDER}


def numel(model):
    return sum(math.prod(s) for _, s in model.shapes)


def module_shapes(module: nn.Module):
    return [(name, tuple(p.shape)) for name, p in module.named_parameters()]


def test_the_issues_three_models_are_on_the_ladder():
    with torch.device("meta"):
        tiny = nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 1))
        mnist = nn.Sequential(nn.Linear(784, 256), nn.ReLU(), nn.Linear(256, 10))
        six = nn.Sequential(*[m for _ in range(6) for m in (nn.Linear(128, 128), nn.ReLU())][:-1])
    assert LADDER["mlp-4-4-1"].shapes == module_shapes(tiny)
    assert LADDER["mnist-mlp"].shapes == module_shapes(mnist)
    assert LADDER["mlp-6x128"].shapes == module_shapes(six)
    assert (numel(LADDER["mlp-4-4-1"]), numel(LADDER["mnist-mlp"])) == (25, 203_530)


def test_the_ladder_climbs_to_gpt2_small():
    sizes = [numel(m) for m in bench_small.LADDER[2:]]  # after the two overhead rows
    assert sizes == sorted(sizes)
    assert bench_small.LADDER[-1].name == "gpt2" and sizes[-1] == 124_439_808
    assert any(1e6 <= s <= 1e7 for s in sizes)  # a few-million-parameter model
    assert [len(m.shapes) for m in bench_small.LADDER[:2]] == [1, 100]  # the overhead rows
    assert all(s == (1,) for m in bench_small.LADDER[:2] for _, s in m.shapes)


def small_run(tmp_path, *extra):
    argv = ["--models", "overhead-1", "overhead-100", "mlp-4-4-1", "--reps", "1",
            "--rep-seconds", "0", "--threads", str(torch.get_num_threads()),
            "--out", str(tmp_path), *extra]  # fmt: skip
    return bench_small.main(argv)


def test_a_run_measures_every_variant_and_writes_txt_and_json(tmp_path, capsys):
    assert small_run(tmp_path) == 0
    out = capsys.readouterr().out
    files = sorted(p.name for p in tmp_path.iterdir())
    assert [Path(f).suffix for f in files] == [".json", ".txt"]
    assert files[0].startswith("small-") and Path(files[0]).stem == Path(files[1]).stem
    data = json.loads((tmp_path / files[0]).read_text())
    variants = {(r["case"], r["norm_type"], r["mode"], r["foreach"]) for r in data["records"]}
    assert variants == {
        (m, p, mode, f)
        for m in ("overhead-1", "overhead-100", "mlp-4-4-1")
        for p in (2.0, "inf")
        for mode in ("noclip", "clip")
        for f in (None, False, True)
    }
    for r in data["records"]:
        assert r["ratio_min"] <= r["ratio"] <= r["ratio_max"]
        assert r["clipped"] == (1.0 if r["mode"] == "clip" else 0.0)
    assert data["env"]["threads"] and data["env"]["commit"]
    assert (tmp_path / files[1]).read_text() == out
    assert "Per call (1 tensor of 1 element" in out and "Per extra tensor" in out
    assert "torch us" in out and "gradclip us" in out
    # a second run the same day writes beside the first, never over it
    assert small_run(tmp_path, "--foreach", "none", "--norm-types", "2") == 0
    assert len(list(tmp_path.iterdir())) == 4
    assert json.loads((tmp_path / files[0]).read_text()) == data


@pytest.mark.parametrize("function", ["get_total_norm", "clip_grad_value_"])
def test_another_drop_in_runs_its_noclip_rows_and_names_its_files(function, tmp_path, capsys):
    """Both libraries get the same gradients and return the same norm (the harness's
    accuracy check reads it); value clipping runs one row per model and foreach, without
    changing a gradient element (max_norm, 10x the total norm, bounds every element)."""
    gs = bench_small.make_grad_set("g", [("w", (3, 4)), ("b", (4,))])
    before = [q.grad.clone() for q in gs.params]
    ours, theirs = bench_small._pair(function, gs)
    assert torch.equal(ours(gs.params, 1e9, 2.0), theirs(gs.params, 1e9, 2.0))
    assert all(torch.equal(q.grad, b) for q, b in zip(gs.params, before, strict=True))
    assert small_run(tmp_path, "--function", function) == 0
    out = capsys.readouterr().out
    assert out.startswith(f"gradclip.{function} vs torch.nn.utils.{function} ")
    data = json.loads(next(tmp_path.glob("*.json")).read_text())
    assert next(tmp_path.glob("*.json")).name.startswith(f"small-{function}-")
    assert data["function"] == function
    norm_types = {2.0} if function == "clip_grad_value_" else {2.0, "inf"}
    assert {(r["mode"], r["norm_type"]) for r in data["records"]} == {
        ("noclip", p) for p in norm_types
    }
    with pytest.raises(SystemExit) as exc:
        bench_small.main(["--function", function, "--modes", "clip"])
    assert exc.value.code == 2 and "noclip rows only" in capsys.readouterr().err


@pytest.mark.parametrize(
    "argv",
    [["--reps", "0"], ["--models", "resnet"], ["--foreach", "maybe"], ["--out", "no/such/dir"],
     ["--function", "clip_grads_with_norm_"]],
)
def test_bad_arguments_exit_2(argv, capsys):
    with pytest.raises(SystemExit) as exc:
        bench_small.main(argv)
    assert exc.value.code == 2
    assert "error" in capsys.readouterr().err
