"""The runner of the demo tasks: what it records per step, and how it treats what a clip
function returns, non-finite values and skipped steps.

References are torch itself and the definition of plain SGD; no number from a previous run
of these tasks is asserted.
"""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch

import gradclip
from gradclip.demo import runner
from gradclip.demo.runner import RunResult, run
from gradclip.demo.tasks import TASKS


def per_step_lengths(result: RunResult) -> set[int]:
    return {len(getattr(result, f)) for f in
            ("losses", "pre_norms", "post_norms", "thresholds", "update_norms", "clipped")}


@pytest.fixture
def count_measurements(monkeypatch):
    """Counts the runner's own calls to ``grad_norms``."""
    calls = []
    real = runner.grad_norms

    def counting(*args, **kwargs):
        calls.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(runner, "grad_norms", counting)
    return calls


def test_no_clip_is_measured_every_step(count_measurements):
    result = run("sgd-heavy-tail", None, steps=25)
    assert len(count_measurements) == 25
    assert result.post_norms == result.pre_norms
    assert all(math.isnan(t) for t in result.thresholds)
    assert not any(result.clipped)


def test_returned_norm_tensor_is_recorded_not_remeasured(count_measurements):
    returned = []

    def clip(model):
        norm = gradclip.clip_grad_norm_(model.parameters(), 0.5)
        returned.append(norm.item())
        return norm

    result = run("sgd-heavy-tail", clip, steps=25)
    assert len(count_measurements) <= 1  # at most the first step's probe
    assert result.pre_norms == returned
    assert all(math.isnan(p) for p in result.post_norms)


def test_returned_stats_object_is_recorded_not_remeasured(count_measurements):
    returned = []

    def clip(model):
        norm = gradclip.clip_grad_norm_(model.parameters(), 0.5)
        stats = SimpleNamespace(norm=norm, post_norm=torch.clamp(norm, max=0.5),
                                threshold=torch.tensor(0.5), clipped=norm > 0.5)
        returned.append(stats)
        return stats

    result = run("sgd-heavy-tail", clip, steps=25)
    assert len(count_measurements) <= 1
    assert result.pre_norms == [s.norm.item() for s in returned]
    assert result.post_norms == [s.post_norm.item() for s in returned]
    assert result.thresholds == [0.5] * 25
    assert result.clipped == [bool(s.clipped) for s in returned]


def test_update_norm_is_sgd_step_of_the_clipped_gradient():
    # plain SGD: theta_new - theta_old = -lr * grad, so ||update|| = lr * post-clip norm
    lr = TASKS["sgd-heavy-tail"].config.lr
    norms = []

    def clip(model):
        norm = gradclip.clip_grad_norm_(model.parameters(), 0.5)
        norms.append(min(norm.item(), 0.5))
        return norm

    result = run("sgd-heavy-tail", clip, steps=30)
    for update, post in zip(result.update_norms, norms, strict=True):
        assert math.isclose(update, lr * post, rel_tol=1e-4)


def test_nan_gradient_stops_the_run_without_crashing():
    def poison(model):
        poison.calls += 1
        if poison.calls == 4:
            next(model.parameters()).grad.fill_(float("nan"))

    poison.calls = 0
    result = run("rnn-addition/moderate", poison, steps=12)
    assert result.steps == 4 and result.planned_steps == 12
    assert per_step_lengths(result) == {4}
    assert result.diverged and result.metric == math.inf
    assert result.nonfinite_steps == 1
    assert math.isfinite(result.pre_norms[-1])  # measured before the clip function ran
    assert not math.isfinite(result.update_norms[-1])


def test_nonfinite_norm_from_clip_is_counted():
    def poison_then_clip(model):
        if poison_then_clip.calls == 2:
            next(model.parameters()).grad.fill_(float("inf"))
        poison_then_clip.calls += 1
        return gradclip.clip_grad_norm_(model.parameters(), 1.0)

    poison_then_clip.calls = 0
    result = run("adam-spikes", poison_then_clip, steps=10)
    assert result.nonfinite_steps >= 1 and result.diverged
    assert result.steps == 3


def test_skipped_step_leaves_parameters_and_continues():
    def skip_third(model):
        skip_third.calls += 1
        bad = skip_third.calls == 3
        if bad:
            next(model.parameters()).grad.fill_(float("nan"))
        norm = gradclip.grad_norms(model.parameters()).total
        return SimpleNamespace(norm=norm, finite=torch.isfinite(norm), skipped=torch.tensor(bad))

    skip_third.calls = 0
    result = run("adam-spikes", skip_third, steps=8)
    assert result.steps == 8 and not result.diverged
    assert result.skipped_steps == 1 and result.nonfinite_steps == 1
    assert result.update_norms[2] == 0.0
    assert all(u > 0 for i, u in enumerate(result.update_norms) if i != 2)


def test_progress_and_argument_errors():
    seen = []
    run("sgd-heavy-tail", None, steps=5, progress=lambda done, total: seen.append((done, total)))
    assert seen == [(i, 5) for i in range(1, 6)]
    with pytest.raises(KeyError, match="rnn-addition/violent"):
        run("no-such-task", None)
    with pytest.raises(ValueError, match="steps"):
        run("sgd-heavy-tail", None, steps=0)


def test_a_spike_detector_that_stops_the_run_ends_it_as_diverged():
    def stop_at_five(model, loss=None):
        stop_at_five.calls += 1
        if stop_at_five.calls == 6:
            raise gradclip.GradientSpikeError("10 gradient spikes in a row", None)
        return None

    stop_at_five.calls = 0
    result = run("sgd-heavy-tail", stop_at_five, steps=20)
    assert result.steps == 5 and result.planned_steps == 20
    assert result.diverged and result.metric == math.inf


@pytest.mark.filterwarnings("ignore:.*out of the norm and the clip")
def test_the_norms_recorded_are_those_the_threshold_met_with_muon_left_out():
    clipped = run("muon-adamw", gradclip.NormClip(1.0), steps=5)
    plain = run("muon-adamw", None, steps=5)
    # Muon's matrices dominate the total (~1e7); the clip compares 1.0 with the AdamW groups' norm
    assert min(plain.pre_norms) > 1e5 and max(clipped.pre_norms) < 1e2
    for pre, post, was in zip(clipped.pre_norms, clipped.post_norms, clipped.clipped, strict=True):
        assert post == (pytest.approx(1.0, rel=1e-5) if was else pre)
