"""AGC: unit-wise adaptive gradient clipping (Brock et al., 2021) in the PyTorch weight layout."""

from __future__ import annotations

import fnmatch
import math
import warnings
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Final

import torch
from torch import Tensor
from typing_extensions import Unpack

from gradclip import _foreach, distributed
from gradclip._cache import LRU
from gradclip._checks import check_real
from gradclip.clippers.base import Clipper, Step
from gradclip.clippers.groups import GroupOptions
from gradclip.clippers.targets import Parameters, Target
from gradclip.nonfinite import NonFinitePolicy
from gradclip.norms import GradNorms, empty_norms, result_dtype, total_norm
from gradclip.norms.units import UnitPlan

if TYPE_CHECKING:
    from torch.distributed import ProcessGroup

    from gradclip.distributed import GroupLike

__all__ = ["AGC", "LAST_LINEAR", "ExcludeRule", "UnitNorms"]


class _LastLinear:
    """The default head-exclusion rule of :class:`AGC` (see ``AGC``'s ``exclude``)."""

    _instance: _LastLinear | None = None

    def __new__(cls) -> _LastLinear:  # a singleton: survives copy and pickling by identity
        if cls._instance is None:
            cls._instance = super().__new__(cls)
        return cls._instance

    def __repr__(self) -> str:
        return "LAST_LINEAR"

    def __reduce__(self) -> str:
        return "LAST_LINEAR"


LAST_LINEAR: Final = _LastLinear()
"""Default ``exclude`` of :class:`AGC`: the parameters of the last ``nn.Linear`` of the module."""

ExcludeRule = _LastLinear | str | Iterable[str] | Callable[[str, Tensor], bool] | None
"""What ``AGC(exclude=...)`` accepts: ``LAST_LINEAR``, fnmatch pattern(s), a predicate, None."""

