"""Process groups: which ones a tensor is reduced over, the one order every rank visits them
in, and the collectives over them (see :mod:`gradclip.distributed`)."""

from __future__ import annotations

import math
import sys
import weakref
from collections.abc import Iterable, Sequence
from typing import TYPE_CHECKING, Any, Union

import torch
import torch.distributed as dist
from torch import Tensor

from gradclip import _foreach
from gradclip._cache import index_tensor

if TYPE_CHECKING:
    from torch.distributed import ProcessGroup
    from torch.distributed.device_mesh import DeviceMesh

__all__ = [
    "GroupLike",
    "Schedule",
    "all_reduce",
    "applies",
    "as_tuple",
    "check_group",
    "dtensor_groups",
    "dtensor_type",
    "extra_groups_of",
    "full_value",
    "is_active",
    "local_tensors",
    "localize",
    "mesh_key",
    "order_key",
    "ranks",
    "row_groups",
    "schedule",
    "sum_over",
]

GroupLike = Union["ProcessGroup", "DeviceMesh"]
"""What ``extra_groups`` accepts: process groups, or device meshes (all their dimensions)."""

_AVAILABLE = dist.is_available()  # a property of the build (asked on every clip)
_SUM = dist.ReduceOp.SUM if _AVAILABLE else None
_MAX = dist.ReduceOp.MAX if _AVAILABLE else None


def is_active() -> bool:
    """True when ``torch.distributed`` is available and a default process group exists."""
    return _foreach.default_group_exists()


def applies(shard_group: object, extra_groups: object) -> bool:
    """True when a norm must go through this module: a process group exists, or the caller
    named groups (which then must exist). False costs nothing on the single-process path."""
    return shard_group is not None or bool(extra_groups) or is_active()


def dtensor_type() -> type | None:
    """``DTensor`` if it has been imported (no DTensor can exist otherwise), else None.

    Looking in ``sys.modules`` instead of importing keeps DDP-only programs from paying the
    import, and the per-gradient check to a dictionary lookup.
    """
    module = sys.modules.get("torch.distributed.tensor")
    return getattr(module, "DTensor", None) if module is not None else None


# ---------------------------------------------------------------------------------------
# argument checks: each names the argument, the value received and the fix


def check_group(group: object, name: str) -> list[ProcessGroup]:
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
                f"{ranks(group)}; pass a group that contains this rank"
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
        _AVAILABLE and isinstance(extra_groups, dist.ProcessGroup)
    ) or (mesh_type is not None and isinstance(extra_groups, mesh_type))
    if single:
        return (extra_groups,)
    try:
        return tuple(extra_groups)  # type: ignore[arg-type]
    except TypeError:
        return (extra_groups,)


def extra_groups_of(extra_groups: Iterable[GroupLike] | GroupLike) -> list[ProcessGroup]:
    out: list[ProcessGroup] = []
    for i, item in enumerate(as_tuple(extra_groups)):
        out.extend(check_group(item, f"extra_groups[{i}]"))
    return out


def ranks(group: ProcessGroup) -> tuple[int, ...]:
    return tuple(dist.get_process_group_ranks(group))


def order_key(group: ProcessGroup, mesh_keys: dict[int, tuple] | None = None) -> tuple:
    """The group's place in the one order every rank visits groups in.

    Two requirements. Deadlock freedom: the key must be the same on all members of the
    group (a global order). Correct sums: a slot sharded over two mesh dimensions is
    reduced over one, then the other, and the ranks that meet in the second must all have
    done the first, so every rank must visit a mesh's dimensions in the same order. Sorting
    by the groups' own ranks fails that ((dp=2, tp=2): rank 0 sees tp={0,1} < dp={0,2},
    rank 2 sees dp={0,2} < tp={2,3}); a mesh dimension is therefore keyed by its mesh (the
    global layout, identical on all its ranks) and its index, see ``mesh_key``.
    """
    if mesh_keys is not None and id(group) in mesh_keys:
        return mesh_keys[id(group)]
    return (1, ranks(group), str(getattr(group, "group_name", "")))


def mesh_key(mesh: Any, dim: int) -> tuple:
    """``(0, -size, layout, shape, dim)``: the same on every rank of the mesh. A group that
    is a dimension of several meshes (a sub-mesh and its parent) takes the smallest key, the
    largest mesh's, which all its members see alike. Meshes with equal keys keep the order
    in which the (identical) parameter lists meet them."""
    base = _MESH_KEYS.get(mesh)
    if base is None:  # built once per mesh, from Python data: no tensor is read
        base = _MESH_KEYS[mesh] = (0, -mesh.size(), _foreach.mesh_layout(mesh), tuple(mesh.shape))
    return (*base, dim)


