"""ZClip against the algorithm of Kumar et al. (2025), written here in float64 Python.

The reference collects the first ``warmup_steps`` finite norms, then keeps an EMA of the
mean and variance of the z-score-clipped norm (variance with the updated mean). Clipped
gradients are compared with ``torch.nn.utils.clip_grad_norm_`` at the reference threshold.
The ``zclip`` package is a second reference where it is sound (finite norms, no cap).
"""

from __future__ import annotations

import io
import math

import numpy as np
import pytest
import torch

from gradclip.clippers.zclip import ZClip

from .steps import (
    SHAPES,
    assert_steps_read_nothing,
    float64_norm,
    grads_with_norm,
    make_params,
    set_grads,
)

NAN_STEP, INF_STEP = 7, 33  # one during the default warm-up, one after it
EPS = 1e-6


def norm_sequence(steps: int = 60, seed: int = 1) -> list[float]:
    """Norms near 1 drifting upwards, with spikes of several sizes, one NaN and one inf."""
    rng = np.random.default_rng(seed)
    norms = np.exp(rng.normal(0.0, 0.15, steps)) * (1 + 0.01 * np.arange(steps))
    for step, factor in ((12, 3.0), (29, 40.0), (38, 1.6), (41, 1000.0), (47, 2.2), (52, 6.0)):
        norms[step] *= factor
    out = norms.tolist()
    out[NAN_STEP], out[INF_STEP] = math.nan, math.inf
    return out


def reference_zclip(
    norms: list[float],
    alpha: float = 0.97,
    z_thr: float = 2.5,
    warmup: int = 25,
    max_norm: float | None = None,
    mode: str = "zscore",
) -> list[dict | None]:
    """Per step: the norm the step is clipped to (``clip_to``, inf for none) and the threshold
    gradclip reports; None for a non-finite step (it changes no statistic)."""
    cap = math.inf if max_norm is None else max_norm
    buffer: list[float] = []
    mean = var = None
    out: list[dict | None] = []
    for g in norms:
        if not math.isfinite(g):
            out.append(None)
            continue
        if mean is None:
            buffer.append(g)
            if len(buffer) == warmup:
                mean = sum(buffer) / warmup
                var = sum((x - mean) ** 2 for x in buffer) / warmup
            out.append({"clip_to": cap, "threshold": cap, "fires": False, "margin": math.inf})
            continue
        std = math.sqrt(var)
        if mode == "zscore":
            z = (g - mean) / (std + EPS)
            fires = z > z_thr
            adaptive = mean + z_thr**2 * std / z if fires else mean + z_thr * (std + EPS)
            margin = abs(z - z_thr) / z_thr
        else:
            adaptive = mean + z_thr * std
            fires = g > adaptive
            margin = abs(g - adaptive) / adaptive
        clipped = adaptive if fires else g
        mean = alpha * mean + (1 - alpha) * clipped
        var = alpha * var + (1 - alpha) * (clipped - mean) ** 2
        out.append(
            {
                "clip_to": min(adaptive if fires else math.inf, cap),
                "threshold": min(adaptive, cap),
                "fires": fires,
                "margin": margin,
            }
        )
    return out


def torch_clipped(grads: list[torch.Tensor], max_norm: float) -> list[torch.Tensor]:
    params = [torch.nn.Parameter(torch.zeros_like(g)) for g in grads]
    set_grads(params, grads)
    torch.nn.utils.clip_grad_norm_(params, max_norm)
    return [p.grad for p in params]


def run(clipper: ZClip, norms: list[float], steps=None):
    """Feed the sequence; yield (step, stats, grads after clipping)."""
    params = make_params()
    for step in steps if steps is not None else range(len(norms)):
        set_grads(params, grads_with_norm(norms[step], step))
        stats = clipper(params)
        yield step, stats, [p.grad.clone() for p in params.values()]


def assert_identical(a: torch.Tensor, b: torch.Tensor) -> None:
    torch.testing.assert_close(a, b, rtol=0, atol=0, equal_nan=True)


# ---------------------------------------------------------------------------------------
# the algorithm

CASES = [
    {},
    {"warmup_steps": 10, "max_norm": 1.5},
    {"warmup_steps": 10, "mode": "percentile"},
    {"warmup_steps": 5, "alpha": 0.9, "z_threshold": 2.0},
    {"warmup_steps": 1},  # σ = 0 after warm-up: everything above μ is pulled to μ
]


