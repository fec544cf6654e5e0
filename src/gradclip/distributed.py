"""Global gradient norms across process groups and device meshes: the one distributed module.

Under data, tensor, sharded or pipeline parallelism each rank holds part of the gradients.
This module turns the engine's per-tensor norms of the *local* tensors into global ones,
identical on every rank, with one all-reduce per process group and no host sync:

* each tensor split across ranks gets a *slot*: its local norm raised to the p-th power (the
  norm itself for ``p = inf``, reduced with max instead of sum);
* each process group all-reduces the slots of the tensors split over it (one collective per
  group, whatever the number of tensors), so every rank ends with the p-th power of each
  whole tensor's norm: its root is the whole tensor's norm (``GradNorms.per_tensor``);
* the total is the norm of those per-tensor norms (and of the tensors that are whole on
  this rank), as on one process; the ``extra_groups`` then all-reduce its p-th power.

:func:`gradclip.get_total_norm` has no parameter list to align tensors by (its lists may
differ between ranks), so it sends one slot per *bucket* instead, the sum over the tensors
reduced over the same groups, and only its total is global.

Which groups a gradient is reduced over:

* a ``DTensor`` (FSDP2 ``fully_shard``, tensor parallel, HSDP, 2-D meshes): the mesh
  dimensions on which it is sharded (``Shard`` / ``_StridedShard``). ``Replicate``
  dimensions already hold the full value and are not reduced (a replicated TP bias is counted
  once, not once per rank); ``Partial`` gradients are redistributed to ``Replicate`` first;
* a plain tensor: none (replicated, as under DDP), unless ``shard_group`` says the plain
  tensors are shards over that group (FSDP1 ``FullyShardedDataParallel``, ZeRO);
* the total, then, over each of ``extra_groups`` (pipeline stages, expert parallel: groups
  whose ranks hold *different* parameters that no mesh describes).

The powers travel in float32 (float64 when a gradient is 64-bit). ``MAX`` all-reduces drop
NaN (gloo keeps whichever operand ``std::max`` returns), so the inf norm sends a NaN flag
next to each value and restores NaN after the collective: a NaN on one rank is NaN on all.

What every rank must agree on (as for any collective): the collectives a rank issues depend
only on the process groups involved (``shard_group``, ``extra_groups``, and the meshes and
placements of the DTensor gradients or parameters) and on the parameter list, never on the
values, the sizes of the local shards, or which gradients are ``None`` or empty. The slots
follow the parameter list, and a sharded parameter whose gradient is ``None`` on this rank
keeps its slot (with 0), so a per-tensor vector indexes the same tensors on every rank of a
group. Groups are visited in one global order (mesh dimensions by mesh layout and index,
other groups by their ranks), so ranks that share groups never wait on each other in a cycle
and a tensor sharded over two mesh dimensions is summed over them in the same order on
every rank. :func:`check_layout` verifies that agreement across ranks when in doubt (it
communicates and syncs; use it once, not every step).

When ``torch.distributed`` is not initialised, nothing here runs: the drop-ins and clippers
check :func:`is_active` once per call and take the single-process path.
"""

from __future__ import annotations

import math
import sys
import weakref
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any, Union

import torch
import torch.distributed as dist
from torch import Tensor

from gradclip import norms as _norms
from gradclip._cache import index_tensor

if TYPE_CHECKING:
    from torch.distributed import ProcessGroup
    from torch.distributed.device_mesh import DeviceMesh

__all__ = [
    "GroupLike",
    "Reduction",
    "applies",
    "as_tuple",
    "check_layout",
    "full_value",
    "global_norms",
    "is_active",
    "local_tensors",
    "nothing_measured",
    "plan",
    "row_groups",
    "schedule",
    "sum_over",
]

GroupLike = Union["ProcessGroup", "DeviceMesh"]
"""What ``extra_groups`` accepts: process groups, or device meshes (all their dimensions)."""

_SUM = dist.ReduceOp.SUM if dist.is_available() else None
_MAX = dist.ReduceOp.MAX if dist.is_available() else None


def is_active() -> bool:
    """True when ``torch.distributed`` is available and a default process group exists."""
    return dist.is_available() and dist.is_initialized()


def applies(shard_group: object, extra_groups: object) -> bool:
    """True when a norm must go through this module: a process group exists, or the caller
    named groups (which then must exist). False costs nothing on the single-process path."""
    return shard_group is not None or bool(extra_groups) or is_active()


