"""The reduction plan: which tensors this rank measures and how their norms become global
ones, identical on every rank (see :mod:`gradclip.distributed`)."""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from gradclip import _foreach
from gradclip import norms as _norms
from gradclip._cache import LRU, index_tensor
from gradclip.distributed.groups import (
    GroupLike,
    Schedule,
    all_reduce,
    check_group,
    dtensor_groups,
    dtensor_type,
    extra_groups_of,
    is_active,
    localize,
    schedule,
    sum_over,
)
from gradclip.norms.units import SegmentSums

if TYPE_CHECKING:
    from torch.distributed import ProcessGroup

__all__ = ["Reduction", "global_norms", "nothing_measured", "plan"]


@dataclass(frozen=True)
class Reduction:
    """How the per-tensor norms of one call become global norms on this rank.

    Built by :func:`plan`. The tensors to measure are :attr:`local` (plain tensors: the local
    shards of DTensors, and no empty tensors, whose norm is 0 and which need no scaling).
    :meth:`reduce` turns their norms into global ones.

    What crosses ranks are *slots*, one value each (a sum of p-th powers, or a max for the inf
    norm), all-reduced over the process groups of the slot's key:

    * ``per_tensor`` (the clippers, :func:`gradclip.grad_norms`, the clip drop-ins): one slot
      per tensor split across ranks, so each tensor's norm becomes the whole tensor's;
    * otherwise (:func:`gradclip.get_total_norm`): one slot per key, the sum over the tensors
      reduced over the same groups (only the total becomes global).

    Tensors whole on this rank (replicated ones, a stage's own under ``extra_groups``) are in
    no slot: their norms are already global.

    Attributes:
        local: the non-empty local tensors, in parameter order.
        kept: for each of ``local``, its index in the input list.
        slot: for each of ``local``, its slot, or -1 when it is whole on this rank.
        schedule: ``(group, slots)`` in the global group order, one all-reduce each (see
            :func:`sum_over`; ``slots`` an index tensor, or None for every slot).
        extra: the groups the total is then reduced over, in the caller's order.
        rows: what :meth:`reduce` reports a norm for, in order: an index in the input list,
            or ``len(tensors) + j`` for ``params[j]``, a sharded parameter whose gradient is
            None on this rank. With ``per_tensor``, every tensor split across ranks (the same
            list on every rank of its groups) and every non-empty whole one; else ``kept``.
        row_of: for each of ``local``, its row.
        slot_rows: with ``per_tensor``, the row of each slot (a split tensor); else empty.
        row_tensors: for each row, this rank's local tensor (empty where it holds none).
        order: the order keys of the mesh-dimension groups (see ``order_key``).
        slots: how many slots there are (on every rank of their groups alike).
        device: where the norms are: this rank's first tensor's, else its parameters'.
    """

    local: list[Tensor]
    kept: list[int]
    slot: list[int]
    schedule: Schedule
    extra: list[ProcessGroup]
    rows: list[int]
    row_of: list[int]
    slot_rows: list[int]
    row_tensors: list[Tensor]
    order: dict[int, tuple]
    slots: int
    device: torch.device

    @property
    def communicates(self) -> bool:
        """Whether :meth:`reduce` and :meth:`total` issue any collective."""
        return bool(self.schedule or self.extra)

    @property
    def whole(self) -> bool:
        """Whether :meth:`reduce` reports whole-tensor norms per row (not the local ones)."""
        return bool(self.slot_rows)

    def reduce(self, measured: _norms.GradNorms) -> _norms.GradNorms:
        """``measured`` (the engine's pass over :attr:`local`) made global.

        With ``per_tensor`` and tensors split across ranks, the result has one entry per row:
        ``per_tensor`` the whole tensors' norms and ``tensors`` this rank's parts (identical
        norms on every rank), ``total`` their norm over every rank. Otherwise only ``total``
        changes, and when nothing needs reducing (DDP) ``measured`` itself is returned, so
        the result is the single-process one bit for bit.
        """
        if not self.communicates:
            return measured
        p = measured.norm_type
        _check_norm_type(p)
        is_max = math.isinf(p)
        dtype = measured.per_tensor.dtype
        values = _norms.powers(measured.per_tensor, p)
        slots = self._exchange(values, is_max)
        if not self.whole:
            whole = _subset(values, self._unslotted())
            total = self._finish(_combine(torch.cat([slots, whole]), is_max), is_max, p)
            return replace(measured, total=total.to(dtype))
        per_tensor = self._per_row(measured.per_tensor, _norms.root(slots, p).to(dtype))
        groups = measured.groups
        if len(self.rows) != len(self.local):  # some rows are held by other ranks only
            groups = {
                key: (group, [self.row_of[i] for i in indices])
                for key, (group, indices) in groups.items()
            }
        return replace(measured, tensors=self.row_tensors, per_tensor=per_tensor,
                       total=self.total(per_tensor, p), groups=groups)

    def total(self, per_tensor: Tensor, p: float) -> Tensor:
        """The global ``p``-norm (0-dim) from norms parallel to what :meth:`reduce` returned.

        With whole-tensor rows (:attr:`whole`) only ``extra_groups`` remain to reduce over;
        otherwise ``per_tensor`` holds the norms of :attr:`local` and takes the whole
        reduction. Without collectives this is ``vector_norm(per_tensor, p)``, the
        single-process total.
        """
        if not self.communicates or (self.whole and not self.extra):
            return _norms.total_norm(per_tensor, p)
        _check_norm_type(p)
        is_max = math.isinf(p)
        values = _norms.powers(per_tensor, p)
        if not self.whole:
            whole = _subset(values, self._unslotted())
            values = torch.cat([self._exchange(values, is_max), whole])
        return self._finish(_combine(values, is_max), is_max, p).to(per_tensor.dtype)

    def select(self, items: Sequence[Any]) -> list[Any]:
        """The entries of ``items`` (parallel to the input tensors) that :attr:`local` kept."""
        return [items[i] for i in self.kept]

    def rows_of(self, items: Sequence[Any], param_items: Sequence[Any] = ()) -> list[Any]:
        """The entries of ``items`` (parallel to the input tensors) and of ``param_items``
        (parallel to ``params``) in the order of :attr:`rows`: what a name or parameter list
        must be to match the result of :meth:`reduce`."""
        n = len(items)
        return [items[i] if i < n else param_items[i - n] for i in self.rows]

    def _exchange(self, values: Tensor, is_max: bool) -> Tensor:
        """The slots of this rank's ``values`` (p-th powers of :attr:`local`'s norms),
        all-reduced: identical on every rank of each slot's groups (1-D)."""
        return sum_over(self._slot_values(values, is_max), self.schedule, is_max)

    def _slot_values(self, values: Tensor, is_max: bool) -> Tensor:
        """Per-slot sum (or NaN-propagating max) of ``values``: 1-D, zeros where this rank
        holds nothing."""
        if self.slots == len(values) and self.slot == list(range(self.slots)):
            return values  # one slot per local tensor, in order (FSDP2 without empty shards)
        taken = tuple(i for i, s in enumerate(self.slot) if s >= 0)
        if not taken:
            return values.new_zeros(self.slots)
        values = _subset(values, taken)
        slots = tuple(self.slot[i] for i in taken)
        if not is_max:  # several tensors per slot: a sum in a fixed order, also on CUDA
            key = (slots, self.slots)
            return _SLOT_SUMS.get_or_build(key, lambda: SegmentSums(*key))(values)
        # a max is exact in any order, and so is a max of NaN flags
        index = index_tensor(slots, values.device)
        nan = torch.isnan(values)
        parts = values.new_zeros(self.slots).scatter_reduce_(
            0, index, torch.where(nan, 0.0, values), "amax", include_self=True
        )
        flags = values.new_zeros(self.slots).scatter_reduce_(
            0, index, nan.to(values.dtype), "amax", include_self=True
        )
        return torch.where(flags > 0, math.nan, parts)

    def _unslotted(self) -> tuple[int, ...]:
        return tuple(i for i, s in enumerate(self.slot) if s < 0)

    def _per_row(self, local_norms: Tensor, slot_norms: Tensor) -> Tensor:
        """One norm per row: the whole tensors' from the slots, the others' as measured."""
        if len(self.slot_rows) == len(self.rows):
            return slot_norms  # every row is a split tensor, in slot order
        out = local_norms.new_zeros(len(self.rows))
        if len(local_norms):
            out.index_copy_(0, index_tensor(tuple(self.row_of), out.device), local_norms)
        index = index_tensor(tuple(self.slot_rows), out.device)
        return out.index_copy_(0, index, slot_norms)

    def _finish(self, total: Tensor, is_max: bool, p: float) -> Tensor:
        """The p-th root of ``total`` after the ``extra_groups`` all-reduce."""
        for group in self.extra:
            total = all_reduce(total, is_max, group)
        return _norms.root(total, p)


