"""The CPU fast path of the norm pass (see :mod:`gradclip.norms`), apart because reading
values on the host is free on the CPU, so a plan may branch on sizes and results.

Many tiny tensors are concatenated in cache-resident chunks and measured as the rows of one
matrix (when they are many for their group); large ones are viewed as rows whose norms run
on every core and accumulate over short runs (float32/float64 only when torch runs several
threads); the rest, and those row norms, go through one ``_foreach_norm`` call; the inf norm
of a large tensor uses ``aminmax``. Groups with nothing to concatenate skip the plan
(:func:`measure`).
"""

from __future__ import annotations

import math
import operator
import threading
from dataclasses import dataclass, field

import torch
from torch import Tensor

from gradclip import _foreach
from gradclip._cache import LRU

__all__ = [
    "AMINMAX_NUMEL",
    "CHUNK_NUMEL",
    "CONCAT_SPAN",
    "FAST_DTYPES",
    "LOW_PRECISION",
    "LOW_PRECISION_ROW_LENGTH",
    "MIN_CONCAT",
    "ROW_LENGTH",
    "SMALL_NUMEL",
    "TINY_NUMEL",
    "accumulation_dtype",
    "as_dtype",
    "concatenates",
    "measure",
    "norms",
]

SMALL_NUMEL = 32768
"""float16/bfloat16 tensors below this many elements are not split into rows (CPU)."""
ROWS_NUMEL = 1 << 18
"""float32/float64 tensors from this many elements are measured by rows (CPU) when torch runs
more than one intra-op thread: the rows run on every core, where torch's 2-norm of one
tensor runs on one, and accumulate over short runs (below this size torch's kernel errs by
at most ~2e-6 relative on random data; 3e-3 at GPT-2's 38.6M-element embedding). bench_small
at two threads, clip: GPT-2 small 0.71x torch with rows, 1.01x without. At one thread rows
buy no parallelism and cost a call or two per tensor (~14 µs each when it runs cold between
streamed gradients): one thread, clip, GPT-2 small 1.01x with rows from 2^20, 0.98x
without. There every float32/float64 tensor goes through torch's own kernel, as in torch."""
TINY_NUMEL = 2048
"""Tensors below this many elements are concatenated before they are measured (CPU); those
from here to ``SMALL_NUMEL`` go through one ``_foreach_norm`` call (copying them would cost
more than the ~2 µs per-tensor kernel overhead it saves)."""
CHUNK_NUMEL = (1 << 15) - 1
"""Elements per concatenation chunk: under torch's OpenMP grain (32768), so each chunk is
reduced on one thread. A parallel region on small data waits a whole scheduler slice (~8 ms)
whenever another process holds the second core; measured here, 256K-element chunks made
2,000 tiny tensors 25x slower under such load, 32K-element ones did not."""
ROW_LENGTH = 1024
"""Row length of the 2-D view used to measure a large float32/float64 tensor (CPU), unless
its trailing dims make rows of 256 to 4096 elements. One thread, in cache: rows of 256 to
1024 elements measure an 8192x256 tensor 1.1x faster than torch's flat kernel, rows of 8192
no faster (and shorter runs are more accurate)."""
LOW_PRECISION_ROW_LENGTH = 512
"""Row length for float16/bfloat16: each row norm is rounded to the tensor's dtype, so more,
shorter rows average that rounding out (bf16, 33k elements: 3e-4 relative error instead of
1.2e-3 with 8192-element rows; torch's own per-tensor norm: 2.5e-3), at the same speed."""
FAST_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)
"""Dtypes the CPU fast path measures."""
LOW_PRECISION = (torch.float16, torch.bfloat16)



AMINMAX_NUMEL = 1 << 15
"""Tensors of at least this many elements take their max norm from ``aminmax`` (CPU): one
vectorised pass at ~0.9x the read floor, where torch's ``vector_norm(ord=inf)`` costs 9-12x."""


def large_numel(dtype: torch.dtype, p: float) -> int:
    """Tensors of at least this many elements are measured apart (CPU): by rows for a finite
    ``p`` (see ``ROWS_NUMEL``: float32/float64 only with several threads), by ``aminmax`` for
    the max norm."""
    if math.isinf(p):
        return AMINMAX_NUMEL
    if dtype in LOW_PRECISION:
        return SMALL_NUMEL
    return ROWS_NUMEL if torch.get_num_threads() > 1 else _NO_ROWS


_NO_ROWS = 1 << 62


def accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    """Dtype in which gradclip holds norms of ``dtype`` tensors: float64 for 64-bit, else float32."""
    return torch.float64 if dtype in (torch.float64, torch.complex128) else torch.float32



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
    empty: list[int]  # 0-element tensors: torch's own kernel (it raises for inf norms)
    inverse: Tensor | None  # puts the results back in group order (None: already in order)
    # per thread, the buffer that receives the large tensors' row norms (see _row_slots)
    scratch: threading.local = field(default_factory=threading.local, compare=False)

    @property
    def plain(self) -> bool:
        """Nothing to concatenate, view as rows or reorder: one multi-tensor call measures all."""
        return not (self.chunks or self.large or self.empty) and self.inverse is None