def _dtensor_type() -> type | None:
    """``DTensor`` if it has been imported (no DTensor can exist otherwise), else None.

    Looking in ``sys.modules`` instead of importing keeps DDP-only programs from paying the
    import, and the per-gradient check to a dictionary lookup.
    """
    module = sys.modules.get("torch.distributed.tensor")
    return getattr(module, "DTensor", None) if module is not None else None


# ---------------------------------------------------------------------------------------
# argument checks: each names the argument, the value received and the fix


def _check_group(group: object, name: str) -> list[ProcessGroup]:
    """The process groups that ``group`` (a ProcessGroup or a DeviceMesh) stands for."""
    if isinstance(group, int) and group == dist.GroupMember.NON_GROUP_MEMBER:
        raise ValueError(
            f"`{name}`: rank {dist.get_rank()} is not a member of this process group "
            "(`new_group` returned NON_GROUP_MEMBER here). Pass a group that contains every "
            "rank calling the clip, e.g. the data-parallel group of this rank's stage."
        )
    mesh_type = getattr(sys.modules.get("torch.distributed.device_mesh"), "DeviceMesh", None)
    if mesh_type is not None and isinstance(group, mesh_type):
        return [group.get_group(i) for i in range(group.ndim)]
    if isinstance(group, dist.ProcessGroup):
        if group.rank() < 0:
            raise ValueError(
                f"`{name}`: rank {dist.get_rank()} is not a member of process group "
                f"{_ranks(group)}; pass a group that contains this rank"
            )
        return [group]
    raise TypeError(
        f"`{name}` must be a torch.distributed ProcessGroup or DeviceMesh, got "
        f"{type(group).__name__} {group!r:.80}; pass e.g. `dist.new_group(ranks)` or "
        "`mesh['pp']`"
    )


def as_tuple(extra_groups: Iterable[GroupLike] | GroupLike) -> tuple:
    """``extra_groups`` as a tuple: one group or mesh, or an iterable of them (unchecked)."""
    mesh_type = getattr(sys.modules.get("torch.distributed.device_mesh"), "DeviceMesh", None)
    single = isinstance(extra_groups, (str, bytes)) or (
        dist.is_available() and isinstance(extra_groups, dist.ProcessGroup)
    ) or (mesh_type is not None and isinstance(extra_groups, mesh_type))
    if single:
        return (extra_groups,)
    try:
        return tuple(extra_groups)  # type: ignore[arg-type]
    except TypeError:
        return (extra_groups,)


def _extra(extra_groups: Iterable[GroupLike] | GroupLike) -> list[ProcessGroup]:
    out: list[ProcessGroup] = []
    for i, item in enumerate(as_tuple(extra_groups)):
        out.extend(_check_group(item, f"extra_groups[{i}]"))
    return out


def _ranks(group: ProcessGroup) -> tuple[int, ...]:
    return tuple(dist.get_process_group_ranks(group))


def _order_key(group: ProcessGroup, mesh_keys: dict[int, tuple] | None = None) -> tuple:
    """The group's place in the one order every rank visits groups in.

    Two requirements. Deadlock freedom: the key must be the same on all members of the
    group (a global order). Correct sums: a slot sharded over two mesh dimensions is
    reduced over one, then the other, and the ranks that meet in the second must all have
    done the first, so every rank must visit a mesh's dimensions in the same order. Sorting
    by the groups' own ranks fails that ((dp=2, tp=2): rank 0 sees tp={0,1} < dp={0,2},
    rank 2 sees dp={0,2} < tp={2,3}); a mesh dimension is therefore keyed by its mesh (the
    global layout, identical on all its ranks) and its index, see ``_mesh_key``.
    """
    if mesh_keys is not None and id(group) in mesh_keys:
        return mesh_keys[id(group)]
    return (1, _ranks(group), str(getattr(group, "group_name", "")))


def _mesh_key(mesh: Any, dim: int) -> tuple:
    """``(0, -size, layout, shape, dim)``: the same on every rank of the mesh. A group that
    is a dimension of several meshes (a sub-mesh and its parent) takes the smallest key, the
    largest mesh's, which all its members see alike."""
    base = _MESH_KEYS.get(mesh)
    if base is None:  # read once per mesh (a CPU tensor: no device sync, none after that)
        layout = tuple(mesh.mesh.flatten().tolist())
        base = _MESH_KEYS[mesh] = (0, -len(layout), layout, tuple(mesh.mesh.shape))
    return (*base, dim)


