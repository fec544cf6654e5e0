"""AutoClip against Algorithm 1 of Seetharaman et al. (2020), written here with numpy.

The reference keeps a Python list of finite norms (the last ``window`` of them), appends the
current norm first, and takes ``numpy.percentile`` (default 'linear' interpolation). Clipped
gradients are compared with ``torch.nn.utils.clip_grad_norm_`` at the reference threshold.
"""

from __future__ import annotations

import io
import math

import numpy as np
import pytest
import torch

from gradclip.clippers import autoclip as autoclip_module
from gradclip.clippers.autoclip import AutoClip

from .steps import (
    SHAPES,
    assert_steps_read_nothing,
    float64_norm,
    grads_with_norm,
    make_params,
    set_grads,
)

NAN_STEP, INF_STEP = 17, 33


def norm_sequence(steps: int = 60, seed: int = 0) -> list[float]:
    """Log-normal norms drifting upwards, with spikes, one NaN step and one inf step."""
    rng = np.random.default_rng(seed)
    norms = np.exp(rng.normal(0.0, 0.3, steps)) * (1 + 0.02 * np.arange(steps))
    for step, factor in ((5, 20.0), (12, 50.0), (27, 8.0), (41, 1000.0), (50, 3.0)):
        norms[step] *= factor
    out = norms.tolist()
    out[NAN_STEP], out[INF_STEP] = math.nan, math.inf
    return out


def reference_thresholds(norms: list[float], percentile: float, window: int | None) -> list[float]:
    """Algorithm 1: append the norm (if finite) first, then the percentile of the history."""
    history: list[float] = []
    out = []
    for norm in norms:
        if math.isfinite(norm):
            history.append(norm)
            if window is not None:
                history = history[-window:]
        out.append(float(np.percentile(history, percentile)) if history else math.inf)
    return out


def torch_clipped(grads: list[torch.Tensor], max_norm: float) -> list[torch.Tensor]:
    params = [torch.nn.Parameter(torch.zeros_like(g)) for g in grads]
    for p, g in zip(params, grads, strict=True):
        p.grad = g.clone()
    torch.nn.utils.clip_grad_norm_(params, max_norm)
    return [p.grad for p in params]


def run(clipper: AutoClip, norms: list[float], steps: range | None = None):
    """Feed the sequence; yield (step, stats, grads after clipping)."""
    params = make_params()
    for step in steps if steps is not None else range(len(norms)):
        set_grads(params, grads_with_norm(norms[step], step))
        stats = clipper(params)
        yield step, stats, [p.grad.clone() for p in params.values()]


def valid_history(clipper: AutoClip) -> np.ndarray:
    history = clipper.state.history
    filled = min(int(clipper.state.count), history.numel())
    return history[:filled].double().numpy()


# ---------------------------------------------------------------------------------------
# the algorithm


CASES = [(10.0, 1024), (50.0, 7), (90.0, 16), (100.0, 5), (0.5, 3), (10.0, None), (75.0, None)]


@pytest.mark.parametrize(("percentile", "window"), CASES)
def test_matches_algorithm_1_step_by_step(percentile, window, monkeypatch):
    monkeypatch.setattr(autoclip_module, "GROW_START", 4)  # window=None doubles 4 times in 60 steps
    norms = norm_sequence()
    # the reference sees the norms gradclip-independent, measured in float64
    measured = [
        float64_norm(grads_with_norm(n, s)) if math.isfinite(n) else n for s, n in enumerate(norms)
    ]
    expected = reference_thresholds(measured, percentile, window)
    clipper = AutoClip(percentile, window)
    for step, stats, grads in run(clipper, norms):
        ref = expected[step]
        assert math.isclose(float(stats.threshold), ref, rel_tol=2e-6), (
            step,
            float(stats.threshold),
            ref,
        )
        # the same history in numpy's hands gives the same percentile
        same = float(np.percentile(valid_history(clipper), percentile))
        assert math.isclose(float(stats.threshold), same, rel_tol=1e-6), step
        want = torch_clipped(grads_with_norm(norms[step], step), ref)
        for a, b in zip(grads, want, strict=True):
            torch.testing.assert_close(a, b, rtol=2e-6, atol=1e-7, equal_nan=True)
        if math.isfinite(norms[step]):
            assert bool(stats.finite)
            if abs(ref / measured[step] - 1) > 1e-5:  # not a threshold equal to the norm itself
                assert bool(stats.clipped) == (ref < measured[step])
    assert int(clipper.steps) == len(norms) - 2
    assert int(clipper.nonfinite_steps) == 2
    if window is None:
        assert clipper.state.history.numel() == 64  # 4 -> 64 as calls reached 4, 8, 16, 32
    else:
        assert clipper.state.history.numel() == window


