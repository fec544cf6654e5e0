"""Per-group policies on a clipper: each group excluded, clipped on its own norm, or on a norm
shared with other groups, by the clipper's rule, at its own threshold, or by its own clipper.

Every clipper takes ``groups=``, ``policy=`` and ``orthogonal=`` (see :mod:`gradclip.grouping`
for what they accept), and :meth:`Clipper.step(model, optimizer) <gradclip.Clipper.step>`
applies the orthogonalising rule to the optimizer's groups even without them::

    clipper = gradclip.AdaptiveClip(groups=opt.param_groups,
                                    policy={"head": 0.5, "lora": gradclip.NormClip(1.0)})

One step, for every policy at once, from the one pass: the norm of each group is the p-norm
of its tensors' norms (:func:`gradclip.grouping.group_norms`); each *domain* (an own group,
or the groups that share a norm) runs the rule's pure ``_step`` on its norm and its own
state; the coefficients become one per tensor (excluded tensors: 1), which
:func:`gradclip.scale.scale_each_` applies. No host read, no branch on a value: a compiled
step traces it as the plain one.

**State.** Each domain keeps its own statistics: the ``"shared"`` domain the clipper's own
(the state of the clipper called without groups, so a checkpoint carries over), an own group
or another shared key a state of the clipper's type, a group with its own clipper that
clipper's state. ``state_dict()["groups"]`` holds them by domain and group name.

**Stats.** :attr:`ClipStats.groups <gradclip.ClipStats.groups>` holds, per group, its norm
before and after, its threshold and its coefficient (:class:`gradclip.stats.GroupStats`);
``ClipStats.norm`` stays the norm of every gradient, excluded groups included, and
``threshold`` is the one domain's threshold (NaN with several).
"""

from __future__ import annotations

import copy
import math
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import replace
from typing import TYPE_CHECKING, Any, TypedDict

import torch
from torch import Tensor

from gradclip.clippers.state import StateStore
from gradclip.grouping import GroupPlan, Planner, group_norms
from gradclip.norms import GradNorms
from gradclip.paramgroups import GroupsLike, OrthogonalRule, ParamGroup, as_groups, muon_like
from gradclip.stats import GroupStats

if TYPE_CHECKING:
    from gradclip.clippers.base import Clipper
    from gradclip.clippers.spikes import StepLoss
    from gradclip.clippers.targets import Target

__all__ = ["UNGROUPED", "GroupOptions", "GroupedCall", "Grouping"]

UNGROUPED = "(not in the optimizer)"
"""The group that :meth:`Clipper.step` gives parameters the optimizer does not hold."""


class GroupOptions(TypedDict, total=False):
    """The per-group keyword arguments every clipper takes (see :mod:`gradclip.grouping`)."""

    groups: GroupsLike
    policy: object
    orthogonal: OrthogonalRule | None


def _describe(value: object) -> object:
    """A comparable, picklable description of a policy value (for checkpoints)."""
    if isinstance(value, Mapping):
        return {str(k): _describe(v) for k, v in value.items()}
    if isinstance(value, Sequence) and not isinstance(value, str):
        return [_describe(v) for v in value]
    config = getattr(value, "config", None)
    if callable(config) and hasattr(value, "_step"):
        return {"type": type(value).__name__, "config": config()}
    return value if isinstance(value, str | float | int | type(None)) else repr(value)


