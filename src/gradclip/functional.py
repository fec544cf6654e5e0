"""Drop-ins for ``torch.nn.utils``' gradient-clipping functions, with torch's exact signatures.

Same names, argument order, defaults, return values, warnings and exception types as
torch 2.13, computed by one pass (:mod:`gradclip.norms`). Where torch silently corrupts
gradients, these refuse or fix the input instead; the README's table "Differences from
torch.nn.utils" lists each case:

1. a negative or NaN ``max_norm`` / ``clip_value`` raises ``ValueError`` (torch flips the
   sign of every gradient, or makes them all NaN);
2. float16/bfloat16 gradients are measured with float32 accumulation, and the clip
   coefficient is computed from that float32 norm, so finite gradients are never zeroed by
   an overflowed norm (the returned norm keeps torch's dtype);
3. a parameter or gradient listed twice is counted and scaled once;
4. where knowing it costs no device sync (CPU), gradients that need no clipping are not
   rewritten.

Every argument is checked before any gradient is touched: a call that raises has changed
nothing.
"""

from __future__ import annotations

import math
import types
import warnings
from collections.abc import Iterable, Mapping, Sequence
from typing import TYPE_CHECKING

import torch
from torch import Tensor
from typing_extensions import deprecated

from gradclip import _foreach, distributed, grouping, norms
from gradclip._checks import NotATensorError, check_norm_type, check_threshold, tensor_list
from gradclip.paramgroups import GroupsLike, OrthogonalRule, ParamGroup, as_groups, muon_like
from gradclip.scale import TORCH_EPS, clip_, scale_each_

if TYPE_CHECKING:
    from torch.distributed import ProcessGroup

    from gradclip.distributed import GroupLike

__all__ = [
    "NotATensorError",
    "clip_grad_norm",
    "clip_grad_norm_",
    "clip_grad_value_",
    "clip_grads_with_norm_",
    "get_total_norm",
    "grad_norms",
]

TensorOrTensors = Tensor | Iterable[Tensor]
_LARGEST: dict[torch.dtype, float] = {}


def _largest(dtype: torch.dtype) -> float:
    """``torch.finfo(dtype).max``, remembered (asked on every clip_grad_value_ call)."""
    largest = _LARGEST.get(dtype)
    if largest is None:
        largest = _LARGEST[dtype] = torch.finfo(dtype).max
    return largest


def _params_list(parameters: TensorOrTensors, *, warn_empty_generator: bool) -> list[Tensor]:
    is_generator = isinstance(parameters, types.GeneratorType)
    params = tensor_list(parameters, "parameters")
    if warn_empty_generator and is_generator and not params:
        # stacklevel: this helper, the drop-in, torch.no_grad's wrapper, the user's line.
        warnings.warn(
            "`parameters` is an empty generator, no gradient clipping will occur.", stacklevel=4
        )
    return params


def _unique_grads(params: list[Tensor]) -> list[Tensor]:
    """The distinct gradients of the distinct parameters (see :func:`_foreach.distinct`).

    Eagerly the gradients alone are deduplicated: a parameter listed twice lists its gradient
    twice. While compiling gradients are not (see there), so the parameters are."""
    if _foreach.is_compiling():
        return [p.grad for p in _foreach.distinct(params, lasting=True) if p.grad is not None]
    return _foreach.distinct([g for p in params if (g := p.grad) is not None], lasting=False)


def _raise_if_nonfinite(total: Tensor, norm_type: float) -> None:
    if total.isnan() or total.isinf():
        raise RuntimeError(
            f"The total norm of order {norm_type} for gradients from "
            "`parameters` is non-finite, so it cannot be clipped. To disable "
            "this error and scale the gradients by the non-finite norm anyway, "
            "set `error_if_nonfinite=False`"
        )


