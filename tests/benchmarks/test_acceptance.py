"""benchmarks/acceptance.py: issue 18's verdicts from runs and picks (no training here).

The medians, ratios and verdicts are checked against numbers computed by hand from made-up
runs; the reuse of a quality-benchmark result keeps only the sweep.
"""

from __future__ import annotations

import json
import math
import statistics
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))
import acceptance
import gradclip
from acceptance import Pick, Run


def _runs(task: str, metrics: dict[str, list[float]]) -> list[Run]:
    return [Run(task, s, seed, m, not m < 1.0, 0.5, 2.0) for s, ms in metrics.items()
            for seed, m in enumerate(ms)]  # fmt: skip


METRICS = {
    "none": [0.9, 0.8, 0.7],
    "fixed 0.1": [0.5, 0.6, 0.4],
    "fixed 0.3": [0.2, 0.25, 0.3],
    "fixed 1": [0.3, 0.35, 0.25],
    "default": [0.22, 0.27, 0.26],
    "fixed 3.9": [0.4, 0.2, 0.9],
}


def test_summary_medians_ratios_and_verdicts():
    runs = _runs("rnn-addition/violent", METRICS)
    picks = [
        Pick("rnn-addition/violent", 0, "finder", "fixed 0.3", 0.3, "clear", 10, 0.2, 1.0),
        Pick("rnn-addition/violent", 1, "finder", "default", None, "tie", 10, 0.18, 1.0),
        Pick("rnn-addition/violent", 2, "finder", "fixed 1", 1.0, "clear", 10, 0.19, 1.0),
        *(Pick("rnn-addition/violent", k, "recommend", "fixed 3.9", 3.9, "-", 0, 0.0, 0.0)
          for k in range(3)),
    ]  # fmt: skip
    (v,) = acceptance.summarize(runs, picks)
    best = statistics.median(METRICS["fixed 0.3"])
    assert v.best == "fixed 0.3" and v.medians["fixed 0.3"] == best
    finder = statistics.median([0.2, 0.27, 0.25])  # each seed scored by its own pick's run
    assert v.medians["finder"] == pytest.approx(finder)
    assert v.ratios["finder"] == pytest.approx(finder / best)
    assert v.ratios["default"] == pytest.approx(statistics.median(METRICS["default"]) / best)
    assert v.medians["recommend"] == statistics.median(METRICS["fixed 3.9"])
    default = statistics.median(METRICS["default"]) / best
    assert v.passes == {"finder": finder / best <= 1.1, "default": default <= 1.1,
                        "recommend": 0.4 / best <= 1.15, "finder cost": True}  # fmt: skip
    assert v.finder_fraction == 0.19 and v.finder_wall == pytest.approx(0.5)
    assert not v.judge
    assert set(v.intervals) == {"finder", "default", "recommend"}
    assert set(v.tuned) == {"tuned", "finder", "default", "recommend"}
    # the finder's seeds against fixed 0.3's, pair by pair: (0.2, 0.2), (0.27, 0.25), (0.25, 0.3)
    assert v.intervals["finder"] == acceptance.interval([(0.2, 0.2), (0.27, 0.25), (0.25, 0.3)])
    text = acceptance.render([v])
    assert "rnn-addition/violent" in text and "finder chose fixed 0.3 x1, default x1, fixed 1 x1" in text
    low, high = v.intervals["default"]
    assert f"default {'PASS' if v.passes['default'] else 'FAIL'} [{low:.2f}-{high:.2f}x]" in text


def test_the_interval_of_two_seeds_spans_the_ratios_of_their_resamples():
    """Two seeds give four equally likely resamples: each seed twice (a1/b1, a2/b2) and both
    (the medians of two values are their means: (a1+a2)/(b1+b2), drawn half the time). The
    5th and 95th percentiles of 2000 resamples are the smallest and the largest of them."""
    (a1, b1), (a2, b2) = pairs = [(0.3, 0.2), (0.5, 0.6)]
    exact = [a1 / b1, a2 / b2, (a1 + a2) / (b1 + b2)]
    assert acceptance.interval(pairs) == pytest.approx((min(exact), max(exact)))
    assert acceptance.interval([(0.4, 0.4)] * 5) == (1.0, 1.0)
    assert acceptance.interval([(2 * b, b) for b in (0.1, 0.3, 0.2, 0.7)]) == pytest.approx((2.0, 2.0))
    # a diverged seed (inf) against a finite best: the 26% of resamples that draw it twice or
    # more have an infinite median
    assert acceptance.interval([(math.inf, 0.1), (0.1, 0.1), (0.1, 0.1)])[1] == math.inf


