"""The one pass over the gradients: per-tensor norms and the total norm.

Every feature of gradclip (the drop-ins, the clippers, the monitor, the recommendation)
reads the :class:`GradNorms` this module produces; nothing else walks the gradients to
measure them.

How the pass runs, per (device, dtype) group:

* On the CPU, for real floating dtypes and ``norm_type > 0``:
  - tensors under ``SMALL_NUMEL`` elements are concatenated, in chunks that stay in cache,
    into one buffer; tensors of equal size then form the rows of one 2-D view whose row
    norms are a single kernel (per-tensor kernel overhead, ~2-3 µs, is what dominates
    small tensors);
  - larger tensors are viewed as rows of ``ROW_LENGTH`` elements: the row norms run on
    every core and accumulate over short runs, so they are far more accurate than torch's
    single-accumulator kernel (GPT-2: 5e-7 instead of 9e-4 relative error); the inf norm
    uses ``aminmax``, one vectorised pass (about 10x faster than ``vector_norm(ord=inf)``);
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
import threading
from collections import OrderedDict
from dataclasses import dataclass

import torch
from torch import Tensor

from gradclip import _foreach

__all__ = ["GradNorms", "accumulation_dtype", "compute", "empty_norms"]

SMALL_NUMEL = 32768
"""Tensors below this many elements are not split into rows (CPU)."""
TINY_NUMEL = 2048
"""Tensors below this many elements are concatenated before they are measured (CPU); those
from here to ``SMALL_NUMEL`` go through one ``_foreach_norm`` call (copying them would cost
more than the ~2 µs per-tensor kernel overhead it saves)."""
CHUNK_NUMEL = (1 << 15) - 1
"""Elements per concatenation chunk: under torch's OpenMP grain (32768), so each chunk is
reduced on one thread. A parallel region on small data waits a whole scheduler slice (~8 ms)
whenever another process holds the second core; measured here, 256K-element chunks made
2,000 tiny tensors 25x slower under such load, 32K-element ones did not."""
ROW_LENGTH = 8192
"""Row length of the 2-D view used to measure a large float32/float64 tensor (CPU)."""
LOW_PRECISION_ROW_LENGTH = 512
"""Row length for float16/bfloat16: each row norm is rounded to the tensor's dtype, so more,
shorter rows average that rounding out (bf16, 33k elements: 3e-4 relative error instead of
1.2e-3 with 8192-element rows; torch's own per-tensor norm: 2.5e-3), at the same speed."""
_PLAN_CACHE_SIZE = 16

_FAST_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)
_LOW_PRECISION = (torch.float16, torch.bfloat16)


def accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    """Dtype in which gradclip holds norms of ``dtype`` tensors: float64 for 64-bit, else float32."""
    return torch.float64 if dtype in (torch.float64, torch.complex128) else torch.float32


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
        return self.total.to(self.dtype)


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
    first_device = tensors[0].device
    vectors: list[Tensor] = []
    result_dtype: torch.dtype | None = None
    for (device, dtype), (group, _) in groups.items():
        vectors.append(_group_norms(group, device, dtype, p, foreach))
        real = dtype.to_real()
        result_dtype = real if result_dtype is None else torch.promote_types(result_dtype, real)
    assert result_dtype is not None  # non-empty input gives at least one group
    if len(vectors) == 1:
        per_tensor = vectors[0]
    else:
        acc = accumulation_dtype(result_dtype)
        stacked = torch.cat([v.to(device=first_device, dtype=acc) for v in vectors])
        order = tuple(i for _, indices in groups.values() for i in indices)
        per_tensor = torch.empty_like(stacked)
        per_tensor[_index_tensor(order, first_device)] = stacked
    total = torch.linalg.vector_norm(per_tensor, p)
    return GradNorms(tensors, per_tensor, total, p, result_dtype, groups)