def _measure(
    grads: list[Tensor],
    p: float,
    foreach: bool | None,
    shard_group: object,
    extra_groups: object,
    params: list[Tensor] | tuple[()] = (),
    per_tensor: bool = False,
) -> norms.GradNorms:
    """The one pass; under ``torch.distributed`` over the local shards, with the global total,
    and global per-tensor norms when ``per_tensor`` (:func:`gradclip.grad_norms`: every rank
    of a shard group must then pass the same parameter list, which aligns the per-tensor
    all-reduce). The drop-ins reduce the total only, one value per group: like torch's, they
    accept whatever tensors each rank holds (ZeRO-style partitions included)."""
    if distributed.applies(shard_group, extra_groups):
        return distributed.global_norms(
            grads, p, foreach, shard_group=shard_group, extra_groups=extra_groups,  # type: ignore[arg-type]
            params=params, per_tensor=per_tensor,
        )
    return norms.compute(grads, p, foreach)


# ---------------------------------------------------------------------------------------
# the drop-ins


@_foreach.no_grad
def grad_norms(
    parameters: Tensor | Iterable[Tensor],
    norm_type: float | str = 2.0,
    *,
    shard_group: ProcessGroup | None = None,
    extra_groups: Iterable[GroupLike] = (),
) -> norms.GradNorms:
    """Per-tensor and total gradient norms of ``parameters`` in one pass, without clipping.

    Parameters whose ``.grad`` is None are left out; a gradient listed twice is measured
    once. ``per_tensor[i]`` belongs to ``result.tensors[i]`` (the i-th distinct gradient in
    parameter order).

    Args:
        parameters: a tensor or an iterable of tensors whose ``.grad`` is measured.
        norm_type: p of the p-norm, any value torch accepts (``'inf'`` included).
        shard_group, extra_groups: keyword-only, as in :func:`gradclip.clip_grad_norm_`:
            under ``torch.distributed`` the total is the whole model's and ``per_tensor``
            the whole tensors' norms, identical on every rank. With gradients split across
            ranks (FSDP, TP), ``tensors`` are this rank's parts, an empty tensor where it
            holds none, and a sharded parameter whose gradient is None on this rank only
            keeps its entry: every rank lists the same tensors.

    Returns:
        A :class:`GradNorms`. With no gradients at all, ``per_tensor`` is empty and
        ``total`` is ``tensor(0.)``.

    Example:
        >>> import torch, gradclip
        >>> model = torch.nn.Linear(3, 2)
        >>> model(torch.ones(1, 3)).sum().backward()
        >>> norms = gradclip.grad_norms(model.parameters())
        >>> norms.per_tensor.shape
        torch.Size([2])
    """
    p = check_norm_type(norm_type)
    params = tensor_list(parameters, "parameters")
    return _measure(_unique_grads(params), p, None, shard_group, extra_groups, params, True)



@_foreach.no_grad
def get_total_norm(
    tensors: TensorOrTensors,
    norm_type: float | str = 2.0,
    error_if_nonfinite: bool = False,
    foreach: bool | None = None,
    *,
    shard_group: ProcessGroup | None = None,
    extra_groups: Iterable[GroupLike] = (),
) -> Tensor:
    """Norm of the per-tensor norms of ``tensors``, as ``torch.nn.utils.get_total_norm``.

    The total is ``‖(‖t₁‖ₚ, …, ‖tₙ‖ₚ)‖ₚ`` over the tensors themselves (not their ``.grad``),
    each distinct tensor counted once.

    Args:
        tensors: a tensor or an iterable of tensors (usually gradients).
        norm_type: p of the p-norm; ``'inf'`` or ``float('inf')`` for the max norm.
        error_if_nonfinite: raise ``RuntimeError`` if the total is NaN or inf.
        foreach: as in torch; ``True`` on a device without foreach kernels raises.
        shard_group: keyword-only; under ``torch.distributed``, the plain tensors are shards
            over this process group (FSDP1, ZeRO) and their norms are reduced over it.
            DTensors need nothing: their placements say which mesh dimensions to reduce over.
        extra_groups: keyword-only; process groups or device meshes the total is also reduced
            over (pipeline stages, expert parallel). See the README, "Distributed training".

    Returns:
        A 0-dim tensor on the first tensor's device, in torch's dtype (type promotion of the
        per-tensor norm dtypes); ``tensor(0.)`` when ``tensors`` is empty. float16/bfloat16
        tensors are accumulated in float32. Under ``torch.distributed`` it is the norm of
        every rank's tensors, a plain tensor identical on every rank (torch returns a
        DTensor for DTensor inputs, rank-local for the inf norm).

    Example:
        >>> import torch, gradclip
        >>> gradclip.get_total_norm([torch.tensor([3.0]), torch.tensor([4.0])])
        tensor(5.)
    """
    p = check_norm_type(norm_type)
    tensors = _foreach.distinct(tensor_list(tensors, "tensors"), lasting=False)
    result = _measure(tensors, p, foreach, shard_group, extra_groups)
    if error_if_nonfinite:
        _raise_if_nonfinite(result.total, p)
    return result.result()