class AGC(Clipper):
    """Adaptive gradient clipping: clip each unit's gradient relative to its weight norm.

    A *unit* is a row along dim 0 of a parameter in the PyTorch layout: an output feature
    of ``nn.Linear`` (weight ``(out, in)``), an output channel of ``nn.ConvNd`` (weight
    ``(out, in/groups, *kernel)``), a token row of ``nn.Embedding`` (``(num, dim)``). The
    norm of a unit reduces over dims ``1..n``. A 0-dim or 1-D tensor (bias, LayerNorm or
    BatchNorm gain) is a single unit (its whole-tensor norm). For every unit i, with ``W_i``
    the parameter rows and ``G_i`` the gradient rows::

        max_norm_i = clipping · max(‖W_i‖₂, eps)
        G_i ← G_i · max_norm_i / ‖G_i‖₂      if ‖G_i‖₂ > max_norm_i, else unchanged

    This is the reference layout of the paper's JAX code (HWIO, reducing every axis but the
    last) transposed to PyTorch's OI layout; ports that keep the JAX axis on PyTorch weights
    normalise over the wrong dimension. Layers that store their weight as ``(in, out)``,
    such as Hugging Face's GPT-2 ``Conv1D``, have *input* units along dim 0: AGC clips them
    per input feature (exclude them if that is not what you want).

    **λ = 0.01 is tuned for SGD** (with Nesterov momentum, NFNets at batch 4096; the paper
    uses smaller λ for larger batches). With Adam, AdamW or Lion the update no longer scales
    with the gradient, and λ=0.01 is far too aggressive: reports of AGC at 0.01 with AdamW
    describe much worse training. Tune ``clipping`` (e.g. 0.05–0.5) before using it with an
    adaptive optimizer, and look at ``stats.clipped`` / ``stats.coef`` to see how often and
    how hard it fires. AGC clips by a *ratio*, so it also freezes learning where weights are
    tiny relative to their gradients (our exploding-RNN pilot learned nothing at λ=0.05).

    **The final classifier is not clipped** (the paper's ablation: clipping it hurts). Which
    parameters are left alone is the visible rule ``exclude``:

    * ``LAST_LINEAR`` (default): when you call the clipper on a module, the parameters of
      its last ``nn.Linear`` in ``module.modules()`` order (registration order: ``fc``,
      ``head``, ``classifier``, ``lm_head``) are excluded, matched by identity, so a head
      tied to the input embedding excludes the shared weight too (its name in
      ``named_parameters()`` is the embedding's). A module with no ``nn.Linear``, and a call
      on plain parameters, a mapping or ``(name, param)`` pairs (no module to look at),
      exclude nothing and warn once: pass the module, or name the head.
    * a string or a collection of strings: ``fnmatch`` patterns matched against the
      parameter names (``module.named_parameters()`` names; the mapping's keys; positions
      ``"0"``, ``"1"``, ... for plain parameters), e.g. ``exclude=("fc.*",)``;
    * a callable ``(name, param) -> bool``, called for every parameter on every call;
    * ``None`` or ``()``: clip every parameter.

    Excluded parameters keep their gradients, are still measured (``stats.norm`` is the
    norm of every gradient) and are never read as weights.

    Computation, per call, without a host sync: the unit norms of the gradients and of the
    weights (float32 results; small tensors that share a row length are concatenated and
    reduced by one kernel, larger ones by one row-norm kernel each), the coefficient of every
    unit by ``torch.where``, and one multiply of each clipped gradient by its per-row
    coefficient view (no full-size temporary). On the CPU, gradients with no clipped unit are
    not rewritten. Low-precision gradients are multiplied by the coefficient in their own
    dtype, rounded toward zero, so rounding never lifts a unit above its ``max_norm``.

    :class:`~gradclip.ClipStats`: ``threshold`` is ``clipping`` (the ratio); ``coef`` is the
    factor applied to the total norm, ``post_norm / norm``; ``clipped`` says whether any unit
    was scaled. Per tensor, the effective factor ``‖clipped G‖ / ‖G‖`` comes from the unit
    norms, without another pass. AGC keeps no statistics: its state is the base counters
    (``steps``, ``nonfinite_steps``, int64, 0-dim).

    **Distributed training.** Under DDP and pipeline stages each rank holds whole rows. With
    DTensor parameters (FSDP2 ``fully_shard``, tensor parallel, 2-D meshes, HSDP) a rank
    holds some rows (``Shard(0)``) or pieces of every row (``Shard(1)``, a sharded bias or
    gain, which is one unit): the squared norms of the pieces of each gradient and weight
    row are summed over the groups that cut it (one all-reduce per group), and the
    per-tensor sums behind ``stats`` over the groups that deal rows out (another). Every
    rank then clips its own rows with the single-process coefficients; no host sync. A rank
    whose part of some gradient is empty (fewer rows than ranks) reads its gradients twice.

    Args:
        clipping: λ > 0, the largest allowed ratio ‖G_i‖ / max(‖W_i‖, eps) (default 0.01,
            the paper's for SGD at large batch; ``inf`` disables clipping).
        eps: ε >= 0, the floor of the weight norm, so that zero-initialised units can still
            move (default 1e-3, the paper's).
        exclude: which parameters are never clipped (default ``LAST_LINEAR``; see above).
        nonfinite: ``"propagate"`` (a NaN stays NaN; an infinite unit norm gives coefficient
            0, as torch's ``clip_grad_norm_``), ``"error"`` or ``"skip"``.
        shard_group, extra_groups: distributed training (pipeline stages with
            ``extra_groups``); see :class:`~gradclip.Clipper` and the README, "Distributed
            training". ``shard_group`` (flat FSDP1/ZeRO shards) raises ``NotImplementedError``:
            a flat shard's rows cannot be told apart.
        groups, policy, orthogonal: per-group clipping (``groups=optimizer.param_groups``);
            see :class:`~gradclip.Clipper` and :mod:`gradclip.grouping`.

    Example:
        >>> import torch
        >>> from gradclip.clippers.agc import AGC
        >>> _ = torch.manual_seed(0)
        >>> model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 2))
        >>> model(torch.randn(3, 4)).square().sum().backward()
        >>> head = model[2].weight.grad.clone()
        >>> stats = AGC(clipping=0.01)(model)      # the head, "2.weight" and "2.bias", is excluded
        >>> bool(stats.clipped), torch.equal(model[2].weight.grad, head)
        (True, True)

    References:
        Brock, De, Smith, Simonyan, "High-Performance Large-Scale Image Recognition Without
        Normalization", ICML 2021 (arXiv 2102.06171), §4.1 and Appendix (``unitwise_norm``).
    """

    folds_into_fused = False  # one coefficient per unit, not one global scale
    needs_whole_tensors = True  # rows of flat shards (shard_group) are unknowable: refused

    def __init__(
        self,
        clipping: float = 0.01,
        eps: float = 1e-3,
        *,
        exclude: ExcludeRule = LAST_LINEAR,
        nonfinite: NonFinitePolicy = "propagate",
        shard_group: ProcessGroup | None = None,
        extra_groups: Iterable[GroupLike] = (),
        **grouping: Unpack[GroupOptions],
    ):
        self.clipping = check_real(clipping, "clipping", "> 0", lambda v: v > 0, "clipping=0.01")
        self.eps = check_real(eps, "eps", ">= 0", lambda v: v >= 0 and math.isfinite(v), "eps=1e-3")
        self.exclude: ExcludeRule = _check_exclude(exclude)
        self._patterns = _patterns(self.exclude)
        self._plans: LRU[tuple, UnitPlan] = LRU(8)
        self._pattern_cache: LRU[tuple[str, ...], tuple[bool, ...]] = LRU(8)
        self._warned = False
        super().__init__(
            norm_type=2.0, nonfinite=nonfinite, shard_group=shard_group, extra_groups=extra_groups,
            **grouping,
        )

    def config(self) -> dict[str, Any]:
        return {
            "clipping": self.clipping,
            "eps": self.eps,
            "exclude": _describe_exclude(self.exclude, self._patterns),
            "nonfinite": self.nonfinite,
        }

    # -- which parameters are clipped ---------------------------------------------------

    def _resolve(self, parameters: Parameters) -> Target:
        target = super()._resolve(parameters)
        if self.exclude is not LAST_LINEAR:
            return target
        # LAST_LINEAR needs the module the clipper was called on.
        head = None
        if target.module is not None:
            for module in target.module.modules():
                if isinstance(module, torch.nn.Linear):
                    head = module
        if head is None:
            self._warn_once(
                "it was called on parameters, not on a module"
                if target.module is None
                else "the module has no nn.Linear"
            )
            return _HeadTarget.of(target, frozenset())
        return _HeadTarget.of(target, frozenset(id(p) for p in head.parameters()))

    def _warn_once(self, why: str) -> None:
        if not self._warned:
            self._warned = True
            warnings.warn(
                f"AGC(exclude=LAST_LINEAR) excluded nothing because {why}: every parameter, "
                "the classifier head included, is clipped (the paper leaves the head "
                "unclipped). Call the clipper on the model itself, or name the head, e.g. "
                "AGC(exclude=('fc.*',)); exclude=None clips everything without this warning.",
                stacklevel=4,
            )

    def _excluded(self, target: Target, names: tuple[str, ...], params: list[Tensor]) -> tuple[bool, ...]:
        by_rule = self._by_rule(target, names, params)
        if not target.excluded:
            return by_rule
        return tuple(e or id(p) in target.excluded for e, p in zip(by_rule, params, strict=True))

    def _by_rule(self, target: Target, names: tuple[str, ...], params: list[Tensor]) -> tuple[bool, ...]:
        if self.exclude is LAST_LINEAR:
            head = target.head if isinstance(target, _HeadTarget) else frozenset()
            return tuple(id(p) in head for p in params)
        if self._patterns is None:  # a predicate
            rule: Callable[[str, Tensor], bool] = self.exclude  # type: ignore[assignment]
            return tuple(bool(rule(n, p)) for n, p in zip(names, params, strict=True))
        if not self._patterns:
            return (False,) * len(names)
        patterns = self._patterns
        return self._pattern_cache.get_or_build(names, lambda: _matches(names, patterns))

    # -- the step -----------------------------------------------------------------------

    def _measure(self, target: Target) -> UnitNorms:
        """The step's norms, derived from the unit norms of the gradients (each gradient is
        read once), with the unit norms of the weights and the per-unit limits."""
        grads = target.grads
        local = None
        if grads:
            local = self._units(grads, self._excluded(target, target.local_names, target.local_params))
        layout = target.layout
        if layout is None or not layout.communicates:  # whole rows here (one process, DDP)
            if local is None:
                empty = empty_norms(2.0)
                return UnitNorms.of(empty, plan=UnitPlan.build([], ()), units=empty.per_tensor,
                                    limits=empty.per_tensor, squares=empty.per_tensor.double(),
                                    spread=[], unit_grads=[])
            plan, units, measured = local
            weights = plan.unit_norms(  # replicated DTensors: their local (full) tensors
                distributed.local_tensors(target.local_params), units.device, included_only=True
            )
            return self._with_limits(measured, plan, units, weights, [], grads)
        # A distributed layout: whole-tensor norms, then the rows of this rank's parts.
        reduced = layout.reduce(
            local[2] if local is not None
            else distributed.nothing_measured(2.0, layout.device)
        )
        names, params = target.names, target.params
        grads, local_params = _local_parts(reduced.tensors, params, names)
        device = reduced.per_tensor.device
        if local is not None and _same(local[2].tensors, grads):  # a part of every row here:
            plan, units = local[0], local[1]  # measured already
        else:  # some rows are empty here: measure again, with them
            plan = self._plan(grads, self._excluded(target, names, params))
            units = plan.unit_norms(grads, device)
        weights = plan.unit_norms(local_params, device, included_only=True)
        split, spread = self._schedules(plan, params, device)
        if split:  # a row's pieces: add their squares (gradient and weight in one vector)
            n = len(weights)
            both = distributed.sum_over(torch.cat([units[:n], weights]).square(), split).sqrt()
            units, weights = torch.cat([both[:n], units[n:]]), both[n:]
        return self._with_limits(reduced, plan, units, weights, spread, grads)

    def _units(
        self, grads: list[Tensor], excluded: tuple[bool, ...]
    ) -> tuple[UnitPlan, Tensor, GradNorms]:
        """The unit norms of ``grads`` and the per-tensor norms derived from them."""
        plan = self._plan(grads, excluded)
        units = plan.unit_norms(grads, grads[0].device)
        per_tensor = plan.per_tensor_sums(units.double().square()).sqrt().to(units.dtype)
        groups = _foreach.group_by_device_dtype(grads)
        measured = GradNorms(grads, per_tensor, total_norm(per_tensor, 2.0), 2.0,
                             result_dtype(groups), groups)
        return plan, units, measured

    def _with_limits(
        self, measured: GradNorms, plan: UnitPlan, units: Tensor, weights: Tensor,
        spread: distributed.Schedule, unit_grads: list[Tensor],
    ) -> UnitNorms:
        limits = weights.clamp_min(self.eps).mul_(self.clipping)
        if plan.excluded_units:
            limits = torch.cat([limits, limits.new_full((plan.excluded_units,), math.inf)])
        squares = plan.per_tensor_sums(units.double().square())
        return UnitNorms.of(measured, plan=plan, units=units, limits=limits,
                         squares=squares, spread=spread, unit_grads=unit_grads)

    def _step(self, norms: UnitNorms, state: None) -> Step:  # type: ignore[override]
        units, limits = norms.units, norms.limits
        # NaN > x is False: a NaN unit keeps coefficient 1 and stays NaN ("propagate").
        unit_coef = torch.where(units > limits, limits / units, torch.ones_like(units))
        threshold = torch.full((), self.clipping, dtype=norms.total.dtype, device=units.device)
        return Step(threshold, unit_coef, None)

    def _factors(self, norms: UnitNorms, coef: Tensor) -> Tensor:  # type: ignore[override]
        """Per tensor, ``‖clipped G‖ / ‖G‖`` from the unit norms (no pass over the gradients)."""
        plan, squares = norms.plan, norms.squares
        clipped_units = coef < 1
        # Per-tensor 1-D sums, not one (units x 3) matrix: a fresh ~1 MB-per-column float64
        # matrix cost ~10 ms per call on GPT-2 (page faults of the new allocation), sums ~1 ms.
        post = plan.per_tensor_sums(torch.where(clipped_units, norms.limits, norms.units).double().square())
        count = plan.per_tensor_sums(clipped_units.double())
        if norms.spread:  # rows dealt out over ranks: the whole tensor's sums, same on every rank
            squares, post, count = distributed.sum_over(
                torch.stack([squares, post, count], 1), norms.spread).unbind(1)
        return torch.where(
            count > 0, (post.sqrt() / squares.sqrt().clamp_min(1e-300)), 1.0
        ).to(norms.per_tensor.dtype)

    def _apply(self, norms: UnitNorms, coef: Tensor) -> None:  # type: ignore[override]
        """Multiply each clipped gradient by its per-row coefficient view (no full-size
        temporary); on the CPU, tensors with no clipped unit here are not rewritten."""
        plan = norms.plan
        positions = range(plan.included)
        if _foreach.is_host_device(coef.device) and not _foreach.is_compiling():
            touched = (plan.per_tensor_sums((coef < 1).double()) > 0).tolist()
            positions = [j for j in positions if touched[plan.order[j]]]
            if not positions:
                return
        grads = norms.unit_grads
        by_key: dict[tuple[torch.device, torch.dtype], list[tuple[Tensor, Tensor]]] = {}
        pieces: dict[tuple[torch.device, torch.dtype], tuple[Tensor, ...]] = {}
        for j in positions:
            grad = grads[plan.order[j]]
            key = (grad.device, grad.dtype)
            if key not in pieces:
                pieces[key] = _coef_as(coef, grad.device, grad.dtype).split(plan.counts)
            by_key.setdefault(key, []).append((grad, pieces[key][j].view(plan.coef_shapes[j])))
        for (device, _), pairs in by_key.items():
            group = [g for g, _ in pairs]
            views = [c for _, c in pairs]
            if _foreach.has_foreach_support(group, device):
                _foreach.foreach_mul_(group, views)
            else:
                for g, c in pairs:
                    g.mul_(c)

    def _schedules(
        self, plan: UnitPlan, params: list[Tensor], device: torch.device
    ) -> tuple[distributed.Schedule, distributed.Schedule]:
        """How to sum, over ranks, the units cut in pieces and the sums of tensors whose rows
        are dealt out (kept in the plan, per device and parameter layout)."""
        included = [plan.order[j] for j in range(plan.included)]
        key = (device, tuple(_layout_of(params[i]) for i in included))
        cached = plan.schedules.get(key)
        if cached is not None:
            return cached[0], cached[1]
        order: dict[int, tuple] = {}
        n = sum(plan.counts[: plan.included])
        split_keys, split_entries, spread_keys, spread_entries = [], [], [], []
        start = 0
        for j, i in enumerate(included):
            split, spread = distributed.row_groups(params[i], plan.coef_shapes[j] == (), order)
            units = range(start, start + plan.counts[j])
            start += plan.counts[j]
            if split:
                split_keys.append(split)
                split_entries.append([*units, *(u + n for u in units)])
            if spread:
                spread_keys.append(spread)
                spread_entries.append([i])
        split_schedule = distributed.schedule(split_keys, split_entries, 2 * n, device, order)
        spread_schedule = distributed.schedule(spread_keys, spread_entries, len(plan.order),
                                               device, order)
        # the key holds mesh ids: keep the meshes alive with it, so that no id is reused
        meshes = [getattr(params[i], "device_mesh", None) for i in included]
        plan.schedules[key] = (split_schedule, spread_schedule, meshes)
        return split_schedule, spread_schedule

    def _plan(self, grads: list[Tensor], excluded: tuple[bool, ...]) -> UnitPlan:
        key = (tuple((g.shape, g.dtype, g.device) for g in grads), excluded)
        return self._plans.get_or_build(key, lambda: UnitPlan.build(grads, excluded))