class Grouping:
    """A clipper's per-group setup: its groups (or None: the optimizer's, in :meth:`step
    <gradclip.Clipper.step>`), the policies, the states of the domains and the warning.

    Built by :class:`~gradclip.Clipper`; checks every argument (names, lengths, thresholds,
    clippers) before the first step.
    """

    def __init__(self, clipper: Clipper, groups: GroupsLike = None, policy: object = None,
                 orthogonal: OrthogonalRule | None = muon_like):
        self.clipper = clipper
        self.raw = groups
        self.explicit = Planner(policy, orthogonal, default="own")
        self.auto = Planner(None, orthogonal, default="shared")
        self.policy, self.orthogonal = policy, orthogonal
        self.stores: dict[str, StateStore] = {}  # domain key -> state (not "shared")
        self.copies: dict[float, Clipper] = {}  # threshold -> the clipper at it
        self.pending: dict[str, Any] = {}  # loaded states of sub-clippers not seen yet
        self.subs: dict[str, Clipper] = {}  # group name -> its own clipper, once seen
        self.warned = False
        self.parsed: list[ParamGroup] | None = None
        if groups is not None:
            parsed = self.parsed = as_groups(groups)
            policies, _ = self.explicit.policies(parsed)
            for group, pol in zip(parsed, policies, strict=True):
                self._check_value(pol.value, group.name)
        for value in self._values(policy):
            self._check_value(value, "*")

    def __deepcopy__(self, memo: dict[int, Any]) -> Grouping:
        # A copied clipper clips the same parameters: the groups (the optimizer's own
        # param_groups) are shared, not copied; policies, sub-clippers and states are copied.
        new = object.__new__(Grouping)
        memo[id(self)] = new
        for key, value in self.__dict__.items():
            setattr(new, key, value if key in ("raw", "parsed") else copy.deepcopy(value, memo))
        return new

    @staticmethod
    def _values(policy: object) -> list[object]:
        if isinstance(policy, Mapping):
            return list(policy.values())
        if isinstance(policy, Sequence) and not isinstance(policy, str):
            return list(policy)
        return [] if policy is None else [policy]

    def reads_loss(self) -> bool:
        """Whether a group's own clipper reads the loss: one named by the ``policy``
        argument or by a group's ``"clip"`` entry (of the live groups, as a step reads them)."""
        rules = self._values(self.policy)
        if self.configured:
            rules += [p.value for p in self.explicit.policies(self._groups())[0]]
        return any(getattr(rule, "reads_loss", False) for rule in rules)

    def _groups(self) -> list[ParamGroup]:
        """The configured groups as a step reads them: re-parsed when they are live (an
        optimizer's ``param_groups``, which may change), else as parsed at construction."""
        return as_groups(self.raw) if _live(self.raw) else self.parsed  # type: ignore[return-value]

    @property
    def configured(self) -> bool:
        """Whether the clipper was given groups (else only ``step`` with an optimizer groups)."""
        return self.raw is not None

    def describe(self) -> dict[str, Any]:
        """What decides the domains, for ``state_dict()`` (compared on load)."""
        rule = self.orthogonal
        return {
            "policy": _describe(self.policy),
            "orthogonal": None if rule is None else getattr(rule, "__qualname__", repr(rule)),
        }

    def _check_value(self, value: object, group: str) -> None:
        from_clipper = type(self.clipper)
        if value is None or isinstance(value, str):
            return
        if getattr(from_clipper, "needs_whole_tensors", False):
            raise TypeError(
                f"group {group!r}: {from_clipper.__name__} clips each unit relative to its weight, "
                f"not a group's norm: its groups take 'exclude', 'own' or 'shared' only, not "
                f"{value!r:.40}; exclude the group, or clip it with another clipper"
            )
        if isinstance(value, float | int):
            if getattr(from_clipper, "threshold_arg", None) is None:
                raise TypeError(
                    f"group {group!r}: a threshold ({value}) as a policy needs a clipper with one "
                    f"threshold (NormClip, ValueClip); {from_clipper.__name__} has none. Give "
                    f"the group its own clipper instead, e.g. {from_clipper.__name__}(...)"
                )
            return
        if not callable(getattr(value, "_step", None)) or not hasattr(value, "_store"):
            raise TypeError(
                f"group {group!r}: policy {value!r:.60} is not a gradclip Clipper; pass "
                "'exclude', 'own', 'shared', 'shared:<key>', a threshold or a clipper such as "
                "gradclip.NormClip(1.0)"
            )
        kind = type(value)
        if getattr(kind, "needs_whole_tensors", False) or hasattr(kind, "_apply_rows"):
            raise TypeError(
                f"group {group!r}: {kind.__name__} clips units or elements, not a group's norm, so "
                "it cannot be a group's clipper; give the group a norm clipper (NormClip, "
                "AdaptiveClip, ...), or use it on its own"
            )
        if value.norm_type != self.clipper.norm_type:
            raise ValueError(
                f"group {group!r}: its clipper measures norm_type={value.norm_type}, this "
                f"{type(self.clipper).__name__} norm_type={self.clipper.norm_type}: the one pass "
                "measures one norm; build both with the same norm_type"
            )
        if getattr(value, "_grouping", None) is not None and value._grouping.configured:
            raise ValueError(f"group {group!r}: its clipper has groups of its own; give it none")

    # -- binding a call ---------------------------------------------------------------------

    def bind(self, target: Target, optimizers: Sequence[object] | None) -> GroupedCall | None:
        """The grouped step of this call, or None when no group policy applies (the plain
        step: no groups were given, and no optimizer group is orthogonalised)."""
        layout = target.layout
        stages = layout is not None and bool(layout.extra)
        if self.configured:
            groups = self._groups()
            if optimizers:
                _check_in_optimizers(groups, optimizers)
            plan = self.explicit.plan(groups, target.params, target.names, allow_empty=stages)
        elif optimizers and self.orthogonal is not None:
            rule = self.orthogonal
            # the rule on the group dicts first: a step without Muon parses no group
            if not any(rule(g, opt) for opt in optimizers for g in opt.param_groups):  # type: ignore[attr-defined]
                return None
            groups = as_groups(list(optimizers))
            plan = self.auto.plan(groups, target.params, target.names, ungrouped=UNGROUPED,
                                  allow_empty=True)
        else:
            return None
        if plan.by_rule and not self.warned:
            self.warned = True
            kinds = sorted({type(g.optimizer).__name__ for g in groups
                            if g.name in plan.by_rule and g.optimizer is not None})
            of = f" ({', '.join(kinds)})" if kinds else ""
            warnings.warn(
                f"{type(self.clipper).__name__} leaves the parameter group(s) {list(plan.by_rule)}"
                f"{of} out of the norm and the clip: their optimizer orthogonalises its update "
                "(Muon), which discards the gradient's magnitude, and a small clip coefficient "
                "can only stall it. To clip them anyway, give them a policy, e.g. "
                f"policy={{{plan.by_rule[0]!r}: 'own'}} (with groups=...), or build the clipper "
                "with orthogonal=None; gradclip.muon_like is the rule.",
                stacklevel=4,
            )
        return GroupedCall(self, plan, groups, target)

    # -- the states of domains --------------------------------------------------------------

    def runner(self, key: str, value: object, group: str) -> tuple[Clipper, StateStore]:
        """The rule and the state of the domain ``key`` (``value``: its policy value)."""
        clipper = self.clipper
        if value is None:
            if key == "shared":
                return clipper, clipper._store
            return clipper, self._store(key)
        if isinstance(value, float | int):
            copy = self.copies.get(float(value))
            if copy is None:
                self._check_value(value, group)
                copy = self.copies[float(value)] = clipper._at_threshold(float(value))
            return copy, self._store(key)
        if self.subs.get(group) is not value:
            self._check_value(value, group)
            self.subs[group] = value  # type: ignore[assignment]
            loaded = self.pending.pop(group, None)
            if loaded is not None:
                value.load_state_dict(loaded)  # type: ignore[attr-defined]
        return value, value._store  # type: ignore[attr-defined, return-value]

    def _store(self, key: str) -> StateStore:
        store = self.stores.get(key)
        if store is None:
            store = self.stores[key] = StateStore(self.clipper)
        return store

    def reset(self) -> None:
        self.stores.clear()
        self.pending.clear()
        for sub in self.subs.values():
            sub.reset()

    def state_dict(self) -> dict[str, Any]:
        return {
            **self.describe(),
            "domains": {k: s.state_dict() for k, s in self.stores.items()},
            "clippers": {**self.pending, **{g: c.state_dict() for g, c in self.subs.items()}},
        }

    def load(self, saved: Mapping[str, Any]) -> None:
        """Validate and load ``state_dict()["groups"]``; nothing replaced on error."""
        own = type(self.clipper).__name__
        if not isinstance(saved, Mapping) or not {"domains", "clippers"} <= set(saved):
            raise ValueError(f"{own} state dict: 'groups' must hold 'domains' and 'clippers'; "
                             f"pass the value of `{own}.state_dict()`")
        mine = self.describe()
        theirs = {k: saved.get(k) for k in mine}
        if theirs != mine:
            raise ValueError(
                f"the {own} state dict was saved with other group policies ({theirs}, here "
                f"{mine}); build the clipper with the same policy= and orthogonal="
            )
        stores = {}
        for key, entry in dict(saved["domains"]).items():
            if not isinstance(entry, Mapping) or not {"state", "param_state"} <= set(entry):
                raise ValueError(f"{own} state dict: groups domain {key!r} must hold 'state' and "
                                 "'param_state'")
            store = StateStore(self.clipper)
            store.load(entry["state"], entry["param_state"])
            stores[str(key)] = store
        clippers = dict(saved["clippers"])
        given = {str(k): v for k, v in self.policy.items()} if isinstance(self.policy, Mapping) else {}
        loads = [(self.subs.get(name) or given.get(name), sub_state)
                 for name, sub_state in clippers.items()]
        loads = [(sub, st) for sub, st in loads if hasattr(sub, "load_state_dict")]
        for sub, sub_state in loads:  # every one checked (on a fresh twin) before any is replaced
            type(sub)(**sub.config()).load_state_dict(sub_state)
        for sub, sub_state in loads:
            sub.load_state_dict(sub_state)
        if self.clipper._store.device is not None:
            for store in stores.values():
                store.to(self.clipper._store.device)
        self.stores = stores
        self.pending = {n: s for n, s in clippers.items()
                        if not hasattr(self.subs.get(n) or given.get(n), "load_state_dict")}