@_foreach.no_grad
def clip_grads_with_norm_(
    parameters: TensorOrTensors,
    max_norm: float,
    total_norm: Tensor,
    foreach: bool | None = None,
) -> None:
    """Scale gradients by ``min(max_norm / (total_norm + 1e-6), 1)``, in place.

    As ``torch.nn.utils.clip_grads_with_norm_``: ``total_norm`` is a 0-dim tensor, usually
    from :func:`get_total_norm`; each distinct gradient is scaled once.

    Args:
        parameters: a tensor or an iterable of tensors whose ``.grad`` is scaled.
        max_norm: the largest total norm to allow (>= 0).
        total_norm: 0-dim tensor, the total norm of the gradients.
        foreach: as in torch.

    Example:
        >>> import torch, gradclip
        >>> p = torch.nn.Parameter(torch.zeros(2)); p.grad = torch.tensor([3.0, 4.0])
        >>> gradclip.clip_grads_with_norm_([p], 1.0, gradclip.get_total_norm([p.grad]))
        >>> p.grad
        tensor([0.6000, 0.8000])
    """
    max_norm = check_threshold(max_norm, "max_norm")
    grads = _unique_grads(tensor_list(parameters, "parameters"))
    if not grads:
        return
    if not isinstance(total_norm, Tensor):
        raise TypeError(
            f"`total_norm` must be a 0-dim Tensor, got {type(total_norm).__name__} "
            f"{total_norm!r:.80}; pass the tensor returned by `get_total_norm`"
        )
    if total_norm.numel() != 1:
        raise RuntimeError(
            f"`total_norm` must be a 0-dim Tensor, got shape {tuple(total_norm.shape)}; "
            "pass the tensor returned by `get_total_norm`"
        )
    if distributed.is_active():  # DTensor grads (and torch's DTensor norm): scale local shards
        grads = distributed.local_tensors(grads)
        total_norm = distributed.full_value(total_norm)
    groups = _foreach.group_by_device_dtype(grads)
    total = total_norm.reshape(()).to(torch.promote_types(total_norm.dtype, torch.float32))
    clip_(groups, max_norm, total, foreach)