@dataclass(frozen=True)
class _HeadTarget(Target):
    """A :class:`Target` with the ids of the last ``nn.Linear``'s parameters (LAST_LINEAR)."""

    head: frozenset[int] = frozenset()

    @classmethod
    def of(cls, target: Target, head: frozenset[int]) -> _HeadTarget:
        # field by field: torch.compile (2.11) cannot trace vars() of a frozen dataclass
        return cls(target.grads, target.local_names, target.local_params, target.names,
                   target.params, target.layout, target.module, head)


@dataclass(frozen=True)
class UnitNorms(GradNorms):
    """AGC's measurement: :class:`~gradclip.GradNorms` derived from unit norms, with what
    the step and the scaling need (this rank's view; see :class:`AGC`).

    Attributes:
        plan: how the units were measured (:class:`~gradclip.norms.units.UnitPlan`).
        units: 1-D, the norm of every unit of the gradients, in the plan's unit order
            (pieces of a row summed over the ranks that cut it).
        limits: 1-D, the largest allowed norm of each unit, ``clipping · max(‖W_i‖, eps)``
            (``inf`` for excluded units).
        squares: float64, per tensor, the sum of its squared unit norms (this rank's rows).
        spread: the groups over which tensors' rows are dealt out (their sums are added).
        unit_grads: the gradients the plan measured (this rank's part of each row tensor).
    """

    plan: UnitPlan
    units: Tensor
    limits: Tensor
    squares: Tensor
    spread: distributed.Schedule
    unit_grads: list[Tensor]

    @classmethod
    def of(cls, norms: GradNorms, **extra: Any) -> UnitNorms:
        """``norms`` with AGC's fields (field by field: see :meth:`_HeadTarget.of`)."""
        return cls(norms.tensors, norms.per_tensor, norms.total, norms.norm_type, norms.dtype,
                   norms.groups, **extra)


