"""Unit norms: the norm of each row of each tensor, the kernel of AGC's clipping.

A *unit* is a row along dim 0 of a tensor in the PyTorch weight layout (an output feature of
``nn.Linear``, an output channel of ``nn.ConvNd``, a token row of ``nn.Embedding``); a 0-dim
or 1-D tensor, or one measured whole, is a single unit. :class:`UnitPlan` measures the units
of a list of tensors in one pass: small tensors that share a row length are concatenated and
reduced by one kernel, larger ones by one row-norm kernel each; results are float32 (float64
for 64-bit tensors), with float32 accumulation for low-precision tensors.

Per-tensor sums of unit values (AGC's per-tensor norms) go through :class:`SegmentSums`, which
adds in the same order on every run on every device (``index_add_`` on CUDA does not).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor

from gradclip import _foreach
from gradclip.norms._host import SMALL_NUMEL, accumulation_dtype

__all__ = ["SegmentSums", "UnitPlan", "row_norms", "unit_norms", "unit_rows"]


class SegmentSums:
    """Sums of the entries of a 1-D tensor by segment, bitwise the same on every run.

    ``index_add_`` on CUDA adds with atomics: when several entries land in one output, the
    order of the additions, and so the last bits of a float sum, change from run to run. A
    resumed run, or two ranks that should agree bit for bit, would then drift apart. Off the
    CPU, each segment is therefore summed as a row of a gathered matrix, a plain reduction in
    a fixed order: segments are bucketed by their size rounded up to a power of two, and each
    bucket is one gather (rows padded with a zero entry) and one row sum, so at most twice the
    entries are read, in ``2 * buckets + 3`` kernels. On the CPU, ``index_add_`` adds
    sequentially (deterministic) and is kept; so is any layout where no segment has two
    entries (one addition into zero is exact in any order).

    Args:
        segments: for each entry of the values to sum, its segment in ``[0, count)``.
        count: number of segments (those without entries sum to 0).

    Example:
        >>> sums = SegmentSums((0, 2, 0, 2, 2), 3)
        >>> sums(torch.tensor([1.0, 2.0, 3.0, 4.0, 5.0]))
        tensor([ 4.,  0., 11.])
    """

    def __init__(self, segments: Sequence[int], count: int):
        self.segments = tuple(segments)
        self.count = count
        members: list[list[int]] = [[] for _ in range(count)]
        for position, segment in enumerate(self.segments):
            members[segment].append(position)
        self.unique = all(len(m) <= 1 for m in members)
        pad = len(self.segments)  # the index of the zero appended to the values
        buckets: dict[int, list[list[int]]] = {}
        for m in members:
            if m:
                width = 1 << (len(m) - 1).bit_length()
                buckets.setdefault(width, []).append(m + [pad] * (width - len(m)))
        # row sums come out bucket after bucket, then one 0 for the empty segments
        self._buckets = sorted(buckets.items())
        slot_of: list[int] = [-1] * count
        rows = 0
        for _, bucket in self._buckets:
            for row in bucket:
                # segment of that row: the segment of its first (real) member
                slot_of[self.segments[row[0]]] = rows
                rows += 1
        self._inverse = tuple(rows if s < 0 else s for s in slot_of)
        self._built: dict[tuple[torch.device, bool], list[Tensor]] = {}

    def __call__(self, values: Tensor) -> Tensor:
        """``out[s]`` = the sum of ``values[i]`` over the entries ``i`` of segment ``s``:
        1-D, ``count`` entries, ``values``'s dtype and device."""
        if self.unique or _foreach.is_host_device(values.device):
            (segments,) = self._on(values.device, gather=False)
            return values.new_zeros(self.count).index_add_(0, segments, values)
        inverse, *gathers = self._on(values.device, gather=True)
        padded = torch.cat([values, values.new_zeros(1)])
        sums = [padded[index].sum(1) for index in gathers]
        return torch.cat([*sums, values.new_zeros(1)])[inverse]

    def _on(self, device: torch.device, gather: bool) -> list[Tensor]:
        """The index tensors on ``device``, built once (a host-to-device copy, which a CUDA
        graph capture cannot contain); while compiling, graph constants, not cached."""
        built = self._built.get((device, gather))
        if built is not None:
            return built
        if _foreach.capturing():
            raise RuntimeError(
                "gradclip needs index tensors it has not built yet inside a CUDA graph capture "
                "(building them is a host-to-device copy, which a capture cannot contain): run "
                "the captured step once before capturing it, with the same parameters"
            )
        lists = [self._inverse, *(b for _, b in self._buckets)] if gather else [self.segments]
        built = [torch.tensor(x, dtype=torch.long).to(device) for x in lists]
        if not _foreach.is_compiling():
            self._built[(device, gather)] = built
        return built


