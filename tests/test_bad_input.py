"""Bad input: the same exception types as torch, messages that name the argument and the fix,
and never a gradient changed (values and version counters) by a call that raises.

Where torch itself half-applies a clip before raising, the test shows it.
"""

from __future__ import annotations

import contextlib
import math

import pytest
import torch
import torch.nn.utils as tnu

import gradclip
from conftest import Snapshot, grads_of, make_params, params_with_grads
from gradclip import _foreach

FOREACH = [None, True, False]
pytestmark = [
    pytest.mark.usefixtures("one_thread"),
    pytest.mark.filterwarnings(
        "ignore:`torch.nn.utils.clip_grad_norm` is now deprecated:FutureWarning"
    ),
]

# name -> how to call it with a parameter list (grad-based functions) and a max/clip value
CALLS = {
    "clip_grad_norm_": lambda mod, ps: mod.clip_grad_norm_(ps, 1.0),
    "clip_grad_norm": lambda mod, ps: mod.clip_grad_norm(ps, 1.0),
    "clip_grad_value_": lambda mod, ps: mod.clip_grad_value_(ps, 1.0),
    "clip_grads_with_norm_": lambda mod, ps: mod.clip_grads_with_norm_(ps, 1.0, torch.tensor(5.0)),
    "get_total_norm": lambda mod, ps: mod.get_total_norm(ps),
}


def _good():
    return make_params([((3, 2), torch.float32), ((4,), torch.float64)], scale=5)


def _torch_error(call) -> Exception:
    """The exception torch raises for this call (the reference type)."""
    try:
        call()
    except Exception as err:
        return err
    raise AssertionError("torch accepted the input")


def _warns_if_deprecated(name):
    return pytest.warns(FutureWarning) if name == "clip_grad_norm" else contextlib.nullcontext()


def _raises_like_torch(name, make_bad, *, match=None):
    """torch raises some type T on this input; ours raises a T too, changing nothing."""
    call = CALLS[name]
    theirs = _torch_error(lambda: call(tnu, make_bad(_good())))
    params = _good()
    snap = Snapshot(params)
    with _warns_if_deprecated(name), pytest.raises(type(theirs), match=match) as ours:
        call(gradclip, make_bad(params))
    snap.assert_unchanged()
    return ours.value, theirs


# ---------------------------------------------------------------------------------------
# non-tensor elements


BAD_ELEMENTS = {
    "float": lambda ps: [*ps, 1.0],
    "named_parameters": lambda ps: [(f"p{i}", p) for i, p in enumerate(ps)],
    "None": lambda ps: [ps[0], None, ps[1]],
    "str": lambda ps: [*ps, "weight"],
}


@pytest.mark.parametrize("bad", BAD_ELEMENTS)
@pytest.mark.parametrize("name", CALLS)
def test_non_tensor_element(name, bad):
    make_bad = BAD_ELEMENTS[bad]
    if name == "get_total_norm":

        def make_bad(ps, _make=BAD_ELEMENTS[bad]):  # get_total_norm takes the tensors themselves
            return _make(grads_of(ps))

    ours, _ = _raises_like_torch(name, make_bad)
    assert isinstance(ours, gradclip.NotATensorError)
    assert isinstance(ours, TypeError | AttributeError | RuntimeError)
    argument = "tensors" if name == "get_total_norm" else "parameters"
    message = str(ours)
    assert f"`{argument}`" in message
    assert "model.parameters()" in message  # the fix
    if bad == "named_parameters":
        assert "named_parameters()" in message


def test_not_a_tensor_error_is_catchable_as_torch_errors():
    assert issubclass(gradclip.NotATensorError, TypeError)
    assert issubclass(gradclip.NotATensorError, AttributeError)
    assert issubclass(gradclip.NotATensorError, RuntimeError)


def test_grad_norms_non_tensor_element():
    params = _good()
    snap = Snapshot(params)
    with pytest.raises(gradclip.NotATensorError, match="`parameters`"):
        gradclip.grad_norms([*params, 1.0])
    snap.assert_unchanged()


MODULES = {
    # not iterable: torch raises TypeError
    "Linear": lambda: torch.nn.Linear(3, 2),
    # iterable: torch iterates and fails on the first element's `.grad` (AttributeError)
    "Sequential": lambda: torch.nn.Sequential(torch.nn.Linear(3, 2)),
    "ModuleList": lambda: torch.nn.ModuleList([torch.nn.Linear(3, 2)]),
    "ParameterDict": lambda: torch.nn.ParameterDict({"w": torch.nn.Parameter(torch.ones(2, 3))}),
}


@pytest.mark.parametrize("kind", MODULES)
@pytest.mark.parametrize("name", CALLS)
def test_module_passed_directly(name, kind):
    module = MODULES[kind]()
    for p in module.parameters():
        p.grad = torch.full_like(p, 3.0)
    theirs = _torch_error(lambda: CALLS[name](tnu, module))
    snap = Snapshot(list(module.parameters()))
    with (
        pytest.raises(TypeError, match=r"model\.parameters\(\)") as ours,
        _warns_if_deprecated(name),
    ):
        CALLS[name](gradclip, module)
    assert isinstance(ours.value, type(theirs))  # code that catches torch's error still works
    snap.assert_unchanged()