def test_a_threshold_best_on_every_seed_is_tuned_on_any_half():
    fixed = {"fixed 0.1": {k: 0.5 for k in range(6)}, "fixed 1": {k: 0.2 + 0.01 * k for k in range(6)}}
    default = {k: 2 * fixed["fixed 1"][k] for k in range(6)}
    assert acceptance.halves(fixed, {"default": default}) == pytest.approx({"tuned": 1.0, "default": 2.0})
    assert acceptance.halves({"fixed 1": {0: 0.2}}, {"default": {0: 0.4}}) == {}


def test_the_halves_show_the_winners_curse():
    """Seven seeds, three on which ``a`` is bad (9) and four on which it is good (1); ``b`` is 2
    everywhere, the default 3. A split tunes on three seeds and judges on four; with ``k`` of
    the bad seeds among the three tuned on (probability C(3,k) C(4,3-k) / 35):

    * k=0 (4/35): ``a`` tuned; judged on 3 bad + 1 good: ``a``'s median 9 over ``b``'s 2: 4.5;
    * k=1 (18/35): ``a`` tuned; judged on 2 + 2: median 5 over 2: 2.5;
    * k=2, 3 (13/35): ``b`` tuned; judged on at most one bad seed: 2 over ``a``'s 1: 2.0.

    The median of that distribution is 2.5 (the tuned threshold over the judged half's best);
    the default over the tuned threshold: 3/9 (4/35), 3/5 (18/35), 3/2 (13/35): median 0.6.
    """
    a = {k: 9.0 if k < 3 else 1.0 for k in range(7)}
    fixed = {"a": a, "b": dict.fromkeys(range(7), 2.0)}
    got = acceptance.halves(fixed, {"default": dict.fromkeys(range(7), 3.0)})
    assert got == pytest.approx({"tuned": 2.5, "default": 0.6})


def test_a_judge_task_is_marked_and_a_missing_pick_run_leaves_no_verdict():
    runs = _runs("lstm-text", {k: v for k, v in METRICS.items() if k != "fixed 3.9"})
    picks = [Pick("lstm-text", 0, "recommend", "fixed 3.9", 3.9, "-", 0, 0.0, 0.0)]
    (v,) = acceptance.summarize(runs, picks)
    assert v.judge and "recommend" not in v.medians and "recommend" not in v.passes
    assert math.isnan(v.finder_fraction)


def test_a_method_on_fewer_seeds_is_compared_on_its_own_seeds():
    # the sweep on four seeds (two added later), the finder's picks on the first two only
    runs = _runs("adam-spikes", {"fixed 0.1": [0.2, 0.2, 0.9, 0.9], "fixed 1": [0.5, 0.5, 0.3, 0.3]})
    picks = [Pick("adam-spikes", k, "finder", "fixed 1", 1.0, "tie", 10, 0.2, 1.0) for k in (0, 1)]
    (v,) = acceptance.summarize(runs, picks)
    # best over four seeds: fixed 1 (median 0.4 against 0.55); on the finder's seeds 0.5
    assert v.best == "fixed 1" and v.ran == {"finder": 2}
    assert v.ratios["finder"] == pytest.approx(1.0) and v.passes["finder"]
    assert "0.5 (1.00x) (2 of 4 seeds)" in acceptance.render([v])


@pytest.mark.parametrize("key", ["records", "runs"])  # bench_quality's result, or this script's
def test_reuse_keeps_the_sweep_only(tmp_path, key):
    saved = {key: [
        {"task": "adam-spikes", "strategy": s, "seed": seed, "metric": 0.1, "diverged": False,
         "steps": 3, "nonfinite_steps": 0, "clip_rate": 0.0, "median_threshold": 1.0,
         "wall_time_s": 1.0}
        for s in ("none", "fixed 0.1", "fixed 1", "AdaptiveClip", "ZClip") for seed in range(3)
    ]}  # fmt: skip
    path = tmp_path / "quality.json"
    path.write_text(json.dumps(saved))
    kept = acceptance.reuse(path, ["adam-spikes", "sgd-heavy-tail"], seeds=2)
    assert sorted({(r.strategy, r.seed) for r in kept}) == [
        ("fixed 0.1", 0), ("fixed 0.1", 1), ("none", 0), ("none", 1)]  # fmt: skip
    later = acceptance.reuse(path, ["adam-spikes"], seeds=1, first=2)
    assert sorted({(r.strategy, r.seed) for r in later}) == [("fixed 0.1", 2), ("none", 2)]