_MESH_KEYS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()



Schedule = list[tuple["ProcessGroup", Tensor | None]]
"""What :func:`sum_over` runs: per process group, in the global order, the entries to sum
over it (an index tensor, or None for all of them)."""


def all_reduce(values: Tensor, is_max: bool, group: ProcessGroup) -> Tensor:
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


def dtensor_groups(tensor: Any, cache: dict, mesh_keys: dict[int, tuple]) -> tuple:
    """The process groups of the mesh dimensions a DTensor is sharded over (cached per call);
    records each group's order key in ``mesh_keys``."""
    mesh, placements = tensor.device_mesh, tuple(tensor.placements)
    key = (id(mesh), placements)
    groups = cache.get(key)
    if groups is None:
        dims = [i for i, pl in enumerate(placements) if not pl.is_replicate()]
        groups = cache[key] = tuple(mesh.get_group(i) for i in dims)
        for i, group in zip(dims, groups, strict=True):
            order = mesh_key(mesh, i)
            if id(group) not in mesh_keys or order < mesh_keys[id(group)]:
                mesh_keys[id(group)] = order
    return groups


def localize(tensor: Any) -> Any:
    """A DTensor whose placements hold no ``Partial`` (those are summed first: a collective)."""
    if any(pl.is_partial() for pl in tensor.placements):
        from torch.distributed.tensor import Replicate

        tensor = tensor.redistribute(
            tensor.device_mesh,
            [Replicate() if pl.is_partial() else pl for pl in tensor.placements],
        )
    return tensor


def row_groups(param: Tensor, whole: bool, order: dict[int, tuple]) -> tuple[tuple, tuple]:
    """For a clipper that decides per row along dim 0 (AGC): ``(split, spread)``, the process
    groups over which each row of ``param`` is cut in pieces (their sums must be added) and
    those over which its rows are dealt out (each rank holds other rows). ``whole``: the
    tensor is one unit (0-/1-D, or excluded), cut by every shard. A plain tensor: neither.
    Records each group's order key in ``order`` (see :func:`schedule`)."""
    dtensor = dtensor_type()
    if dtensor is None or not isinstance(param, dtensor):
        return (), ()
    mesh = param.device_mesh
    split, spread = [], []
    for i, placement in enumerate(param.placements):
        if placement.is_replicate():  # Shard and _StridedShard (whose is_shard() is False)
            continue
        group = mesh.get_group(i)
        key = mesh_key(mesh, i)
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
    ``order_key``, the same on every rank, so no two ranks wait on each other in a cycle."""
    return [
        (group, None if len(positions) == n else index_tensor(tuple(positions), device))
        for group, positions in _by_group(keys, entries, order)
    ]


def _by_group(
    keys: Sequence[tuple], entries: Sequence[Sequence[int]], order: dict[int, tuple]
) -> list[tuple[ProcessGroup, list[int]]]:
    """Per process group, in the global order (``order_key``), the sorted positions of the
    ``entries`` whose key holds it."""
    members: dict[int, tuple[ProcessGroup, list[int]]] = {}
    for key, positions in zip(keys, entries, strict=True):
        for group in key:
            members.setdefault(id(group), (group, []))[1].extend(positions)
    ordered = sorted(members.values(), key=lambda m: order_key(m[0], order))
    return [(group, sorted(positions)) for group, positions in ordered]


def sum_over(values: Tensor, plan: Schedule, is_max: bool = False) -> Tensor:
    """``values`` (entries along dim 0) with each entry summed (``is_max``: NaN-keeping max)
    over its groups: a new tensor."""
    for group, index in plan:
        if index is None:
            values = all_reduce(values, is_max, group)
        else:
            values = values.index_copy(0, index, all_reduce(values[index], is_max, group))
    return values


@_foreach.no_grad  # see plan
def local_tensors(tensors: list[Tensor]) -> list[Tensor]:
    """``tensors`` with each DTensor replaced by its local shard (to scale or clamp in place).

    Scaling the local tensors is exact for every placement (a coefficient is the same on all
    ranks), needs no DTensor dispatch, and works for lists mixing DTensors and plain tensors
    or DTensors on several meshes, where ``torch._foreach_mul_`` on the DTensors raises.
    """
    dtensor = dtensor_type()
    if dtensor is None:
        return tensors
    return [t.to_local() if isinstance(t, dtensor) else t for t in tensors]


def full_value(total: Tensor) -> Tensor:
    """A total norm as a plain tensor: a DTensor (torch's own norm under FSDP2/TP) made whole."""
    dtensor = dtensor_type()
    if dtensor is not None and isinstance(total, dtensor):
        return total.full_tensor()
    return total