_MESH_KEYS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


# ---------------------------------------------------------------------------------------
# the plan: which tensors this rank measures and how their norms combine


Schedule = list[tuple["ProcessGroup", Tensor | None]]
"""What :func:`sum_over` runs: per process group, in the global order, the entries to sum
over it (an index tensor, or None for all of them)."""


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
        order: the order keys of the mesh-dimension groups (see ``_order_key``).
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
        values = _powers(measured.per_tensor, p)
        slots = self._exchange(values, is_max)
        if not self.whole:
            whole = _subset(values, self._unslotted())
            total = self._finish(_combine(torch.cat([slots, whole]), is_max), is_max, p)
            return replace(measured, total=total)
        per_tensor = self._per_row(measured.per_tensor, _root(slots, p))
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
            return torch.linalg.vector_norm(per_tensor, p)
        _check_norm_type(p)
        is_max = math.isinf(p)
        values = _powers(per_tensor, p)
        if not self.whole:
            whole = _subset(values, self._unslotted())
            values = torch.cat([self._exchange(values, is_max), whole])
        return self._finish(_combine(values, is_max), is_max, p)

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
        index = index_tensor(tuple(self.slot[i] for i in taken), values.device)
        if not is_max:
            return values.new_zeros(self.slots).index_add_(0, index, values)
        nan = torch.isnan(values)
        parts = values.new_zeros(self.slots).scatter_reduce_(
            0, index, torch.where(nan, 0.0, values), "amax", include_self=True
        )
        flags = values.new_zeros(self.slots).index_add_(0, index, nan.to(values.dtype))
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
            total = _all_reduce(total, is_max, group)
        return _root(total, p)


def _subset(values: Tensor, positions: tuple[int, ...]) -> Tensor:
    """``values[positions]`` for increasing ``positions``; no index tensor for all or none."""
    if len(positions) == len(values):
        return values
    if not positions:
        return values[:0]
    return values[index_tensor(positions, values.device)]


def _powers(norms: Tensor, p: float) -> Tensor:
    """What adds up across ranks: ``norms ** p`` (the norms themselves for ``p = inf``)."""
    if math.isinf(p) or p == 1:
        return norms
    return norms.square() if p == 2 else norms.pow(p)


def _root(total: Tensor, p: float) -> Tensor:
    """The inverse of :func:`_powers`."""
    if math.isinf(p) or p == 1:
        return total
    return total.sqrt() if p == 2 else total.pow(1.0 / p)


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


def _all_reduce(values: Tensor, is_max: bool, group: ProcessGroup) -> Tensor:
    """All-reduce ``values`` over ``group``: SUM, or a MAX that keeps NaN (returns a tensor)."""
    if not is_max:
        values = values.clone()  # never reduce into the caller's tensor
        dist.all_reduce(values, op=_SUM, group=group)
        return values
    shape = values.shape
    flat = values.reshape(-1)
    nan = torch.isnan(flat)
    packed = torch.cat([torch.where(nan, 0.0, flat), nan.to(flat.dtype)])
    dist.all_reduce(packed, op=_MAX, group=group)
    n = flat.numel()
    return torch.where(packed[n:] > 0, math.nan, packed[:n]).reshape(shape)


def _dtensor_groups(tensor: Any, cache: dict, mesh_keys: dict[int, tuple]) -> tuple:
    """The process groups of the mesh dimensions a DTensor is sharded over (cached per call);
    records each group's order key in ``mesh_keys``."""
    mesh, placements = tensor.device_mesh, tuple(tensor.placements)
    key = (id(mesh), placements)
    groups = cache.get(key)
    if groups is None:
        dims = [i for i, pl in enumerate(placements) if not pl.is_replicate()]
        groups = cache[key] = tuple(mesh.get_group(i) for i in dims)
        for i, group in zip(dims, groups, strict=True):
            order = _mesh_key(mesh, i)
            if id(group) not in mesh_keys or order < mesh_keys[id(group)]:
                mesh_keys[id(group)] = order
    return groups