def _fake_job(seen):
    def job(job):
        seen.append(job)
        kind, task, seed = job
        run = {"task": task, "strategy": "fixed 1" if kind == "recommend" else kind, "seed": seed,
               "metric": 0.5, "diverged": False, "clip_rate": 0.0, "wall_time_s": 1.0}
        if kind == "recommend":
            return {"runs": [run], "picks": [{"task": task, "seed": seed, "method": "recommend",
                    "strategy": "fixed 1", "threshold": 1.0, "confidence": "-", "steps": 0,
                    "fraction": 0.0, "seconds": 0.0}]}  # fmt: skip
        return {"runs": [run]}

    return job


def test_evaluate_runs_the_chosen_methods_on_the_chosen_seeds(monkeypatch, tmp_path):
    seen: list[tuple[str, str, int]] = []
    monkeypatch.setattr(acceptance, "_job", _fake_job(seen))
    path = tmp_path / "part.json"
    acceptance.evaluate(["adam-spikes"], 2, path, first=5, methods=["default"])
    # the sweep always runs, fixed 1 too (no recommendation runs it here)
    assert seen == [(k, "adam-spikes", seed) for seed in (5, 6) for k in (*acceptance.SWEEP, "default")]
    meta = json.loads(path.read_text())["meta"]
    assert (meta["seeds"], meta["first_seed"], meta["methods"]) == (2, 5, ["default"])
    seen.clear()
    acceptance.evaluate(["adam-spikes"], 1, methods=["recommend"])
    sweep = [s for s in acceptance.SWEEP if s != "fixed 1"]
    assert seen == [(k, "adam-spikes", 0) for k in ("recommend", *sweep)]


def test_render_reads_several_results_as_one(monkeypatch, tmp_path, capsys):
    monkeypatch.setattr(acceptance, "_job", _fake_job([]))
    parts = [tmp_path / "a.json", tmp_path / "b.json"]
    acceptance.evaluate(["adam-spikes"], 2, parts[0], methods=["default"])
    acceptance.evaluate(["adam-spikes"], 3, parts[1], first=2, methods=["default"])
    assert acceptance.main(["--render", *map(str, parts)]) == 0
    out = capsys.readouterr().out
    assert out.startswith("a.json, b.json: 5 seeds (0-4),")
    assert "default: 1/1 tasks pass" in out
    # no finder and no recommendation ran: no rows, costs or choices for them
    assert "finder" not in out.split("acceptance (")[0] and "recommend chose" not in out
    acceptance.evaluate(["lstm-text"], 1, parts[1], first=5, resume=True, methods=["default"])
    assert acceptance.main(["--render", *map(str, parts), "--tasks", "adam-spikes"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("a.json, b.json: 5 seeds (0-4),") and "lstm-text" not in out
    with pytest.raises(SystemExit) as exc:
        acceptance.main(["--render", *map(str, parts), "--tasks", "muon-adamw"])
    assert exc.value.code == 2 and "no run of the tasks muon-adamw" in capsys.readouterr().err


@pytest.mark.parametrize("jobs", [1, 2])
def test_map_jobs_returns_each_result_in_order_at_one_thread(jobs):
    threads = torch.get_num_threads()
    try:
        assert acceptance.map_jobs(abs, [-3, 1, -2], jobs) == [3, 1, 2]
        assert torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(threads)


def test_a_recommendation_with_a_start_is_applied_after_it():
    # "fixed 1 then 0.5 from 3": torch's clip at 1 on steps 0-2, at 0.5 from step 3 on
    clip = acceptance.clipper("sgd-heavy-tail", "fixed 1 then 0.5 from 3")
    model = torch.nn.Linear(3, 1)
    for step in range(6):
        for p in model.parameters():
            p.grad = torch.full_like(p, 2.0)
        reference = [torch.nn.Parameter(p.detach().clone()) for p in model.parameters()]
        for r, p in zip(reference, model.parameters(), strict=True):
            r.grad = p.grad.clone()
        torch.nn.utils.clip_grad_norm_(reference, 1.0 if step < 3 else 0.5)
        clip(model)
        for p, r in zip(model.parameters(), reference, strict=True):
            torch.testing.assert_close(p.grad, r.grad, rtol=0, atol=0)
    assert isinstance(acceptance.clipper("sgd-heavy-tail", "fixed 0.5"), gradclip.NormClip)
    with pytest.raises(ValueError, match="unknown strategy"):
        acceptance.clipper("sgd-heavy-tail", "fixed 1 after 0.5 from 3")
