"""Global gradient norms across process groups and device meshes: the one distributed module.

Under data, tensor, sharded or pipeline parallelism each rank holds part of the gradients.
This module turns the engine's per-tensor norms of the *local* tensors into the norm of the
whole model, identical on every rank, with one all-reduce per process group and no host
sync:

* the local norms are raised to the p-th power and summed per *bucket*: the tensors that are
  reduced over the same process groups (max instead of sum for ``p = inf``);
* each process group all-reduces the partial sums of the buckets that reduce over it (one
  collective per group, whatever the number of tensors);
* the buckets are summed, the ``extra_groups`` all-reduce that total, and the p-th root is
  taken.

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
placements of the DTensor gradients or parameters), never on the values, the sizes of the
local shards, or which plain gradients are ``None``; groups are visited in one global order
(mesh dimensions by mesh layout and index, other groups by their ranks), so ranks that share
groups never wait on each other in a cycle and a bucket sharded over two mesh dimensions is
summed over them in the same order on every rank. An empty local shard contributes zero. :func:`check_layout` verifies that agreement
across ranks when in doubt (it communicates and syncs; use it once, not every step).

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
    "plan",
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
    group (a global order). Correct sums: a bucket sharded over two mesh dimensions is
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


@dataclass(frozen=True)
class Reduction:
    """How the per-tensor norms of one call combine into the global norm on this rank.

    Built by :func:`plan`. The tensors to measure are :attr:`local` (plain tensors: the local
    shards of DTensors, and no empty tensors, whose norm is 0 and which need no scaling).

    Attributes:
        local: the non-empty local tensors, in input order.
        kept: for each of ``local``, its index in the input list.
        bucket: for each of ``local``, its bucket (index into ``keys``).
        keys: per bucket, the process groups its partial sum is reduced over (``()``: none).
        schedule: ``(group, buckets)`` in the global group order: one all-reduce each.
        extra: the groups the total is then reduced over, in the caller's order.
        sharded: some bucket is split across ranks, so a per-tensor norm in
            :attr:`GradNorms.per_tensor` is the norm of a *shard*, not of the tensor.
        order: the order keys of the mesh-dimension groups (see ``_order_key``).
    """

    local: list[Tensor]
    kept: list[int]
    bucket: list[int]
    keys: list[tuple[ProcessGroup, ...]]
    schedule: list[tuple[ProcessGroup, list[int]]]
    extra: list[ProcessGroup]
    sharded: bool
    order: dict[int, tuple]

    @property
    def communicates(self) -> bool:
        """Whether :meth:`total` issues any collective."""
        return bool(self.schedule or self.extra)

    def total(self, per_tensor: Tensor, p: float) -> Tensor:
        """The global ``p``-norm from the per-tensor norms of :attr:`local` (0-dim tensor).

        ``per_tensor`` is 1-D, float32 or float64, one norm per tensor of ``local``. Without
        collectives this is ``vector_norm(per_tensor, p)``, the single-process total.
        """
        if not self.communicates:
            return torch.linalg.vector_norm(per_tensor, p)
        _check_norm_type(p)
        is_max = math.isinf(p)
        values = per_tensor if is_max else per_tensor.square() if p == 2 else per_tensor.pow(p)
        parts = self._bucket_parts(values, is_max)
        for group, buckets in self.schedule:
            if len(buckets) == len(self.keys):
                parts = _all_reduce(parts, is_max, group)
            else:
                index = _norms._index_tensor(tuple(buckets), parts.device)
                parts = parts.index_copy(0, index, _all_reduce(parts[index], is_max, group))
        if not len(parts):
            total = parts.new_zeros(())
        elif is_max:
            total = parts.amax()  # propagates NaN
        else:
            total = parts.sum()
        for group in self.extra:
            total = _all_reduce(total, is_max, group)
        if is_max or p == 1:
            return total
        return total.sqrt() if p == 2 else total.pow(1.0 / p)

    def _bucket_parts(self, values: Tensor, is_max: bool) -> Tensor:
        """Per-bucket sum (or NaN-propagating max) of ``values``: 1-D, one per key."""
        n = len(self.keys)
        if n == 0:  # nothing on this rank and no group: only extra_groups reduce (zeros)
            return values.new_zeros(0)
        if n == 1:
            if not len(values):
                return values.new_zeros(1)
            return (values.amax() if is_max else values.sum()).reshape(1)
        index = _norms._index_tensor(tuple(self.bucket), values.device)
        if not is_max:
            return values.new_zeros(n).index_add_(0, index, values)
        nan = torch.isnan(values)
        parts = values.new_zeros(n).scatter_reduce_(
            0, index, torch.where(nan, 0.0, values), "amax", include_self=True
        )
        flags = values.new_zeros(n).index_add_(0, index, nan.to(values.dtype))
        return torch.where(flags > 0, math.nan, parts)

    def reduce(self, measured: _norms.GradNorms) -> _norms.GradNorms:
        """``measured`` (the engine's pass over :attr:`local`) with its total made global.

        ``per_tensor`` stays the norms of the local tensors. Returns ``measured`` itself when
        nothing needs reducing (DDP), so the result is the single-process one bit for bit.
        """
        if not self.communicates:
            return measured
        total = self.total(measured.per_tensor, measured.norm_type)
        return replace(measured, total=total)

    def select(self, items: Sequence[Any]) -> list[Any]:
        """The entries of ``items`` (parallel to the input tensors) that :attr:`local` kept."""
        return [items[i] for i in self.kept]


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


def plan(
    tensors: Sequence[Tensor],
    *,
    shard_group: ProcessGroup | None = None,
    extra_groups: Iterable[GroupLike] | GroupLike = (),
    params: Iterable[Tensor] = (),
    whole_tensors: str | None = None,
) -> Reduction:
    """How this rank measures ``tensors`` and reduces their norms (see :class:`Reduction`).

    Args:
        tensors: the distinct gradients (plain tensors or DTensors).
        shard_group: plain tensors are shards over this group (FSDP1, ZeRO).
        extra_groups: groups (or meshes) the total is also reduced over (pipeline stages).
        params: parameters whose gradient is ``None`` on this rank; a DTensor among them still
            takes part in its mesh's collective (with 0), so that every rank issues the same
            collectives when a gradient is missing on some ranks only.
        whole_tensors: the name of a clipper that decides per tensor or per unit: raise if any
            tensor is split across ranks, since its local norm is not the tensor's norm.
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
    cache: dict = {}
    mesh_keys: dict[int, tuple] = {}
    plain_key = tuple(shard)
    key_index: dict[tuple, int] = {plain_key: 0} if shard else {}
    local: list[Tensor] = []
    kept: list[int] = []
    bucket: list[int] = []
    for i, t in enumerate(tensors):
        if dtensor is not None and isinstance(t, dtensor):
            t = _localize(t)
            key = _dtensor_groups(t, cache, mesh_keys)
            t = t.to_local()
        else:
            key = plain_key
        b = key_index.setdefault(key, len(key_index))
        if t.numel():
            local.append(t)
            kept.append(i)
            bucket.append(b)
    if dtensor is not None:
        for q in params:
            if q.grad is None and isinstance(q, dtensor):
                key_index.setdefault(_dtensor_groups(q, cache, mesh_keys), len(key_index))
    keys = list(key_index)
    members: dict[int, tuple[ProcessGroup, list[int]]] = {}
    for b, key in enumerate(keys):
        for group in key:
            members.setdefault(id(group), (group, []))[1].append(b)
    schedule = sorted(members.values(), key=lambda item: _order_key(item[0], mesh_keys))
    sharded = any(keys)
    if whole_tensors is not None and sharded:
        raise NotImplementedError(
            f"{whole_tensors} decides per tensor (or per row of a tensor), but these gradients "
            "are split across ranks (DTensor shards under FSDP2/TP, or `shard_group` under "
            f"FSDP1/ZeRO), so no rank holds a whole tensor's norm. Use {whole_tensors} with "
            "DDP or pipeline stages (`extra_groups`), or a global-norm clipper (NormClip, "
            "AutoClip, ZClip, AdaptiveClip), which is exact under every layout."
        )
    return Reduction(local, kept, bucket, keys, schedule, extra, sharded, mesh_keys)


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
) -> _norms.GradNorms:
    """The engine's pass over this rank's local tensors, with the global total.

    ``tensors``: distinct gradients (plain or DTensor). The result's ``tensors`` are the
    non-empty local tensors (scale those to clip), ``per_tensor`` their local norms, and
    ``total`` the norm of the whole model: a plain 0-dim tensor, identical on every rank.

    Example (on every rank of an FSDP1 job)::

        norms = global_norms(grads, 2.0, None, shard_group=dist.group.WORLD)
    """
    reduction = plan(tensors, shard_group=shard_group, extra_groups=extra_groups, params=params)
    if reduction.local:
        measured = _norms.compute(reduction.local, p, foreach)
    else:
        measured = _norms.empty_norms(p)
        device = _default_device(tensors, params)
        if device is not None:
            measured = replace(
                measured,
                per_tensor=measured.per_tensor.to(device),
                total=measured.total.to(device),
            )
    return reduction.reduce(measured)


