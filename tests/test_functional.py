"""Parity of gradclip's drop-ins with torch.nn.utils, on exact clones of the same inputs.

Tests that take the ``device`` fixture (conftest.py) run on the CPU and, when a GPU is
present, again on CUDA with the same values: dtypes, norm types, non-finite gradients,
``clip_grad_value_`` and gradients spread over two devices.

The deliberate differences (README, "Differences from torch.nn.utils") are in test_differences.py; inputs are chosen
here so that none of them applies (no negative max_norm, no duplicated gradients, no
low-precision norm that overflows its dtype; the CPU "no rewrite" difference changes no
value, only version counters, which are not compared here).
"""

from __future__ import annotations

import inspect
import math
import warnings

import pytest
import torch
import torch.nn.utils as tnu
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

import gradclip
from conftest import (
    ALL_DTYPES,
    LOW_PRECISION,
    RTOL,
    Snapshot,
    assert_grads_like,
    assert_total_like,
    clone_params,
    float64_total,
    grads_of,
    lowest_precision,
    make_grad,
    make_params,
    on_device,
    params_with_grads,
    run_both,
    well_conditioned,
)
from gradclip import _foreach

INF = math.inf
FOREACH = [None, True, False]
pytestmark = [
    pytest.mark.usefixtures("one_thread"),
    pytest.mark.filterwarnings(  # torch's own, from _foreach_norm / vector_norm p=0
        "ignore:Casting complex values to real discards the imaginary part:UserWarning"
    ),
]
FUNCTIONS = [
    "clip_grad_norm_",
    "clip_grad_norm",
    "clip_grad_value_",
    "get_total_norm",
    "clip_grads_with_norm_",
]

# (norm_type as passed, the float torch makes of it)
NORM_TYPES = [
    (0, 0.0),
    (1, 1.0),
    (2, 2.0),
    (3, 3.0),
    (0.5, 0.5),
    (1.5, 1.5),
    (2.0, 2.0),
    (-1, -1.0),
    (-2.5, -2.5),
    (INF, INF),
    ("inf", INF),
    ("Infinity", INF),
    (-INF, -INF),
    ("-inf", -INF),
    (True, 1.0),
    ("2", 2.0),
    (torch.tensor(3.0), 3.0),
    (torch.tensor([1.5]), 1.5),
]
NORM_IDS = [f"{type(n).__name__}:{f}" for n, f in NORM_TYPES]

MIXED_SHAPES = [
    ((7, 3), torch.float32),
    ((11,), torch.float32),
    ((), torch.float32),
    ((2, 3, 4), torch.float32),
    None,
    ((40_000,), torch.float32),
]


def clip_both(params, *args, **kwargs):
    return run_both(gradclip.clip_grad_norm_, tnu.clip_grad_norm_, params, *args, **kwargs)


def check_clip_parity(params, max_norm, p, *, foreach=None, rtol=None):
    """clip_grad_norm_ on clones: same total (type/dtype/device/value) and same clipped grads."""
    ours, mine, theirs, ref = clip_both(params, max_norm, p, foreach=foreach)
    grads = grads_of(params)
    assert_total_like(ours, theirs, grads, p, rtol=rtol)
    if rtol is None:
        rtol = RTOL[lowest_precision(g.dtype for g in grads)] if grads else 0.0
    assert_grads_like(grads_of(mine), grads_of(ref), rtol=rtol)
    return ours, mine


# ---------------------------------------------------------------------------------------
# public surface


@pytest.mark.parametrize("name", FUNCTIONS)
def test_signature_matches_torch(name):
    """torch's parameters, in order, then only keyword-only extras (STYLE principle 1)."""
    ours = list(inspect.signature(getattr(gradclip, name)).parameters.values())
    theirs = list(inspect.signature(getattr(tnu, name)).parameters.values())
    assert [(p.name, p.kind, p.default) for p in ours[: len(theirs)]] == [
        (p.name, p.kind, p.default) for p in theirs
    ]
    assert all(p.kind is inspect.Parameter.KEYWORD_ONLY for p in ours[len(theirs) :])


def test_return_values_are_none_like_torch():
    params = make_params([((3,), torch.float32)])
    assert gradclip.clip_grad_value_(clone_params(params), 1.0) is None
    total = gradclip.get_total_norm(grads_of(params))
    assert gradclip.clip_grads_with_norm_(clone_params(params), 1.0, total) is None


# ---------------------------------------------------------------------------------------
# norm types


@pytest.mark.parametrize("foreach", FOREACH)
@pytest.mark.parametrize(("norm_type", "p"), NORM_TYPES, ids=NORM_IDS)
@pytest.mark.parametrize("clips", [True, False], ids=["clips", "no-clip"])
def test_norm_types(norm_type, p, clips, foreach, device):
    params = on_device(make_params(MIXED_SHAPES, seed=1), device)
    ref = float64_total(grads_of(params), p)
    check_clip_parity(params, 0.3 * ref if clips else 3 * ref, norm_type, foreach=foreach)


@pytest.mark.parametrize(("norm_type", "p"), NORM_TYPES, ids=NORM_IDS)
def test_get_total_norm_norm_types(norm_type, p):
    tensors = [make_grad((5, 4), torch.float32, seed=2), make_grad((9,), torch.float64, seed=3)]
    ours = gradclip.get_total_norm(tensors, norm_type)
    theirs = tnu.get_total_norm(tensors, norm_type)
    assert_total_like(ours, theirs, tensors, p)


