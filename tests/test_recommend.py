"""recommend_max_norm: the threshold, its evidence and its warnings.

Expected values are computed here from the norms themselves (NumPy quantiles, counts with
torch's clip rule), never copied from gradclip's output.
"""

from __future__ import annotations

import dataclasses
import json
import math

import numpy as np
import pytest
import torch

import gradclip
from gradclip.recommend import render_text

pytestmark = pytest.mark.usefixtures("one_thread")


def clipped_by(norms, max_norm):
    """Fraction of steps torch's rule scales down: max_norm / (norm + 1e-6) < 1."""
    norms = np.asarray(norms, dtype=float)
    return float(np.mean(max_norm / (norms + 1e-6) < 1))


def noisy_problem(seed=0):
    """Linear regression with label noise, the model started at the solution: the gradient
    norms are noise, with the same distribution whether or not the run clips."""
    torch.manual_seed(seed)
    w = torch.randn(8, 1)
    model = torch.nn.Sequential(torch.nn.Linear(8, 1))
    with torch.no_grad():
        model[0].weight.copy_(w.T)
        model[0].bias.zero_()
    x = torch.randn(1024, 8)
    y = x @ w + 0.5 * torch.randn(1024, 1)
    return model, x, y


def run(max_norm, steps=200, log=None):
    """SGD on the noisy problem; clips with NormClip(max_norm) under a GradMonitor when
    logging, else returns torch's pre-clip norms of an unclipped run."""
    model, x, y = noisy_problem()
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    mon = gradclip.GradMonitor(gradclip.NormClip(max_norm), model, log=log, every=32)
    norms = []
    for _ in range(steps):
        idx = torch.randint(0, len(x), (32,))
        loss = (model(x[idx]) - y[idx]).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        if log is None:
            norms.append(torch.nn.utils.clip_grad_norm_(model.parameters(), math.inf).item())
        else:
            mon(loss=loss.detach())
        opt.step()
    mon.close()
    return norms


def test_threshold_10x_below_the_median_is_flagged_and_raised(tmp_path):
    path = tmp_path / "run.jsonl"
    threshold = float(np.median(run(math.inf))) / 10  # from a pilot run without clipping
    run(threshold, log=path)
    logged = [json.loads(line) for line in path.read_text().splitlines()]
    norms = np.array([r["norm"] for r in logged])
    assert 8 <= np.median(norms) / threshold <= 12  # the set-up: a threshold 10x too low

    rec = gradclip.recommend_max_norm(path)
    # the typical norms ask for 10x more; the run never applied a norm above `threshold`, so
    # the recommendation raises by one step of 3x (two significant digits) and says so
    wanted = np.percentile(norms, 99)
    assert rec.max_norm == float(f"{3 * threshold:.2g}")
    (w,) = [w for w in rec.warnings if "this log cannot tell" in w]
    asked = float(w.split("max_norm=")[1].split(",")[0])
    assert wanted < asked <= 1.1 * wanted and asked >= 5 * threshold
    assert f"applied norms up to {threshold:.4g}" in w
    # ...and it clipped to the end: which way to go, one log cannot tell, and it says so
    # instead of "ask again, raising a step at a time" (the norms are noise around a solution:
    # a lower threshold, a smaller step, may well be better)
    quarter = len(norms) // 4
    assert rec.late_clip_rate == pytest.approx(clipped_by(norms[-quarter:], threshold)) == 1.0
    (b,) = [w for w in rec.warnings if "a single log cannot tell" in w]
    assert "still clipped 100% of the last quarter" in b and "find_max_norm" in b
    assert "ask again" not in w and "raise it" not in " ".join(rec.warnings)
    assert "held to 3x the largest norm the run applied" in rec.rule
    assert rec.recorded_threshold == pytest.approx(threshold)
    assert rec.recorded_clip_rate == 1.0
    assert any("clipping fired on 100% of steps" in w and "below the typical norm" in w
               for w in rec.warnings)  # fmt: skip
    assert any("below the median pre-clip norm" in w for w in rec.warnings)
    assert "100% of its last quarter" in render_text(rec)
    # the evidence, against NumPy on the logged norms
    for key, q in (("p10", 10), ("p50", 50), ("p90", 90), ("p99", 99)):
        assert rec.quantiles[key] == pytest.approx(np.percentile(norms, q), rel=1e-9)
    assert rec.projected_clip_rate == pytest.approx(clipped_by(norms, rec.max_norm))
    assert "recommended max_norm" in render_text(rec)
    # recorded where it did not clip, the same norms get the whole step
    free = gradclip.recommend_max_norm(gradclip.History.from_norms(norms.tolist(), threshold=1e3))
    assert free.max_norm == asked and not any("cannot tell" in w for w in free.warnings)
    # ...and so do those of a run that never moved its weights (every step frozen)
    frozen = gradclip.recommend_max_norm(gradclip.History.from_norms(norms.tolist(), threshold=1e-6))
    assert frozen.max_norm == asked and frozen.frozen_steps == len(norms)