def _local_parts(
    tensors: list[Tensor], params: list[Tensor], names: tuple[str, ...]
) -> tuple[list[Tensor], list[Tensor]]:
    """This rank's part of each gradient and parameter, rows matched: a gradient it holds no
    part of (None here, a part elsewhere) becomes zeros shaped like its parameter's part."""
    weights = distributed.local_tensors(list(params))
    grads = []
    for grad, weight, param, name in zip(tensors, weights, params, names, strict=True):
        if grad.shape != weight.shape:
            if param.grad is not None:
                raise NotImplementedError(
                    f"AGC: on this rank the gradient of {name!r} is laid out as "
                    f"{tuple(grad.shape)} and its parameter as {tuple(weight.shape)}, so their "
                    "rows cannot be matched; give the gradient the parameter's placements, or "
                    "exclude it (AGC(exclude=...))"
                )
            grad = weight.new_zeros(weight.shape)
        grads.append(grad)
    return grads, weights


def _same(a: list[Tensor], b: list[Tensor]) -> bool:
    """The same tensor objects in the same order."""
    return len(a) == len(b) and all(x is y for x, y in zip(a, b, strict=True))


def _layout_of(param: Tensor) -> tuple | None:
    """What decides a parameter's row groups: its mesh and placements (None: a plain tensor)."""
    mesh = getattr(param, "device_mesh", None)
    return None if mesh is None else (id(mesh), tuple(param.placements))


