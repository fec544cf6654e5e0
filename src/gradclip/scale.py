"""Scaling: torch's clip coefficient and the in-place multiply, in one place.

Every function that clips by a norm (the drop-ins, every clipper, the monitor's and the
recommendation's "what would this threshold do") uses :data:`TORCH_EPS` and
:func:`clip_coefficient`, and every multiply of gradients goes through :func:`scale_` (one
coefficient) or :func:`scale_each_` (one per tensor).
"""

from __future__ import annotations

import torch
from torch import Tensor

from gradclip import _foreach
from gradclip._cache import index_tensor

__all__ = ["TORCH_EPS", "clip_coefficient", "noop_on_host", "scale_", "scale_each_"]

TORCH_EPS = 1e-6
"""torch's ``clip_coef = max_norm / (total_norm + 1e-6)``: the eps decides whether a norm
equal to ``max_norm`` is scaled (it is, by ``1 / (1 + 1e-6 / max_norm)``)."""


def clip_coefficient(max_norm: float | Tensor, total: Tensor) -> Tensor:
    """torch's coefficient ``min(max_norm / (total + 1e-6), 1)`` as a tensor (no host read).

    ``total`` may be 0-dim or 1-D (one coefficient per norm).

    Example:
        >>> clip_coefficient(1.0, torch.tensor(4.0))
        tensor(0.2500)
    """
    return torch.clamp(max_norm / (total + TORCH_EPS), max=1.0)


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
    for (device, _), (group, _) in groups.items():
        scale = coef.to(device)
        if noop_on_host(device, scale):
            continue
        use_foreach = foreach if foreach is not None else _foreach.has_foreach_support(group, device)
        if use_foreach:
            _foreach.foreach_mul_(group, scale)
        else:
            for g in group:
                g.mul_(scale)


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
    for (device, _), (group, indices) in groups.items():
        mine = coefs.index_select(0, index_tensor(tuple(indices), coefs.device)).to(device)
        if _foreach.is_host_device(device) and not _foreach.is_compiling():  # see noop_on_host
            keep = (mine != 1).tolist()
            if not any(keep):
                continue
            if not all(keep):
                group = [g for g, k in zip(group, keep, strict=True) if k]
                mine = mine[torch.tensor(keep)]
        if _foreach.has_foreach_support(group, device):
            _foreach.foreach_mul_(group, list(mine.unbind()))
        else:
            for g, c in zip(group, mine.unbind(), strict=True):
                g.mul_(c)
