"""Scaling: torch's clip coefficient and the in-place multiply, in one place.

Every function that clips by a norm (the drop-ins, every clipper, the monitor's and the
recommendation's "what would this threshold do") uses :data:`TORCH_EPS` and
:func:`clip_coefficient`, and every multiply of gradients goes through :func:`scale_` (one
coefficient) or :func:`scale_each_` (one per tensor).
"""

from __future__ import annotations

import math
import struct

import torch
from torch import Tensor

from gradclip import _foreach
from gradclip._cache import index_tensor

__all__ = [
    "TORCH_EPS",
    "clip_",
    "clip_coefficient",
    "host_coefficient",
    "noop_on_host",
    "scale_",
    "scale_each_",
]

TORCH_EPS = 1e-6
"""torch's ``clip_coef = max_norm / (total_norm + 1e-6)``: the eps decides whether a norm
equal to ``max_norm`` is scaled (it is, by ``1 / (1 + 1e-6 / max_norm)``)."""


def clip_coefficient(max_norm: float | Tensor, total: Tensor) -> Tensor:
    """torch's coefficient ``min(max_norm / (total + 1e-6), 1)`` as a tensor (no host read).

    ``total`` may be 0-dim or 1-D (one coefficient per norm). Computed as torch computes it
    for a Python ``max_norm`` (``Tensor.__rtruediv__``: the reciprocal, then a product), so a
    ``max_norm`` held in a tensor of ``total``'s dtype gives the same bits as the number.

    Example:
        >>> clip_coefficient(1.0, torch.tensor(4.0))
        tensor(0.2500)
    """
    return torch.clamp((total + TORCH_EPS).reciprocal() * max_norm, max=1.0)


_FLOAT32 = struct.Struct("f")


def _f32(x: float) -> float:
    """``x`` rounded to float32 (round to nearest even; overflow to inf), as torch rounds."""
    try:
        return _FLOAT32.unpack(_FLOAT32.pack(x))[0]
    except OverflowError:
        return math.copysign(math.inf, x)


def host_coefficient(max_norm: float, total: float, dtype: torch.dtype) -> float:
    """:func:`clip_coefficient` of a 0-dim ``dtype`` total equal to ``total``, computed on
    the host with torch's rounding: the same number, bit for bit (float32 and float64).

    torch evaluates ``max_norm / (total + 1e-6)`` as ``(total + eps).reciprocal() *
    max_norm`` in the tensor's dtype (``Tensor.__rtruediv__``), the scalars rounded to it;
    each float32 step is emulated exactly by rounding its float64 result (one float32
    operation computed in float64 and rounded is the float32 result). Then ``clamp(max=1)``:
    NaN stays NaN.

    Example:
        >>> host_coefficient(1.0, 1.0, torch.float32)  # a norm equal to max_norm is scaled
        0.9999990463256836
        >>> host_coefficient(1.0, 0.5, torch.float32)
        1.0
    """
    if dtype == torch.float64:
        shifted = total + TORCH_EPS  # norms are never < 0: shifted > 0 or NaN
        coef = (1.0 / shifted) * max_norm if shifted else math.inf
    else:
        shifted = _f32(total + _f32(TORCH_EPS))
        coef = _f32(_f32(1.0 / shifted) * _f32(max_norm)) if shifted else math.inf
    return 1.0 if coef >= 1.0 else coef


def clip_(groups: _foreach.Groups, max_norm: float, total: Tensor, foreach: bool | None) -> None:
    """Scale every grouped tensor in place by ``clip_coefficient(max_norm, total)``.

    On the CPU (reading the total costs no device sync there) the coefficient is computed
    on the host, bit for bit as torch computes it (:func:`host_coefficient`): no tensor
    operation builds it, and when it is exactly 1 nothing is written.

    Example:
        >>> g = [torch.tensor([3.0, 4.0])]
        >>> clip_(_foreach.group_by_device_dtype(g), 1.0, torch.tensor(5.0), None)
        >>> g[0]
        tensor([0.6000, 0.8000])
    """
    host = (
        _foreach.is_host_device(total.device)
        and not _foreach.is_compiling()
        and total.dtype in (torch.float32, torch.float64)
    )
    for device, dtype in groups:  # a loop, not all(...): no generator frame on this hot path
        host = host and _foreach.is_host_device(device) and dtype.is_floating_point
    if not host:
        scale_(groups, clip_coefficient(max_norm, total), foreach)
        return
    _foreach.check_foreach(groups, foreach)
    coef = host_coefficient(max_norm, total.item(), total.dtype)
    if coef == 1.0:
        return
    # A 0-dim tensor, as torch passes it: the same products as a Python number for float32/
    # float64 gradients (rounded to their compute type alike), torch's rounding for float16/
    # bfloat16 ones, and a vectorised CPU kernel (a Python number's is ~1.6x slower).
    scale = torch.scalar_tensor(coef, dtype=total.dtype)  # (torch.tensor: twice the call cost)
    for (device, _), (group, _) in groups.items():
        _multiply(group, device, scale, foreach)