def _group_norms(
    group: list[Tensor], device: torch.device, dtype: torch.dtype, p: float, foreach: bool | None
) -> Tensor:
    """1-D per-tensor norms of one (device, dtype) group, in the group's order."""
    acc = accumulation_dtype(dtype)
    if (
        _foreach.is_host_device(device)
        and dtype in _FAST_DTYPES
        and p > 0  # False for nan too
        and all(type(t) is Tensor and t.layout == torch.strided for t in group)
    ):
        return _host_norms(group, dtype, p, acc)
    use_foreach = foreach if foreach is not None else _foreach.has_foreach_support(group, device)
    norm_dtype = torch.float32 if dtype in _LOW_PRECISION else None
    if use_foreach:
        norms = _foreach.foreach_norm(group, p, norm_dtype)
    else:
        norms = [torch.linalg.vector_norm(g, p, dtype=norm_dtype) for g in group]
    return torch.stack(norms).to(acc)


# ---------------------------------------------------------------------------------------
# CPU fast path


@dataclass(frozen=True)
class _Chunk:
    members: list[int]  # group indices, concatenated in this order
    runs: list[tuple[int, int, int]]  # (offset, count, numel): equal-size members as rows
    numel: int
    flat_members: bool  # every member is 1-D: torch.cat(..., out=) needs no flattening


@dataclass(frozen=True)
class _Large:
    index: int  # in the group
    rows: int  # the tensor's elements viewed as (rows, length), then a tail of `tail`
    length: int
    tail: int
    slot: int  # its first row norm in the group's row-norm buffer


@dataclass(frozen=True)
class _Plan:
    chunks: list[_Chunk]
    mid: list[int]  # measured by one _foreach_norm call
    large: list[_Large]
    slots: int  # row norms of all large tensors (rows, plus one per tail)
    segments: Tensor  # for each slot, the position of its tensor among the large ones
    empty: list[int]  # 0-element tensors: torch's own kernel (it raises for inf norms)
    inverse: Tensor | None  # puts the results back in group order (None: already in order)


_plans: OrderedDict[tuple, _Plan] = OrderedDict()
_index_tensors: OrderedDict[tuple, Tensor] = OrderedDict()
_plans_lock = threading.Lock()
_buffers = threading.local()


def _index_tensor(order: tuple[int, ...], device: torch.device) -> Tensor:
    """``order`` as an index tensor on ``device``, cached: a fresh host-to-device copy per
    call would block the host on accelerators."""
    key = (order, device)
    with _plans_lock:
        index = _index_tensors.get(key)
        if index is None:
            index = _index_tensors[key] = torch.tensor(order, device=device)
            while len(_index_tensors) > _PLAN_CACHE_SIZE:
                _index_tensors.popitem(last=False)
        return index


def _plan_for(group: list[Tensor], dtype: torch.dtype) -> _Plan:
    """How to measure a group of these shapes; cached, since the gradients' shapes rarely change."""
    shapes = tuple(t.shape for t in group)
    key = (dtype, shapes)
    with _plans_lock:
        plan = _plans.get(key)
        if plan is not None:
            _plans.move_to_end(key)
            return plan
    plan = _build_plan(shapes, dtype)
    with _plans_lock:
        _plans[key] = plan
        while len(_plans) > _PLAN_CACHE_SIZE:
            _plans.popitem(last=False)
    return plan


def _build_plan(shapes: tuple[torch.Size, ...], dtype: torch.dtype) -> _Plan:
    numels = [s.numel() for s in shapes]
    small = sorted((i for i, n in enumerate(numels) if 0 < n < TINY_NUMEL), key=numels.__getitem__)
    mid = [i for i, n in enumerate(numels) if TINY_NUMEL <= n < SMALL_NUMEL]
    empty = [i for i, n in enumerate(numels) if n == 0]
    chunks: list[_Chunk] = []
    members: list[int] = []
    size = 0
    for i in [*small, None]:
        if i is None or (members and size + numels[i] > CHUNK_NUMEL):
            if members:
                chunks.append(_make_chunk(members, numels, shapes))
            members, size = [], 0
        if i is not None:
            members.append(i)
            size += numels[i]
    large: list[_Large] = []
    segments: list[int] = []
    for i, shape in enumerate(shapes):
        if numels[i] >= SMALL_NUMEL:
            length = _row_length(shape, dtype)
            rows, tail = divmod(numels[i], length)
            large.append(_Large(i, rows, length, tail, len(segments)))
            segments.extend([len(large) - 1] * (rows + (tail > 0)))
    order = [*small, *mid, *(t.index for t in large), *empty]
    inverse = None
    if order != list(range(len(shapes))):
        inverse = torch.empty(len(order), dtype=torch.long)
        inverse[torch.tensor(order)] = torch.arange(len(order))
    segments_tensor = torch.tensor(segments, dtype=torch.long)
    return _Plan(chunks, mid, large, len(segments), segments_tensor, empty, inverse)