def test_a_run_whose_clipping_fades_is_told_to_raise_a_step_and_ask_again():
    # clipped at 1 while the norms were 5 (most of the run: no "start"), then not at all once
    # they fell to 0.5: the log shows training at 1 early, nothing of the threshold late
    norms = [5.0 + 0.1 * (i % 7) for i in range(240)] + [0.5 + 0.01 * (i % 5) for i in range(160)]
    rec = gradclip.recommend_max_norm(gradclip.History.from_norms(norms, threshold=1.0))
    assert rec.late_clip_rate == clipped_by(norms[-100:], 1.0) == 0.0
    assert rec.max_norm == 3.0  # held to 3x the largest norm applied (1)
    (w,) = [w for w in rec.warnings if "this log cannot tell" in w]
    assert "ask again, raising a step at a time" in w
    assert not any("a single log cannot tell" in w for w in rec.warnings)
    # the same norms, clipped at 0.1 to the end: the warning, and no "ask again"
    low = gradclip.recommend_max_norm(gradclip.History.from_norms(norms, threshold=0.1))
    assert low.late_clip_rate == clipped_by(norms[-100:], 0.1) == 1.0
    assert any("a single log cannot tell" in w for w in low.warnings)
    assert not any("ask again" in w for w in low.warnings)
    # without a recorded threshold there is no late clip rate, and no such warning
    free = gradclip.recommend_max_norm(norms)
    assert free.late_clip_rate is None and not any("single log" in w for w in free.warnings)


def spiky_norms(n=2000, spike_every=50, factor=100.0, seed=0):
    rng = np.random.default_rng(seed)
    norms = np.exp(rng.normal(0.0, 0.3, n))
    spikes = np.arange(7, n, spike_every)
    norms[spikes] *= factor
    return norms, spikes


def test_spikes_are_left_out_of_the_threshold():
    norms, spikes = spiky_norms()
    typical = np.delete(norms, spikes)
    rec = gradclip.recommend_max_norm(torch.tensor(norms))
    assert np.percentile(typical, 99) <= rec.max_norm < norms[spikes].min()
    assert rec.spike_count == len(spikes)
    top = sorted(spikes, key=lambda i: -norms[i])[:5]
    assert [s for s, _ in rec.spikes] == top
    assert [v for _, v in rec.spikes] == pytest.approx(norms[top])
    assert rec.projected_clip_rate == pytest.approx(clipped_by(norms, rec.max_norm))
    # the rule is robust: a 100x larger spike does not move the threshold
    bigger, _ = spiky_norms(factor=1e4)
    assert gradclip.recommend_max_norm(bigger.tolist()).max_norm == rec.max_norm


def test_the_start_of_training_is_neither_typical_nor_a_spike():
    # a run that settles: steps falling from 1000x the settled level to it, then spiky norms
    settled, spikes = spiky_norms(n=1000)
    start = 1e3 * np.median(settled) * 1e-3 ** (np.arange(60) / 60)
    start = start[start > 5 * np.median(settled)]  # clearly above any spike cut of the rest
    norms = np.concatenate([start, settled])
    rec = gradclip.recommend_max_norm(torch.tensor(norms))
    alone = gradclip.recommend_max_norm(torch.tensor(settled))
    assert len(start) >= 40 and rec.start_steps >= len(start)
    assert rec.max_norm == alone.max_norm  # the threshold is the settled run's
    assert rec.spike_count == len(spikes)  # the isolated spikes, not the start
    assert all(s >= len(start) for s, _ in rec.spikes)
    (w,) = [w for w in rec.warnings if "start of training" in w]
    assert f"first {rec.start_steps} steps" in w and "AdaptiveClip" in w
    assert f"from step {rec.start_steps} on" in w and "threshold_at" in w
    assert "steps of the start" in rec.rule
    # applied as advised: no clipping (inf) during the start (the run recorded none), then
    # max_norm; a NormClip takes both
    clipper = gradclip.NormClip(rec.threshold_at(0))
    clipper.max_norm = rec.threshold_at(rec.settled_step)
    assert clipper.max_norm == rec.max_norm
    assert rec.settled_step == rec.start_steps
    assert [rec.threshold_at(i) for i in (0, rec.settled_step - 1)] == [math.inf, math.inf]
    assert rec.threshold_at(rec.settled_step) == rec.threshold_at(10**6) == rec.max_norm
    assert alone.settled_step == 0 and alone.threshold_at(0) == alone.max_norm
    head = render_text(rec).splitlines()[0]
    assert head.endswith(f"from step {rec.settled_step} on; before it, no clipping")
    assert render_text(alone).splitlines()[0].endswith("(norm_type 2)")


