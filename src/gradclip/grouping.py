"""Per-group clipping: parameter groups, what each one's policy is, and the norm of each group.

Modern training mixes optimizers and groups (Muon for the hidden matrices, AdamW for the
embeddings, head, norms and biases; LoRA adapters; a frozen backbone with a trainable head).
One global norm and one coefficient for all of them either does nothing useful or stalls
some: an orthogonalising optimizer (Muon) throws the gradient's magnitude away, and a tiny
global coefficient pushes its input under its numerical floor (NVIDIA/Megatron-LM#5394).

**Groups** are what an optimizer already has: ``groups=optimizer.param_groups`` (or the
optimizer itself, or several optimizers), or named groups ``{"adapters": [...], ...}``; see
:mod:`gradclip.paramgroups` for the forms and how groups are named.

**Policies.** Each group is, per its policy:

* ``"exclude"``: left out of the norm and of the clip (still measured, for the stats);
* ``"own"``: clipped on its own norm;
* ``"shared"``, or ``"shared:<key>"``: clipped on one norm shared by every group with the
  same key (the norm of their union);
* a number: clipped on its own norm at this threshold (``max_norm`` of the drop-in,
  :class:`~gradclip.NormClip`, :class:`~gradclip.ValueClip`);
* a :class:`~gradclip.Clipper` (clippers only): clipped on its own norm by that clipper,
  with its own state.

A group's policy comes from, first to last: the ``policy=`` argument (one value per group, a
mapping from group name to value, or one value for all), the group's own ``"clip"`` entry
(``{"params": ..., "clip": "exclude"}``), the orthogonalising rule (``orthogonal=``,
:func:`gradclip.muon_like` by default: such groups are ``"exclude"``), and the default (``"own"``
when groups are given; :meth:`Clipper.step <gradclip.Clipper.step>` without groups uses
``"shared"``, the global norm of before).

The norm of a group is the p-norm of its tensors' norms, taken from the one pass
(:mod:`gradclip.norms`); under ``torch.distributed`` those are the whole tensors' norms,
identical on every rank, and the group norms are reduced over ``extra_groups`` (pipeline
stages) in one all-reduce. No host read, no branch on a value.

Example:
    >>> import torch, gradclip
    >>> model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.Linear(4, 2))
    >>> groups = [{"params": model[0].parameters()}, {"params": model[1].parameters()}]
    >>> opt = torch.optim.SGD(groups, lr=0.1)
    >>> model(torch.ones(1, 4)).sum().backward()
    >>> norms = gradclip.clip_grad_norm_(model.parameters(), 1.0, groups=opt.param_groups)
    >>> norms.shape                      # one pre-clip norm per group
    torch.Size([2])
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from gradclip import distributed, norms
from gradclip._cache import LRU, index_tensor
from gradclip._checks import ArgumentTypeError
from gradclip.paramgroups import OrthogonalRule, ParamGroup, muon_like

if TYPE_CHECKING:
    from gradclip.distributed import Reduction

__all__ = ["POLICY_KEY", "GroupPlan", "Planner", "explicit", "group_norms"]

POLICY_KEY = "clip"
"""The param-group entry that holds a group's policy: ``{"params": ..., "clip": "exclude"}``."""

# ---------------------------------------------------------------------------------------
# policies


@dataclass(frozen=True)
class Policy:
    """A group's resolved policy: excluded, or clipped on the norm of ``domain``.

    ``value`` is the group's threshold (a float), its own clipper (any other object), or
    None (the caller's rule and threshold).
    """

    excluded: bool
    domain: str
    value: object = None