def _row_length(shape: torch.Size, dtype: torch.dtype) -> int:
    """Row length for a large tensor: its own trailing dims when they make rows of 512 to
    65536 elements (no tail to measure apart), else ``ROW_LENGTH``-element rows."""
    if dtype in _LOW_PRECISION:
        return LOW_PRECISION_ROW_LENGTH
    length = 1
    for size in reversed(shape[1:]):
        length *= size
        if length >= 512:
            return length if length <= 65536 else ROW_LENGTH
    return ROW_LENGTH


def _make_chunk(members: list[int], numels: list[int], shapes: tuple[torch.Size, ...]) -> _Chunk:
    runs: list[tuple[int, int, int]] = []
    offset = 0
    for i in members:
        n = numels[i]
        if runs and runs[-1][2] == n:
            start, count, _ = runs[-1]
            runs[-1] = (start, count + 1, n)
        else:
            runs.append((offset, 1, n))
        offset += n
    return _Chunk(list(members), runs, offset, all(len(shapes[i]) == 1 for i in members))


def _buffer(dtype: torch.dtype, numel: int) -> Tensor:
    """A per-thread scratch buffer, reused across calls (a fresh one page-faults every call)."""
    cache = getattr(_buffers, "by_dtype", None)
    if cache is None:
        cache = _buffers.by_dtype = {}
    buf = cache.get(dtype)
    if buf is None or buf.numel() < numel:
        buf = cache[dtype] = torch.empty(max(numel, CHUNK_NUMEL), dtype=dtype)
    return buf[:numel]


def _rows_norms(rows: Tensor, p: float, acc: torch.dtype) -> Tensor:
    """Norm of each row of a 2-D view, as ``acc`` values."""
    if math.isinf(p):
        return torch.maximum(rows.amax(dim=1), rows.amin(dim=1).neg()).to(acc)
    norm_dtype = acc if rows.dtype in _LOW_PRECISION else None
    return torch.linalg.vector_norm(rows, p, dim=1, dtype=norm_dtype)


def _flat_view(t: Tensor) -> Tensor | None:
    """All elements of ``t`` as a 1-D view in memory order, without a copy (None if ``t``
    has gaps or overlaps). The norm does not depend on element order."""
    if t.is_contiguous():
        return t.view(-1)
    order = sorted(range(t.dim()), key=lambda d: (t.stride(d), t.size(d)), reverse=True)
    permuted = t.permute(order)
    return permuted.view(-1) if permuted.is_contiguous() else None


def _strided_norm(t: Tensor, p: float, acc: torch.dtype) -> Tensor:
    """Norm of a tensor with gaps between its elements (no flat view): the trailing dims
    first, then the rows, so accumulation runs stay short without a copy. 0-dim, ``acc``."""
    norm_dtype = acc if t.dtype in _LOW_PRECISION else None
    dims = tuple(range(1, t.dim())) or None
    rows = torch.linalg.vector_norm(t, p, dim=dims, dtype=norm_dtype).to(acc)
    return torch.linalg.vector_norm(rows.reshape(-1), p)


def _large_inf_norms(group: list[Tensor], plan: _Plan, acc: torch.dtype) -> Tensor:
    """Max-abs norm of each large tensor: one vectorised ``aminmax`` pass each."""
    low = torch.empty(len(plan.large), dtype=group[0].dtype)
    high = torch.empty_like(low)
    for k, item in enumerate(plan.large):
        t = group[item.index]
        flat = _flat_view(t)
        torch.aminmax(t if flat is None else flat, out=(low[k], high[k]))
    return torch.maximum(high, low.neg()).to(acc)