@pytest.mark.parametrize("value", [5, None, 3.5], ids=["int", "None", "float"])
@pytest.mark.parametrize("name", CALLS)
def test_non_iterable(name, value):
    with pytest.raises(TypeError):
        CALLS[name](tnu, value)
    argument = "tensors" if name == "get_total_norm" else "parameters"
    with pytest.raises(TypeError, match=f"`{argument}`"), _warns_if_deprecated(name):
        CALLS[name](gradclip, value)


# ---------------------------------------------------------------------------------------
# bad max_norm / clip_value / norm_type


BAD_NUMBERS = [None, "one", [1], torch.tensor([1.0, 2.0])]
BAD_IDS = ["None", "str", "list", "2-element-tensor"]

THRESHOLD_CALLS = {
    "clip_grad_norm_": ("max_norm", lambda mod, ps, v: mod.clip_grad_norm_(ps, v)),
    "clip_grads_with_norm_": (
        "max_norm",
        lambda mod, ps, v: mod.clip_grads_with_norm_(ps, v, torch.tensor(50.0)),
    ),
    "clip_grad_value_": ("clip_value", lambda mod, ps, v: mod.clip_grad_value_(ps, v)),
}


@pytest.mark.parametrize("value", BAD_NUMBERS, ids=BAD_IDS)
@pytest.mark.parametrize("name", THRESHOLD_CALLS)
def test_bad_threshold(name, value):
    argument, call = THRESHOLD_CALLS[name]
    with pytest.raises((TypeError, ValueError, RuntimeError)) as theirs:
        call(tnu, _good(), value)
    params = _good()
    snap = Snapshot(params)
    with pytest.raises(type(theirs.value), match=f"`{argument}`"):
        call(gradclip, params, value)
    snap.assert_unchanged()


NORM_TYPE_CALLS = {
    "clip_grad_norm_": lambda mod, ps, v: mod.clip_grad_norm_(ps, 1.0, v),
    "get_total_norm": lambda mod, ps, v: mod.get_total_norm(grads_of(ps), v),
}


@pytest.mark.parametrize(
    "value",
    ["fro", "nuc", None, [2], torch.tensor([1.0, 2.0])],
    ids=["fro", "nuc", "None", "list", "2-element-tensor"],
)
@pytest.mark.parametrize("name", NORM_TYPE_CALLS)
def test_bad_norm_type(name, value):
    call = NORM_TYPE_CALLS[name]
    with pytest.raises((TypeError, ValueError, RuntimeError)) as theirs:
        call(tnu, _good(), value)
    params = _good()
    snap = Snapshot(params)
    with pytest.raises(type(theirs.value), match="`norm_type`"):
        call(gradclip, params, value)
    snap.assert_unchanged()
    if name == "get_total_norm":  # grad_norms takes the same norm types
        with pytest.raises(type(theirs.value), match="`norm_type`"):
            gradclip.grad_norms(params, value)
        snap.assert_unchanged()


@pytest.mark.parametrize("total", [3.0, torch.tensor([1.0, 2.0])], ids=["float", "2-element"])
@pytest.mark.parametrize("foreach", FOREACH)
def test_bad_total_norm(total, foreach):
    with pytest.raises((TypeError, RuntimeError)) as theirs:
        tnu.clip_grads_with_norm_(_good(), 1.0, total, foreach=foreach)
    params = _good()
    snap = Snapshot(params)
    with pytest.raises(type(theirs.value), match="`total_norm`"):
        gradclip.clip_grads_with_norm_(params, 1.0, total, foreach=foreach)
    snap.assert_unchanged()


# ---------------------------------------------------------------------------------------
# errors raised after torch has already changed some gradients


def _cpu_then_meta():
    cpu = torch.nn.Parameter(torch.zeros(3))
    cpu.grad = torch.tensor([3.0, 4.0, 12.0])
    meta = torch.nn.Parameter(torch.zeros(2, device="meta"))
    meta.grad = torch.zeros(2, device="meta")
    return [meta, cpu]


HALF_APPLIED = {
    "clip_grads_with_norm_": lambda mod, ps: mod.clip_grads_with_norm_(
        ps, 1.0, torch.tensor(13.0), foreach=True
    ),
    "clip_grad_value_": lambda mod, ps: mod.clip_grad_value_(ps, 1.0, foreach=True),
}


@pytest.mark.parametrize("name", HALF_APPLIED)
def test_foreach_true_on_meta_torch_half_applies_ours_changes_nothing(name):
    call = HALF_APPLIED[name]
    ref = _cpu_then_meta()
    version = ref[1].grad._version
    with pytest.raises(RuntimeError, match="foreach=True") as theirs:
        call(tnu, ref)
    assert ref[1].grad._version > version  # torch wrote the CPU gradient before raising
    assert not torch.equal(ref[1].grad, torch.tensor([3.0, 4.0, 12.0]))

    mine = _cpu_then_meta()
    snap = Snapshot(mine)
    with pytest.raises(RuntimeError) as ours:
        call(gradclip, mine)
    assert str(ours.value) == str(theirs.value)
    snap.assert_unchanged()