def _default_device(tensors: Sequence[Tensor], params: Iterable[Tensor]) -> torch.device | None:
    """Where a rank with nothing to measure keeps its zeros: beside its tensors or parameters."""
    for t in tensors:
        return t.device
    for q in params:
        return q.device
    return None


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
    naming different groups, different ``extra_groups``, or DTensor gradients on a mesh that
    some ranks do not see. Run it once after building the model, not every step: a mismatch
    in a clip call itself hangs (until the process-group timeout) like any mismatched
    collective.

    Example::

        gradclip.distributed.check_layout(model.parameters(), extra_groups=[pp_group])
    """
    params = [parameters] if isinstance(parameters, Tensor) else list(parameters)
    grads = list({id(q.grad): q.grad for q in params if q.grad is not None}.values())
    reduction = plan(grads, shard_group=shard_group, extra_groups=extra_groups, params=params)
    wide = any(_norms.accumulation_dtype(t.dtype) == torch.float64 for t in reduction.local)
    dtype = (torch.float64 if wide else torch.float32) if reduction.local else None
    mine = {
        "schedule": [((_ranks(g), _order_key(g, reduction.order)), len(b))
                     for g, b in reduction.schedule],
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
                    found = f"{entries[key]}" if key in entries else "never reduces over it"
                    problems.append(
                        f"rank {rank} all-reduces {n} partial sum(s) over group "
                        f"{list(key[0])}, rank {other} {found}"
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
            "pass the same `shard_group` / `extra_groups` (with the same members) and hold "
            "gradients on the same meshes; a clip call in this state would hang."
        )