def _coef_as(coef: Tensor, device: torch.device, dtype: torch.dtype) -> Tensor:
    """Unit coefficients in the gradients' dtype, rounded toward zero (never above the exact one).

    Mixed-dtype broadcast multiplies are an order of magnitude slower on the CPU, so the
    coefficient is converted once to the gradients' dtype instead.
    """
    coef = coef.to(device)
    if dtype == coef.dtype or not dtype.is_floating_point:
        return coef
    low = coef.to(dtype)
    return torch.where(low.to(coef.dtype) > coef, torch.nextafter(low, torch.zeros_like(low)), low)


# ---------------------------------------------------------------------------------------
# argument checks



@torch.compiler.assume_constant_result  # names and patterns are strings: known at trace time
def _matches(names: tuple[str, ...], patterns: tuple[str, ...]) -> tuple[bool, ...]:
    """For each name, whether an fnmatch pattern matches it."""
    return tuple(any(fnmatch.fnmatchcase(n, pat) for pat in patterns) for n in names)


def _check_exclude(exclude: object) -> ExcludeRule:
    if exclude is None or exclude is LAST_LINEAR or callable(exclude):
        return exclude  # type: ignore[return-value]
    if isinstance(exclude, str):
        return (exclude,)
    try:
        patterns = tuple(exclude)  # type: ignore[call-overload]
    except TypeError:
        patterns = None
    if patterns is None or not all(isinstance(p, str) for p in patterns):
        raise TypeError(
            f"`exclude` must be LAST_LINEAR, a name pattern, a collection of name patterns, a "
            f"callable (name, param) -> bool, or None; got {exclude!r:.80}"
        )
    return tuple(sorted(set(patterns)))  # order is irrelevant; sorted compares across runs


def _patterns(exclude: ExcludeRule) -> tuple[str, ...] | None:
    """The fnmatch patterns of the rule; None for LAST_LINEAR and predicates."""
    if exclude is LAST_LINEAR or callable(exclude):
        return None
    return () if exclude is None else tuple(exclude)  # type: ignore[arg-type]


def _describe_exclude(exclude: ExcludeRule, patterns: tuple[str, ...] | None) -> object:
    """A picklable, comparable description of the rule, for ``config()`` / ``state_dict()``."""
    if exclude is LAST_LINEAR:
        return "LAST_LINEAR"
    if patterns is not None:
        return patterns
    rule = exclude
    return f"callable {getattr(rule, '__module__', '?')}.{getattr(rule, '__qualname__', repr(rule))}"