def _parse(value: object, name: str) -> Policy:
    if isinstance(value, str):
        if value == "exclude":
            return Policy(True, "")
        if value == "own":
            return Policy(False, f"own:{name}")
        if value == "shared" or (value.startswith("shared:") and len(value) > 7):
            return Policy(False, value)
        raise ValueError(
            f"group {name!r}: policy {value!r} is not one of 'exclude', 'own', 'shared' or "
            "'shared:<key>'; or pass a threshold (a number) or a clipper"
        )
    if isinstance(value, bool) or value is None:
        raise ArgumentTypeError(
            f"group {name!r}: policy {value!r} is not a policy; pass 'exclude', 'own', 'shared', "
            "'shared:<key>', a threshold or a clipper"
        )
    if isinstance(value, numbers.Real) or (isinstance(value, Tensor) and value.numel() == 1):
        number = float(value)
        if math.isnan(number) or number < 0:
            raise ValueError(
                f"group {name!r}: threshold {number} must be >= 0 (a negative or NaN threshold "
                "would flip or NaN its gradients); pass e.g. 1.0, or 'exclude'"
            )
        return Policy(False, f"own:{name}", number)
    return Policy(False, f"own:{name}", value)


def explicit(policy: object, groups: list[ParamGroup], what: str) -> list[object | None]:
    """Per group, the value ``policy`` gives it explicitly (None: none)."""
    names = [g.name for g in groups]
    if policy is None:
        return [None] * len(groups)
    if isinstance(policy, Mapping):
        unknown = [str(k) for k in policy if str(k) not in names]
        if unknown:
            raise ValueError(
                f"`{what}` names {unknown}, which {'is' if len(unknown) == 1 else 'are'} not "
                f"among the groups {names}: a group that is not in the optimizer. Use the "
                "groups' names (their 'name' entry, or their position '0', '1', ...)"
            )
        return [policy.get(n, None) for n in names]
    if isinstance(policy, Sequence) and not isinstance(policy, str):
        if len(policy) != len(groups):
            raise ValueError(
                f"`{what}` has {len(policy)} entries for {len(groups)} groups {names}: pass one "
                f"per group, in order, or a mapping from group name to value"
            )
        return list(policy)
    return [None] * len(groups)  # one value for all: a default, applied after the rule


def _blanket(policy: object) -> object | None:
    if policy is None or isinstance(policy, Mapping):
        return None
    if isinstance(policy, Sequence) and not isinstance(policy, str):
        return None
    return policy


# ---------------------------------------------------------------------------------------
# the plan of one parameter set


@dataclass(frozen=True)
class Domain:
    """Groups clipped on one norm: its name (a group's, or ``"shared"`` / ``"shared:<key>"``),
    its key (``"own:<group>"`` or the shared name), its groups, the rows they hold, and the
    value of an own group's policy (its threshold or clipper; None otherwise)."""

    name: str
    key: str
    groups: tuple[int, ...]
    rows: tuple[int, ...]
    value: object = None


@dataclass(frozen=True)
class GroupPlan:
    """Which measured row belongs to which group, and which groups share a norm.

    Attributes:
        names: the group names (G).
        excluded: per group, whether it is left out of the norm and the clip.
        row_group: per measured row (entry of ``GradNorms.per_tensor``), its group.
        domains: the norms that are clipped on, each with its groups and rows.
        domain_of_group: per group, its domain (-1: excluded).
        by_rule: the groups the orthogonalising rule excluded (for the warning).
    """

    names: tuple[str, ...]
    excluded: tuple[bool, ...]
    row_group: tuple[int, ...]
    domains: tuple[Domain, ...]
    domain_of_group: tuple[int, ...]
    by_rule: tuple[str, ...]

    def row_index(self, device: torch.device) -> Tensor:
        """``row_group`` as an int64 device tensor (cached)."""
        return index_tensor(self.row_group, device)

    def domain_index(self, device: torch.device) -> Tensor:
        """Per group, its domain; excluded groups get ``len(domains)`` (a spare slot)."""
        spare = len(self.domains)
        return index_tensor(tuple(d if d >= 0 else spare for d in self.domain_of_group), device)

    def rows_of(self, domain: int, device: torch.device) -> Tensor:
        """The rows of ``domains[domain]`` as an index tensor (cached)."""
        return index_tensor(self.domains[domain].rows, device)