def test_the_start_is_clipped_as_the_recorded_run_was_and_its_steps_are_the_logs():
    settled, _ = spiky_norms(n=300)
    start = [1e3 * float(np.median(settled))] * 8
    h = gradclip.History.from_norms(np.concatenate([start, settled]).tolist(), threshold=5.0)
    h = dataclasses.replace(h, steps=h.steps + 100)  # a log that began at step 100
    rec = gradclip.recommend_max_norm(h)
    assert (rec.start_steps, rec.settled_step) == (8, 108)
    assert rec.threshold_at(107) == 5.0 and rec.threshold_at(108) == rec.max_norm
    assert "from step 108 on" in " ".join(rec.warnings)
    assert render_text(rec).splitlines()[0].endswith("from step 108 on; before it, 5 as recorded")


@pytest.mark.parametrize("first", [1, 4])
def test_a_few_large_first_steps_are_spikes(first):
    settled, spikes = spiky_norms(n=500)
    norms = np.concatenate([[1e3 * settled.max()] * first, settled])
    rec = gradclip.recommend_max_norm(norms.tolist())
    assert rec.start_steps == 0 and rec.spike_count == len(spikes) + first
    assert not any("start of training" in w for w in rec.warnings)


def test_threshold_is_just_above_the_typical_quantile():
    norms = [2.0, 2.2, 1.8, 2.1] * 25
    rec = gradclip.recommend_max_norm(norms)
    assert rec.max_norm > max(norms)  # two significant digits, rounded up
    assert rec.max_norm == pytest.approx(2.3)
    assert rec.projected_clip_rate == 0.0 and rec.spike_count == 0


def lower_median(x):
    """torch's median: the lower of the two middle values of an even count."""
    return np.sort(x)[(len(x) - 1) // 2]


def adam():
    return torch.optim.AdamW([torch.nn.Parameter(torch.zeros(1))])


@pytest.mark.parametrize("optimizer", [adam, lambda: "AdamW", lambda: "rmsprop", lambda: [adam(), adam()]])
def test_under_a_normalising_optimizer_steady_norms_are_all_clipped(optimizer):
    # Adam's step size is its learning rate's: a threshold below the typical norms costs it
    # none, and a spike then reaches its moments as one ordinary step
    norms, spikes = spiky_norms()
    typical = np.delete(norms, spikes)
    rec = gradclip.recommend_max_norm(torch.tensor(norms), optimizer=optimizer())
    q01 = np.percentile(typical, 1)
    assert q01 / 1.1 <= rec.max_norm < q01  # just below it: two significant digits
    assert rec.projected_clip_rate == pytest.approx(clipped_by(norms, rec.max_norm))
    assert rec.projected_clip_rate >= 0.99 and rec.normalising is True
    assert rec.spike_count == len(spikes)  # the evidence is the same as without it
    assert rec.drift == pytest.approx(lower_median(norms[-200:]) / lower_median(norms[:200]))
    assert "just below the 1% quantile" in rec.rule and "every typical step" in rec.rule
    # SGD's step is proportional to the gradient: the threshold stays above the typical norms
    sgd = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.1)
    for other in (gradclip.recommend_max_norm(norms.tolist(), optimizer=sgd),
                  gradclip.recommend_max_norm(norms.tolist(), optimizer=[sgd, adam()]),
                  gradclip.recommend_max_norm(norms.tolist())):  # fmt: skip
        assert np.percentile(typical, 99) <= other.max_norm < norms[spikes].min()
    assert other.normalising is None and gradclip.recommend_max_norm(norms, optimizer="sgd").normalising is False


