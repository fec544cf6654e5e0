"""Diagnosis: check, across ranks, that a clip issues matching collectives."""

from __future__ import annotations

from collections.abc import Iterable
from typing import TYPE_CHECKING, Any

import torch
import torch.distributed as dist
from torch import Tensor

from gradclip import norms as _norms
from gradclip.distributed.groups import GroupLike, dtensor_type, order_key, ranks
from gradclip.distributed.reduction import Reduction, plan

if TYPE_CHECKING:
    from torch.distributed import ProcessGroup

__all__ = ["check_layout"]


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
            ((ranks(g), order_key(g, reduction.order)), _describe(
                reduction, originals, range(reduction.slots) if slots is None else slots.tolist()))
            for g, slots in reduction.schedule
        ],
        "extra": [(ranks(g), order_key(g)) for g in reduction.extra],
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
    dtensor = dtensor_type()
    held = (originals[reduction.slot_rows[s]] for s in slots)
    return tuple(
        str(tuple(t.shape)) if dtensor is not None and isinstance(t, dtensor) else "shard"
        for t in held
    )


def _count(described: tuple[str, ...]) -> str:
    shown = ", ".join(described[:6]) + (", ..." if len(described) > 6 else "")
    return f"{len(described)} tensor norm(s) [{shown}]"