_SLOT_SUMS: LRU[tuple[tuple[int, ...], int], SegmentSums] = LRU(64)
"""The per-slot sums of each layout, built once (a :class:`Reduction` is planned per call)."""


def _subset(values: Tensor, positions: tuple[int, ...]) -> Tensor:
    """``values[positions]`` for increasing ``positions``; no index tensor for all or none."""
    if len(positions) == len(values):
        return values
    if not positions:
        return values[:0]
    return values[index_tensor(positions, values.device)]


def _combine(values: Tensor, is_max: bool) -> Tensor:
    """Sum (or NaN-propagating max) of 1-D ``values``; 0 when empty."""
    if not len(values):
        return values.new_zeros(())
    return values.amax() if is_max else values.sum()


def _check_norm_type(p: float) -> None:
    if not p > 0:  # 0, negative, -inf and nan
        raise ValueError(
            f"`norm_type`={p} cannot be reduced across ranks: "
            + ("norm_type=0 counts non-zero tensors, and a sharded tensor is non-zero on "
               "some ranks only" if p == 0 else "only positive orders add up across shards")
            + "; use a positive norm_type such as 2.0, 1.0 or inf"
        )


def _sources(tensors: Sequence[Tensor], params: list[Tensor]) -> list[int]:
    """The input positions in parameter order, with ``len(tensors) + j`` for ``params[j]``
    when it takes a gradient but has none on this rank; tensors no parameter holds come last.

    Every rank of a group holds the same parameters, so this order is the same on all of them
    whichever gradients exist: it is what a per-tensor all-reduce is aligned by.
    """
    n = len(tensors)
    if not params:
        return list(range(n))
    at = {id(t): i for i, t in enumerate(tensors)}
    order: list[int] = []
    done: set[int] = set()
    seen: set[int] = set()
    for j, q in enumerate(params):
        if id(q) in seen:
            continue
        seen.add(id(q))
        grad = q.grad
        if grad is None:
            if q.requires_grad:
                order.append(n + j)
            continue
        i = at.get(id(grad))
        if i is not None and i not in done:
            done.add(i)
            order.append(i)
    if len(done) < n:
        order.extend(i for i in range(n) if i not in done)
    return order