def test_p0_counts_tensors_with_a_nonzero_entry():
    grads = [
        torch.tensor([1.0, 2, 3]),
        torch.tensor([0.0, 5]),
        torch.zeros(2),
        torch.tensor([math.nan]),
    ]
    ours = gradclip.get_total_norm(grads, 0)
    assert_total_like(ours, tnu.get_total_norm(grads, 0), grads, 0.0, rtol=0)
    assert ours.item() == 3


@pytest.mark.parametrize("p", [-1.0, -INF])
def test_negative_p_zero_entry_gives_zero_total(p):
    params = params_with_grads([torch.tensor([0.0, 5.0]), torch.tensor([3.0, 4.0])])
    ours, _ = check_clip_parity(params, 1.0, p)
    assert ours.item() == 0.0


# ---------------------------------------------------------------------------------------
# dtypes and the result dtype


DTYPE_SETS = [
    [torch.float32],
    [torch.float64],
    [torch.float16],
    [torch.bfloat16],
    [torch.complex64],
    [torch.complex128],
    [torch.float16, torch.bfloat16],
    [torch.float16, torch.float32],
    [torch.bfloat16, torch.float32],
    [torch.float32, torch.float64],
    [torch.float16, torch.float64],
    [torch.complex64, torch.float16],
    [torch.complex64, torch.float32],
    [torch.complex64, torch.float64],
    [torch.complex128, torch.float32],
    [torch.float64, torch.float32, torch.float16],
    [torch.bfloat16, torch.complex64, torch.float16, torch.float32],
]


@pytest.mark.parametrize("foreach", FOREACH)
@pytest.mark.parametrize("p", [2.0, 1.0, INF, 0.5, 0.0, -1.0])
@pytest.mark.parametrize("dtypes", DTYPE_SETS, ids=lambda ds: "+".join(str(d)[6:] for d in ds))
def test_dtypes(dtypes, p, foreach, device):
    shapes = [(6, 5), (40,), (), (33_000,)]
    specs = [(shapes[i % len(shapes)], dtypes[i % len(dtypes)]) for i in range(max(4, len(dtypes)))]
    # Leave out tensors whose low-precision norm overflows or is subnormal in its dtype (a
    # 33k-element float16 tensor's 0.5-norm is ~1e9): that is difference #2, tested apart.
    params = [q for q in make_params(specs, seed=5) if well_conditioned([q.grad], p)]
    params = on_device(params, device)
    assert len(params) >= 3 and well_conditioned(grads_of(params), p)
    ref = float64_total(grads_of(params), p)
    check_clip_parity(params, 0.5 * ref, p, foreach=foreach)


@pytest.mark.parametrize("second", [None, *ALL_DTYPES, torch.complex128])
@pytest.mark.parametrize("first", [*ALL_DTYPES, torch.complex128])
def test_result_dtype_follows_torch_promotion(first, second):
    tensors = [make_grad((3,), first, seed=1)]
    if second is not None:
        tensors.append(make_grad((2,), second, seed=2))
    assert gradclip.get_total_norm(tensors).dtype == tnu.get_total_norm(tensors).dtype


# ---------------------------------------------------------------------------------------
# the parameters argument


def test_none_grads_are_skipped():
    params = make_params([None, ((4, 2), torch.float32), None, ((3,), torch.float64), None])
    check_clip_parity(params, 0.1, 2.0)


def test_single_tensor_equals_one_element_list():
    (param,) = make_params([((5, 3), torch.float32)], scale=4)
    single = clone_params([param])[0]
    listed = clone_params([param])
    total_single = gradclip.clip_grad_norm_(single, 1.0)
    total_listed = gradclip.clip_grad_norm_(listed, 1.0)
    assert torch.equal(total_single, total_listed)
    assert torch.equal(single.grad, listed[0].grad)
    check_clip_parity(param, 1.0, 2.0)


def test_single_tensor_clip_grad_value_and_with_norm():
    (param,) = make_params([((5, 3), torch.float32)], scale=4)
    single, ref = clone_params([param])[0], clone_params([param])
    assert gradclip.clip_grad_value_(single, 1.0) is None
    tnu.clip_grad_value_(ref, 1.0)
    assert torch.equal(single.grad, ref[0].grad)
    single = clone_params([param])[0]
    ref_single = clone_params([param])[0]
    gradclip.clip_grads_with_norm_(single, 1.0, torch.tensor(10.0))
    tnu.clip_grads_with_norm_(ref_single, 1.0, torch.tensor(10.0))
    assert torch.equal(single.grad, ref_single.grad)


@pytest.mark.parametrize(
    "container",
    [tuple, set, lambda ps: {i: p for i, p in enumerate(ps)}.values(), torch.nn.ParameterList],
    ids=["tuple", "set", "dict_values", "ParameterList"],
)
def test_iterables(container):
    params = make_params([((4,), torch.float32), ((2, 2), torch.float32)], scale=3)
    mine, ref = clone_params(params), clone_params(params)
    ours = gradclip.clip_grad_norm_(container(mine), 1.0)
    theirs = tnu.clip_grad_norm_(container(ref), 1.0)
    assert_total_like(ours, theirs, grads_of(params), 2.0)
    assert_grads_like(grads_of(mine), grads_of(ref), rtol=1e-5)