@dataclass
class UnitPlan:
    """How to measure the units of a set of tensors (cached per shapes, dtypes, exclusion).

    Tensors are measured in "unit order": included tensors first, excluded ones (a single
    unit each, never read as weights) last; each tensor's units are contiguous.

    Attributes:
        order: base index of the tensor at each unit-order position.
        counts: units of the tensor at each position.
        coef_shapes: shape of the coefficient view that broadcasts over that tensor.
        pieces: ``(positions, row_length)``: several small tensors concatenated and reduced
            as rows of one matrix (row_length > 0), or one tensor on its own (row_length 0).
        included: positions ``[0, included)`` are clipped.
        included_pieces: the first ``included_pieces`` pieces cover exactly those.
        excluded_units: units after the included ones.
        acc: dtype of the unit norms (float64 if any tensor is 64-bit, else float32).
    """

    order: list[int]
    counts: list[int]
    coef_shapes: list[tuple[int, ...]]
    pieces: list[tuple[list[int], int]]
    included: int
    included_pieces: int
    excluded_units: int
    acc: torch.dtype
    _segments: dict[torch.device, Tensor] = field(default_factory=dict)
    schedules: dict[tuple, tuple] = field(default_factory=dict)  # cached by its users (AGC)
    _sums: SegmentSums | None = None

    @classmethod
    def build(cls, tensors: list[Tensor], excluded: tuple[bool, ...]) -> UnitPlan:
        order: list[int] = []
        pieces: list[tuple[list[int], int]] = []
        included_pieces = 0
        for want_excluded in (False, True):
            batches: dict[tuple, list[int]] = {}
            singles: list[int] = []
            for i, t in enumerate(tensors):
                if excluded[i] != want_excluded:
                    continue
                rows = unit_rows(t, whole=want_excluded)
                numel = t.numel()
                if 0 < numel < SMALL_NUMEL and rows > 0:
                    batches.setdefault((t.device, t.dtype, numel // rows), []).append(i)
                else:
                    singles.append(i)
            for (_, _, length), members in batches.items():
                pieces.append((members, length if len(members) > 1 else 0))
            pieces.extend(([i], 0) for i in singles)
            if not want_excluded:
                included_pieces = len(pieces)
        remapped: list[tuple[list[int], int]] = []  # members as unit-order positions
        for members, length in pieces:
            remapped.append(([len(order) + k for k in range(len(members))], length))
            order.extend(members)
        included = sum(len(m) for m, _ in pieces[:included_pieces])
        rows = [unit_rows(tensors[i], whole=j >= included) for j, i in enumerate(order)]
        shapes = [
            (r, *(1,) * (tensors[i].dim() - 1)) if j < included and tensors[i].dim() >= 2 else ()
            for j, (i, r) in enumerate(zip(order, rows, strict=True))
        ]
        acc = torch.float32
        for t in tensors:
            if accumulation_dtype(t.dtype) == torch.float64:
                acc = torch.float64
        return cls(order, rows, shapes, remapped, included, included_pieces,
                   sum(rows[included:]), acc)

    def segments(self, device: torch.device) -> Tensor:
        """Base index of the tensor owning each unit (for per-tensor sums), on ``device``."""
        seg = self._segments.get(device)
        if seg is None:
            # From Python data, not repeat_interleave: its output size depends on tensor
            # values, which torch.compile (2.8) cannot trace.
            owners = [i for i, n in zip(self.order, self.counts, strict=True) for _ in range(n)]
            seg = torch.tensor(owners, dtype=torch.long, device=device)
            self._segments[device] = seg
        return seg

    def unit_norms(
        self, tensors: list[Tensor], device: torch.device, included_only: bool = False
    ) -> Tensor:
        """1-D unit norms (``acc`` dtype, on ``device``) in unit order; ``tensors`` in base order."""
        pieces = self.pieces[: self.included_pieces] if included_only else self.pieces
        if not pieces:
            return torch.zeros(0, dtype=self.acc, device=device)
        out = [self._piece(tensors, positions, length) for positions, length in pieces]
        out = [u if u.dtype == self.acc and u.device == device else u.to(device, self.acc)
               for u in out]
        units = torch.cat(out) if len(out) > 1 else out[0]
        if (
            _foreach.is_host_device(device)
            and not _foreach.is_compiling()
            and bool(torch.isinf(units).any())
        ):
            # Finite rows whose float32 sum of squares overflows read inf; on the CPU,
            # looking is free: measure those pieces again in float64 (see norms.total_norm).
            out = [u if not bool(torch.isinf(u).any()) else
                   self._piece(tensors, positions, length, wide=True).to(device, self.acc)
                   for u, (positions, length) in zip(out, pieces, strict=True)]
            units = torch.cat(out) if len(out) > 1 else out[0]
        return units

    def _piece(
        self, tensors: list[Tensor], positions: list[int], length: int, wide: bool = False
    ) -> Tensor:
        """The unit norms of one piece (see ``pieces``); ``wide``: from float64 copies."""
        members = [tensors[self.order[j]] for j in positions]
        if wide:
            members = [t.double() for t in members]
        if length:
            return row_norms(_foreach.flatten(members).view(-1, length))
        return unit_norms(members[0], whole=positions[0] >= self.included)

    def per_tensor_sums(self, values: Tensor) -> Tensor:
        """Sum ``values`` (one per unit, in unit order) per tensor: ``(n_tensors,)``, base order;
        bitwise the same on every run, on every device (see :class:`SegmentSums`)."""
        if _foreach.is_host_device(values.device):
            seg = self.segments(values.device)
            return values.new_zeros(len(self.order)).index_add_(0, seg, values)
        if self._sums is None:
            owners = [i for i, n in zip(self.order, self.counts, strict=True) for _ in range(n)]
            self._sums = SegmentSums(owners, len(self.order))
        return self._sums(values)


def unit_rows(t: Tensor, whole: bool) -> int:
    """Units of ``t``: rows along dim 0, or 1 for a 0-dim/1-D tensor (or a whole excluded one)."""
    return 1 if whole or t.dim() <= 1 else t.shape[0]


def row_norms(rows: Tensor) -> Tensor:
    """L2 norm of each row of a 2-D tensor, with float32 (or wider) results."""
    if rows.dtype == torch.bfloat16 and _foreach.is_host_device(rows.device):
        # The CPU's float32-result kernel is ~15x slower for bfloat16; the bfloat16 result
        # (float32 accumulation, rounded once) cannot overflow: bfloat16 has float32's range.
        return torch.linalg.vector_norm(rows, dim=1).float()
    if rows.dtype in (torch.float16, torch.bfloat16):
        return torch.linalg.vector_norm(rows, dim=1, dtype=torch.float32)
    return torch.linalg.vector_norm(rows, dim=1)


def unit_norms(t: Tensor, whole: bool) -> Tensor:
    """Unit norms of one tensor, without a copy for any memory layout."""
    if t.numel() == 0:
        return torch.zeros(unit_rows(t, whole), dtype=accumulation_dtype(t.dtype), device=t.device)
    if whole or t.dim() <= 1:
        if t.is_contiguous():
            return row_norms(t.view(1, -1))
        low = t.dtype in (torch.float16, torch.bfloat16)
        return torch.linalg.vector_norm(t, dtype=torch.float32 if low else None).reshape(1)
    if t.is_contiguous():
        return row_norms(t.view(t.shape[0], -1))
    low = t.dtype in (torch.float16, torch.bfloat16)  # e.g. channels_last convolution weights
    return torch.linalg.vector_norm(
        t, dim=tuple(range(1, t.dim())), dtype=torch.float32 if low else None
    )
