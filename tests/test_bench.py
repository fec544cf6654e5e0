"""gradclip._bench, the module behind ``gradclip bench``: its gradient sets, the interleaved
measurement, the rendering (times, ratios and a reading; no development targets) and the JSON
file it writes (only ever replacing its own).

No timing assertions: the machine is shared; the records are tested for well-formed data and
the measurement for what it calls, in which order, with which ``max_norm``.
"""

from __future__ import annotations

import json
import math
import os

import pytest
import torch
from torch import nn

from gradclip import _bench

# --- the gradient sets: against the modules they stand for ------------------------------


def shapes_of(module: nn.Module) -> list[tuple[int, ...]]:
    return [tuple(p.shape) for p in module.parameters()]


def gpt2_param_count(vocab: int, positions: int, d: int, layers: int) -> int:
    """Closed form from the architecture: embeddings, per block 12d² + 13d, final LayerNorm."""
    return vocab * d + positions * d + layers * (12 * d * d + 13 * d) + 2 * d


def test_mlp_cases_match_nn_sequential():
    with torch.device("meta"):
        tiny = nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 1))
        mnist = nn.Sequential(nn.Linear(784, 256), nn.ReLU(), nn.Linear(256, 10))
    assert _bench.CASES["tiny"].shapes() == shapes_of(tiny)
    assert _bench.CASES["mnist"].shapes() == shapes_of(mnist)
    assert sum(math.prod(s) for s in shapes_of(mnist)) == 203_530


def test_gpt2_case_matches_the_architecture():
    shapes = _bench.CASES["gpt2"].shapes()
    assert len(shapes) == 2 + 12 * 12 + 2 == 148
    assert sum(math.prod(s) for s in shapes) == gpt2_param_count(50257, 1024, 768, 12)
    assert sum(math.prod(s) for s in shapes) == 124_439_808  # published, lm_head tied to wte
    assert shapes[:2] == [(50257, 768), (1024, 768)]
    assert shapes[4] == (768, 2304) and shapes[12] == (3072, 768)  # Conv1D layout: (in, out)


def test_many_case_and_order():
    assert _bench.CASES["many"].shapes() == [(1000,)] * 2000
    sizes = [sum(math.prod(s) for s in c.shapes()) for c in _bench.CASES.values()]
    assert sizes == sorted(sizes)  # smallest first, as the help and the table list them


# --- the measurement ---------------------------------------------------------------------


def test_rows_are_well_formed():
    result = _bench.run(["tiny", "mnist"], reps=2, rep_seconds=0.001)
    assert [(r.case, r.norm_type, r.mode) for r in result.rows] == [
        (case, p, mode)
        for case in ("tiny", "mnist")
        for p in (2.0, math.inf)
        for mode in ("noclip", "clip")
    ]
    for r in result.rows:
        expected = {"tiny": (4, 25), "mnist": (4, 203_530)}[r.case]
        assert (r.n_tensors, r.numel) == expected
        assert r.gradclip_s > 0 and r.torch_s > 0
        assert r.ratio_min <= r.ratio <= r.ratio_max
        assert r.reps == 2 and r.calls_per_rep >= 1
        assert r.clipped == (1.0 if r.mode == "clip" else 0.0)
    assert result.env["torch"] == torch.__version__
    assert result.env["threads"] == str(torch.get_num_threads())


def spy(name, calls):
    """A clip function that records what it was given, then clips as torch does."""

    def clip(params, max_norm, norm_type):
        grads = [p.grad for p in params]
        flat = torch.cat([g.double().flatten() for g in grads])
        norm = torch.linalg.vector_norm(flat, norm_type).item()
        calls.append((name, tuple(id(g) for g in grads), max_norm / norm, norm))
        return torch.nn.utils.clip_grad_norm_(params, max_norm, norm_type)

    return clip


@pytest.mark.parametrize(("mode", "factor"), [("noclip", 10.0), ("clip", 0.98)])
@pytest.mark.parametrize("p", [2.0, math.inf])
def test_same_gradients_interleaved_max_norm_anchored(mode, factor, p):
    calls = []
    _bench.run(["mnist"], [p], [mode], reps=4, rep_seconds=0.0,
               ours=spy("ours", calls), theirs=spy("torch", calls))  # fmt: skip
    # 3 warm-up pairs, then per repetition both orders, so neither always goes first
    assert [c[0] for c in calls] == ["ours", "torch"] * 3 + ["ours", "torch", "torch", "ours"] * 4
    assert len({c[1] for c in calls}) == 1  # both see the very same gradient tensors
    for c in calls:  # max_norm follows the gradients' current norm (float64)
        assert c[2] == pytest.approx(factor, rel=1e-5)


def test_clipping_never_lets_the_gradients_vanish():
    calls = []
    spied = spy("both", calls)
    _bench.run(["tiny"], [2.0], ["clip"], reps=100, rep_seconds=0.0, ours=spied, theirs=spied)
    # 406 calls that each scale by 0.98 would leave 0.98**406 = 3e-4 of the first norm
    norms = [c[3] for c in calls]
    assert len(norms) == 406
    assert min(norms) >= norms[0] / 4 * 0.98 and max(norms) <= norms[0] * (1 + 1e-6)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"cases": ["gpt3"]}, "unknown case 'gpt3' in `cases`; choose from tiny, mnist"),
        ({"modes": ["sometimes"]}, "unknown mode 'sometimes' in `modes`; choose from noclip"),
        ({"norm_types": [0.0]}, "`norm_types` must be > 0"),
        ({"norm_types": [-2.0]}, "`norm_types` must be > 0"),
        ({"norm_types": [float("nan")]}, "`norm_types` must be > 0"),
        ({"reps": 0}, "`reps` must be >= 1, got 0"),
    ],
)
def test_bad_values_raise_before_anything_runs(kwargs, match):
    calls = []
    with pytest.raises(ValueError, match=match):
        _bench.run(**{"cases": ["tiny"], **kwargs}, ours=spy("ours", calls))
    assert calls == []