def test_under_a_normalising_optimizer_drifting_norms_keep_the_typical_rule():
    # norms that fall 1000x over the run: Adam's second moment lags them and its steps shrink,
    # which clipping every step would undo
    rng = np.random.default_rng(1)
    norms = np.exp(np.linspace(0, np.log(1e-3), 1000) + rng.normal(0.0, 0.3, 1000))
    rec = gradclip.recommend_max_norm(norms, optimizer=adam())
    assert rec.max_norm == gradclip.recommend_max_norm(norms).max_norm
    drift = lower_median(norms[-100:]) / lower_median(norms[:100])
    assert drift < 1 / gradclip.recommend.DRIFT and rec.drift == pytest.approx(drift)
    assert f"changed {drift:.3g}x over the run" in rec.rule and "just above" in rec.rule
    assert any(f"changed {drift:.3g}x from the first" in w for w in rec.warnings)
    # too few steps to tell whether the norms are steady
    few = gradclip.recommend_max_norm([1.0, 1.1, 0.9] * 10, optimizer="adam")
    assert few.drift is None and "too few settled steps" in few.rule and few.max_norm > 1.1


def test_under_a_normalising_optimizer_the_start_is_not_drift():
    settled, _ = spiky_norms(n=500)
    start = 1e3 * np.median(settled) * 1e-2 ** (np.arange(30) / 30)  # far above, falling 100x
    norms = np.concatenate([start, settled])
    rec = gradclip.recommend_max_norm(norms, optimizer=adam())
    alone = gradclip.recommend_max_norm(settled, optimizer=adam())
    assert rec.start_steps == len(start) and rec.max_norm == alone.max_norm < np.median(settled)
    assert rec.drift == pytest.approx(lower_median(settled[-50:]) / lower_median(settled[:50]))
    # clipped from the first step: under Adam that costs the start no step size, where a start
    # clipped less would fill its second moment with large norms
    assert rec.settled_step == 0 and rec.threshold_at(0) == rec.max_norm
    assert "from the first step" in rec.rule and not any("start of training" in w for w in rec.warnings)
    assert gradclip.recommend_max_norm(norms, optimizer="SGD").settled_step == len(start)


def test_under_a_normalising_optimizer_clipping_is_no_learning_rate_cut():
    # a run clipped on every step to its end: with SGD a smaller learning rate, and a single
    # log cannot tell which way is better; with Adam neither holds
    h = gradclip.History.from_norms(spiky_norms(n=400)[0].tolist(), threshold=0.1)
    sgd, adamw = (gradclip.recommend_max_norm(h, optimizer=o) for o in ("SGD", "AdamW"))
    assert any("smaller learning rate" in w for w in sgd.warnings)
    assert any("single log cannot tell" in w for w in sgd.warnings)
    assert not any("learning rate" in w or "raise it" in w for w in adamw.warnings)
    assert adamw.late_clip_rate == sgd.late_clip_rate == 1.0


def test_the_optimizer_the_log_names_is_followed():
    # a monitor that stepped Adam names it in the log: no optimizer= needed; one given wins
    norms = spiky_norms()[0].tolist()
    named = dataclasses.replace(gradclip.History.from_norms(norms), optimizer="AdamW", normalising=True)
    rec = gradclip.recommend_max_norm(named)
    given = gradclip.recommend_max_norm(norms, optimizer="AdamW")
    assert (rec.max_norm, rec.normalising, rec.optimizer) == (given.max_norm, True, "AdamW")
    assert "the optimizer (AdamW, as the log names it) normalises its update" in rec.rule
    assert "the optimizer (AdamW) normalises its update" in given.rule
    sgd = gradclip.recommend_max_norm(named, optimizer="sgd")
    assert (sgd.max_norm, sgd.normalising, sgd.optimizer) == (gradclip.recommend_max_norm(norms).max_norm, False, "SGD")
    assert gradclip.recommend_max_norm(norms).optimizer is None
    # two runs in one log, Adam and AdamW: no one name, but the kind they share
    kin = dataclasses.replace(named, optimizer=None)
    assert "the optimizer (each the log names) normalises" in gradclip.recommend_max_norm(kin).rule
    text = gradclip.recommend.render_text(rec).splitlines()
    assert "  optimizer: AdamW (normalises its update)" in text
    assert "  optimizer: SGD (does not normalise its update)" in gradclip.recommend.render_text(sgd)
    assert "optimizer:" not in gradclip.recommend.render_text(gradclip.recommend_max_norm(norms))