@pytest.mark.parametrize(
    "kwargs", CASES, ids=lambda k: ",".join(f"{a}={b}" for a, b in k.items()) or "defaults"
)
def test_matches_the_paper_step_by_step(kwargs):
    norms = norm_sequence()
    measured = [
        float64_norm(grads_with_norm(n, s)) if math.isfinite(n) else n for s, n in enumerate(norms)
    ]
    ref_kwargs = {
        "alpha": kwargs.get("alpha", 0.97),
        "z_thr": kwargs.get("z_threshold", 2.5),
        "warmup": kwargs.get("warmup_steps", 25),
        "max_norm": kwargs.get("max_norm"),
        "mode": kwargs.get("mode", "zscore"),
    }
    expected = reference_zclip(measured, **ref_kwargs)
    fired = 0
    for step, stats, grads in run(ZClip(**kwargs), norms):
        ref = expected[step]
        source = grads_with_norm(norms[step], step)
        if ref is None:  # propagate: torch's result for a finite threshold
            assert not bool(stats.finite)
            if math.isnan(norms[step]):
                assert all(bool(g.isnan().all()) for g in grads)
            elif step >= ref_kwargs["warmup"]:  # inf after warm-up: coefficient 0
                for a, b in zip(grads, torch_clipped(source, 1.0), strict=True):
                    assert_identical(a, b)
            continue
        assert ref["margin"] > 1e-4, f"step {step} is too close to the z threshold to test"
        fired += ref["fires"]
        assert math.isclose(float(stats.threshold), ref["threshold"], rel_tol=1e-5), (
            step,
            float(stats.threshold),
            ref,
        )
        for a, b in zip(grads, torch_clipped(source, ref["clip_to"]), strict=True):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)
        if ref["clip_to"] == math.inf:
            assert not bool(stats.clipped)
            for a, b in zip(grads, source, strict=True):
                assert torch.equal(a, b)  # not clipped: not even multiplied by 1
        else:
            assert bool(stats.clipped) == (ref["clip_to"] < measured[step])
    assert fired >= 4, "the sequence should exercise the rule"


def test_warmup_collects_then_sets_population_statistics():
    clipper = ZClip(warmup_steps=4)
    p = torch.nn.Parameter(torch.zeros(1))
    for value in (1.0, 3.0, 2.0, 6.0):
        p.grad = torch.tensor([value])
        stats = clipper([p])
        assert not bool(stats.clipped) and float(stats.threshold) == math.inf
        assert p.grad.item() == value
    # mean 3, population variance (4 + 0 + 1 + 9) / 4 = 3.5
    assert float(clipper.state.mean) == 3.0
    assert math.isclose(float(clipper.state.var), 3.5, rel_tol=1e-7)
    assert int(clipper.state.warmup_count) == 4


def test_hand_computed_reciprocal_rule_and_ema():
    clipper = ZClip(alpha=0.5, z_threshold=2.0, warmup_steps=2)
    p = torch.nn.Parameter(torch.zeros(1))
    for value in (1.0, 3.0):  # μ = 2, σ² = 1
        p.grad = torch.tensor([value])
        clipper([p])
    p.grad = torch.tensor([12.0])  # z = 10/(1 + 1e-6) > 2: c = 2 + 4·1/z
    z = 10 / (1 + 1e-6)
    c = 2 + 4 / z
    stats = clipper([p])
    assert math.isclose(float(stats.threshold), c, rel_tol=1e-6)
    assert math.isclose(p.grad.item(), 12 * c / (12 + 1e-6), rel_tol=1e-6)
    mean = 0.5 * 2 + 0.5 * c
    var = 0.5 * 1 + 0.5 * (c - mean) ** 2  # the updated mean
    assert math.isclose(float(clipper.state.mean), mean, rel_tol=1e-6)
    assert math.isclose(float(clipper.state.var), var, rel_tol=1e-6)