def _multiply(group: list[Tensor], device: torch.device, scale: float | Tensor,
              foreach: bool | None) -> None:
    """``group *= scale`` in place: one multi-tensor kernel where torch has one, else a loop."""
    use_foreach = foreach if foreach is not None else _foreach.has_foreach_support(group, device)
    if use_foreach:
        _foreach.foreach_mul_(group, scale)
    else:
        for g in group:
            g.mul_(scale)


def noop_on_host(device: torch.device, coef: Tensor) -> bool:
    """On the CPU a coefficient of exactly 1 makes the multiply a no-op (x * 1 == x bit for
    bit), and reading it costs no device sync. Elsewhere, and while compiling (a value read
    would break the graph), the multiply always runs."""
    return (
        _foreach.is_host_device(device)
        and not _foreach.is_compiling()
        and bool(coef == 1.0)
    )


def scale_(groups: _foreach.Groups, coef: Tensor, foreach: bool | None) -> None:
    """Multiply every grouped tensor in place by the 0-dim ``coef``.

    Example:
        >>> g = [torch.tensor([3.0, 4.0])]
        >>> scale_(_foreach.group_by_device_dtype(g), torch.tensor(0.5), None)
        >>> g[0]
        tensor([1.5000, 2.0000])
    """
    _foreach.check_foreach(groups, foreach)
    for (device, dtype), (group, _) in groups.items():
        scale = coef.to(device)
        if _foreach.is_host_device(device):
            if not noop_on_host(device, scale):
                _multiply(group, device, scale, foreach)
        elif dtype == torch.float16:
            _multiply_float16(group, [scale] * len(group))
        else:
            # torch's multi-tensor kernel takes a 0-dim scale only in the tensors' own dtype;
            # another dtype falls back to one kernel per tensor: twice the time for bfloat16
            # on an H200. bfloat16 has float32's exponent range: the cast costs one rounding
            # of the scale, the size of the product's own
            _multiply(group, device, scale.to(dtype) if dtype == torch.bfloat16 else scale, foreach)


def _multiply_float16(group: list[Tensor], scales: list[Tensor]) -> None:
    """``g *= s`` for float16 tensors and 0-dim float32 scales, computed in float32.

    On CUDA a 0-dim float32 scale is rounded to float16 before the multiply (seen on an
    H200: a coefficient of 5e-7, subnormal in float16, clipped a norm to 0.954 instead of 1;
    below 6e-8 it would be 0). A scale with a dimension takes part in type promotion, so the
    product is computed in float32 and rounded once; one kernel per tensor.
    """
    for g, s in zip(group, scales, strict=True):
        if g.dim():
            g.mul_(s.view([1] * g.dim()))
        else:
            g.copy_(g.float() * s)


def scale_each_(groups: _foreach.Groups, coefs: Tensor) -> None:
    """Multiply each grouped tensor in place by its own coefficient.

    ``coefs`` is 1-D with one entry per tensor of the list the groups were made from
    (``coefs[i]`` for the tensor at index ``i``). On the CPU, tensors whose coefficient is
    exactly 1 are not rewritten.

    Example:
        >>> g = [torch.tensor([3.0]), torch.tensor([4.0])]
        >>> scale_each_(_foreach.group_by_device_dtype(g), torch.tensor([0.5, 1.0]))
        >>> g
        [tensor([1.5000]), tensor([4.])]
    """
    for (device, dtype), (group, indices) in groups.items():
        mine = coefs.index_select(0, index_tensor(tuple(indices), coefs.device)).to(device)
        if _foreach.is_host_device(device) and not _foreach.is_compiling():  # see noop_on_host
            keep = (mine != 1).tolist()
            if not any(keep):
                continue
            if not all(keep):
                group = [g for g, k in zip(group, keep, strict=True) if k]
                mine = mine[torch.tensor(keep)]
        if dtype == torch.float16 and not _foreach.is_host_device(device):
            _multiply_float16(group, list(mine.unbind()))
        elif _foreach.has_foreach_support(group, device):
            _foreach.foreach_mul_(group, list(mine.unbind()))
        else:
            for g, c in zip(group, mine.unbind(), strict=True):
                g.mul_(c)