def test_module_parameters():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(5, 4), torch.nn.Tanh(), torch.nn.Linear(4, 2))
    model(torch.randn(3, 5)).pow(2).sum().backward()
    params = list(model.parameters())
    ours, mine, theirs, ref = clip_both(params, 0.1)
    assert_total_like(ours, theirs, grads_of(params), 2.0)
    assert_grads_like(grads_of(mine), grads_of(ref), rtol=1e-5)


def test_generator_is_consumed_and_gives_the_list_result():
    params = make_params([((4,), torch.float32), None, ((3, 3), torch.float32)], scale=2)
    mine, ref = clone_params(params), clone_params(params)
    gen = (p for p in mine)
    ours = gradclip.clip_grad_norm_(gen, 1.0)
    assert next(gen, None) is None
    theirs = tnu.clip_grad_norm_((p for p in ref), 1.0)
    assert_total_like(ours, theirs, grads_of(params), 2.0)
    assert_grads_like(grads_of(mine), grads_of(ref), rtol=1e-5)


def _empty_generator():
    yield from ()


EMPTY_GEN_MESSAGE = "`parameters` is an empty generator, no gradient clipping will occur."


@pytest.mark.parametrize("name", ["clip_grad_norm_", "clip_grad_norm"])
def test_empty_generator_warns_like_torch(name):
    for module in (tnu, gradclip):
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            total = getattr(module, name)(_empty_generator(), 1.0)
        user = [w for w in caught if w.category is UserWarning]
        assert [str(w.message) for w in user] == [EMPTY_GEN_MESSAGE], module
        assert torch.equal(total, torch.tensor(0.0))


def test_empty_generator_warning_points_at_the_caller():
    for fn in (tnu.clip_grad_norm_, gradclip.clip_grad_norm_):
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            fn(_empty_generator(), 1.0)
        (warning,) = caught
        assert warning.filename == __file__, f"{fn.__module__}: {warning.filename}"


@pytest.mark.parametrize("parameters", [[], (), iter([]), "all-none-generator"])
def test_no_warning_without_an_empty_generator(parameters):
    if parameters == "all-none-generator":
        parameters = (p for p in make_params([None, None]))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert torch.equal(gradclip.clip_grad_norm_(parameters, 1.0), torch.tensor(0.0))


@pytest.mark.parametrize("name", ["clip_grads_with_norm_", "get_total_norm"])
def test_other_functions_never_warn_on_empty_generator(name):
    args = {"clip_grads_with_norm_": (1.0, torch.tensor(1.0)), "get_total_norm": ()}[name]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        getattr(gradclip, name)(_empty_generator(), *args)
        getattr(tnu, name)(_empty_generator(), *args)


@pytest.mark.parametrize("parameters", [[], "all-none", "empty-generator"])
def test_clip_grad_value_without_grads_raises_like_torch(parameters):
    def make():
        if parameters == "all-none":
            return make_params([None, None])
        return _empty_generator() if parameters == "empty-generator" else []

    with pytest.raises(RuntimeError):
        tnu.clip_grad_value_(make(), 1.0)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with pytest.raises(RuntimeError):
            gradclip.clip_grad_value_(make(), 1.0)


# ---------------------------------------------------------------------------------------
# empty inputs and 0-element tensors


@pytest.mark.parametrize("default", [torch.float32, torch.float64])
@pytest.mark.parametrize("case", ["empty-list", "all-none", "get_total_norm"])
def test_empty_input_returns_zero_in_default_dtype(case, default, restore_default_dtype):
    torch.set_default_dtype(default)
    if case == "get_total_norm":
        ours, theirs = gradclip.get_total_norm([]), tnu.get_total_norm([])
    else:
        params = make_params([None, None]) if case == "all-none" else []
        snap = Snapshot(params)
        ours, theirs = gradclip.clip_grad_norm_(params, 1.0), tnu.clip_grad_norm_(params, 1.0)
        snap.assert_unchanged()
    assert ours.dtype == theirs.dtype == default
    assert ours.shape == torch.Size([]) and not ours.requires_grad
    assert ours.device == theirs.device and ours.item() == theirs.item() == 0.0


def test_empty_input_on_meta_params_returns_cpu_zero():
    p = torch.nn.Parameter(torch.zeros(3, device="meta"))
    ours, theirs = gradclip.clip_grad_norm_([p], 1.0), tnu.clip_grad_norm_([p], 1.0)
    assert ours.device == theirs.device


def test_clip_grads_with_norm_no_grads_ignores_total():
    params = make_params([None])
    assert gradclip.clip_grads_with_norm_(params, 1.0, 3.0) is None
    assert tnu.clip_grads_with_norm_(params, 1.0, 3.0) is None


