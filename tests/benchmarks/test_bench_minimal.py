"""benchmarks/bench_minimal.py: the smallest clip is torch's clip, and a run pairs all three.

No timing assertions: only that the floor computes what torch computes, and that a short run
yields a row per model and pair.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))
import bench_minimal
import harness
from cases import make_grad_set


@pytest.mark.parametrize("max_norm", [0.01, 1e9])  # clips, and does not
def test_minimal_clip_is_torchs_clip(max_norm):
    shapes = [("w", (30, 20)), ("b", (20,)), ("e", (500,))]
    ours, theirs = make_grad_set("a", shapes), make_grad_set("a", shapes)
    total = bench_minimal.minimal_clip(ours.params, max_norm)
    expected = torch.nn.utils.clip_grad_norm_(theirs.params, max_norm)
    torch.testing.assert_close(total, expected, rtol=0, atol=0)
    for p, q in zip(ours.params, theirs.params, strict=True):
        torch.testing.assert_close(p.grad, q.grad, rtol=2e-7, atol=0)


def test_a_run_pairs_every_function():
    cfg = harness.BenchConfig(cases=(), norm_types=(2.0,), modes=("clip",), reps=1, min_rep_seconds=0.0)
    rows = bench_minimal.run(["mlp-4-4-1"], cfg, lambda line: None)
    assert [r[2] for r in rows] == [f"{a}/{b}" for a, b in bench_minimal.PAIRS]
    assert all(r[0] == "mlp-4-4-1" and float(r[5].split()[0]) > 0 for r in rows)


def test_bad_arguments_exit_2(tmp_path):
    with pytest.raises(SystemExit) as info:
        bench_minimal.main(["--reps", "0"])
    assert info.value.code == 2
    with pytest.raises(SystemExit) as info:
        bench_minimal.main(["--out", str(tmp_path / "missing")])
    assert info.value.code == 2