@_foreach.no_grad
def clip_grad_norm_(
    parameters: TensorOrTensors,
    max_norm: float,
    norm_type: float | str = 2.0,
    error_if_nonfinite: bool = False,
    foreach: bool | None = None,
    *,
    shard_group: ProcessGroup | None = None,
    extra_groups: Iterable[GroupLike] = (),
    groups: GroupsLike = None,
    policy: object = None,
    orthogonal: OrthogonalRule | None = muon_like,
) -> Tensor:
    """Clip the gradients so that their total norm is at most ``max_norm``, in place.

    As ``torch.nn.utils.clip_grad_norm_``: the total is the ``norm_type``-norm of the
    per-gradient norms; every gradient is multiplied by
    ``min(max_norm / (total + 1e-6), 1)``. Faster (one pass; on the CPU no rewrite when
    nothing is clipped), more accurate (float32 accumulation, short runs) and never
    silently wrong (see the module doc).

    Args:
        parameters: a tensor or an iterable of tensors whose ``.grad`` is clipped.
        max_norm: the largest total norm to allow (>= 0; ``inf`` disables clipping).
        norm_type: p of the p-norm; ``'inf'`` or ``float('inf')`` for the max norm.
        error_if_nonfinite: raise ``RuntimeError``, before touching any gradient, if the
            total norm is NaN or inf.
        foreach: as in torch; ``True`` on a device without foreach kernels raises.
        shard_group: keyword-only; under ``torch.distributed``, plain-tensor gradients are
            shards over this process group (FSDP1 ``FullyShardedDataParallel``, ZeRO).
            Without it plain gradients are taken as replicated (DDP). DTensor gradients
            (FSDP2, tensor parallel, HSDP) need nothing.
        extra_groups: keyword-only; process groups or device meshes the total is also
            reduced over: pipeline stages, expert parallel. See the README, "Distributed
            training"; :func:`gradclip.distributed.check_layout` diagnoses mismatches.
        groups: keyword-only; clip by parameter groups (``optimizer.param_groups``, the
            optimizer, several optimizers, or ``{name: parameters}``): each group on its own
            norm by default, an orthogonalising optimizer's groups (Muon) left out. ``max_norm``
            may then be one threshold per group (a sequence, or ``{group name: threshold}``).
            See :mod:`gradclip.grouping`.
        policy: keyword-only, with ``groups``: per-group ``"exclude"``, ``"own"``,
            ``"shared"`` or ``"shared:<key>"`` (groups with one key are clipped on the norm
            of their union, at one threshold), or a threshold.
        orthogonal: keyword-only, with ``groups``: the rule for orthogonalising optimizers
            (:func:`gradclip.muon_like`; None: none).

    Returns:
        The total norm before clipping: a 0-dim tensor on the first gradient's device, in
        torch's dtype; ``tensor(0.)`` when no parameter has a gradient. Under
        ``torch.distributed``, the norm of the whole model: a plain tensor identical on
        every rank; each rank scales its local shards by the same coefficient. With
        ``groups``: a 1-D tensor, the norm of each group before clipping (excluded groups
        included), in group order.

    Example:
        >>> import torch, gradclip
        >>> p = torch.nn.Parameter(torch.zeros(2)); p.grad = torch.tensor([3.0, 4.0])
        >>> gradclip.clip_grad_norm_([p], max_norm=1.0)
        tensor(5.)
        >>> p.grad
        tensor([0.6000, 0.8000])
    """
    params = _params_list(parameters, warn_empty_generator=True)
    if groups is not None:
        return _clip_groups(params, max_norm, check_norm_type(norm_type), error_if_nonfinite,
                            foreach, shard_group, extra_groups, groups, policy, orthogonal)
    if policy is not None:
        raise ValueError("`policy` needs `groups`: pass e.g. groups=optimizer.param_groups")
    max_norm = check_threshold(max_norm, "max_norm")
    p = check_norm_type(norm_type)
    result = _measure(_unique_grads(params), p, foreach, shard_group, extra_groups, params)
    if not result.tensors:
        return result.total
    if error_if_nonfinite:
        _raise_if_nonfinite(result.total, p)
    clip_(result.groups, max_norm, result.total, foreach)
    return result.result()