def test_first_step_threshold_is_its_own_norm():
    p = torch.nn.Parameter(torch.zeros(2))
    p.grad = torch.tensor([3.0, 4.0])
    stats = AutoClip()({"w": p})
    assert float(stats.threshold) == 5.0
    torch.testing.assert_close(p.grad, torch.tensor([3.0, 4.0]) * (5 / (5 + 1e-6)))


def test_hand_computed_percentiles():
    # history [4, 1, 3, 2] -> sorted [1, 2, 3, 4]; p=10 -> position 0.3 -> 1.3; p=50 -> 2.5
    for percentile, want in ((10.0, 1.3), (50.0, 2.5), (100.0, 4.0)):
        clipper = AutoClip(percentile, window=4)
        p = torch.nn.Parameter(torch.zeros(1))
        for value in (4.0, 1.0, 3.0, 2.0):
            p.grad = torch.tensor([value])
            stats = clipper([p])
        assert math.isclose(float(stats.threshold), want, rel_tol=1e-6)
    # window 2 after wrap-around: only the last two norms [3, 2] count -> p=50 gives 2.5
    clipper = AutoClip(50.0, window=2)
    p = torch.nn.Parameter(torch.zeros(1))
    for value in (100.0, 1.0, 3.0, 2.0):
        p.grad = torch.tensor([value])
        stats = clipper([p])
    assert math.isclose(float(stats.threshold), 2.5, rel_tol=1e-6)


def test_window_wraps_around_as_a_ring():
    clipper = AutoClip(100.0, window=3)
    p = torch.nn.Parameter(torch.zeros(1))
    for value in (5.0, 1.0, 2.0, 3.0, 4.0):
        p.grad = torch.tensor([value])
        stats = clipper([p])
    # the 5 and the 1 left the window: max of [2, 3, 4]; norms 4 and 5 overwrote slots 0, 1
    assert float(stats.threshold) == 4.0
    assert clipper.state.history.tolist() == [3.0, 4.0, 2.0]
    assert int(clipper.state.count) == 5


# ---------------------------------------------------------------------------------------
# non-finite steps


@pytest.mark.parametrize("nonfinite", ["propagate", "skip"])
@pytest.mark.parametrize("window", [7, None])
def test_nonfinite_steps_never_enter_the_history(nonfinite, window, monkeypatch):
    monkeypatch.setattr(autoclip_module, "GROW_START", 4)
    norms = norm_sequence()
    with_bad = AutoClip(30.0, window, nonfinite=nonfinite)
    without = AutoClip(30.0, window, nonfinite=nonfinite)
    clean_steps = [s for s in range(len(norms)) if math.isfinite(norms[s])]
    ours = {s: (st.threshold.clone(), st.coef.clone(), g) for s, st, g in run(with_bad, norms)}
    ref = {
        s: (st.threshold.clone(), st.coef.clone(), g)
        for s, st, g in run(without, norms, clean_steps)
    }
    for s in clean_steps:
        assert torch.equal(ours[s][0], ref[s][0]) and torch.equal(ours[s][1], ref[s][1]), s
        for a, b in zip(ours[s][2], ref[s][2], strict=True):
            assert torch.equal(a, b)
    a, b = with_bad.state_dict()["state"], without.state_dict()["state"]
    assert torch.equal(a["count"], b["count"])
    if window is None:  # the bad steps were calls, so the buffer may have grown sooner
        count = int(b["count"])
        assert torch.equal(a["history"][:count], b["history"][:count])
        assert bool(torch.isinf(a["history"][count:]).all())
    else:
        assert torch.equal(a["history"], b["history"])
    assert int(with_bad.nonfinite_steps) == 2 and int(without.nonfinite_steps) == 0
    if nonfinite == "skip":  # the bad steps' gradients were left alone
        assert math.isnan(float(ours[NAN_STEP][2][1][2]))
        torch.testing.assert_close(ours[NAN_STEP][2][0], grads_with_norm(math.nan, NAN_STEP)[0])