class Planner:
    """Builds and caches the :class:`GroupPlan` of each parameter set (rows change rarely).

    Args:
        groups: the groups (see :data:`GroupsLike`), or None (given per call).
        policy: per-group policies (see the module doc).
        orthogonal: the orthogonalising rule (:func:`muon_like`; None: no rule).
        default: the policy of groups nothing else decides.
        what: the argument name ``policy`` came in as, for messages.
    """

    def __init__(self, policy: object = None, orthogonal: OrthogonalRule | None = muon_like,
                 default: object = "own", what: str = "policy"):
        if orthogonal is not None and not callable(orthogonal):
            raise ArgumentTypeError(
                f"`orthogonal` must be a callable (group, optimizer) -> bool or None, got "
                f"{type(orthogonal).__name__} {orthogonal!r:.60}; pass e.g. "
                "`orthogonal=gradclip.muon_like` (the default) or `orthogonal=None`"
            )
        if isinstance(policy, Mapping | Sequence) and not isinstance(policy, str):
            for key, value in (policy.items() if isinstance(policy, Mapping)
                               else enumerate(policy)):
                _parse(value, str(key))
        elif policy is not None:
            _parse(policy, "*")
        _parse(default, "*")
        self.policy, self.orthogonal, self.default, self.what = policy, orthogonal, default, what
        self._plans: LRU[tuple, GroupPlan] = LRU(8)

    def __getstate__(self) -> dict[str, Any]:
        # the plans are a cache (keyed by ids, with a lock): a copy builds its own
        return {k: v for k, v in self.__dict__.items() if k != "_plans"}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._plans = LRU(8)

    def policies(self, groups: list[ParamGroup]) -> tuple[list[Policy], list[str]]:
        """Each group's :class:`Policy`, and the names the rule excluded."""
        given = explicit(self.policy, groups, self.what)
        blanket = _blanket(self.policy)
        out, by_rule = [], []
        for group, value in zip(groups, given, strict=True):
            if value is None:
                value = group.options.get(POLICY_KEY) if isinstance(group.options, Mapping) else None
            if value is None and self.orthogonal is not None and self.orthogonal(
                group.options, group.optimizer
            ):
                value = "exclude"
                by_rule.append(group.name)
            if value is None:
                value = blanket if blanket is not None else self.default
            out.append(_parse(value, group.name))
        return out, by_rule

    def plan(self, groups: list[ParamGroup], params: Sequence[Tensor], names: Sequence[str],
             *, ungrouped: str | None = None, allow_empty: bool = False) -> GroupPlan:
        """The plan of measured rows ``params`` (named ``names``) over ``groups``.

        Args:
            ungrouped: rows in no group join a group of this name with the default policy
                (None: they raise).
            allow_empty: a group with no row is fine (pipeline stages); else it raises.

        Raises:
            ValueError: a parameter in two groups, a group with no gradient, a parameter
                with a gradient in no group (each message names them and the fix).
        """
        key = (
            tuple(map(id, params)),
            tuple((g.name, tuple(map(id, g.params)), _policy_key(g.options)) for g in groups),
            ungrouped, allow_empty,
        )
        cached = self._plans.get(key)
        if cached is None:
            cached = self._plans.put(key, self._build(groups, params, names, ungrouped, allow_empty))
        return cached

    def _build(self, groups: list[ParamGroup], params: Sequence[Tensor], names: Sequence[str],
               ungrouped: str | None, allow_empty: bool) -> GroupPlan:
        owner: dict[int, int] = {}
        for i, group in enumerate(groups):
            for p in group.params:
                j = owner.setdefault(id(p), i)
                if j != i:
                    where = next((n for n, q in zip(names, params, strict=True) if q is p),
                                 f"of shape {tuple(p.shape)}")
                    raise ValueError(
                        f"parameter {where!r} is in two groups, {groups[j].name!r} and "
                        f"{group.name!r}: its gradient would be clipped twice. Put each "
                        "parameter in one group (as torch.optim requires)"
                    )
        row_group = [owner.get(id(p), -1) for p in params]
        loose = [n for n, g in zip(names, row_group, strict=True) if g < 0]
        if loose:
            if ungrouped is None:
                raise ValueError(
                    f"{len(loose)} parameter(s) with a gradient are in no group: "
                    f"{loose[:5]}{' ...' if len(loose) > 5 else ''}. Add them to a group (or "
                    "to the optimizer), or leave them out of the call; nothing was clipped"
                )
            groups = [*groups, ParamGroup(ungrouped, ())]
            row_group = [len(groups) - 1 if g < 0 else g for g in row_group]
        policies, by_rule = self.policies(groups)
        if ungrouped is not None and loose:
            policies[-1] = _parse(self.default, ungrouped)
        counts = [0] * len(groups)
        for g in row_group:
            counts[g] += 1
        empty = [grp.name for grp, c, pol in zip(groups, counts, policies, strict=True)
                 if c == 0 and not pol.excluded]
        if empty and not allow_empty:
            raise ValueError(
                f"group(s) {empty} hold no parameter with a gradient among the parameters "
                "clipped: call after backward(), pass the model the optimizer updates, or give "
                f"{'it' if len(empty) == 1 else 'them'} the policy 'exclude'; nothing was clipped"
            )
        domain_names: dict[str, int] = {}
        members: list[list[int]] = []
        values: list[object] = []
        domain_of_group = []
        for i, pol in enumerate(policies):
            if pol.excluded:
                domain_of_group.append(-1)
                continue
            d = domain_names.setdefault(pol.domain, len(domain_names))
            if d == len(members):
                members.append([])
                values.append(pol.value)
            members[d].append(i)
            domain_of_group.append(d)
        domains = tuple(
            Domain(
                name.removeprefix("own:"),
                name,
                tuple(gs),
                tuple(r for r, g in enumerate(row_group) if domain_of_group[g] == d),
                values[d],
            )
            for (name, d), gs in zip(domain_names.items(), members, strict=True)
        )
        return GroupPlan(
            tuple(g.name for g in groups), tuple(p.excluded for p in policies),
            tuple(row_group), domains, tuple(domain_of_group), tuple(by_rule),
        )