def test_percentile_mode_clips_above_mean_plus_z_sigma():
    clipper = ZClip(alpha=0.5, z_threshold=2.0, warmup_steps=2, mode="percentile")
    p = torch.nn.Parameter(torch.zeros(1))
    for value in (1.0, 3.0):
        p.grad = torch.tensor([value])
        clipper([p])
    p.grad = torch.tensor([3.9])  # below μ + 2σ = 4: untouched
    stats = clipper([p])
    assert float(stats.threshold) == 4.0 and not bool(stats.clipped)
    assert torch.equal(p.grad, torch.tensor([3.9]))
    mean = 0.5 * 2 + 0.5 * 3.9
    var = 0.5 * 1 + 0.5 * (3.9 - mean) ** 2
    c = mean + 2 * math.sqrt(var)
    p.grad = torch.tensor([10.0])  # above μ + 2σ: clipped to it
    stats = clipper([p])
    assert math.isclose(float(stats.threshold), c, rel_tol=1e-6) and bool(stats.clipped)
    assert math.isclose(p.grad.item(), 10 * c / (10 + 1e-6), rel_tol=1e-6)


def test_max_norm_is_only_a_cap_outside_the_statistics():
    capped, free = ZClip(warmup_steps=3, max_norm=0.5), ZClip(warmup_steps=3)
    norms = [1.0, 1.1, 0.9, 1.05, 0.95, 30.0, 1.0]
    for step, (_, a, ga), (_, b, gb) in zip(
        range(len(norms)), run(capped, norms), run(free, norms), strict=True
    ):
        assert math.isclose(float64_norm(ga), min(0.5, float64_norm(gb)), rel_tol=1e-5), step
        assert float(a.threshold) == min(0.5, float(b.threshold))
    for key in ("mean", "var", "warmup_norms"):
        assert torch.equal(getattr(capped.state, key), getattr(free.state, key))


def test_no_hidden_cap_by_default():
    clipper = ZClip(warmup_steps=3)
    assert clipper.max_norm is None
    norms = [110.0, 112.0, 108.0, 111.0, 109.0]
    for _step, stats, grads in run(clipper, norms):
        assert not bool(stats.clipped)
        assert math.isclose(float64_norm(grads), float(stats.norm), rel_tol=1e-6)


# ---------------------------------------------------------------------------------------
# non-finite steps


@pytest.mark.parametrize("nonfinite", ["propagate", "skip"])
@pytest.mark.parametrize("mode", ["zscore", "percentile"])
def test_nonfinite_steps_never_enter_the_statistics(nonfinite, mode):
    norms = norm_sequence()
    clean = [s for s in range(len(norms)) if math.isfinite(norms[s])]
    with_bad, without = ZClip(mode=mode, nonfinite=nonfinite), ZClip(mode=mode, nonfinite=nonfinite)
    ours = {s: (st.threshold.clone(), st.coef.clone(), g) for s, st, g in run(with_bad, norms)}
    ref = {s: (st.threshold.clone(), st.coef.clone(), g) for s, st, g in run(without, norms, clean)}
    for s in clean:
        assert torch.equal(ours[s][0], ref[s][0]) and torch.equal(ours[s][1], ref[s][1]), s
        for a, b in zip(ours[s][2], ref[s][2], strict=True):
            assert torch.equal(a, b)
    a, b = with_bad.state_dict()["state"], without.state_dict()["state"]
    for key in ("warmup_norms", "warmup_count", "mean", "var"):
        assert torch.equal(a[key], b[key]), key
    assert int(with_bad.nonfinite_steps) == 2 and int(with_bad.steps) == len(clean)
    if nonfinite == "skip":
        for s in (NAN_STEP, INF_STEP):
            assert bool(ours[s][1] == 1)
            for got, want in zip(ours[s][2], grads_with_norm(norms[s], s), strict=True):
                assert_identical(got, want)


# ---------------------------------------------------------------------------------------
# checkpoints


def _roundtrip(state_dict: dict) -> dict:
    buffer = io.BytesIO()
    torch.save(state_dict, buffer)
    buffer.seek(0)
    return torch.load(buffer, weights_only=True)


