"""The scaling module: torch's coefficient, and the host-side "is it exactly 1?" decision."""

from __future__ import annotations

import math

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from gradclip import _foreach
from gradclip.scale import clip_, clip_coefficient, host_coefficient, scale_

THRESHOLDS = st.one_of(
    st.sampled_from([0.0, 1e-6, 1e-3, 0.5, 1.0, 3.0, 10.0, 1e8, math.inf]),
    st.floats(min_value=0.0, max_value=1e30, allow_nan=False),
)
NORMS = st.one_of(
    st.sampled_from([0.0, 1e-45, 1e-6, 1.0, 3.4e38, math.inf, math.nan]),
    st.floats(min_value=0.0, max_value=3.4e38, allow_nan=False),
)


@settings(max_examples=3000, deadline=None)
@given(max_norm=THRESHOLDS, total=NORMS, relative=st.floats(-1e-5, 1e-5),
       dtype=st.sampled_from([torch.float32, torch.float64]))
def test_host_coefficient_is_torch_s_bit_for_bit(max_norm, total, relative, dtype):
    """Near the threshold (where the eps and the rounding decide) and everywhere else."""
    for t in (total, max_norm * (1 + relative) if math.isfinite(max_norm) else total):
        tensor = torch.tensor(t, dtype=dtype)
        expected = clip_coefficient(max_norm, tensor)
        ours = torch.tensor(host_coefficient(max_norm, tensor.item(), dtype), dtype=dtype)
        torch.testing.assert_close(ours, expected, rtol=0, atol=0, equal_nan=True,
                                   msg=f"max_norm={max_norm!r} total={t!r}")


@settings(max_examples=300, deadline=None)
@given(max_norm=THRESHOLDS, scale=st.floats(1e-3, 1e3),
       dtype=st.sampled_from([torch.float32, torch.float64, torch.float16, torch.bfloat16]),
       foreach=st.sampled_from([None, True, False]))
def test_clip_scales_as_torch_s_coefficient_tensor(max_norm, scale, dtype, foreach):
    gen = torch.Generator().manual_seed(0)
    grads = [(torch.randn(n, generator=gen) * scale).to(dtype) for n in (3, 40, 7)]
    theirs = [g.clone() for g in grads]
    total = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g.float()) for g in grads]))
    if dtype == torch.float64:
        total = total.double()
    clip_(_foreach.group_by_device_dtype(grads), max_norm, total, foreach)
    scale_(_foreach.group_by_device_dtype(theirs), clip_coefficient(max_norm, total), foreach)
    for a, b in zip(grads, theirs, strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0, equal_nan=True)


def test_clip_writes_nothing_when_the_coefficient_is_one():
    grads = [torch.tensor([0.3, 0.4])]
    groups = _foreach.group_by_device_dtype(grads)
    version = grads[0]._version
    clip_(groups, 1.0, torch.tensor(0.5), None)
    assert grads[0]._version == version
    clip_(groups, 0.25, torch.tensor(0.5), None)  # clips: written, with torch's coefficient
    assert grads[0]._version > version
    torch.testing.assert_close(grads[0], torch.tensor([0.3, 0.4]) * clip_coefficient(
        0.25, torch.tensor(0.5)), rtol=0, atol=0)


def test_on_accelerators_bfloat16_gets_the_coefficient_in_its_dtype(monkeypatch, accelerator_path):
    """torch's multi-tensor multiply takes a 0-dim scale only in the tensors' own dtype (CUDA
    falls back to one kernel per tensor otherwise: 2x slower for bfloat16 on an H200). So on
    the accelerator path bfloat16 groups get the float32 coefficient cast once (float32's
    exponent range: one rounding of the scale, no underflow); float16 ones are multiplied
    apart, by a float32 scale with a dimension (CUDA rounds a 0-dim one to float16: below
    6e-5 it loses its digits, below 6e-8 it is 0)."""
    seen: dict[torch.dtype, torch.dtype] = {}
    real = _foreach.foreach_mul_

    def spy(tensors, scale):
        seen[tensors[0].dtype] = scale.dtype
        real(tensors, scale)

    monkeypatch.setattr(_foreach, "foreach_mul_", spy)
    dtypes = (torch.bfloat16, torch.float32, torch.float16, torch.float64)
    grads = [torch.randn(50, dtype=dtype) * 1e4 for dtype in dtypes] + [torch.tensor(3e4).half()]
    coef = torch.tensor(3e-7)  # a float16 subnormal
    want = [g.double() * coef.item() for g in grads]
    scale_(_foreach.group_by_device_dtype(grads), coef, None)
    assert seen == {torch.bfloat16: torch.bfloat16, torch.float32: torch.float32,
                    torch.float64: torch.float32}
    for g, w in zip(grads, want, strict=True):  # a rounding of the scale and of the product
        info = torch.finfo(g.dtype)  # (products below `tiny` are subnormal: coarser steps)
        torch.testing.assert_close(g.double(), w, rtol=2 * info.eps, atol=info.tiny)
