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

from gradclip.distributed.groups import (
    GroupLike,
    Schedule,
    applies,
    as_tuple,
    full_value,
    is_active,
    local_tensors,
    row_groups,
    schedule,
    sum_over,
)
from gradclip.distributed.layout import check_layout
from gradclip.distributed.reduction import Reduction, global_norms, nothing_measured, plan

__all__ = [
    "GroupLike",
    "Reduction",
    "Schedule",
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