def _localize(tensor: Any) -> Any:
    """A DTensor whose placements hold no ``Partial`` (those are summed first: a collective)."""
    if any(pl.is_partial() for pl in tensor.placements):
        from torch.distributed.tensor import Replicate

        tensor = tensor.redistribute(
            tensor.device_mesh,
            [Replicate() if pl.is_partial() else pl for pl in tensor.placements],
        )
    return tensor


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


@torch.no_grad()  # DTensor.to_local() is an autograd op otherwise: ~6 µs a tensor
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
    shard = _check_group(shard_group, "shard_group") if shard_group is not None else []
    extra = _extra(extra_groups)
    dtensor = _dtensor_type()
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
                t = _localize(t)
            key = _dtensor_groups(t, cache, mesh_keys)
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


# ---------------------------------------------------------------------------------------
# what the drop-ins call


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


def row_groups(param: Tensor, whole: bool, order: dict[int, tuple]) -> tuple[tuple, tuple]:
    """For a clipper that decides per row along dim 0 (AGC): ``(split, spread)``, the process
    groups over which each row of ``param`` is cut in pieces (their sums must be added) and
    those over which its rows are dealt out (each rank holds other rows). ``whole``: the
    tensor is one unit (0-/1-D, or excluded), cut by every shard. A plain tensor: neither.
    Records each group's order key in ``order`` (see :func:`schedule`)."""
    dtensor = _dtensor_type()
    if dtensor is None or not isinstance(param, dtensor):
        return (), ()
    mesh = param.device_mesh
    split, spread = [], []
    for i, placement in enumerate(param.placements):
        if placement.is_replicate():  # Shard and _StridedShard (whose is_shard() is False)
            continue
        group = mesh.get_group(i)
        key = _mesh_key(mesh, i)
        if id(group) not in order or key < order[id(group)]:
            order[id(group)] = key
        rows = not whole and placement.dim % param.dim() == 0
        (spread if rows else split).append(group)
    return tuple(split), tuple(spread)


def schedule(
    keys: Sequence[tuple], entries: Sequence[Sequence[int]], n: int, device: torch.device,
    order: dict[int, tuple],
) -> Schedule:
    """The :func:`sum_over` schedule of ``n`` entries: ``entries[k]`` are summed over each
    process group of ``keys[k]``. Groups are visited in the global order of
    ``_order_key``, the same on every rank, so no two ranks wait on each other in a cycle."""
    return [
        (group, None if len(positions) == n else index_tensor(tuple(positions), device))
        for group, positions in _by_group(keys, entries, order)
    ]


def _by_group(
    keys: Sequence[tuple], entries: Sequence[Sequence[int]], order: dict[int, tuple]
) -> list[tuple[ProcessGroup, list[int]]]:
    """Per process group, in the global order (``_order_key``), the sorted positions of the
    ``entries`` whose key holds it."""
    members: dict[int, tuple[ProcessGroup, list[int]]] = {}
    for key, positions in zip(keys, entries, strict=True):
        for group in key:
            members.setdefault(id(group), (group, []))[1].extend(positions)
    ordered = sorted(members.values(), key=lambda m: _order_key(m[0], order))
    return [(group, sorted(positions)) for group, positions in ordered]


def sum_over(values: Tensor, plan: Schedule, is_max: bool = False) -> Tensor:
    """``values`` (entries along dim 0) with each entry summed (``is_max``: NaN-keeping max)
    over its groups: a new tensor."""
    for group, index in plan:
        if index is None:
            values = _all_reduce(values, is_max, group)
        else:
            values = values.index_copy(0, index, _all_reduce(values[index], is_max, group))
    return values


@torch.no_grad()  # see plan
def local_tensors(tensors: list[Tensor]) -> list[Tensor]:
    """``tensors`` with each DTensor replaced by its local shard (to scale or clamp in place).

    Scaling the local tensors is exact for every placement (a coefficient is the same on all
    ranks), needs no DTensor dispatch, and works for lists mixing DTensors and plain tensors
    or DTensors on several meshes, where ``torch._foreach_mul_`` on the DTensors raises.
    """
    dtensor = _dtensor_type()
    if dtensor is None:
        return tensors
    return [t.to_local() if isinstance(t, dtensor) else t for t in tensors]


def full_value(total: Tensor) -> Tensor:
    """A total norm as a plain tensor: a DTensor (torch's own norm under FSDP2/TP) made whole."""
    dtensor = _dtensor_type()
    if dtensor is not None and isinstance(total, dtensor):
        return total.full_tensor()
    return total


