"""The one pass over the gradients: per-tensor norms and the total norm.

Every feature of gradclip (the drop-ins, the clippers, the monitor, the recommendation)
reads the :class:`GradNorms` this module produces; nothing else walks the gradients to
measure them.

How the pass runs, per (device, dtype) group:

* On the CPU, for real floating dtypes and ``norm_type > 0``:
  - many tiny tensors (at least ``MIN_CONCAT`` under ``TINY_NUMEL`` elements, and at least
    one per ``CONCAT_SPAN`` elements of the group) are concatenated, in chunks that stay in
    cache, into one buffer; tensors of equal size then form the rows of one 2-D view whose
    row norms are a single kernel (per-tensor kernel overhead, ~2-3 µs, is what dominates
    small tensors);
  - large tensors (float32/float64 from ``ROWS_NUMEL`` = 2^18 elements where torch runs
    several threads, float16/bfloat16 from ``SMALL_NUMEL`` = 2^15) are viewed as rows of up
    to ``ROW_LENGTH`` elements: the row norms run on every core and accumulate over short
    runs, so they are far more accurate than torch's single-accumulator kernel (GPT-2: 3e-8
    instead of 9e-4 relative error); below that size torch's kernel errs by about 1e-6 or
    less on gradients. At one thread the rows would buy no parallelism and cost more calls
    than they save: float32/float64 tensors are then measured by torch's kernel, as torch
    measures them;
  - every other tensor, and the row norms of the large ones (whose norm is the tensor's),
    go through one ``_foreach_norm`` call; the inf norm of a tensor from ``AMINMAX_NUMEL``
    = 2^15 elements uses ``aminmax``, one vectorised pass (about 10x faster than
    ``vector_norm(ord=inf)``);
  - float16/bfloat16 gradients are measured with float32 accumulation into float32
    per-tensor norms, so finite gradients never give an infinite norm; a large tensor's row
    norms are rounded once to its dtype (the fast kernel's output) and averaged over many
    short rows, which keeps the per-tensor error under eps / 8 of the dtype (torch's: eps / 2).
* Elsewhere (accelerators, other norm types, tensor subclasses): torch's own multi-tensor
  ``_foreach_norm`` (or per-tensor ``vector_norm`` where torch would loop), asking for
  float32 results from low-precision gradients. No value is read on the host.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from gradclip import _foreach
from gradclip._cache import index_tensor
from gradclip.norms import _host
from gradclip.norms._host import FAST_DTYPES, LOW_PRECISION, SMALL_NUMEL, accumulation_dtype

__all__ = [
    "SMALL_NUMEL",
    "GradNorms",
    "accumulation_dtype",
    "compute",
    "empty_norms",
    "powers",
    "result_dtype",
    "root",
    "total_norm",
]


@dataclass(frozen=True)
class GradNorms:
    """What one pass over a set of tensors measured.

    Attributes:
        tensors: the tensors measured, in input order, each once (duplicates removed).
            Under ``torch.distributed`` with gradients split across ranks: this rank's
            part of each (see :func:`grad_norms`).
        per_tensor: 1-D tensor, ``per_tensor[i]`` is the ``norm_type``-norm of
            ``tensors[i]``; float32 (float64 if any tensor is 64-bit), on the device of
            ``tensors[0]``. Half-precision tensors are measured with float32 accumulation.
            Under ``torch.distributed``, the norm of the whole tensor (all ranks' parts).
        total: 0-dim tensor, the norm of ``per_tensor`` (torch's definition of the total
            norm), in the same dtype and device as ``per_tensor``.
        norm_type: the ``p`` of the norms, as a float.
        dtype: the dtype torch gives the total norm for these tensors (type promotion of
            the per-tensor norm dtypes); :meth:`result` casts ``total`` to it.
        groups: the non-empty tensors grouped by (device, dtype), with their indices
            into ``tensors``; reused to scale them without grouping again.

    Example:
        >>> import torch, gradclip
        >>> p = torch.nn.Parameter(torch.zeros(2)); p.grad = torch.tensor([3.0, 4.0])
        >>> gradclip.grad_norms([p]).total
        tensor(5.)
    """

    tensors: list[Tensor]
    per_tensor: Tensor
    total: Tensor
    norm_type: float
    dtype: torch.dtype
    groups: _foreach.Groups

    def result(self) -> Tensor:
        """The total norm as ``torch.nn.utils.get_total_norm`` types it (value, dtype, device)."""
        return _host.as_dtype(self.total, self.dtype)


def empty_norms(p: float) -> GradNorms:
    """The :class:`GradNorms` of nothing: torch returns ``tensor(0.)`` in the default dtype."""
    zero = torch.tensor(0.0)
    return GradNorms([], zero.new_zeros(0), zero, p, zero.dtype, {})


def compute(tensors: list[Tensor], p: float, foreach: bool | None) -> GradNorms:
    """Measure ``tensors`` (non-empty list of distinct tensors) in one pass; see the module doc."""
    if not tensors:
        return empty_norms(p)
    groups = _foreach.group_by_device_dtype(tensors)
    _foreach.check_foreach(groups, foreach)
    # on the CPU outside compilation branching on a measured value is free
    compiling = _foreach.is_compiling()
    if len(groups) == 1:  # the usual case: nothing to promote, gather or reorder
        ((device, dtype), (group, _)), = groups.items()
        on_host = not compiling and _foreach.is_host_device(device)
        per_tensor = _group_norms(group, device, dtype, p, foreach, on_host)
        dtype = _foreach.real_dtype(dtype)
    else:
        host = [not compiling and _foreach.is_host_device(device) for device, _ in groups]
        vectors = [_group_norms(group, *key, p, foreach, h)
                   for (key, (group, _)), h in zip(groups.items(), host, strict=True)]  # fmt: skip
        on_host = all(host)
        dtype = result_dtype(groups)
        acc = accumulation_dtype(dtype)
        first_device = tensors[0].device
        stacked = torch.cat([v.to(device=first_device, dtype=acc) for v in vectors])
        order = tuple(i for _, indices in groups.values() for i in indices)
        per_tensor = torch.empty_like(stacked)
        per_tensor[index_tensor(order, first_device)] = stacked
    if not on_host:
        return GradNorms(tensors, per_tensor, total_norm(per_tensor, p), p, dtype, groups)
    # On the CPU, reading the total is free: the float32 total, measured again (exactly)
    # only in the rare case of an overflow.
    total = torch.linalg.vector_norm(per_tensor, p)
    if 0 < p < math.inf and math.isinf(total.item()):
        per_tensor = _rescue_overflow(tensors, per_tensor, p)
        total = total_norm(per_tensor, p)
    return GradNorms(tensors, per_tensor, total, p, dtype, groups)


def total_norm(per_tensor: Tensor, p: float) -> Tensor:
    """The ``p``-norm of ``per_tensor``, accumulated in float64 (a float32 sum of squares
    overflows once a norm passes 1.8e19, and finite gradients would then be zeroed); in the
    dtype of ``per_tensor``.

    Example:
        >>> total_norm(torch.tensor([3e30, 4e30]), 2.0)
        tensor(5.0000e+30)
    """
    wide = _foreach.wide_dtype(per_tensor.device)
    if not 0 < p < math.inf or per_tensor.dtype == wide:  # max and p <= 0 cannot overflow
        return torch.linalg.vector_norm(per_tensor, p)
    return torch.linalg.vector_norm(per_tensor, p, dtype=wide).to(per_tensor.dtype)


def powers(norms: Tensor, p: float) -> Tensor:
    """What adds up when norms are combined (over shards, ranks or the tensors of a group):
    ``norms ** p`` in float64 (float32 powers overflow for norms near 1e19); the norms
    themselves for ``p = inf`` (combined by a max) and, as counts, for ``p = 0``.

    Example:
        >>> powers(torch.tensor([3.0, 4.0]), 2.0).sum().sqrt()
        tensor(5., dtype=torch.float64)
    """
    if p == 0:
        return (norms != 0).to(norms.dtype)
    if math.isinf(p):
        return norms
    wide = norms.to(_foreach.wide_dtype(norms.device))
    if p == 1:
        return wide
    return wide.square() if p == 2 else wide.pow(p)


def root(sums: Tensor, p: float) -> Tensor:
    """The norm from combined :func:`powers`: their ``p``-th root (the value itself for
    ``p`` in 0, 1, inf).

    Example:
        >>> root(torch.tensor(25.0), 2.0)
        tensor(5.)
    """
    if p == 0 or p == 1 or math.isinf(p):
        return sums
    return sums.sqrt() if p == 2 else sums.pow(1.0 / p)


def _rescue_overflow(tensors: list[Tensor], norms: Tensor, p: float) -> Tensor:
    """``norms`` (of ``tensors``) with the infinite ones measured again in float64.

    A float32 norm whose sum of squares passes float32's range (elements near 1e19) reads
    ``inf`` although every element is finite; finite gradients would then be zeroed by the
    clip. On the CPU, looking is free: the rare tensor is measured again, exactly.
    """
    norms = norms.clone()
    for i in torch.isinf(norms).nonzero().flatten().tolist():
        t = tensors[i]
        wide = t.to(torch.complex128 if t.is_complex() else torch.float64)
        norms[i] = torch.linalg.vector_norm(wide, p).to(norms.dtype)
    return norms


def result_dtype(groups: _foreach.Groups) -> torch.dtype:
    """The dtype torch gives the total norm of these groups (non-empty): type promotion of
    the real dtypes of the per-tensor norms."""
    dtypes = [_foreach.real_dtype(dtype) for _, dtype in groups]
    out = dtypes[0]
    for dtype in dtypes[1:]:
        out = torch.promote_types(out, dtype)
    return out


_PLAIN = {Tensor}


def _group_norms(
    group: list[Tensor], device: torch.device, dtype: torch.dtype, p: float, foreach: bool | None,
    host: bool,
) -> Tensor:
    """1-D per-tensor norms of one (device, dtype) group, in the group's order; ``host``: the
    group is on the CPU, outside compilation (where the fast path may read values)."""
    acc = accumulation_dtype(dtype)
    # While compiling, the plain multi-tensor path: it traces into one graph.
    if host and dtype in FAST_DTYPES and p > 0 and set(map(type, group)) == _PLAIN:  # p: not nan
        measured = _host.measure(group, dtype, p, acc)
        if measured is not None:
            return measured
    use_foreach = foreach if foreach is not None else _foreach.has_foreach_support(group, device)
    norm_dtype = torch.float32 if dtype in LOW_PRECISION else None
    if use_foreach:
        listed = _foreach.foreach_norm(group, p, norm_dtype)
    else:
        listed = [torch.linalg.vector_norm(g, p, dtype=norm_dtype) for g in group]
    return torch.stack(listed).to(acc)