def test_a_case_that_does_not_fit_raises_memory_error(monkeypatch):
    huge = _bench.Case("huge", "4 PB: more than any address space", lambda: [(10**15,)])
    monkeypatch.setitem(_bench.CASES, "huge", huge)
    with pytest.raises(MemoryError, match="case 'huge'"):
        _bench.run(["huge"])


# --- rendering: times, ratios and an honest reading; never a pass/fail verdict -------------


def row(case="tiny", p=2.0, mode="noclip", ratio=1.0, spread=0.05, gradclip_s=50e-6):
    return _bench.Row(
        case=case, n_tensors=4, numel=25, norm_type=p, mode=mode, gradclip_s=gradclip_s,
        torch_s=gradclip_s / ratio, ratio=ratio, ratio_min=ratio - spread,
        ratio_max=ratio + spread, reps=11, calls_per_rep=100, clipped=float(mode == "clip"),
    )  # fmt: skip


ENV = {"gradclip": "0.1.0", "torch": "2.13.0", "threads": "2", "cpus": "2", "cpu": "x86"}


def test_render_reads_faster_slower_and_unclear_rows():
    rows = [
        row("gpt2", math.inf, "noclip", 0.10, gradclip_s=0.020),
        row("many", 2.0, "clip", 0.60, gradclip_s=0.008),
        row("tiny", 2.0, "noclip", 1.44),
        row("mnist", 2.0, "clip", 1.02, spread=0.1),  # its range spans 1
    ]
    text = _bench.render(_bench.BenchResult(rows, ENV))
    reading = [line for line in text.splitlines() if line.startswith("Reading:")]
    assert reading == [
        "Reading: gradclip took less time than torch in 2 of 4 rows (down to 0.10x: gpt2 p=inf "
        "noclip); more time than torch in 1 of 4 rows (up to 1.44x: tiny p=2 noclip); no clear "
        "difference in 1 of 4 (their [min-max] spans 1)."
    ]
    assert "0.10 [0.05-0.15]" in text and "1.44 [1.39-1.49]" in text
    assert "20.00 ms" in text and "50.0 us" in text and "200.00 ms" in text  # both, per call
    assert "2 threads" in text and "torch 2.13.0" in text
    for word in ("MISS", "target", "FAIL", " ok"):
        assert word not in text


def test_render_lists_only_the_cases_it_measured():
    text = _bench.render(_bench.BenchResult([row("tiny")], ENV))
    assert _bench.CASES["tiny"].description in text
    assert _bench.CASES["gpt2"].description not in text


def test_to_dict_is_json():
    data = _bench.to_dict(_bench.BenchResult([row(p=math.inf)], ENV))
    again = json.loads(json.dumps(data, allow_nan=False))
    assert again["kind"] == "gradclip bench" and again["env"] == ENV
    assert again["rows"][0]["norm_type"] == "inf" and again["rows"][0]["ratio"] == 1.0


# --- the JSON file: new, or one this command wrote; nothing else is touched ---------------


def result():
    return _bench.BenchResult([row()], ENV)


def test_write_json_creates_then_replaces_its_own_file(tmp_path):
    path = tmp_path / "bench.json"
    _bench.write_json(result(), path)
    assert json.loads(path.read_text())["rows"][0]["case"] == "tiny"
    _bench.write_json(_bench.BenchResult([row("mnist")], ENV), path)
    assert json.loads(path.read_text())["rows"][0]["case"] == "mnist"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bench.json"]  # no temporary left


@pytest.mark.parametrize(
    ("content", "what"),
    [
        ("my thesis\n", "text"),
        ('{"kind": "something else"}', "another JSON"),
        ('[1, 2, 3]', "a JSON list"),
        (b"\xff\xfe\x00", "binary"),
    ],
)
def test_a_file_it_did_not_write_is_refused_and_untouched(tmp_path, content, what):
    path = tmp_path / "precious.json"
    if isinstance(content, bytes):
        path.write_bytes(content)
    else:
        path.write_text(content)
    before = path.read_bytes()
    with pytest.raises(ValueError, match="not written by gradclip bench; it is left untouched"):
        _bench.write_json(result(), path)
    assert path.read_bytes() == before, what
    assert [p.name for p in tmp_path.iterdir()] == ["precious.json"]


def test_links_folders_and_missing_folders_are_refused(tmp_path):
    target = tmp_path / "elsewhere.json"
    _bench.write_json(result(), target)  # even a link to a file of ours is not followed
    link = tmp_path / "link.json"
    link.symlink_to(target)
    with pytest.raises(ValueError, match="symbolic link"):
        _bench.check_json_path(link)
    with pytest.raises(ValueError, match="not a regular file"):
        _bench.check_json_path(tmp_path)
    with pytest.raises(ValueError, match="does not exist; create it"):
        _bench.check_json_path(tmp_path / "missing" / "out.json")
    fifo = tmp_path / "fifo.json"
    os.mkfifo(fifo)
    with pytest.raises(ValueError, match="not a regular file"):  # and it does not hang
        _bench.check_json_path(fifo)
