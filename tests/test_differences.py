"""The four deliberate differences from torch.nn.utils (README, "Differences from torch.nn.utils"), side by side.

Each test runs torch and gradclip on exact clones of the same input, asserts what torch does
(so the test notices if torch changes) and what gradclip does instead.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.utils as tnu

import gradclip
from conftest import (
    Snapshot,
    assert_total_like,
    clone_params,
    grads_of,
    make_grad,
    make_params,
    params_with_grads,
)

pytestmark = pytest.mark.usefixtures("one_thread")

INF = math.inf


def f64_norm(tensors, p=2.0):
    return torch.linalg.vector_norm(
        torch.cat([t.detach().double().flatten() for t in tensors]), p
    ).item()


# ---------------------------------------------------------------------------------------
# 1. negative or NaN max_norm / clip_value


def _small_grads():
    return params_with_grads(
        [torch.tensor([0.003, -0.004]), torch.tensor([[1e-3, 0.0]], dtype=torch.float64)]
    )


NORM_CALLS = {
    "clip_grad_norm_": lambda mod, ps, max_norm: mod.clip_grad_norm_(ps, max_norm),
    "clip_grads_with_norm_": lambda mod, ps, max_norm: mod.clip_grads_with_norm_(
        ps, max_norm, mod.get_total_norm(grads_of(ps))
    ),
}


@pytest.mark.parametrize("name", NORM_CALLS)
@pytest.mark.parametrize(
    "max_norm", [-1.0, -1, "-0.5", torch.tensor(-2.0)], ids=["-1.0", "int", "str", "tensor"]
)
def test_negative_max_norm_raises_where_torch_flips_signs(name, max_norm):
    call = NORM_CALLS[name]
    params = _small_grads()
    ref, mine = clone_params(params), clone_params(params)
    original = grads_of(params)

    # torch: a negative coefficient, every gradient sign-flipped (and amplified)
    call(tnu, ref, max_norm)
    total = f64_norm(original)
    coef = float(max_norm) / (total + 1e-6)
    assert coef < -1
    for after, before in zip(grads_of(ref), original, strict=True):
        torch.testing.assert_close(after, before * coef, rtol=1e-5, atol=0)

    snap = Snapshot(mine)
    with pytest.raises(ValueError, match="`max_norm`") as err:
        call(gradclip, mine, max_norm)
    assert str(float(max_norm)) in str(err.value)
    snap.assert_unchanged()


@pytest.mark.parametrize("name", NORM_CALLS)
@pytest.mark.parametrize(
    "max_norm", [math.nan, "nan", torch.tensor(math.nan)], ids=["float", "str", "tensor"]
)
def test_nan_max_norm_raises_where_torch_nans_every_grad(name, max_norm):
    call = NORM_CALLS[name]
    params = _small_grads()
    ref, mine = clone_params(params), clone_params(params)
    call(tnu, ref, max_norm)
    assert all(bool(g.isnan().all()) for g in grads_of(ref))
    snap = Snapshot(mine)
    with pytest.raises(ValueError, match=r"`max_norm`.*nan"):
        call(gradclip, mine, max_norm)
    snap.assert_unchanged()


@pytest.mark.parametrize("foreach", [None, False])
@pytest.mark.parametrize(
    "clip_value", [-0.5, math.nan, "-1", torch.tensor(-0.5)], ids=["neg", "nan", "str", "tensor"]
)
def test_bad_clip_value_raises_where_torch_overwrites_every_grad(clip_value, foreach):
    params = params_with_grads(
        [torch.tensor([-3.0, 0.1, 2.0]), torch.tensor([0.25], dtype=torch.float64)]
    )
    ref, mine = clone_params(params), clone_params(params)
    tnu.clip_grad_value_(ref, clip_value, foreach=foreach)
    c = float(clip_value)
    for g in grads_of(ref):  # torch: min > max, so every entry becomes clip_value (or NaN)
        expected = torch.full_like(g, c)
        torch.testing.assert_close(g, expected, equal_nan=True, rtol=0, atol=0)
    snap = Snapshot(mine)
    with pytest.raises(ValueError, match="`clip_value`"):
        gradclip.clip_grad_value_(mine, clip_value, foreach=foreach)
    snap.assert_unchanged()


def test_zero_and_inf_thresholds_still_accepted():
    params = make_params([((4,), torch.float32)], scale=3)
    for value in (0.0, -0.0, INF):
        gradclip.clip_grad_norm_(clone_params(params), value)
        gradclip.clip_grad_value_(clone_params(params), value)


# ---------------------------------------------------------------------------------------
# 2. low-precision gradients: float32 accumulation and a float32 coefficient


def _norm_after_clip(mod, params, max_norm, **kwargs):
    total = mod.clip_grad_norm_(params, max_norm, **kwargs)
    return total, f64_norm(grads_of(params))


@pytest.mark.parametrize("foreach", [None, True, False])
@pytest.mark.parametrize(
    "grads",
    [
        [torch.tensor([6e4, 6e4], dtype=torch.float16)],
        # each tensor's norm (5e4) fits float16, their total (7.07e4) does not
        [
            torch.tensor([3e4, 4e4], dtype=torch.float16),
            torch.tensor([4e4, -3e4], dtype=torch.float16),
        ],
        [make_grad((40_000,), torch.float16, scale=500.0)],  # large-tensor path, norm ~1e5
    ],
    ids=["6e4x2", "two-5e4", "large"],
)
def test_float16_norm_overflow_clips_instead_of_zeroing(grads, foreach):
    params = params_with_grads(grads)
    ref, mine = clone_params(params), clone_params(params)
    true_total = f64_norm(grads)
    assert math.isfinite(true_total) and true_total > torch.finfo(torch.float16).max

    theirs, theirs_after = _norm_after_clip(tnu, ref, 1.0, foreach=foreach)
    assert theirs.dtype == torch.float16 and math.isinf(theirs.item())
    assert theirs_after == 0.0  # torch: coefficient 1/inf = 0 zeroes every gradient

    ours, ours_after = _norm_after_clip(gradclip, mine, 1.0, foreach=foreach)
    # The returned norm keeps torch's dtype, float16, where the true total does not fit: inf.
    assert ours.dtype == torch.float16 and math.isinf(ours.item())
    assert math.isclose(ours_after, 1.0, rel_tol=2e-3)  # clipped to max_norm, float16 rounding


def test_float16_overflow_with_float32_neighbour_returns_finite_float32_norm():
    grads = [torch.tensor([6e4, 6e4], dtype=torch.float16), torch.tensor([1.0, 2.0])]
    params = params_with_grads(grads)
    ref, mine = clone_params(params), clone_params(params)
    theirs, theirs_after = _norm_after_clip(tnu, ref, 1.0)
    assert theirs.dtype == torch.float32 and math.isinf(theirs.item()) and theirs_after == 0.0
    ours, ours_after = _norm_after_clip(gradclip, mine, 1.0)
    assert ours.dtype == torch.float32
    assert math.isclose(ours.item(), f64_norm(grads), rel_tol=1e-6)
    assert math.isclose(ours_after, 1.0, rel_tol=2e-3)


def test_float16_overflow_error_if_nonfinite_raises_only_in_torch():
    params = params_with_grads([torch.tensor([6e4, 6e4], dtype=torch.float16)])
    ref, mine = clone_params(params), clone_params(params)
    with pytest.raises(RuntimeError, match="non-finite"):
        tnu.clip_grad_norm_(ref, 1.0, error_if_nonfinite=True)
    ours = gradclip.clip_grad_norm_(mine, 1.0, error_if_nonfinite=True)
    assert ours.dtype == torch.float16  # torch's dtype; the value does not fit it (inf)
    assert math.isclose(f64_norm(grads_of(mine)), 1.0, rel_tol=2e-3)


def test_bfloat16_coefficient_is_float32_precise():
    # torch computes the total and the coefficient in bfloat16 (8 significant bits), so the
    # clipped norm is off by up to ~0.5%; ours is off only by rounding each clipped element to
    # bfloat16 (independent errors, ~1e-4 over 1000 elements).
    params = params_with_grads([make_grad((1000,), torch.bfloat16, scale=3.0, seed=6)])
    ref, mine = clone_params(params), clone_params(params)
    theirs, theirs_after = _norm_after_clip(tnu, ref, 1.0)
    ours, ours_after = _norm_after_clip(gradclip, mine, 1.0)
    assert ours.dtype == theirs.dtype == torch.bfloat16
    print(f"bfloat16 clipped norm: torch {theirs_after:.6f}, gradclip {ours_after:.6f}")
    assert abs(theirs_after - 1.0) > 2e-3
    assert abs(ours_after - 1.0) < 1e-3


def test_float16_tiny_total_coefficient_does_not_overflow():
    # torch's float16 coefficient max_norm / (total + 1e-6) overflows (1/1e-5 > 65504 in
    # float16 arithmetic), so a total of 1e-5 above max_norm 1e-6 is not clipped at all.
    params = params_with_grads([torch.tensor([6e-6, 8e-6], dtype=torch.float16)])
    ref, mine = clone_params(params), clone_params(params)
    before = f64_norm(grads_of(params))
    _, theirs_after = _norm_after_clip(tnu, ref, 1e-6)
    assert theirs_after == pytest.approx(before, rel=1e-3)
    _, ours_after = _norm_after_clip(gradclip, mine, 1e-6)
    expected = before * 1e-6 / (before + 1e-6)
    assert ours_after == pytest.approx(expected, rel=0.05)  # float16 subnormals: ~3 digits


def test_float16_zero_grads_with_zero_max_norm_stay_zero():
    params = params_with_grads([torch.zeros(3, dtype=torch.float16)])
    ref, mine = clone_params(params), clone_params(params)
    tnu.clip_grad_norm_(ref, 0.0)
    assert bool(ref[0].grad.isnan().all())  # torch: 0 * (1/1e-6 = inf in float16) = NaN
    gradclip.clip_grad_norm_(mine, 0.0)
    assert torch.equal(mine[0].grad, torch.zeros(3, dtype=torch.float16))


# ---------------------------------------------------------------------------------------
# 3. a gradient listed twice is counted and scaled once


def _twice(kind):
    (p,) = make_params([((4, 3), torch.float32)], scale=2, seed=4)
    if kind == "same-param":
        return [p, p], [p]
    q = torch.nn.Parameter(torch.zeros(4, 3))
    q.grad = p.grad  # two parameters, one gradient tensor (e.g. tied weights)
    return [p, q], [p]


@pytest.mark.parametrize("kind", ["same-param", "shared-grad"])
def test_duplicates_counted_and_scaled_once(kind):
    listed_twice, listed_once = _twice(kind)
    g = listed_once[0].grad
    norm = f64_norm([g])

    ref = clone_params(listed_twice)
    version = ref[0].grad._version
    theirs = tnu.clip_grad_norm_(ref, 1.0)
    assert theirs.item() == pytest.approx(math.sqrt(2) * norm, rel=1e-6)  # torch: counted twice
    coef = 1.0 / (math.sqrt(2) * norm + 1e-6)
    torch.testing.assert_close(ref[0].grad, g * coef**2, rtol=1e-5, atol=0)  # scaled twice
    assert ref[0].grad._version == version + 2

    mine = clone_params(listed_twice)
    ours = gradclip.clip_grad_norm_(mine, 1.0)
    single = clone_params(listed_once)
    expected = tnu.clip_grad_norm_(single, 1.0)  # torch with the gradient listed once
    assert ours.item() == pytest.approx(expected.item(), rel=1e-6)
    torch.testing.assert_close(mine[0].grad, single[0].grad, rtol=1e-6, atol=0)
    assert mine[0].grad._version == version + 1


@pytest.mark.parametrize("kind", ["same-param", "shared-grad"])
def test_duplicates_clip_grads_with_norm_scales_once(kind):
    listed_twice, listed_once = _twice(kind)
    total = torch.tensor(10.0)
    ref, mine, single = (
        clone_params(listed_twice),
        clone_params(listed_twice),
        clone_params(listed_once),
    )
    tnu.clip_grads_with_norm_(ref, 1.0, total)
    gradclip.clip_grads_with_norm_(mine, 1.0, total)
    tnu.clip_grads_with_norm_(single, 1.0, total)
    coef = 1.0 / (10.0 + 1e-6)
    torch.testing.assert_close(ref[0].grad, listed_once[0].grad * coef**2, rtol=1e-6, atol=0)
    torch.testing.assert_close(mine[0].grad, single[0].grad, rtol=0, atol=0)


def test_duplicate_tensor_counted_once_by_get_total_norm():
    g = make_grad((5,), torch.float32, seed=1)
    theirs = tnu.get_total_norm([g, g])
    assert theirs.item() == pytest.approx(math.sqrt(2) * f64_norm([g]), rel=1e-6)
    assert gradclip.get_total_norm([g, g]).item() == pytest.approx(
        tnu.get_total_norm([g]).item(), rel=1e-6
    )


def test_duplicates_clip_grad_value_same_values_one_write():
    listed_twice, _ = _twice("same-param")
    ref, mine = clone_params(listed_twice), clone_params(listed_twice)
    v0 = ref[0].grad._version
    tnu.clip_grad_value_(ref, 0.5)
    gradclip.clip_grad_value_(mine, 0.5)
    assert torch.equal(ref[0].grad, mine[0].grad)  # clamping is idempotent: same values
    assert ref[0].grad._version - v0 == 4  # foreach clamp_min_ + clamp_max_, twice
    assert mine[0].grad._version - v0 == 2


# ---------------------------------------------------------------------------------------
# 4. on the CPU, gradients that need no clipping are not written


@pytest.mark.parametrize("foreach", [None, True, False])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.float64])
def test_no_clip_does_not_write_grads(dtype, foreach):
    params = make_params([((5, 4), dtype), ((40_000,), dtype), None, ((), dtype)], seed=2)
    ref, mine = clone_params(params), clone_params(params)
    before = [g._version for g in grads_of(mine)]
    theirs = tnu.clip_grad_norm_(ref, 1e6, foreach=foreach)
    ours = gradclip.clip_grad_norm_(mine, 1e6, foreach=foreach)
    assert_total_like(ours, theirs, grads_of(params), 2.0)
    assert [g._version for g in grads_of(ref)] == [v + 1 for v in before]
    assert [g._version for g in grads_of(mine)] == before
    for a, b in zip(grads_of(mine), grads_of(ref), strict=True):
        assert torch.equal(a, b)


def test_no_clip_clip_grads_with_norm_does_not_write():
    params = make_params([((5, 4), torch.float32), ((3,), torch.float64)])
    ref, mine = clone_params(params), clone_params(params)
    before = [g._version for g in grads_of(mine)]
    for total in (torch.tensor(0.5), torch.tensor(0.0)):
        tnu.clip_grads_with_norm_(ref, 1.0, total)
        gradclip.clip_grads_with_norm_(mine, 1.0, total)
    assert [g._version for g in grads_of(ref)] == [v + 2 for v in before]
    assert [g._version for g in grads_of(mine)] == before
    for a, b in zip(grads_of(mine), grads_of(ref), strict=True):
        assert torch.equal(a, b)


def test_clipping_still_writes():
    params = make_params([((5, 4), torch.float32)], scale=3)
    mine = clone_params(params)
    before = mine[0].grad._version
    gradclip.clip_grad_norm_(mine, 0.1)
    assert mine[0].grad._version == before + 1


# ---------------------------------------------------------------------------------------
# 5. a NaN norm_type, and float32 norms that overflow float32's range


NAN_NORM_CALLS = {
    "clip_grad_norm_": lambda mod, ps: mod.clip_grad_norm_(ps, 1.0, math.nan),
    "get_total_norm": lambda mod, ps: mod.get_total_norm(grads_of(ps), math.nan),
}


@pytest.mark.parametrize("name", NAN_NORM_CALLS)
def test_nan_norm_type_raises_where_torch_nans_every_result(name):
    params = params_with_grads([make_grad((4, 3), torch.float32), make_grad((5,), torch.float32)])
    theirs = clone_params(params)
    total = NAN_NORM_CALLS[name](tnu, theirs)
    assert math.isnan(float(total))  # torch: a NaN norm ...
    if name == "clip_grad_norm_":  # ... and every gradient NaN
        assert all(bool(torch.isnan(g).all()) for g in grads_of(theirs))
    snap = Snapshot(params)
    with pytest.raises(ValueError, match="norm_type"):
        NAN_NORM_CALLS[name](gradclip, params)
    snap.assert_unchanged()
    with pytest.raises(ValueError, match="norm_type"):
        gradclip.NormClip(1.0, norm_type=math.nan)


OVERFLOWING = {
    # one tensor: its float32 sum of squares passes float32's range (elements of 1e20)
    "one-tensor": lambda: [torch.full((100,), 1e20)],
    "large-tensor": lambda: [torch.full((50_000,), 3e19)],
    # every tensor's norm fits float32, their float32 sum of squares does not
    "two-tensors": lambda: [torch.tensor([3e19]), torch.tensor([-4e19])],
    "many": lambda: [torch.full((7,), 2e19 * (i + 1)) for i in range(40)],
}


@pytest.mark.parametrize("foreach", [None, True, False])
@pytest.mark.parametrize("case", OVERFLOWING)
def test_float32_norm_overflow_is_measured_not_zeroed(case, foreach):
    params = params_with_grads(OVERFLOWING[case]())
    theirs = clone_params(params)
    exact = f64_norm(grads_of(params))
    assert exact < torch.finfo(torch.float32).max  # finite, and representable
    their_total = tnu.clip_grad_norm_(theirs, 1.0, foreach=foreach)
    assert math.isinf(float(their_total))  # torch: inf, and every gradient zeroed
    assert all(bool((g == 0).all()) for g in grads_of(theirs))
    before = [g.double().clone() for g in grads_of(params)]
    ours = gradclip.clip_grad_norm_(params, 1.0, foreach=foreach, error_if_nonfinite=True)
    assert ours.dtype == torch.float32
    assert math.isclose(float(ours), exact, rel_tol=1e-5)
    coef = 1.0 / (float(ours) + 1e-6)
    for g, b in zip(grads_of(params), before, strict=True):
        torch.testing.assert_close(g.double(), b * coef, rtol=1e-5, atol=0)
    assert math.isclose(f64_norm(grads_of(params)), 1.0, rel_tol=1e-5)