@pytest.mark.parametrize("foreach", FOREACH)
@pytest.mark.parametrize("clip_value", [7e4, 1e30], ids=["7e4", "1e30"])
def test_clip_value_that_does_not_fit_float16(clip_value, foreach):
    # torch converts clip_value to each group's dtype and raises at the float16 group, after
    # clamping the groups before it (float32 here).
    def make():
        return params_with_grads(
            [torch.tensor([1e4, -3.0], dtype=torch.float16), torch.tensor([1e5, -3.0])]
        )

    ref = make()
    with pytest.raises(RuntimeError, match="overflow"):
        tnu.clip_grad_value_(ref, clip_value, foreach=foreach)
    print("torch wrote:", [g._version for g in grads_of(ref)])
    mine = make()
    snap = Snapshot(mine)
    with pytest.raises(RuntimeError):
        gradclip.clip_grad_value_(mine, clip_value, foreach=foreach)
    snap.assert_unchanged()


# ---------------------------------------------------------------------------------------
# sparse and complex gradients


def _with_sparse_grad():
    torch.manual_seed(0)
    emb = torch.nn.Embedding(10, 3, sparse=True)
    lin = torch.nn.Linear(3, 1)
    lin(emb(torch.tensor([1, 2]))).sum().mul(100).backward()
    assert emb.weight.grad.is_sparse
    return [lin.weight, emb.weight, lin.bias]


SPARSE_CALLS = {
    "clip_grad_norm_": lambda mod, ps, fe: mod.clip_grad_norm_(ps, 1.0, foreach=fe),
    "get_total_norm": lambda mod, ps, fe: mod.get_total_norm(grads_of(ps), foreach=fe),
    "clip_grad_value_": lambda mod, ps, fe: mod.clip_grad_value_(ps, 1.0, foreach=fe),
}


@pytest.mark.parametrize("foreach", FOREACH)
@pytest.mark.parametrize("name", SPARSE_CALLS)
def test_sparse_grads_raise_not_implemented(name, foreach):
    call = SPARSE_CALLS[name]
    if _foreach.TORCH_VERSION >= (2, 14) and name != "clip_grad_value_":
        # torch 2.14 takes the norm of sparse gradients (before, linalg_vector_norm raised
        # NotImplementedError on SparseCPU), and so does gradclip: the same result as torch
        theirs, ours = _with_sparse_grad(), _with_sparse_grad()
        torch.testing.assert_close(call(gradclip, ours, foreach), call(tnu, theirs, foreach))
        for a, b in zip(ours, theirs, strict=True):
            torch.testing.assert_close(a.grad.to_dense(), b.grad.to_dense())
        return
    with pytest.raises(NotImplementedError):
        call(tnu, _with_sparse_grad(), foreach)
    params = _with_sparse_grad()
    snap = Snapshot(params)
    with pytest.raises(NotImplementedError):
        call(gradclip, params, foreach)
    snap.assert_unchanged()


def test_sparse_grads_torch_clip_grad_value_half_applies():
    params = _with_sparse_grad()
    version = params[0].grad._version
    with pytest.raises(NotImplementedError):
        tnu.clip_grad_value_(params, 1.0)
    assert params[0].grad._version > version  # the dense grad before the sparse one was clamped


@pytest.mark.parametrize("foreach", FOREACH)
@pytest.mark.parametrize("order", ["complex-first", "real-first"])
def test_complex_grads_in_clip_grad_value(order, foreach):
    def make():
        grads = [torch.full((2,), 5 + 1j, dtype=torch.complex64), torch.full((3,), 5.0)]
        return params_with_grads(grads if order == "complex-first" else grads[::-1])

    with pytest.raises(NotImplementedError, match="complex"):
        tnu.clip_grad_value_(make(), 1.0, foreach=foreach)
    params = make()
    snap = Snapshot(params)
    with pytest.raises(NotImplementedError, match="complex"):
        gradclip.clip_grad_value_(params, 1.0, foreach=foreach)
    snap.assert_unchanged()


def test_get_total_norm_integer_tensor_raises_like_torch():
    tensors = [torch.ones(3), torch.arange(3)]
    with pytest.raises(RuntimeError) as theirs:
        tnu.get_total_norm(tensors)
    with pytest.raises(type(theirs.value)):
        gradclip.get_total_norm(tensors)


def test_error_if_nonfinite_changes_nothing():
    params = params_with_grads([torch.tensor([1.0, math.inf]), torch.tensor([2.0])])
    snap = Snapshot(params)
    with pytest.raises(RuntimeError, match="non-finite"):
        gradclip.clip_grad_norm_(params, 1.0, error_if_nonfinite=True)
    snap.assert_unchanged()