_plans: LRU[tuple, _Plan] = LRU(16)
_SHAPE = operator.attrgetter("shape")
_buffers = threading.local()


def _plan_for(group: list[Tensor], dtype: torch.dtype, p: float) -> _Plan:
    """How to measure a group of these shapes; cached, since the gradients' shapes rarely change."""
    shapes = tuple(map(_SHAPE, group))
    apart = large_numel(dtype, p)
    return _plans.get_or_build((dtype, apart, shapes), lambda: _build_plan(shapes, dtype, apart))


def _build_plan(shapes: tuple[torch.Size, ...], dtype: torch.dtype, apart: int) -> _Plan:
    numels = [s.numel() for s in shapes]
    small = sorted((i for i, n in enumerate(numels) if 0 < n < TINY_NUMEL), key=numels.__getitem__)
    mid = [i for i, n in enumerate(numels) if TINY_NUMEL <= n < apart]
    if not concatenates(len(small), sum(numels)):
        mid, small = sorted(mid + small), []
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
    slots = 0
    for i, shape in enumerate(shapes):
        if numels[i] >= apart:
            length = _row_length(shape, dtype)
            rows, tail = divmod(numels[i], length)
            large.append(_Large(i, rows, length, tail, slots))
            slots += rows + (tail > 0)
    order = [*small, *mid, *(t.index for t in large), *empty]
    inverse = None
    if order != list(range(len(shapes))):
        inverse = torch.empty(len(order), dtype=torch.long)
        inverse[torch.tensor(order)] = torch.arange(len(order))
    return _Plan(chunks, mid, large, slots, empty, inverse)


def _row_length(shape: torch.Size, dtype: torch.dtype) -> int:
    """Row length for a large tensor: its own trailing dims when they make rows of 256 to
    4096 elements (no tail to measure apart), else ``ROW_LENGTH``-element rows."""
    if dtype in LOW_PRECISION:
        return LOW_PRECISION_ROW_LENGTH
    length = 1
    for size in reversed(shape[1:]):
        length *= size
        if length >= 256:
            return length if length <= 4096 else ROW_LENGTH
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
    norm_dtype = acc if rows.dtype in LOW_PRECISION else None
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
    norm_dtype = acc if t.dtype in LOW_PRECISION else None
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


def _row_slots(plan: _Plan, dtype: torch.dtype) -> tuple[Tensor, list[tuple[Tensor, Tensor, Tensor]]]:
    """This thread's row-norm buffer for ``plan`` and, per large tensor, the views that
    receive its body's and its tail's row norms and the view of both (built once per plan
    and thread, and kept on the plan: they go when it is evicted, and no lock is taken)."""
    slots = getattr(plan.scratch, "slots", None)
    if slots is None:
        buf = torch.empty(plan.slots, dtype=dtype)
        views = []
        for i in plan.large:
            end = i.slot + i.rows + (i.tail > 0)
            views.append((buf[i.slot : i.slot + i.rows], buf[i.slot + i.rows : end], buf[i.slot : end]))
        slots = plan.scratch.slots = (buf, views)
    return slots


def _large_rows(group: list[Tensor], plan: _Plan, p: float, acc: torch.dtype) -> list[Tensor]:
    """Per large tensor (finite ``p``), its :func:`_row_norms`, written into this thread's
    row-norm buffer for ``plan``."""
    row_norms, views = _row_slots(plan, group[0].dtype)
    out = [_row_norms(group[item.index], p, acc, item.length, outs)
           for item, outs in zip(plan.large, views, strict=True)]  # fmt: skip
    if row_norms.dtype == torch.float16 and bool(row_norms.isinf().any()):
        # float16 row norms overflow at 65504 although every element is finite: measure
        # again with float32 results (slower kernels, paid only on this rare step).
        return [_strided_norm(group[item.index], p, acc).reshape(1) for item in plan.large]
    return out


MIN_CONCAT = 24
"""Tiny tensors are concatenated only when there are at least this many (each saves ~1.5 µs
of per-tensor kernel overhead; the concatenation and reordering cost ~20-30 µs: one thread,
18 tiny tensors beside 4 larger ones measured even, 24 a tenth faster, 48 twice as fast)."""
CONCAT_SPAN = 1 << 16
"""...and only when there is at least one per this many elements of the group. Past that the
group no longer stays in cache between calls: each tiny tensor then saves under ~0.5 µs, and
the plan's lookup by shapes and its reordering run cold (one thread, interleaved: 34 tiny
tensors concatenated in a 5.3M-element group cost 6% of a call; concatenating 2,000 tensors of
1,000 elements saves 23-28% of their call, 100 of one element 35-40%)."""


def concatenates(tiny: int, numel: int) -> bool:
    """Whether ``tiny`` tiny tensors in a group of ``numel`` elements are worth concatenating."""
    return tiny >= MIN_CONCAT and tiny * CONCAT_SPAN >= numel