@pytest.mark.parametrize("split", [10, 40])  # in the warm-up, after it
def test_state_dict_resume_equals_uninterrupted_run(split):
    norms = norm_sequence()
    straight = list(run(ZClip(), norms))
    first = ZClip()
    head = list(run(first, norms, range(split)))
    resumed = ZClip()
    resumed.load_state_dict(_roundtrip(first.state_dict()))
    tail = list(run(resumed, norms, range(split, len(norms))))
    for (s, a, ga), (t, b, gb) in zip(straight, head + tail, strict=True):
        assert s == t
        for field in ("norm", "threshold", "coef", "post_norm", "clipped", "finite"):
            assert_identical(getattr(a, field), getattr(b, field))
        for x, y in zip(ga, gb, strict=True):
            assert_identical(x, y)
    uninterrupted = ZClip()
    list(run(uninterrupted, norms))
    for key, value in uninterrupted.state_dict()["state"].items():
        assert torch.equal(value, resumed.state_dict()["state"][key]), key


def test_load_state_dict_mismatch_raises():
    saved = ZClip(warmup_steps=5).state_dict()
    with pytest.raises(ValueError, match="warmup_steps"):
        ZClip(warmup_steps=6).load_state_dict(saved)
    with pytest.raises(ValueError, match="max_norm"):
        ZClip(warmup_steps=5, max_norm=1.0).load_state_dict(saved)


# ---------------------------------------------------------------------------------------
# arguments

BAD = [
    ({"alpha": 0.0}, "alpha", "0.0"),
    ({"alpha": 1.0}, "alpha", "1.0"),
    ({"alpha": -0.5}, "alpha", "-0.5"),
    ({"alpha": math.nan}, "alpha", "nan"),
    ({"alpha": "0.9"}, "alpha", "'0.9'"),
    ({"z_threshold": 0.0}, "z_threshold", "0.0"),
    ({"z_threshold": -1.0}, "z_threshold", "-1.0"),
    ({"z_threshold": math.inf}, "z_threshold", "inf"),
    ({"z_threshold": None}, "z_threshold", "None"),
    ({"warmup_steps": 0}, "warmup_steps", "0"),
    ({"warmup_steps": 2.5}, "warmup_steps", "2.5"),
    ({"warmup_steps": True}, "warmup_steps", "True"),
    ({"max_norm": -1.0}, "max_norm", "-1.0"),
    ({"max_norm": math.nan}, "max_norm", "nan"),
    ({"mode": "mean"}, "mode", "'mean'"),
    ({"nonfinite": "ignore"}, "nonfinite", "ignore"),
]


@pytest.mark.parametrize(("kwargs", "name", "shown"), BAD)
def test_bad_arguments_raise_value_error_naming_them(kwargs, name, shown):
    with pytest.raises(ValueError) as info:
        ZClip(**kwargs)
    message = str(info.value)
    assert f"`{name}`" in message and shown in message
    if name != "nonfinite":
        assert "pass" in message.lower()


def test_good_edge_arguments():
    assert ZClip(max_norm=0.0).max_norm == 0.0
    assert ZClip(warmup_steps=1, alpha=0.999999).warmup_steps == 1
    assert repr(ZClip()) == (
        "ZClip(alpha=0.97, z_threshold=2.5, warmup_steps=25, max_norm=None, mode='zscore', "
        "norm_type=2.0, nonfinite='propagate')"
    )


# ---------------------------------------------------------------------------------------
# no host sync


@pytest.mark.parametrize(
    "kwargs", [{"warmup_steps": 5}, {"warmup_steps": 5, "max_norm": 1.2, "mode": "percentile"}]
)
def test_no_host_sync_in_the_step(kwargs, monkeypatch):
    norms = norm_sequence()[:16]  # warm-up with a NaN, its end, then clipping
    clipper = ZClip(**kwargs)
    assert_steps_read_nothing(clipper, norms, monkeypatch)
    assert int(clipper.state.warmup_count) == 5


# ---------------------------------------------------------------------------------------
# the peer package