def _clip_groups(
    params: list[Tensor], max_norm: object, p: float, error_if_nonfinite: bool,
    foreach: bool | None, shard_group: ProcessGroup | None, extra_groups: Iterable[GroupLike],
    groups: GroupsLike, policy: object, orthogonal: OrthogonalRule | None,
) -> Tensor:
    """:func:`clip_grad_norm_` by groups (see :mod:`gradclip.grouping`): every argument is
    checked and the plan built before any gradient is touched."""
    parsed = as_groups(groups)
    planner = grouping.Planner(policy, orthogonal, default="own")
    thresholds = _group_thresholds(max_norm, parsed)
    owners: dict[int, Tensor] = {}
    for q in params:
        if q.grad is not None:
            owners.setdefault(id(q.grad), q)
    grads = _unique_grads(params)
    owner_of = [owners[id(g)] for g in grads]
    position = {id(q): i for i, q in enumerate(params)}
    layout = None
    if distributed.applies(shard_group, extra_groups):
        layout = distributed.plan(grads, shard_group=shard_group, extra_groups=extra_groups,
                                  params=params, per_tensor=True)
        measured = layout.reduce(
            norms.compute(layout.local, p, foreach) if layout.local
            else distributed.nothing_measured(p, layout.device)
        )
        rows = layout.rows_of(owner_of, params)
    else:
        measured = norms.compute(grads, p, foreach) if grads else norms.empty_norms(p)
        rows = owner_of
    names = [f"parameters[{position.get(id(q), '?')}]" for q in rows]
    plan = planner.plan(parsed, rows, names, allow_empty=layout is not None and bool(layout.extra))
    limits = []
    for domain in plan.domains:
        values = {thresholds[g] if domain.value is None else float(domain.value)  # type: ignore[arg-type]
                  for g in domain.groups}
        if None in values:
            missing = [plan.names[g] for g in domain.groups if thresholds[g] is None]
            raise ValueError(
                f"`max_norm` gives no threshold for the group(s) {missing}: add them to it, or "
                "give them the policy 'exclude'; nothing was clipped"
            )
        if len(values) != 1:
            raise ValueError(
                f"groups {[plan.names[g] for g in domain.groups]} share the norm "
                f"{domain.name!r} but not one threshold ({sorted(values)}): give them one max_norm"
            )
        limits.append(values.pop())
    device = measured.per_tensor.device
    group_norms = grouping.group_norms(measured.per_tensor, plan.row_index(device),
                                       len(plan.names), p, layout)
    totals = grouping.group_norms(group_norms, plan.domain_index(device), len(limits) + 1, p)
    if error_if_nonfinite:
        bad = (~torch.isfinite(totals[: len(limits)])).nonzero().flatten().tolist()
        if bad:
            raise RuntimeError(
                f"The total norm of order {p} of the group(s) "
                f"{[plan.domains[d].name for d in bad]} is non-finite, so it cannot be clipped. "
                "To disable this error and scale the gradients by the non-finite norm anyway, "
                "set `error_if_nonfinite=False`"
            )
    if limits and measured.tensors:
        # torch's coefficient, as torch computes it: reciprocal, then times max_norm
        limit = torch.tensor([*limits, 1.0], dtype=totals.dtype, device=device)
        coef = torch.clamp((totals + TORCH_EPS).reciprocal() * limit, max=1.0)
        coef[len(limits)] = 1.0  # excluded groups
        per_row = coef[plan.domain_index(device)][plan.row_index(device)]
        _foreach.check_foreach(measured.groups, foreach)
        scale_each_(measured.groups, per_row)
    return group_norms.to(measured.dtype)


def _group_thresholds(max_norm: object, groups: list[ParamGroup]) -> list[float | None]:
    """One checked ``max_norm`` per group (None where a mapping gives none)."""
    if isinstance(max_norm, Mapping | Sequence) and not isinstance(max_norm, str):
        given = grouping.explicit(max_norm, groups, "max_norm")
        return [None if v is None else check_threshold(v, f"max_norm[{g.name!r}]")
                for v, g in zip(given, groups, strict=True)]
    value = check_threshold(max_norm, "max_norm")
    return [value] * len(groups)


