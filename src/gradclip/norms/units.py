"""Unit norms: the norm of each row of each tensor, the kernel of AGC's clipping.

A *unit* is a row along dim 0 of a tensor in the PyTorch weight layout (an output feature of
``nn.Linear``, an output channel of ``nn.ConvNd``, a token row of ``nn.Embedding``); a 0-dim
or 1-D tensor, or one measured whole, is a single unit. :class:`UnitPlan` measures the units
of a list of tensors in one pass: small tensors that share a row length are concatenated and
reduced by one kernel, larger ones by one row-norm kernel each; results are float32 (float64
for 64-bit tensors), with float32 accumulation for low-precision tensors.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor

from gradclip import _foreach
from gradclip.norms._host import SMALL_NUMEL, accumulation_dtype

__all__ = ["UnitPlan", "row_norms", "unit_norms", "unit_rows"]


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
            seg = torch.repeat_interleave(
                torch.tensor(self.order, dtype=torch.long), torch.tensor(self.counts, dtype=torch.long)
            ).to(device)
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
        """Sum ``values`` (one per unit, in unit order) per tensor: ``(n_tensors,)``, base order."""
        seg = self.segments(values.device)
        return values.new_zeros(len(self.order)).index_add_(0, seg, values)


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