@_foreach.no_grad  # DTensor.to_local() is an autograd op otherwise: ~6 µs a tensor
def plan(
    tensors: Sequence[Tensor],
    *,
    shard_group: ProcessGroup | None = None,
    extra_groups: Iterable[GroupLike] | GroupLike = (),
    params: Iterable[Tensor] = (),
    whole_tensors: str | None = None,
    per_tensor: bool = False,
) -> Reduction:
    """How this rank measures ``tensors`` and reduces their norms (see :class:`Reduction`).

    Args:
        tensors: the distinct gradients (plain tensors or DTensors).
        shard_group: plain tensors are shards over this group (FSDP1, ZeRO).
        extra_groups: groups (or meshes) the total is also reduced over (pipeline stages).
        params: the parameters these gradients belong to, the same list on every rank (a
            sharded parameter whose gradient is ``None`` on this rank still takes part in
            its groups' collectives, with 0, so every rank issues the same collectives).
        whole_tensors: the name of a clipper that decides per row of a tensor (AGC): raise
            for plain shards (``shard_group``), whose rows cannot be told apart.
        per_tensor: reduce each split tensor's norm, not only the total: one value per tensor
            in the all-reduce. The per-tensor vector is aligned by ``params`` (or by
            ``tensors`` when none are given), which must then be the same on every rank.
    """
    if not is_active():
        raise ValueError(
            f"`shard_group`={shard_group!r:.60} / `extra_groups`={extra_groups!r:.60} were given "
            "but torch.distributed is not initialised; call "
            "`torch.distributed.init_process_group(...)` first, or drop these arguments"
        )
    shard = check_group(shard_group, "shard_group") if shard_group is not None else []
    extra = extra_groups_of(extra_groups)
    dtensor = dtensor_type()
    params = list(params)
    n = len(tensors)
    cache: dict = {}
    mesh_keys: dict[int, tuple] = {}
    plain_key = tuple(shard)
    # a bucket per key (without per_tensor); the plain shards' is there on every rank
    buckets: dict[tuple, int] = {plain_key: 0} if shard and not per_tensor else {}
    slot_keys: list[tuple] = list(buckets)
    local: list[Tensor] = []
    kept: list[int] = []
    slot: list[int] = []
    row_of: list[int] = []
    rows: list[int] = []
    slot_rows: list[int] = []
    row_tensors: list[Tensor] = []
    aligned = bool(shard) or dtensor is not None  # else nothing is split: input order will do
    for source in _sources(tensors, params) if aligned else range(n):
        t = tensors[source] if source < n else params[source - n]
        if dtensor is not None and isinstance(t, dtensor):
            if source < n:
                t = localize(t)
            key = dtensor_groups(t, cache, mesh_keys)
            t = t.to_local()
        else:
            key = plain_key
        if source >= n:  # no gradient on this rank
            if not key:
                continue
            t = torch.empty(0, dtype=t.dtype, device=t.device)
        s = -1  # its slot: its own with per_tensor, else its key's bucket
        if key:
            s = len(slot_keys) if per_tensor else buckets.setdefault(key, len(slot_keys))
            if s == len(slot_keys):
                slot_keys.append(key)
        split = s >= 0 and per_tensor
        if split or t.numel():
            if split:
                slot_rows.append(len(rows))
            rows.append(source)
            row_tensors.append(t)
        if t.numel():
            local.append(t)
            kept.append(source)
            slot.append(s)
            row_of.append(len(rows) - 1)
    device = local[0].device if local else _default_device(tensors, params) or torch.device("cpu")
    slots = schedule(slot_keys, [[s] for s in range(len(slot_keys))], len(slot_keys), device,
                     mesh_keys)
    if whole_tensors is not None and shard:
        raise NotImplementedError(
            f"{whole_tensors} decides per row of a tensor, but with `shard_group` the plain "
            "gradients are flat shards (FSDP1, ZeRO) whose rows no rank can tell apart. Use "
            f"{whole_tensors} with DDP, FSDP2 / tensor parallel (DTensor parameters), or "
            "pipeline stages (`extra_groups`); or a clipper that works on flat shards (NormClip, "
            "AutoClip, ZClip, AdaptiveClip, AdaGC)."
        )
    return Reduction(local, kept, slot, slots, extra, rows, row_of, slot_rows, row_tensors,
                     mesh_keys, len(slot_keys), device)


