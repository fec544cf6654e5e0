"""The step path never reads a device value on the host (README, "What you get": no host sync on accelerators).

Nothing here has a GPU, so the accelerator code path is forced onto CPU tensors by patching
``gradclip._foreach.is_host_device``; a dispatch mode records every op that copies a tensor
value to the host (``.item()``, ``bool()``, ``float()``, ``.tolist()`` all end in
``aten._local_scalar_dense``; ``bool()`` goes through ``aten.is_nonzero``).
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.utils as tnu

import gradclip
from conftest import (
    RTOL,
    assert_grads_like,
    assert_total_like,
    clone_params,
    grads_of,
    lowest_precision,
    make_params,
    well_conditioned,
)
from host_reads import HostReadDetector

pytestmark = pytest.mark.usefixtures("one_thread")


P_VALUES = [2.0, 1.0, math.inf, 0.5]
DTYPE_SETS = {
    "f32": [torch.float32],
    "f16": [torch.float16],
    "bf16": [torch.bfloat16],
    "f64+f32": [torch.float64, torch.float32],
    "f16+f32+bf16": [torch.float16, torch.float32, torch.bfloat16],
}
# Relative error of torch's float32 single-accumulator kernels (used on this path on the CPU)
# over 40k terms, e.g. p=0.5; a GPU reduces as a tree and does better.
KERNEL_RTOL = 1e-4
SHAPES = [(6, 5), (40_000,), (), (3, 0), (300,)]


def _params(dtypes, p):
    shapes = [s for s in SHAPES if not (math.isinf(p) and 0 in s)]  # torch raises on those
    params = make_params([(s, dtypes[i % len(dtypes)]) for i, s in enumerate(shapes)], scale=0.1)
    # A float16 norm that overflows float16 is deliberate difference #2, tested elsewhere.
    return [q for q in params if well_conditioned([q.grad], p)]


def _no_host_read(fn, *args, **kwargs):
    with HostReadDetector() as detector:
        out = fn(*args, **kwargs)
    assert detector.reads == [], f"host reads: {detector.reads}"
    return out


@pytest.mark.parametrize("dtypes", DTYPE_SETS.values(), ids=DTYPE_SETS.keys())
@pytest.mark.parametrize("p", P_VALUES)
@pytest.mark.parametrize("foreach", [None, False])
def test_clip_grad_norm_no_host_read(accelerator_path, p, dtypes, foreach):
    params = _params(dtypes, p)
    rtol = RTOL[lowest_precision(dtypes)]
    for max_norm in (0.01, 1e6):  # clipping and not clipping
        mine, ref = clone_params(params), clone_params(params)
        ours = _no_host_read(gradclip.clip_grad_norm_, mine, max_norm, p, foreach=foreach)
        theirs = tnu.clip_grad_norm_(ref, max_norm, p, foreach=foreach)
        assert_total_like(ours, theirs, grads_of(params), p)
        assert_grads_like(grads_of(mine), grads_of(ref), rtol=rtol)


@pytest.mark.parametrize("dtypes", DTYPE_SETS.values(), ids=DTYPE_SETS.keys())
@pytest.mark.parametrize("p", P_VALUES)
def test_get_total_norm_and_clip_grads_with_norm_no_host_read(accelerator_path, p, dtypes):
    params = _params(dtypes, p)
    mine, ref = clone_params(params), clone_params(params)
    ours = _no_host_read(gradclip.get_total_norm, grads_of(mine), p)
    theirs = tnu.get_total_norm(grads_of(ref), p)
    assert_total_like(ours, theirs, grads_of(params), p)
    _no_host_read(gradclip.clip_grads_with_norm_, mine, 0.05, ours)
    tnu.clip_grads_with_norm_(ref, 0.05, theirs)
    assert_grads_like(grads_of(mine), grads_of(ref), rtol=RTOL[lowest_precision(dtypes)])


@pytest.mark.parametrize("dtypes", DTYPE_SETS.values(), ids=DTYPE_SETS.keys())
@pytest.mark.parametrize("p", P_VALUES)
def test_grad_norms_no_host_read(accelerator_path, p, dtypes):
    params = _params(dtypes, p)
    result = _no_host_read(gradclip.grad_norms, params, p)
    grads = grads_of(params)
    for norm, g in zip(result.per_tensor.tolist(), grads, strict=True):
        expected = torch.linalg.vector_norm(g.double(), p).item()
        assert math.isclose(norm, expected, rel_tol=KERNEL_RTOL, abs_tol=1e-30)
    theirs = tnu.get_total_norm(grads, p)
    assert_total_like(result.result(), theirs, grads, p)


def test_clip_grad_value_no_host_read(accelerator_path):
    params = make_params([((6, 5), torch.float32), ((40_000,), torch.float16)], scale=3)
    mine, ref = clone_params(params), clone_params(params)
    _no_host_read(gradclip.clip_grad_value_, mine, 0.5)
    tnu.clip_grad_value_(ref, 0.5)
    for a, b in zip(grads_of(mine), grads_of(ref), strict=True):
        assert torch.equal(a, b)


def test_float16_overflowing_norm_no_host_read(accelerator_path):
    """The accelerator path measures float16 with float32 results instead of re-checking."""
    params = make_params([((40_000,), torch.float16), ((50,), torch.float16)], scale=1e4)
    assert all(bool(g.isfinite().all()) for g in grads_of(params))
    assert math.isinf(tnu.get_total_norm(grads_of(params)).item())
    mine = clone_params(params)
    total = _no_host_read(gradclip.clip_grad_norm_, mine, 1.0)
    assert total.dtype == torch.float16
    after = torch.linalg.vector_norm(torch.cat([g.double().flatten() for g in grads_of(mine)]))
    assert math.isclose(after.item(), 1.0, rel_tol=2e-3)


# ---------------------------------------------------------------------------------------
# the detector is not vacuous


def test_detector_flags_error_if_nonfinite(accelerator_path):
    params = make_params([((6, 5), torch.float32)])
    with HostReadDetector() as detector:
        gradclip.clip_grad_norm_(params, 1.0, error_if_nonfinite=True)
    assert detector.reads


def test_detector_flags_item_bool_float():
    t = torch.tensor(1.5)
    for read in (lambda: t.item(), lambda: bool(t), lambda: float(t), lambda: t.tolist()):
        with HostReadDetector() as detector:
            read()
        assert detector.reads


def test_detector_flags_default_cpu_path():
    """Unpatched, the CPU path reads the coefficient to skip the no-op multiply."""
    params = make_params([((6, 5), torch.float32)])
    with HostReadDetector() as detector:
        gradclip.clip_grad_norm_(params, 1e6)
    assert detector.reads


# ---------------------------------------------------------------------------------------
# the meta device: any host read raises there


def _meta_params(dtypes):
    params = []
    for i, shape in enumerate([(6, 5), (40_000,), (), (3, 2)]):
        dtype = dtypes[i % len(dtypes)]
        p = torch.nn.Parameter(torch.zeros(shape, dtype=dtype, device="meta"))
        p.grad = torch.zeros(shape, dtype=dtype, device="meta")
        params.append(p)
    return params


@pytest.mark.parametrize("dtypes", DTYPE_SETS.values(), ids=DTYPE_SETS.keys())
@pytest.mark.parametrize("p", P_VALUES)
def test_meta_device_runs_without_host_reads(p, dtypes):
    params = _meta_params(dtypes)
    expected = tnu.get_total_norm(grads_of(_meta_params(dtypes)), p)
    for total in (
        gradclip.clip_grad_norm_(params, 1.0, p),
        gradclip.get_total_norm(grads_of(params), p),
        gradclip.grad_norms(params, p).result(),
    ):
        assert total.device.type == "meta" and total.dtype == expected.dtype
        assert total.shape == torch.Size([])
    gradclip.clip_grads_with_norm_(params, 1.0, torch.tensor(2.0, device="meta"))
    gradclip.clip_grad_value_(params, 1.0)


def test_meta_device_host_read_raises():
    params = _meta_params([torch.float32])
    with pytest.raises(RuntimeError, match="meta"):
        gradclip.clip_grad_norm_(params, 1.0, error_if_nonfinite=True)


@pytest.mark.parametrize("dtypes", DTYPE_SETS.values(), ids=DTYPE_SETS.keys())
@pytest.mark.parametrize("p", P_VALUES)
def test_no_tensor_from_host_data_after_the_first_call(accelerator_path, p, dtypes):
    """Index tensors are built once: a warmed-up step makes no host-to-device copy (which a
    captured CUDA graph cannot contain)."""
    params = _params(dtypes, p)
    calls = [
        lambda: gradclip.clip_grad_norm_(params, 0.01, p),
        lambda: gradclip.get_total_norm(grads_of(params), p),
        lambda: gradclip.grad_norms(params, p),
        lambda: gradclip.clip_grads_with_norm_(params, 0.05, gradclip.get_total_norm(grads_of(params), p)),
    ]
    for call in calls:
        call()  # warm-up
        with HostReadDetector() as detector:
            call()
        assert detector.reads == [] and detector.copies == [], (detector.reads, detector.copies)