@deprecated(
    "`gradclip.clip_grad_norm` is now deprecated in favor of `gradclip.clip_grad_norm_`.",
    category=FutureWarning,
)
def clip_grad_norm(
    parameters: TensorOrTensors,
    max_norm: float,
    norm_type: float | str = 2.0,
    error_if_nonfinite: bool = False,
    foreach: bool | None = None,
    *,
    shard_group: ProcessGroup | None = None,
    extra_groups: Iterable[GroupLike] = (),
    groups: GroupsLike = None,
    policy: object = None,
    orthogonal: OrthogonalRule | None = muon_like,
) -> Tensor:
    """Deprecated alias of :func:`clip_grad_norm_` (as in torch; warns ``FutureWarning``).

    Example:
        >>> import torch, gradclip, warnings
        >>> p = torch.nn.Parameter(torch.zeros(1)); p.grad = torch.ones(1)
        >>> with warnings.catch_warnings():
        ...     warnings.simplefilter("ignore")
        ...     gradclip.clip_grad_norm([p], 1.0)
        tensor(1.)
    """
    return clip_grad_norm_(
        parameters, max_norm, norm_type, error_if_nonfinite, foreach,
        shard_group=shard_group, extra_groups=extra_groups, groups=groups, policy=policy,
        orthogonal=orthogonal,
    )


@_foreach.no_grad
def clip_grad_value_(
    parameters: TensorOrTensors, clip_value: float, foreach: bool | None = None
) -> None:
    """Clamp every gradient element to ``[-clip_value, clip_value]``, in place.

    As ``torch.nn.utils.clip_grad_value_``, each distinct gradient once. NaN elements stay
    NaN; ``clip_value`` is rounded to each gradient's dtype.

    Args:
        parameters: a tensor or an iterable of tensors whose ``.grad`` is clamped.
        clip_value: the largest magnitude to allow (>= 0; ``inf`` disables clipping).
        foreach: as in torch.

    Example:
        >>> import torch, gradclip
        >>> p = torch.nn.Parameter(torch.zeros(2)); p.grad = torch.tensor([-3.0, 0.5])
        >>> gradclip.clip_grad_value_([p], 1.0)
        >>> p.grad
        tensor([-1.0000,  0.5000])
    """
    clip_value = check_threshold(clip_value, "clip_value")
    grads = _unique_grads(tensor_list(parameters, "parameters"))
    if not grads:
        raise RuntimeError(
            "clip_grad_value_ found no gradients to clip (every `.grad` is None or "
            "`parameters` is empty); torch.nn.utils.clip_grad_value_ raises here too. "
            "Call it after `loss.backward()`."
        )
    if distributed.is_active():  # DTensor grads: clamp the local shards (exact, elementwise)
        grads = distributed.local_tensors(grads)
    groups = _foreach.group_by_device_dtype(grads)
    _foreach.check_foreach(groups, foreach)
    for device, dtype in groups:
        if dtype.is_complex:
            raise NotImplementedError(
                "clamp is not supported for complex types: clip_grad_value_ cannot clip complex "
                "gradients; use clip_grad_norm_ (nothing was changed)"
            )
        # torch's CPU clamp refuses a bound its dtype cannot hold; its CUDA kernels take the
        # bound in float32 (nothing exceeds it but inf, which stays inf): a no-op there
        if device.type == "cpu" and clip_value > _largest(dtype) and clip_value != math.inf:
            raise RuntimeError(
                f"`clip_value`={clip_value} does not fit {dtype} gradients (max "
                f"{_largest(dtype)}); torch raises here too on the CPU. Pass a smaller "
                "value, or `inf` to disable clipping (nothing was changed)"
            )
    if not _foreach.all_strided(grads):
        raise NotImplementedError(
            "clip_grad_value_ cannot clamp sparse gradients (torch cannot either); use "
            "clip_grad_norm_ or dense gradients (nothing was changed)"
        )
    for (device, _), (group, _) in groups.items():
        use_foreach = foreach if foreach is not None else _foreach.has_foreach_support(group, device)
        if use_foreach:
            _foreach.foreach_clamp_(group, -clip_value, clip_value)
        else:
            for g in group:
                g.clamp_(min=-clip_value, max=clip_value)