def global_norms(
    tensors: Sequence[Tensor],
    p: float,
    foreach: bool | None,
    *,
    shard_group: ProcessGroup | None = None,
    extra_groups: Iterable[GroupLike] | GroupLike = (),
    params: Iterable[Tensor] = (),
    per_tensor: bool = False,
) -> _norms.GradNorms:
    """The engine's pass over this rank's local tensors, with global norms.

    ``tensors``: distinct gradients (plain or DTensor). ``total`` is the norm of the whole
    model: a plain 0-dim tensor, identical on every rank. With ``per_tensor`` (aligned by
    ``params``, the same list on every rank), ``per_tensor`` holds the norm of each whole
    tensor, identical on every rank, and ``tensors`` this rank's part of each (empty where
    it holds none; a sharded parameter whose gradient is None here still has its entry);
    otherwise ``tensors`` are the non-empty local tensors and ``per_tensor`` their local
    norms. Scale ``groups`` to clip.

    Example (on every rank of an FSDP1 job)::

        norms = global_norms(grads, 2.0, None, shard_group=dist.group.WORLD)
    """
    params = list(params)
    reduction = plan(tensors, shard_group=shard_group, extra_groups=extra_groups, params=params,
                     per_tensor=per_tensor)
    if reduction.local:
        measured = _norms.compute(reduction.local, p, foreach)
    else:
        measured = nothing_measured(p, reduction.device)
    return reduction.reduce(measured)


def nothing_measured(p: float, device: torch.device) -> _norms.GradNorms:
    """The norms of nothing on ``device`` (:attr:`Reduction.device`), for a rank without
    local gradients that still takes part in the collectives (NCCL needs them on the GPU)."""
    measured = _norms.empty_norms(p)
    return replace(measured, per_tensor=measured.per_tensor.to(device),
                   total=measured.total.to(device))


def _default_device(tensors: Sequence[Tensor], params: Iterable[Tensor]) -> torch.device | None:
    """Where a rank with nothing to measure keeps its zeros: beside its tensors or parameters."""
    for t in tensors:
        return t.device
    for q in params:
        return q.device
    return None