class Net(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.params = torch.nn.ParameterList(torch.nn.Parameter(torch.zeros(s)) for s in SHAPES)


def _set(model: Net, grads: list[torch.Tensor]) -> None:
    for p, g in zip(model.parameters(), grads, strict=True):
        p.grad = g.clone()


def test_agrees_with_the_zclip_package_on_finite_norms_without_cap():
    zclip = pytest.importorskip("zclip")
    norms = [n for n in norm_sequence() if math.isfinite(n)]
    theirs_model, ours_model = Net(), Net()
    peer = zclip.ZClip(max_grad_norm=None)
    ours = ZClip()
    for step, norm in enumerate(norms):
        grads = grads_with_norm(norm, step)
        _set(theirs_model, grads)
        _set(ours_model, grads)
        peer.step(theirs_model)
        ours(ours_model)
        for a, b in zip(ours_model.parameters(), theirs_model.parameters(), strict=True):
            torch.testing.assert_close(a.grad, b.grad, rtol=1e-5, atol=1e-7)
    assert math.isclose(float(ours.state.mean), peer.mean, rel_tol=1e-5)
    assert math.isclose(float(ours.state.var), peer.var, rel_tol=1e-4)


def test_peer_zclip_default_is_a_fixed_clip_at_one_ours_is_not():
    zclip = pytest.importorskip("zclip")
    theirs_model, ours_model = Net(), Net()
    peer, ours = zclip.ZClip(), ZClip()  # both with their defaults
    assert peer.max_grad_norm == 1.0 and ours.max_norm is None
    rng = np.random.default_rng(0)
    for step in range(30):  # steady norms around 110: nothing to clip
        grads = grads_with_norm(110 * float(np.exp(rng.normal(0, 0.05))), step)
        _set(theirs_model, grads)
        _set(ours_model, grads)
        peer.step(theirs_model)
        stats = ours(ours_model)
        theirs_norm = float64_norm([p.grad for p in theirs_model.parameters()])
        ours_norm = float64_norm([p.grad for p in ours_model.parameters()])
        assert math.isclose(theirs_norm, 1.0, rel_tol=1e-5)  # every step clipped to 1.0
        assert math.isclose(ours_norm, float64_norm(grads), rel_tol=1e-6) and not bool(
            stats.clipped
        )


def test_peer_zclip_nan_poisons_its_statistics_ours_do_not():
    zclip = pytest.importorskip("zclip")
    theirs_model, ours_model = Net(), Net()
    peer = zclip.ZClip(max_grad_norm=None, warmup_steps=5)
    ours = ZClip(warmup_steps=5)
    norms = [1.0, 1.1, 0.9, 1.05, 0.95, 1.0, 1.02, math.nan, 1.0, 1e6]
    for step, norm in enumerate(norms):
        grads = grads_with_norm(norm, step)
        _set(theirs_model, grads)
        _set(ours_model, grads)
        peer.step(theirs_model)
        ours(ours_model)
    assert math.isnan(peer.mean) and math.isnan(peer.var)  # poisoned for good
    theirs_norm = float64_norm([p.grad for p in theirs_model.parameters()])
    ours_norm = float64_norm([p.grad for p in ours_model.parameters()])
    assert math.isclose(theirs_norm, 1e6, rel_tol=1e-5)  # the 1e6x spike went through
    assert ours_norm < 1.2  # ours pulled it back near μ ≈ 1
    assert all(bool(getattr(ours.state, k).isfinite()) for k in ("mean", "var"))


# ---------------------------------------------------------------------------------------
# protocol details


def test_step_is_pure():
    from gradclip.norms import compute

    norms = norm_sequence()[:32]
    probed, plain = ZClip(warmup_steps=5), ZClip(warmup_steps=5)
    stray = compute(grads_with_norm(1e6, 999), 2.0, foreach=None)
    for (_, a, ga), (_, b, gb) in zip(run(probed, norms), run(plain, norms), strict=True):
        before = [v.clone() for v in probed.state]
        probed._step(stray, probed.state)  # e.g. a dry run: must not leak into the next step
        for v, w in zip(probed.state, before, strict=True):
            assert_identical(v, w)
        assert_identical(a.threshold, b.threshold)
        for x, y in zip(ga, gb, strict=True):
            assert_identical(x, y)


def test_float64_gradients():
    p = torch.nn.Parameter(torch.zeros(1, dtype=torch.float64))
    clipper = ZClip(alpha=0.5, z_threshold=2.0, warmup_steps=2)
    for value in (1.0, 3.0, 12.0):
        p.grad = torch.tensor([value], dtype=torch.float64)
        stats = clipper([p])
    assert stats.threshold.dtype == torch.float64 and stats.coef.dtype == torch.float64
    c = 2 + 4 / (10 / (1 + 1e-6))
    assert math.isclose(p.grad.item(), 12 * c / (12 + 1e-6), rel_tol=1e-6)


def test_docstring_example_runs():
    import doctest

    from gradclip.clippers import zclip as zclip_module

    assert doctest.testmod(zclip_module).failed == 0