def test_nonfinite_first_step_leaves_history_empty():
    clipper = AutoClip(10.0, window=4)
    p = torch.nn.Parameter(torch.zeros(2))
    p.grad = torch.tensor([math.nan, 1.0])
    stats = clipper([p])
    assert float(stats.threshold) == math.inf and not bool(stats.finite)
    assert int(clipper.state.count) == 0
    p.grad = torch.tensor([3.0, 4.0])
    assert float(clipper([p]).threshold) == 5.0


# ---------------------------------------------------------------------------------------
# checkpoints


def assert_identical(a: torch.Tensor, b: torch.Tensor) -> None:
    torch.testing.assert_close(a, b, rtol=0, atol=0, equal_nan=True)


def _roundtrip(state_dict: dict) -> dict:
    buffer = io.BytesIO()
    torch.save(state_dict, buffer)
    buffer.seek(0)
    return torch.load(buffer, weights_only=True)


@pytest.mark.parametrize(("window", "split"), [(7, 25), (1024, 40), (None, 30)])
def test_state_dict_resume_equals_uninterrupted_run(window, split, monkeypatch):
    monkeypatch.setattr(autoclip_module, "GROW_START", 4)
    norms = norm_sequence()
    straight = list(run(AutoClip(25.0, window), norms))
    first = AutoClip(25.0, window)
    head = list(run(first, norms, range(split)))
    resumed = AutoClip(25.0, window)
    resumed.load_state_dict(_roundtrip(first.state_dict()))
    tail = list(run(resumed, norms, range(split, len(norms))))
    for (s, a, ga), (t, b, gb) in zip(straight, head + tail, strict=True):
        assert s == t
        for field in ("norm", "threshold", "coef", "post_norm", "clipped", "finite"):
            assert_identical(getattr(a, field), getattr(b, field))
        for x, y in zip(ga, gb, strict=True):
            assert_identical(x, y)
    uninterrupted = AutoClip(25.0, window)
    list(run(uninterrupted, norms))
    for key, value in uninterrupted.state_dict()["state"].items():
        assert torch.equal(value, resumed.state_dict()["state"][key]), key


def test_load_state_dict_mismatch_raises():
    saved = AutoClip(10.0, window=8).state_dict()
    with pytest.raises(ValueError, match="window"):
        AutoClip(10.0, window=16).load_state_dict(saved)
    with pytest.raises(ValueError, match="percentile"):
        AutoClip(20.0, window=8).load_state_dict(saved)
    bad = AutoClip(10.0, window=8).state_dict()
    bad["state"]["history"] = torch.zeros(5)
    with pytest.raises(ValueError, match="window"):
        AutoClip(10.0, window=8).load_state_dict(bad)


def test_reset_forgets_the_history():
    clipper = AutoClip(50.0, window=4)
    p = torch.nn.Parameter(torch.zeros(1))
    p.grad = torch.tensor([9.0])
    clipper([p])
    clipper.reset()
    p.grad = torch.tensor([2.0])
    assert float(clipper([p]).threshold) == 2.0


# ---------------------------------------------------------------------------------------
# arguments


BAD = [
    ({"percentile": 0}, "percentile", "1e-6"),
    ({"percentile": 0.0}, "percentile", "minimum"),
    ({"percentile": -5.0}, "percentile", "-5.0"),
    ({"percentile": 100.5}, "percentile", "100.5"),
    ({"percentile": 0.9 * 1000}, "percentile", "not a quantile"),
    ({"percentile": math.nan}, "percentile", "nan"),
    ({"percentile": "10"}, "percentile", "'10'"),
    ({"percentile": True}, "percentile", "True"),
    ({"window": 0}, "window", "0"),
    ({"window": -3}, "window", "-3"),
    ({"window": 2.5}, "window", "2.5"),
    ({"window": True}, "window", "True"),
    ({"window": "1024"}, "window", "'1024'"),
    ({"nonfinite": "ignore"}, "nonfinite", "ignore"),
]