def _row_slots(plan: _Plan, dtype: torch.dtype) -> tuple[Tensor, list[tuple[Tensor, Tensor]]]:
    """This thread's row-norm buffer for ``plan`` and, per large tensor, the views that
    receive its body's and its tail's row norms (built once, not per call)."""
    cache = getattr(_buffers, "slots", None)
    if cache is None:
        cache = _buffers.slots = OrderedDict()
    key = (id(plan), dtype)
    entry = cache.get(key)
    if entry is None or entry[0] is not plan:
        buf = torch.empty(plan.slots, dtype=dtype)
        views = [
            (buf[i.slot : i.slot + i.rows], buf[i.slot + i.rows : i.slot + i.rows + (i.tail > 0)])
            for i in plan.large
        ]
        entry = cache[key] = (plan, buf, views)
        while len(cache) > _PLAN_CACHE_SIZE:
            cache.popitem(last=False)
    return entry[1], entry[2]


def _large_norms(group: list[Tensor], plan: _Plan, p: float, acc: torch.dtype) -> Tensor:
    """Finite-p norm of each large tensor.

    Every tensor's row norms go into one buffer, one kernel per tensor (rows run on every
    core, each over a short run); one ``index_add_`` then sums their p-th powers per tensor
    in float64.
    """
    row_norms, views = _row_slots(plan, group[0].dtype)
    strided: dict[int, Tensor] = {}
    for k, (item, (body_out, tail_out)) in enumerate(zip(plan.large, views, strict=True)):
        t = group[item.index]
        if not item.tail and t.is_contiguous():
            torch.linalg.vector_norm(t.view(item.rows, item.length), p, dim=1, out=body_out)
            continue
        flat = _flat_view(t)
        if flat is None:  # gaps between elements: measured on its own
            body_out.zero_()
            tail_out.zero_()
            strided[k] = _strided_norm(t, p, acc)
            continue
        body = item.rows * item.length
        torch.linalg.vector_norm(flat[:body].view(item.rows, item.length), p, dim=1, out=body_out)
        if item.tail:
            torch.linalg.vector_norm(flat[body:], p, dim=0, keepdim=True, out=tail_out)
    if row_norms.dtype == torch.float16 and bool(row_norms.isinf().any()):
        # float16 row norms overflow at 65504 although every element is finite: measure
        # again with float32 results (slower kernels, paid only on this rare step).
        return torch.stack([_strided_norm(group[item.index], p, acc) for item in plan.large])
    powers = row_norms.double()
    powers = powers * powers if p == 2 else powers.pow(p)
    sums = torch.zeros(len(plan.large), dtype=torch.float64).index_add_(0, plan.segments, powers)
    norms = (sums.sqrt() if p == 2 else sums.pow(1.0 / p)).to(acc)
    for k, norm in strided.items():
        norms[k] = norm
    return norms


def _host_norms(group: list[Tensor], dtype: torch.dtype, p: float, acc: torch.dtype) -> Tensor:
    plan = _plan_for(group, dtype)
    pieces: list[Tensor] = []
    for chunk in plan.chunks:
        tensors = [group[i] for i in chunk.members]
        if chunk.flat_members:
            flat = torch.cat(tensors, out=_buffer(dtype, chunk.numel))
        else:
            flat = _foreach.flatten(tensors)
        for offset, count, numel in chunk.runs:
            rows = flat[offset : offset + count * numel].view(count, numel)
            pieces.append(_rows_norms(rows, p, acc))
    if plan.mid:
        mid = [group[i] for i in plan.mid]
        norm_dtype = acc if dtype in _LOW_PRECISION else None
        pieces.append(torch.stack(_foreach.foreach_norm(mid, p, norm_dtype)).to(acc))
    if plan.large and math.isinf(p):
        pieces.append(_large_inf_norms(group, plan, acc))
    elif plan.large:
        pieces.append(_large_norms(group, plan, p, acc))
    pieces.extend(
        torch.linalg.vector_norm(group[i], p).to(acc).reshape(1) for i in plan.empty
    )
    norms = torch.cat(pieces) if len(pieces) > 1 else pieces[0]
    return norms if plan.inverse is None else norms[plan.inverse]