def _policy_key(options: Mapping[str, Any]) -> object:
    value = options.get(POLICY_KEY) if isinstance(options, Mapping) else None
    return value if isinstance(value, str | float | int | type(None)) else id(value)


# ---------------------------------------------------------------------------------------
# norms of groups


def _combine(values: Tensor, index: Tensor, n: int, p: float) -> Tensor:
    """Per slot of ``index`` (``n`` slots), the sum (max for inf, min for -inf) of ``values``;
    NaN anywhere in a slot makes it NaN (a max would drop it)."""
    if p == math.inf or p == -math.inf:
        nan = torch.isnan(values)
        start = 0.0 if p > 0 else math.inf
        out = values.new_full((n,), start).scatter_reduce_(
            0, index, torch.where(nan, start, values), "amax" if p > 0 else "amin",
            include_self=True,
        )
        flags = values.new_zeros(n).index_add_(0, index, nan.to(values.dtype))
        return torch.where(flags > 0, math.nan, out)
    return values.new_zeros(n).index_add_(0, index, values)


def group_norms(per_tensor: Tensor, index: Tensor, n: int, p: float,
                layout: Reduction | None = None) -> Tensor:
    """The ``p``-norm of each group's per-tensor norms: ``n`` values, in ``per_tensor``'s dtype.

    ``index[i]`` is the group of ``per_tensor[i]``; a group with no entry has norm 0 (``inf``
    for ``p = -inf``). Finite ``p`` accumulate p-th powers in float64, so that norms past
    float32's square root never overflow. Under ``torch.distributed`` with ``layout``, the
    groups are reduced over its ``extra_groups`` (pipeline stages) in one all-reduce: every
    stage must pass the same groups in the same order.

    Example:
        >>> group_norms(torch.tensor([3.0, 4.0, 2.0]), torch.tensor([0, 0, 1]), 2, 2.0)
        tensor([5., 2.])
    """
    sums = _combine(norms.powers(per_tensor, p), index, n, p)
    if layout is not None and layout.extra:
        if not p > 0:
            raise ValueError(
                f"`norm_type`={p} cannot be reduced across pipeline stages: use a positive "
                "norm_type such as 2.0, 1.0 or inf"
            )
        sums = distributed.sum_over(sums, [(g, None) for g in layout.extra], math.isinf(p))
    return norms.root(sums, p).to(per_tensor.dtype)