@pytest.mark.parametrize("foreach", FOREACH)
@pytest.mark.parametrize("p", [0.0, 0.5, 1.0, 2.0, 3.0])
def test_zero_element_tensors_contribute_zero(p, foreach, device):
    params = make_params(
        [
            ((0,), torch.float32),
            ((4, 3), torch.float32),
            ((2, 0), torch.float32),
            ((5,), torch.float64),
            ((0,), torch.float64),
        ],
        scale=2,
        seed=3,
    )
    check_clip_parity(on_device(params, device), 0.5, p, foreach=foreach)
    only_empty = on_device(make_params([((0,), torch.float32), ((3, 0), torch.float32)]), device)
    ours, _ = check_clip_parity(only_empty, 0.5, p, foreach=foreach)
    assert ours.item() == 0.0


@pytest.mark.parametrize("foreach", FOREACH)
@pytest.mark.parametrize("p", [INF, -INF, -1.0, "inf"])
@pytest.mark.parametrize("fn", ["clip_grad_norm_", "get_total_norm"])
def test_zero_element_tensors_raise_for_inf_and_negative_p(fn, p, foreach):
    def args(params):
        return (grads_of(params),) if fn == "get_total_norm" else (params, 1.0)

    params = make_params([((4,), torch.float32), ((0,), torch.float32)], scale=2)
    with pytest.raises(RuntimeError, match="empty tensor"):
        getattr(tnu, fn)(*args(clone_params(params)), p, foreach=foreach)
    mine = clone_params(params)
    snap = Snapshot(mine)
    # The text differs by path in torch too ("_foreach_norm cannot compute the infinity norm
    # on an empty tensor" / "linalg.vector_norm cannot compute the inf norm on an empty tensor").
    with pytest.raises(RuntimeError, match="empty tensor"):
        getattr(gradclip, fn)(*args(mine), p, foreach=foreach)
    snap.assert_unchanged()


# ---------------------------------------------------------------------------------------
# error_if_nonfinite


def _bad_grads(kind):
    bad = {"nan": math.nan, "inf": INF, "-inf": -INF}[kind]
    return params_with_grads(
        [
            torch.tensor([1.0, bad, 2.0]),
            torch.tensor([3.0, 4.0]),
            torch.tensor([0.5], dtype=torch.float64),
        ]
    )


@pytest.mark.parametrize("foreach", FOREACH)
@pytest.mark.parametrize("p", [2.0, 1.0, INF, 0.5, -1.0, -INF, 0.0])
@pytest.mark.parametrize("kind", ["nan", "inf", "-inf"])
def test_error_if_nonfinite(kind, p, foreach, device):
    params = on_device(_bad_grads(kind), device)
    mine, ref = clone_params(params), clone_params(params)
    snap = Snapshot(mine)
    try:
        theirs = tnu.clip_grad_norm_(ref, 1.0, p, error_if_nonfinite=True, foreach=foreach)
    except RuntimeError as err:
        with pytest.raises(RuntimeError) as ours:
            gradclip.clip_grad_norm_(mine, 1.0, p, error_if_nonfinite=True, foreach=foreach)
        assert str(ours.value) == str(err)
        snap.assert_unchanged()
        with pytest.raises(RuntimeError) as ours_total:
            gradclip.get_total_norm(grads_of(mine), p, error_if_nonfinite=True, foreach=foreach)
        assert str(ours_total.value) == str(err)
        snap.assert_unchanged()
        return
    ours = gradclip.clip_grad_norm_(mine, 1.0, p, error_if_nonfinite=True, foreach=foreach)
    assert_total_like(ours, theirs, grads_of(params), p)
    assert_grads_like(grads_of(mine), grads_of(ref), rtol=1e-5)


@pytest.mark.parametrize("p", [2.0, 1.0, INF, 0.0, -1.0])
@pytest.mark.parametrize("kind", ["nan", "inf"])
def test_nonfinite_without_flag_poisons_grads_like_torch(kind, p, device):
    check_clip_parity(on_device(_bad_grads(kind), device), 1.0, p)


@pytest.mark.parametrize("p", [2.0, 3.5])
def test_float64_overflow_raises_like_torch(p):
    params = params_with_grads([torch.tensor([2e200, -2e200], dtype=torch.float64)])
    mine = clone_params(params)
    snap = Snapshot(mine)
    with pytest.raises(RuntimeError) as theirs:
        tnu.clip_grad_norm_(params, 1.0, p, error_if_nonfinite=True)
    with pytest.raises(RuntimeError) as ours:
        gradclip.clip_grad_norm_(mine, 1.0, p, error_if_nonfinite=True)
    assert str(ours.value) == str(theirs.value)
    snap.assert_unchanged()


# ---------------------------------------------------------------------------------------
# the coefficient


@pytest.mark.parametrize(
    ("grads", "max_norm"),
    [
        ([[3.0, 4.0]], 5.0),  # total == max_norm still scales by max/(max+1e-6)
        ([[3e-8, 4e-8]], 1e-7),  # tiny norms are scaled too
        ([[3e-9, 4e-9]], 1e-6),
        ([[0.0, 0.0]], 0.0),  # 0/(0+1e-6) = 0, no NaN
        ([[0.0, 0.0]], 1.0),
        ([[3.0, -4.0], [1.0]], 0.0),  # max_norm 0 zeroes
        ([[3.0, -4.0], [1.0]], INF),  # max_norm inf is a no-op
        ([[-0.0, 1.0]], 10.0),  # -0.0 survives
    ],
)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_coefficient_edge_cases(grads, max_norm, dtype):
    params = params_with_grads([torch.tensor(g, dtype=dtype) for g in grads])
    ours, mine, theirs, ref = clip_both(params, max_norm)
    assert torch.equal(ours, theirs)
    for a, b in zip(grads_of(mine), grads_of(ref), strict=True):
        assert torch.equal(a, b) and torch.equal(a.signbit(), b.signbit())