def _live(groups: object) -> bool:
    """Whether ``groups`` is read again each call (an optimizer's groups can grow: its
    ``param_groups`` list, dicts and their ``params`` lists are the optimizer's own); other
    forms (generators) are read once, when the clipper is built."""
    if hasattr(groups, "param_groups"):
        return True
    return isinstance(groups, Sequence) and all(
        isinstance(g, Mapping) or hasattr(g, "param_groups") for g in groups
    )


def _check_in_optimizers(groups: list[ParamGroup], optimizers: Sequence[object]) -> None:
    held = {id(p) for opt in optimizers for g in opt.param_groups for p in g["params"]}  # type: ignore[attr-defined]
    for group in groups:
        if not all(id(p) in held for p in group.params):
            raise ValueError(
                f"group {group.name!r} is not in the optimizer: "
                f"{sum(id(p) not in held for p in group.params)} of its parameters are not among "
                "the optimizer's parameters. Build the clipper with groups=optimizer.param_groups "
                "of the optimizer you step; nothing was clipped"
            )


class GroupedCall:
    """The grouped step of one call (built by :meth:`Grouping.bind`)."""

    def __init__(self, grouping: Grouping, plan: GroupPlan, groups: list[ParamGroup],
                 target: Target):
        self.grouping, self.plan, self.target = grouping, plan, target
        self.clipper = grouping.clipper
        # AGC decides per unit in its own measure: the groups only exclude (see AGC)
        self.passive = bool(getattr(self.clipper, "needs_whole_tensors", False))
        self.clamps = hasattr(self.clipper, "_apply_rows")
        self.row_threshold: Tensor | None = None

    def excluded_ids(self) -> frozenset[int]:
        """Ids of the parameters of excluded groups (for clippers that measure on their own)."""
        plan, params = self.plan, self.target.params
        return frozenset(id(p) for p, g in zip(params, plan.row_group, strict=True)
                         if plan.excluded[g])

    # -- the step ---------------------------------------------------------------------------

    def step(self, measured: GradNorms, loss: StepLoss | None = None) -> tuple[Tensor, Tensor, list]:
        """This step's threshold, its coefficients (one per row, or the clipper's own when
        :attr:`passive`) and what :meth:`commit` writes; ``loss`` goes to each group's rule
        that reads it."""
        clipper, plan = self.clipper, self.plan
        per_tensor = measured.per_tensor
        device, p = per_tensor.device, clipper.norm_type
        self.norms = group_norms(per_tensor, plan.row_index(device), len(plan.names), p,
                                 self.target.layout)
        if self.passive:
            store = clipper._store
            state = store.prepare(self.target.names)
            step = clipper._run_step(measured, state, loss)
            self.domain_thresholds = step.threshold.reshape(1).expand(len(plan.domains))
            return step.threshold, step.coef, [(store, state, step.state)]
        n_domains = len(plan.domains)
        totals = group_norms(self.norms, plan.domain_index(device), n_domains + 1, p)
        coefs = torch.ones_like(per_tensor)
        thresholds, pending = [], []
        names = self.target.names
        for d, domain in enumerate(plan.domains):
            group = plan.names[domain.groups[0]]
            rule, store = self.grouping.runner(domain.key, domain.value, group)
            store.to(device)
            rows = plan.rows_of(d, device)
            view = replace(
                measured, tensors=[measured.tensors[r] for r in domain.rows],
                per_tensor=per_tensor.index_select(0, rows), total=totals[d].to(measured.total.dtype),
                groups={},
            )
            state = store.prepare(tuple(names[r] for r in domain.rows))
            step = rule._run_step(view, state, loss)
            coef = step.coef.to(coefs.dtype)
            coefs = coefs.index_copy(0, rows, coef.expand(len(domain.rows)))
            thresholds.append(step.threshold.to(per_tensor.dtype).reshape(()))
            pending.append((store, state, step.state))
        self.domain_thresholds = torch.stack(thresholds) if thresholds else per_tensor.new_zeros(0)
        if self.clamps:  # an element bound: each tensor's max-abs norm shrinks to it
            padded = torch.cat([self.domain_thresholds, per_tensor.new_full((1,), math.inf)])
            row_threshold = padded[plan.domain_index(device)][plan.row_index(device)]
            self.row_threshold = row_threshold
            coefs = torch.where(per_tensor > row_threshold, row_threshold / per_tensor,
                                torch.ones_like(per_tensor))
        if n_domains == 1:
            threshold = self.domain_thresholds[0].to(measured.total.dtype)
        else:
            threshold = measured.total.new_full((), math.nan)
        return threshold, coefs, pending

    def clipped_rows(self, like: Tensor) -> Tensor:
        """Bool per row of ``like`` (the per-tensor norms): the rows some group clips, i.e. not
        excluded (asked only by a spike detector's "clip" policy)."""
        mask = torch.zeros_like(like, dtype=torch.bool)
        for d in range(len(self.plan.domains)):
            mask = mask.index_fill(0, self.plan.rows_of(d, like.device), True)
        return mask

    def commit(self, pending: list, finite: Tensor) -> None:
        """Write each domain's state (masked by finiteness); the clipper counts the step
        even when no domain uses its own state."""
        main = self.clipper._store
        for store, old, new in pending:
            store.commit(old, new, finite)
        if all(store is not main for store, _, _ in pending):
            main.to(finite.device)
            main.commit(None, None, finite)

    def apply(self, measured: GradNorms, coef: Tensor) -> None:
        """Scale (or, for an element bound, clamp) each tensor by its coefficient."""
        if self.clamps and self.row_threshold is not None:
            bound = torch.where(coef < 1, self.row_threshold, math.inf)
            self.clipper._apply_rows(measured, bound)  # type: ignore[attr-defined]
        else:
            self.clipper._apply(measured, coef)

    def stats(self, after: Tensor) -> GroupStats:
        """Per group: norms before and after, threshold, coefficient (see :class:`GroupStats`)."""
        plan = self.plan
        device = after.device
        post = group_norms(after, plan.row_index(device), len(plan.names), self.clipper.norm_type,
                           self.target.layout)
        padded = torch.cat([self.domain_thresholds.to(self.norms.dtype),
                            self.norms.new_full((1,), math.nan)])
        threshold = padded[plan.domain_index(device)]
        coef = torch.where(self.norms == 0, torch.ones_like(post), post / self.norms)
        return GroupStats(plan.names, self.norms, post, threshold, coef, plan.excluded)