@pytest.mark.parametrize(("kwargs", "name", "shown"), BAD)
def test_bad_arguments_raise_value_error_naming_them(kwargs, name, shown):
    with pytest.raises(ValueError) as info:
        AutoClip(**kwargs)
    message = str(info.value)
    assert f"`{name}`" in message and shown in message
    if name != "nonfinite":  # ours also say how to fix it
        assert "pass" in message


def test_good_edge_arguments():
    assert AutoClip(100).percentile == 100.0
    assert AutoClip(1e-9, window=1).window == 1
    assert AutoClip(window=None).window is None
    assert (
        repr(AutoClip())
        == "AutoClip(percentile=10.0, window=1024, norm_type=2.0, nonfinite='propagate')"
    )


# ---------------------------------------------------------------------------------------
# no host sync


@pytest.mark.parametrize("window", [5, None])
def test_no_host_sync_in_the_step(window, monkeypatch):
    monkeypatch.setattr(autoclip_module, "GROW_START", 4)
    norms = norm_sequence()[:20]  # wraps a window of 5, grows 4 -> 32, includes the NaN step
    clipper = AutoClip(10.0, window)
    assert_steps_read_nothing(clipper, norms, monkeypatch)


# ---------------------------------------------------------------------------------------
# the peer package


def test_peer_autoclip_nan_poisons_its_history_not_ours():
    peer = pytest.importorskip("autoclip.torch")
    theirs = [torch.nn.Parameter(torch.zeros(s)) for s in SHAPES]
    clipper = peer.QuantileClip(theirs, quantile=0.5, history_length=1000, global_threshold=True)
    ours_params = make_params()
    ours = AutoClip(50.0, window=1000)
    norms = [1.0, 2.0, 1.5, 1.2, 1.8, math.nan, 1.1, 1.3, 40.0, 1.4]
    for step, norm in enumerate(norms):
        grads = grads_with_norm(norm, step)
        for p, g in zip(theirs, grads, strict=True):
            p.grad = g.clone()
        clipper.step()
        set_grads(ours_params, grads)
        ours(ours_params)
        if step > norms.index(math.nan):  # clean steps after the NaN step
            assert all(bool(p.grad.isnan().all()) for p in theirs), "peer no longer poisoned?"
            assert all(bool(p.grad.isfinite().all()) for p in ours_params.values())
    assert bool(clipper.state["global_history"].isnan().any())
    assert bool(ours.state.history.isfinite().sum() == len(norms) - 1)
    # and our last step is the paper's: the median of the 9 finite norms, the current one included
    want = float(np.percentile([n for n in norms if math.isfinite(n)], 50))
    got = float64_norm([p.grad for p in ours_params.values()])
    assert math.isclose(got, want, rel_tol=1e-5)


# ---------------------------------------------------------------------------------------
# protocol details


def test_step_is_pure():
    norms = norm_sequence()[:12]
    probed, plain = AutoClip(50.0, window=5), AutoClip(50.0, window=5)
    stray = gradclip_norms(grads_with_norm(1e6, 999))
    for (_, a, ga), (_, b, gb) in zip(run(probed, norms), run(plain, norms), strict=True):
        before = [v.clone() for v in probed.state]
        probed._step(stray, probed.state)  # e.g. a dry run: must not leak into the next step
        for v, w in zip(probed.state, before, strict=True):
            assert_identical(v, w)
        assert_identical(a.threshold, b.threshold)
        for x, y in zip(ga, gb, strict=True):
            assert_identical(x, y)


def test_float64_gradients_are_clipped_in_float64():
    p = torch.nn.Parameter(torch.zeros(2, dtype=torch.float64))
    clipper = AutoClip(50.0, window=8)
    for value in ([3.0, 4.0], [6.0, 8.0], [30.0, 40.0]):
        p.grad = torch.tensor(value, dtype=torch.float64)
        stats = clipper([p])
    assert stats.threshold.dtype == torch.float64 and stats.coef.dtype == torch.float64
    assert float(stats.threshold) == 10.0  # median of 5, 10, 50 (recorded in float32)
    torch.testing.assert_close(
        p.grad, torch.tensor([6.0, 8.0], dtype=torch.float64), rtol=1e-6, atol=0
    )


def test_docstring_example_runs():
    import doctest

    assert doctest.testmod(autoclip_module).failed == 0


def gradclip_norms(grads: list[torch.Tensor]):
    from gradclip.norms import compute

    return compute(grads, 2.0, foreach=None)