# ---------------------------------------------------------------------------------------
# diagnosis


def check_layout(
    parameters: Tensor | Iterable[Tensor],
    *,
    shard_group: ProcessGroup | None = None,
    extra_groups: Iterable[GroupLike] | GroupLike = (),
) -> None:
    """Check, across all ranks, that a clip with these arguments issues matching collectives.

    Every rank must call it (it gathers a short description of each rank's reductions with
    ``all_gather_object``: a host sync, and numpy is needed). It raises ``ValueError`` naming
    the ranks and the group when they disagree: a ``shard_group`` given on some ranks only or
    naming different groups, different ``extra_groups``, DTensor gradients on a mesh that
    some ranks do not see, or ranks of one group holding different parameters (the clippers
    and :func:`gradclip.grad_norms` reduce per-tensor norms tensor by tensor, aligned by the
    parameter list; the drop-ins reduce only the total and, like torch's, accept different
    tensors per rank, e.g. ZeRO-style partitions). Run it once after
    building the model, not every step: a mismatch in a clip call itself hangs (until the
    process-group timeout) like any mismatched collective.

    Example::

        gradclip.distributed.check_layout(model.parameters(), extra_groups=[pp_group])
    """
    params = [parameters] if isinstance(parameters, Tensor) else list(parameters)
    grads = list({id(q.grad): q.grad for q in params if q.grad is not None}.values())
    reduction = plan(grads, shard_group=shard_group, extra_groups=extra_groups, params=params,
                     per_tensor=True)
    originals = reduction.rows_of(grads, params)
    wide = any(_norms.accumulation_dtype(t.dtype) == torch.float64 for t in reduction.local)
    dtype = (torch.float64 if wide else torch.float32) if reduction.local else None
    mine = {
        "schedule": [
            ((_ranks(g), _order_key(g, reduction.order)), _describe(
                reduction, originals, range(reduction.slots) if slots is None else slots.tolist()))
            for g, slots in reduction.schedule
        ],
        "extra": [(_ranks(g), _order_key(g)) for g in reduction.extra],
        "dtype": str(dtype),
    }
    everyone: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(everyone, mine)
    problems = []
    for rank, theirs in enumerate(everyone):
        for key, n in theirs["schedule"]:
            for other in key[0]:
                entries = dict(everyone[other]["schedule"])
                if entries.get(key) != n:
                    found = _count(entries[key]) if key in entries else "never reduces over it"
                    problems.append(
                        f"rank {rank} all-reduces {_count(n)} over group {list(key[0])}, "
                        f"rank {other} {found}"
                    )
        for key in theirs["extra"]:
            for other in key[0]:
                if theirs["extra"] != everyone[other]["extra"]:
                    problems.append(
                        f"rank {rank} passes `extra_groups` "
                        f"{[list(k[0]) for k in theirs['extra']]}, rank {other} "
                        f"{[list(k[0]) for k in everyone[other]['extra']]}"
                    )
    dtypes = {e["dtype"] for e in everyone} - {"None"}
    if len(dtypes) > 1:  # the same on every rank, so every rank raises (none is left waiting)
        problems.append(f"the ranks reduce norms in different dtypes {sorted(dtypes)}")
    if problems:
        shown = "; ".join(dict.fromkeys(problems))
        raise ValueError(
            f"the ranks disagree on the gradient-norm reduction: {shown:.1500}. Every rank must "
            "pass the same `shard_group` / `extra_groups` (with the same members) and the same "
            "parameters, with gradients on the same meshes; a clip call in this state would "
            "hang."
        )


def _describe(reduction: Reduction, originals: list[Tensor], slots: Iterable[int]) -> tuple[str, ...]:
    """What ``slots`` hold, comparable across ranks: a DTensor's global shape, else "shard"."""
    dtensor = _dtensor_type()
    held = (originals[reduction.slot_rows[s]] for s in slots)
    return tuple(
        str(tuple(t.shape)) if dtensor is not None and isinstance(t, dtensor) else "shard"
        for t in held
    )


def _count(described: tuple[str, ...]) -> str:
    shown = ", ".join(described[:6]) + (", ..." if len(described) > 6 else "")
    return f"{len(described)} tensor norm(s) [{shown}]"