@pytest.mark.parametrize("dtype", LOW_PRECISION)
def test_low_precision_total_equal_max_norm_does_not_scale(dtype):
    params = params_with_grads([torch.tensor([3.0, 4.0], dtype=dtype)])
    ours, mine, theirs, ref = clip_both(params, 5.0)
    assert torch.equal(ours, theirs)
    assert torch.equal(mine[0].grad, ref[0].grad)


@pytest.mark.parametrize(
    "max_norm",
    [1, True, "0.5", torch.tensor(0.5), torch.tensor([0.5])],
    ids=["int", "bool", "str", "tensor0d", "tensor1"],
)
def test_max_norm_accepts_what_float_accepts(max_norm):
    params = make_params([((6,), torch.float32)], scale=3)
    ours, mine, theirs, ref = clip_both(params, max_norm)
    assert torch.equal(ours, theirs)
    assert_grads_like(grads_of(mine), grads_of(ref), rtol=1e-6)


# ---------------------------------------------------------------------------------------
# the returned norm and the gradients


def test_returned_norm_is_detached_0dim_even_for_params_requiring_grad():
    params = [
        torch.nn.Parameter(make_grad(s, torch.float32, seed=i))
        for i, s in enumerate([(3, 2), (4,)])
    ]
    assert all(p.requires_grad for p in params)
    ours, theirs = gradclip.get_total_norm(params), tnu.get_total_norm(params)
    assert ours.item() > 0
    assert_total_like(ours, theirs, [p.detach() for p in params], 2.0)
    assert ours.grad_fn is None


def test_get_total_norm_norms_the_tensors_not_their_grads():
    (param,) = make_params([((4, 3), torch.float32)], scale=100)
    with torch.no_grad():
        param.copy_(make_grad((4, 3), torch.float32, seed=9))
    ours, theirs = gradclip.get_total_norm(param), tnu.get_total_norm(param)
    assert_total_like(ours, theirs, [param.detach()], 2.0)
    assert math.isclose(ours.item(), float64_total([param.detach()], 2.0), rel_tol=1e-6)


@pytest.mark.parametrize("foreach", FOREACH)
def test_grads_modified_in_place(foreach, device):
    params = make_params(
        [((5, 4), torch.float32), ((40_000,), torch.float32), ((3,), torch.float16)], scale=3
    )
    params = on_device(params, device)
    grads = grads_of(params)
    ptrs = [g.data_ptr() for g in grads]
    before = [g.clone() for g in grads]
    gradclip.clip_grad_norm_(params, 1.0, foreach=foreach)
    assert all(p.grad is g for p, g in zip(params, grads, strict=True))
    assert [g.data_ptr() for g in grads] == ptrs
    assert all(not torch.equal(g, b) for g, b in zip(grads, before, strict=True))


@pytest.mark.parametrize("foreach", FOREACH)
def test_clip_grads_with_norm_after_get_total_norm_equals_clip_grad_norm(foreach):
    params = make_params(
        [((5, 4), torch.float32), ((40_000,), torch.float32), ((3,), torch.float64), None], scale=3
    )
    a, b = clone_params(params), clone_params(params)
    total = gradclip.get_total_norm(grads_of(a), 2.0, foreach=foreach)
    gradclip.clip_grads_with_norm_(a, 1.0, total, foreach=foreach)
    expected = gradclip.clip_grad_norm_(b, 1.0, 2.0, foreach=foreach)
    assert torch.equal(total, expected)
    for x, y in zip(grads_of(a), grads_of(b), strict=True):
        assert torch.equal(x, y)


@pytest.mark.parametrize("foreach", FOREACH)
@pytest.mark.parametrize(
    "total",
    [
        torch.tensor(12.0),
        torch.tensor(0.0),
        torch.tensor(math.nan),
        torch.tensor(INF),
        torch.tensor(7, dtype=torch.int64),
        torch.tensor(9.0, dtype=torch.float64),
        torch.tensor(20.0, requires_grad=True),
    ],
    ids=["f32", "zero", "nan", "inf", "int", "f64", "requires_grad"],
)
def test_clip_grads_with_norm_matches_torch(total, foreach, device):
    """On CUDA the ``total`` stays on the CPU: torch moves the coefficient to each device."""
    params = make_params(
        [((5, 4), torch.float32), ((3,), torch.float64), ((2,), torch.float16)], scale=3
    )
    params = on_device(params, device)
    run = run_both(
        gradclip.clip_grads_with_norm_,
        tnu.clip_grads_with_norm_,
        params,
        2.0,
        total,
        foreach=foreach,
    )
    assert run[0] is None and run[2] is None
    assert_grads_like(grads_of(run[1]), grads_of(run[3]), rtol=RTOL[torch.float16])