def test_the_optimizer_argument_is_checked():
    with pytest.raises(ValueError, match=r"`optimizer`='Lion' names no torch.optim optimizer.*AdamW.*'Adam' for Lion"):
        gradclip.recommend_max_norm([1.0] * 60, optimizer="Lion")
    for bad in (int, 3, []):
        with pytest.raises(TypeError, match="optimizer"):
            gradclip.recommend_max_norm([1.0] * 60, optimizer=bad)
    # a class reads as its name
    by_class = gradclip.recommend_max_norm([1.0, 1.1, 0.9] * 30, optimizer=torch.optim.Adam)
    assert by_class == gradclip.recommend_max_norm([1.0, 1.1, 0.9] * 30, optimizer="adam")


def test_frozen_updates_are_flagged():
    h = gradclip.History.from_norms([1.0, 2.0, 1.5] * 40, threshold=1e-4)
    rec = gradclip.recommend_max_norm(h)
    assert rec.frozen_steps == 120 and rec.min_coef < 1e-3
    assert any("coefficient below 0.001" in w and "frozen" in w for w in rec.warnings)
    # with momentum the weights still move on those steps, by the earlier steps'
    assert any("momentum only" in w for w in rec.warnings)


def test_clipping_that_never_fires_through_spikes_is_flagged():
    norms, _ = spiky_norms(n=500)
    rec = gradclip.recommend_max_norm(gradclip.History.from_norms(norms, threshold=1e6))
    assert rec.recorded_clip_rate == 0.0
    assert any(w.startswith("clipping never fired") for w in rec.warnings)


def test_nonfinite_steps_are_left_out_and_reported():
    norms = [1.0, 1.2, math.nan, 0.9, math.inf] * 20
    rec = gradclip.recommend_max_norm(norms)
    assert rec.finite_steps == 60 and rec.nonfinite_steps == 40
    assert rec.quantiles["max"] == 1.2
    assert any("NaN/inf gradients (first at step 2)" in w for w in rec.warnings)


def test_nothing_finite_gives_no_threshold():
    rec = gradclip.recommend_max_norm([math.nan] * 5)
    assert rec.max_norm is None and rec.projected_clip_rate is None
    assert "nothing to recommend" in rec.warnings[0]
    assert render_text(rec).startswith("no recommendation")
    json.dumps(rec.to_dict())


def test_drift_and_few_steps_are_flagged():
    growing = np.exp(np.linspace(0, np.log(1000), 400))
    assert any("changed" in w and "AdaptiveClip" in w
               for w in gradclip.recommend_max_norm(growing).warnings)  # fmt: skip
    assert any("rough" in w for w in gradclip.recommend_max_norm([1.0, 2.0]).warnings)


def test_accepts_a_monitor():
    model = torch.nn.Linear(3, 1)
    mon = gradclip.GradMonitor(gradclip.NormClip(1e-3), model, every=4)
    norms = []
    for i in range(10):
        model.zero_grad()
        model(torch.full((2, 3), float(i + 1))).sum().backward()
        norms.append(torch.nn.utils.get_total_norm([p.grad for p in model.parameters()]).item())
        mon()
    rec = gradclip.recommend_max_norm(mon)
    assert rec.steps == 10 and rec.recorded_clip_rate == 1.0
    assert rec.quantiles["p50"] == pytest.approx(np.median(norms), rel=1e-5)
    json.dumps(rec.to_dict())


@pytest.mark.parametrize("scale", [1e-320, 1e-300, 1.0, 1e290, 1e299, 1e308])
def test_norms_near_float64s_limits_give_a_threshold_not_an_error(scale):
    rng = np.random.default_rng(3)
    with np.errstate(over="ignore"):  # at 1e308 some norms overflow to inf: non-finite steps
        norms = np.exp(rng.normal(0.0, 0.3, 300)) * scale
    norms[::50] *= 1e3 if scale < 1e290 else 1.0  # spikes where they stay finite
    rec = gradclip.recommend_max_norm(torch.tensor(norms))
    used = np.sort(norms[np.isfinite(norms)])
    typical = used[used <= rec.spike_cut]
    q99 = np.percentile(typical, 99)
    assert q99 <= rec.max_norm and rec.max_norm / 1.1 <= q99  # just above it: two digits
    assert math.isfinite(rec.max_norm) and rec.spike_count == int((norms > rec.spike_cut).sum())
    assert "recommended max_norm" in render_text(rec)
    json.dumps(rec.to_dict())