def measure(group: list[Tensor], dtype: torch.dtype, p: float, acc: torch.dtype) -> Tensor | None:
    """1-D per-tensor norms (``acc`` dtype) of one CPU group of plain real floating tensors,
    p > 0: by a plan (:func:`norms`) where tiny tensors are concatenated (see
    :func:`concatenates`) or the group is float16/bfloat16, else without a plan (no lookup by
    shapes, no reordering): one ``_foreach_norm`` over the small tensors and, for each large
    one, its row norms (as accurate as the plan's rows) or, for the max norm, ``aminmax``.
    The sizes are read once, in one C-level pass (~80 ns a tensor). None where tensors would
    be viewed or concatenated but one is not strided (sparse): torch's kernels measure those.

    This runs cold on every clip (the gradients stream through the caches between calls):
    each Python step here costs several times what it costs warm, hence one function, and
    the layouts are read only where a view or a concatenation needs them."""
    if dtype not in (torch.float32, torch.float64):
        return norms(group, dtype, p, acc) if _foreach.all_strided(group) else None
    large = large_numel(dtype, p)
    # concatenating needs MIN_CONCAT tiny tensors, one per CONCAT_SPAN elements: the sizes
    # are read only where that, or a tensor measured apart, is possible
    if len(group) < MIN_CONCAT and large == _NO_ROWS:
        return torch.stack(_foreach.foreach_norm(group, p, None))
    numels = list(map(Tensor.numel, group))
    total = sum(numels)
    if len(group) >= MIN_CONCAT and len(group) * CONCAT_SPAN >= total:
        tiny = sum(map(TINY_NUMEL.__gt__, numels)) - numels.count(0)  # as the plan counts them
        if concatenates(tiny, total):
            return norms(group, dtype, p, acc) if _foreach.all_strided(group) else None
    if max(numels) >= large:
        if not _foreach.all_strided(group):
            return None
        group = [t if n < large else _row_norms(t, p, dtype, _row_length(t.shape, dtype))
                 for t, n in zip(group, numels, strict=True)]  # fmt: skip
    return torch.stack(_foreach.foreach_norm(group, p, None))


def _row_norms(
    t: Tensor, p: float, acc: torch.dtype, length: int,
    outs: tuple[Tensor, Tensor, Tensor] | None = None,
) -> Tensor:
    """A 1-D tensor whose ``p``-norm is the large tensor ``t``'s: the norms of its rows of
    ``length`` elements and of its tail (one kernel each; rows run on every core, each over a
    short run), written into ``outs`` (rows, tail, both) when given; its norm alone (``acc``)
    when its elements have gaps; its max-abs for ``p = inf`` (``aminmax``: ~20x faster than
    ``vector_norm(ord=inf)``)."""
    flat = _flat_view(t)
    if math.isinf(p):
        low, high = torch.aminmax(t if flat is None else flat)
        return torch.maximum(high, low.neg()).reshape(1)
    if flat is None:  # gaps between elements
        return _strided_norm(t, p, acc).reshape(1)
    body_out, tail_out, whole = (None, None, None) if outs is None else outs
    rows, tail = divmod(flat.numel(), length)
    body = flat.view(rows, length) if not tail else flat[: rows * length].view(rows, length)
    row_norms = torch.linalg.vector_norm(body, p, dim=1, out=body_out)
    if not tail:
        return row_norms
    end = torch.linalg.vector_norm(flat[rows * length :], p, dim=0, keepdim=True, out=tail_out)
    return whole if whole is not None else torch.cat([row_norms, end])


def as_dtype(t: Tensor, dtype: torch.dtype) -> Tensor:
    """``t.to(dtype)`` without the call when it is already that dtype (~1 µs a call)."""
    return t if t.dtype == dtype else t.to(dtype)


def norms(group: list[Tensor], dtype: torch.dtype, p: float, acc: torch.dtype) -> Tensor:
    """1-D per-tensor norms (``acc`` dtype) of one CPU group of real floating tensors, p > 0."""
    plan = _plan_for(group, dtype, p)
    norm_dtype = acc if dtype in LOW_PRECISION else None
    if plan.plain:
        return as_dtype(torch.stack(_foreach.foreach_norm(group, p, norm_dtype)), acc)
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
    listed = [group[i] for i in plan.mid]
    if plan.large and not math.isinf(p):
        listed += _large_rows(group, plan, p, acc)
    if listed:  # mid tensors, then large ones by their rows: one multi-tensor call
        pieces.append(as_dtype(torch.stack(_foreach.foreach_norm(listed, p, norm_dtype)), acc))
    if plan.large and math.isinf(p):
        pieces.append(_large_inf_norms(group, plan, acc))
    pieces.extend(
        torch.linalg.vector_norm(group[i], p).to(acc).reshape(1) for i in plan.empty
    )
    norms = torch.cat(pieces) if len(pieces) > 1 else pieces[0]
    return norms if plan.inverse is None else norms[plan.inverse]