def test_clip_grads_with_norm_low_precision_total():
    params = make_params([((5, 4), torch.float32)], scale=3)
    total = torch.tensor(6.0, dtype=torch.float16)
    run = run_both(gradclip.clip_grads_with_norm_, tnu.clip_grads_with_norm_, params, 1.0, total)
    assert_grads_like(grads_of(run[1]), grads_of(run[3]), rtol=RTOL[torch.float16])


def test_clip_grads_with_norm_shape1_total_like_torch_loop():
    params = make_params([((5, 4), torch.float32)], scale=3)
    total = torch.tensor([6.0])
    run = run_both(
        gradclip.clip_grads_with_norm_, tnu.clip_grads_with_norm_, params, 1.0, total, foreach=False
    )
    assert_grads_like(grads_of(run[1]), grads_of(run[3]), rtol=0)


def test_clip_grads_with_norm_float_total_raises_type_error():
    params = make_params([((3,), torch.float32)])
    snap = Snapshot(params)
    with pytest.raises(TypeError):
        tnu.clip_grads_with_norm_(clone_params(params), 1.0, 3.0)
    with pytest.raises(TypeError):
        gradclip.clip_grads_with_norm_(params, 1.0, 3.0)
    snap.assert_unchanged()


def test_non_leaf_grads_from_create_graph():
    def build():
        torch.manual_seed(0)
        model = torch.nn.Linear(4, 3)
        model(torch.randn(5, 4)).pow(3).sum().backward(create_graph=True)
        return list(model.parameters())

    mine, ref = build(), build()
    assert all(p.grad.grad_fn is not None for p in mine)
    ours = gradclip.clip_grad_norm_(mine, 0.1)
    theirs = tnu.clip_grad_norm_(ref, 0.1)
    assert_total_like(ours, theirs, [p.grad.detach() for p in ref], 2.0)
    for a, b in zip(mine, ref, strict=True):
        assert type(a.grad.grad_fn) is type(b.grad.grad_fn)
        assert a.grad.requires_grad == b.grad.requires_grad
    assert_grads_like([p.grad.detach() for p in mine], [p.grad.detach() for p in ref], rtol=1e-5)
    grad_sum = sum(p.grad.sum() for p in mine)  # the graph is still usable
    grad_sum.backward()


def test_leaf_grad_requiring_grad_is_clipped():
    params = make_params([((3,), torch.float32)], scale=5)
    params[0].grad.requires_grad_(True)
    check_clip_parity(params, 1.0, 2.0)


# ---------------------------------------------------------------------------------------
# foreach, meta device, subclasses


META_FUNCTIONS = {
    "clip_grad_norm_": lambda fn, ps, **kw: fn(ps, 1.0, **kw),
    "get_total_norm": lambda fn, ps, **kw: fn(grads_of(ps), **kw),
    "clip_grads_with_norm_": lambda fn, ps, **kw: fn(
        ps, 1.0, torch.tensor(3.0, device="meta"), **kw
    ),
    "clip_grad_value_": lambda fn, ps, **kw: fn(ps, 1.0, **kw),
}


def _meta_params(n=2):
    params = []
    for shape in [(3, 2), (4,)][:n]:
        p = torch.nn.Parameter(torch.zeros(shape, device="meta"))
        p.grad = torch.zeros(shape, device="meta")
        params.append(p)
    return params


@pytest.mark.parametrize("name", META_FUNCTIONS)
def test_meta_foreach_true_raises_like_torch(name):
    call = META_FUNCTIONS[name]
    with pytest.raises(RuntimeError) as theirs:
        call(getattr(tnu, name), _meta_params(), foreach=True)
    with pytest.raises(RuntimeError) as ours:
        call(getattr(gradclip, name), _meta_params(), foreach=True)
    assert str(ours.value) == str(theirs.value)


@pytest.mark.parametrize("foreach", [None, False])
@pytest.mark.parametrize("name", META_FUNCTIONS)
def test_meta_works_without_foreach(name, foreach):
    call = META_FUNCTIONS[name]
    ours = call(getattr(gradclip, name), _meta_params(), foreach=foreach)
    theirs = call(getattr(tnu, name), _meta_params(), foreach=foreach)
    if theirs is None:
        assert ours is None
    else:
        assert_total_like(ours, theirs, [], 2.0)


@pytest.mark.parametrize("p", [2.0, INF, 1.0])
def test_meta_first_gives_meta_result(p):
    tensors = [torch.ones(3, device="meta"), torch.ones(2)]
    ours, theirs = gradclip.get_total_norm(tensors, p), tnu.get_total_norm(tensors, p)
    assert ours.device.type == theirs.device.type == "meta"
    assert ours.dtype == theirs.dtype


def test_cpu_first_then_meta_raises_like_torch():
    tensors = [torch.ones(2), torch.ones(3, device="meta")]
    with pytest.raises(NotImplementedError):
        tnu.get_total_norm(tensors)
    with pytest.raises(NotImplementedError):
        gradclip.get_total_norm(tensors)


class MyTensor(torch.Tensor):
    pass


@pytest.mark.parametrize("foreach", FOREACH)
@pytest.mark.parametrize("which", ["all", "first", "second"])
def test_tensor_subclass_propagates(which, foreach):
    grads = [
        make_grad((4, 3), torch.float32, scale=3, seed=1),
        make_grad((5,), torch.float64, seed=2),
    ]
    for i in {"all": [0, 1], "first": [0], "second": [1]}[which]:
        grads[i] = grads[i].as_subclass(MyTensor)
    params = params_with_grads(grads)
    _, mine = check_clip_parity(params, 1.0, 2.0, foreach=foreach)
    assert all(type(a.grad) is type(b) for a, b in zip(mine, grads, strict=True))
    ours_total = gradclip.get_total_norm(grads, foreach=foreach)
    assert type(ours_total) is type(tnu.get_total_norm(grads, foreach=foreach))


# ---------------------------------------------------------------------------------------
# clip_grad_value_


VALUE_GRADS = [[-3.0, -0.5, 0.0, -0.0, 0.25, 2.0, math.nan, INF, -INF], [1e30, -1e-30]]


@pytest.mark.parametrize("foreach", FOREACH)
@pytest.mark.parametrize(
    "clip_value",
    [0.0, 0.1, 1.0, INF, 1e30, 1, "0.5", torch.tensor(0.5)],
    ids=["0", "0.1", "1", "inf", "1e30", "int", "str", "tensor"],
)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16, torch.bfloat16])
def test_clip_grad_value_matches_torch_bitwise(dtype, clip_value, foreach, device):
    # a tensor from ONE_PASS_NUMEL elements is clamped in one pass on the CPU: the same bits
    big = make_grad((200, 200), dtype, scale=2)
    assert big.numel() >= _foreach.ONE_PASS_NUMEL
    big.view(-1)[: len(VALUE_GRADS[0])] = torch.tensor(VALUE_GRADS[0], dtype=dtype)
    params = params_with_grads([torch.tensor(g, dtype=dtype) for g in VALUE_GRADS])
    params.append(params_with_grads([make_grad((40, 30), dtype, scale=2)])[0])
    params.append(params_with_grads([big])[0])
    params = on_device(params, device)
    mine, ref = clone_params(params), clone_params(params)
    try:
        theirs = tnu.clip_grad_value_(ref, clip_value, foreach=foreach)
    except RuntimeError:  # 1e30 does not fit float16: torch refuses to convert it
        snap = Snapshot(mine)
        with pytest.raises(RuntimeError):
            gradclip.clip_grad_value_(mine, clip_value, foreach=foreach)
        snap.assert_unchanged()
        return
    assert gradclip.clip_grad_value_(mine, clip_value, foreach=foreach) is None and theirs is None
    for a, b in zip(grads_of(mine), grads_of(ref), strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0, equal_nan=True)
        assert torch.equal(a.signbit(), b.signbit())


def test_clip_grad_value_mixed_devices_dtypes_and_none():
    params = make_params(
        [((4, 4), torch.float32), None, ((9,), torch.float64), ((3,), torch.bfloat16)], scale=3
    )
    _, mine, _, ref = run_both(gradclip.clip_grad_value_, tnu.clip_grad_value_, params, 0.7)
    for a, b in zip(grads_of(mine), grads_of(ref), strict=True):
        assert torch.equal(a, b)


@pytest.mark.parametrize("foreach", [None, False])
@pytest.mark.parametrize("p", [2.0, 1.0, INF, 0.0])
def test_gradients_on_two_devices_like_torch(p, foreach, device):
    """Gradients alternating between ``device`` and the CPU, in three dtypes: the norms are
    gathered on the first gradient's device, as torch does (on a CPU-only machine, one device)."""
    specs = [((7, 3), torch.float32), ((40_000,), torch.bfloat16), ((11,), torch.float16),
             ((5,), torch.float32), ((2, 3, 4), torch.bfloat16), None]
    params = make_params(specs, seed=8)
    moved = on_device(params, device)
    mixed = [q if i % 2 == 0 else p_ for i, (q, p_) in enumerate(zip(moved, params, strict=True))]
    assert mixed[0].device.type == torch.device(device).type and mixed[1].device.type == "cpu"
    ref = float64_total(grads_of(mixed), p)
    for max_norm in (0.3 * ref, 3 * ref):
        check_clip_parity(mixed, max_norm, p, foreach=foreach)
        run = run_both(gradclip.clip_grad_value_, tnu.clip_grad_value_, mixed, 0.001,
                       foreach=foreach)
        for a, b in zip(grads_of(run[1]), grads_of(run[3]), strict=True):
            assert a.device == b.device and torch.equal(a, b)


# ---------------------------------------------------------------------------------------
# the deprecated alias


def test_deprecated_alias_warns_and_matches():
    params = make_params([((5, 4), torch.float32), ((3,), torch.float64)], scale=3)
    a, b = clone_params(params), clone_params(params)
    with pytest.warns(FutureWarning, match="clip_grad_norm_") as record:
        total = gradclip.clip_grad_norm(a, 1.0, 2.0, False, None)
    assert record[0].filename == __file__
    assert "gradclip" in str(record[0].message)
    expected = gradclip.clip_grad_norm_(b, 1.0)
    assert torch.equal(total, expected)
    for x, y in zip(grads_of(a), grads_of(b), strict=True):
        assert torch.equal(x, y)
    with pytest.warns(FutureWarning):
        theirs = tnu.clip_grad_norm(clone_params(params), 1.0)
    assert_total_like(total, theirs, grads_of(params), 2.0)


def test_deprecated_alias_has_torch_deprecated_attribute():
    assert hasattr(gradclip.clip_grad_norm, "__deprecated__")
    assert hasattr(tnu.clip_grad_norm, "__deprecated__")


# ---------------------------------------------------------------------------------------
# generated cases


SHAPES = st.one_of(
    st.just(()),
    st.lists(st.integers(0, 12), min_size=1, max_size=3).map(tuple),
    st.sampled_from([(0,), (1,), (257,), (33, 40), (40_000,), (3, 12_000)]),
)
P_VALUES = [0.0, 0.5, 1.0, 1.5, 2.0, 3.0, INF, -INF, -1.0, -2.0]
SCALES = {
    torch.float16: [1e-2, 1.0, 30.0],
    torch.bfloat16: [1e-20, 1e-2, 1.0, 1e20],
    torch.float32: [1e-8, 1e-3, 1.0, 1e3, 1e8],
    torch.float64: [1e-100, 1e-8, 1.0, 1e8, 1e100],
    torch.complex64: [1e-8, 1.0, 1e8],
}


@st.composite
def grad_sets(draw):
    pool = draw(st.lists(st.sampled_from(ALL_DTYPES), min_size=1, max_size=3, unique=True))
    scale_of = {d: draw(st.sampled_from(SCALES[d])) for d in pool}
    n = draw(st.integers(1, 6))
    grads = []
    for i in range(n):
        if draw(st.integers(0, 5)) == 0:
            grads.append(None)
            continue
        dtype = draw(st.sampled_from(pool))
        grad = make_grad(
            draw(SHAPES), dtype, scale=scale_of[dtype], seed=draw(st.integers(0, 999)) + i
        )
        if grad.numel() and draw(st.integers(0, 7)) == 0:
            grad.zero_()
        grads.append(grad)
    return grads


@settings(
    max_examples=70,
    deadline=None,
    suppress_health_check=[HealthCheck.filter_too_much, HealthCheck.too_slow],
)
@given(
    grads=grad_sets(),
    p=st.sampled_from(P_VALUES),
    factor=st.sampled_from([0.0, 0.01, 0.5, 0.999, 1.0, 2.0, INF]),
    foreach=st.sampled_from(FOREACH),
)
def test_generated_clip_grad_norm_parity(grads, p, factor, foreach):
    present = [g for g in grads if g is not None]
    assume(well_conditioned(present, p))
    params = params_with_grads(grads)
    max_norm = factor
    if 0 < factor < INF and all(g.numel() for g in present):  # else torch raises or total is 0
        max_norm = factor * float64_total(present, p)
    mine, ref = clone_params(params), clone_params(params)
    snap = Snapshot(mine)
    try:
        theirs = tnu.clip_grad_norm_(ref, max_norm, p, foreach=foreach)
    except RuntimeError as err:
        with pytest.raises(type(err)):
            gradclip.clip_grad_norm_(mine, max_norm, p, foreach=foreach)
        snap.assert_unchanged()
        return
    ours = gradclip.clip_grad_norm_(mine, max_norm, p, foreach=foreach)
    assert_total_like(ours, theirs, present, p)
    rtol = RTOL[lowest_precision(g.dtype for g in present)] if present else 0.0
    # where the totals differ (ours then the closer to float64, checked above), so do the
    # coefficients: torch's float32 sum of p-th powers can be off by more than rtol (p=0.5)
    a, b = float(ours), float(theirs)
    if a != b and math.isfinite(a) and math.isfinite(b) and b != 0:
        rtol = max(rtol, 1.01 * abs(a - b) / abs(b))
    assert_grads_like(grads_of(mine), grads_of(ref), rtol=rtol)


@settings(
    max_examples=40,
    deadline=None,
    suppress_health_check=[HealthCheck.filter_too_much, HealthCheck.too_slow],
)
@given(grads=grad_sets(), p=st.sampled_from(P_VALUES), foreach=st.sampled_from(FOREACH))
def test_generated_get_total_norm_parity(grads, p, foreach):
    tensors = [g for g in grads if g is not None]
    assume(well_conditioned(tensors, p))
    try:
        theirs = tnu.get_total_norm(tensors, p, foreach=foreach)
    except RuntimeError as err:
        with pytest.raises(type(err)):
            gradclip.get_total_norm(tensors, p, foreach=foreach)
        return
    assert_total_like(gradclip.get_total_norm(tensors, p, foreach=foreach), theirs, tensors, p)


@settings(max_examples=40, deadline=None)
@given(
    grads=grad_sets(),
    clip_value=st.sampled_from([0.0, 1e-3, 0.5, 1.0, 100.0, INF]),
    foreach=st.sampled_from(FOREACH),
)
def test_generated_clip_grad_value_parity(grads, clip_value, foreach):
    present = [g for g in grads if g is not None]
    assume(present and not any(g.is_complex() for g in present))
    ours, mine, theirs, ref = run_both(
        gradclip.clip_grad_value_,
        tnu.clip_grad_value_,
        params_with_grads(grads),
        clip_value,
        foreach=foreach,
    )
    assert ours is None and theirs is None
    for a, b in zip(grads_of(mine), grads_of(ref), strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0, equal_nan=True)
