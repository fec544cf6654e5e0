"""The Clipper protocol: a small stateful object called after ``backward()``, before ``step()``.

A subclass says how it chooses the threshold (:meth:`Clipper._decide`) and how its statistics
learn from a step (:meth:`Clipper._update`); the base class does the rest once for every
algorithm: resolving parameters and names, the one norm pass, the non-finite policy, scaling
(or folding the scale into a fused optimizer), :class:`~gradclip.ClipStats`, and checkpoints.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import TYPE_CHECKING, Any, ClassVar

import torch
from torch import Tensor

from gradclip import _foreach, distributed, norms
from gradclip._checks import check_norm_type, tensor_list
from gradclip.nonfinite import (
    NonFinitePolicy,
    check_policy,
    raise_nonfinite,
)
from gradclip.scale import clip_coefficient, scale_, scale_each_
from gradclip.stats import ClipStats

if TYPE_CHECKING:
    from torch.distributed import ProcessGroup

    from gradclip.distributed import GroupLike

__all__ = ["Clipper", "Parameters", "named_grads"]

Parameters = (
    torch.nn.Module | Tensor | Mapping[str, Tensor] | Iterable[Tensor] | Iterable[tuple[str, Tensor]]
)
StateDict = dict[str, Any]


def named_grads(parameters: Parameters) -> tuple[tuple[str, ...], list[Tensor], list[Tensor]]:
    """``(names, params, grads)`` of the parameters that have a gradient, each gradient once.

    A module gives its ``named_parameters()`` names; a mapping its keys; ``(name, tensor)``
    pairs their names; plain tensors their position (``"0"``, ``"1"``, ...).
    """
    return _with_grads(*_named_params(parameters))


def _named_params(parameters: Parameters) -> tuple[list[str], list[Tensor]]:
    """Every parameter and its name (see :func:`named_grads`), with a gradient or not."""
    if isinstance(parameters, torch.nn.Module):
        pairs = _foreach.named_parameters(parameters)
    elif isinstance(parameters, Mapping):
        pairs = list(parameters.items())
    else:
        items = [parameters] if isinstance(parameters, Tensor) else list(parameters)
        if items and all(isinstance(i, tuple) and len(i) == 2 for i in items):
            pairs = [(str(n), t) for n, t in items]
        else:
            pairs = list(zip(map(str, range(len(items))), items, strict=True))
    return [n for n, _ in pairs], tensor_list([t for _, t in pairs], "parameters")


def _with_grads(
    all_names: list[str], all_params: list[Tensor]
) -> tuple[tuple[str, ...], list[Tensor], list[Tensor]]:
    seen: set[int] = set()
    names, params, grads = [], [], []
    for name, param in zip(all_names, all_params, strict=True):
        grad = param.grad
        if grad is not None and id(grad) not in seen:
            seen.add(id(grad))
            names.append(name)
            params.append(param)
            grads.append(grad)
    return tuple(names), params, grads


def _is_fused(optimizer: torch.optim.Optimizer) -> bool:
    return bool(getattr(optimizer, "_step_supports_amp_scaling", False)) and bool(
        optimizer.defaults.get("fused")
    )


class Clipper:
    """Base class of every clipper. Call it on a module or parameters after ``backward()``.

    Subclasses implement :meth:`_decide` (the threshold and coefficient of this step) and,
    when they learn from the norms, :meth:`_init_state` and :meth:`_update`. Statistics are
    0-dim or small device tensors, updated with ``torch.where`` so that no value is read on
    the host and a non-finite step never changes them.

    Under ``torch.distributed`` the clipper reads global norms (see
    :mod:`gradclip.distributed`): the total of the whole model and, for tensors split across
    ranks (FSDP, TP), the norm of each whole tensor. Its state and decisions are identical on
    every rank, and each rank scales its local shards.

    Args:
        norm_type: p of the norms the clipper measures (default 2).
        nonfinite: ``"propagate"`` (torch's behaviour), ``"error"`` or ``"skip"``; see
            :mod:`gradclip.nonfinite`.
        shard_group: plain-tensor gradients are shards over this process group (FSDP1, ZeRO);
            DTensor gradients (FSDP2, TP) need nothing.
        extra_groups: process groups or meshes the total norm is also reduced over
            (pipeline stages, expert parallel).
    """

    STATE_VERSION: ClassVar[int] = 1
    folds_into_fused: ClassVar[bool] = True  # one global coefficient: foldable into grad_scale
    # Decides per row of a tensor (AGC): refuses flat shards (`shard_group`: FSDP1, ZeRO),
    # whose rows no rank can tell apart (see distributed.plan); DTensor rows are fine.
    needs_whole_tensors: ClassVar[bool] = False

    def __init__(
        self,
        *,
        norm_type: float | str = 2.0,
        nonfinite: NonFinitePolicy = "propagate",
        shard_group: ProcessGroup | None = None,
        extra_groups: Iterable[GroupLike] = (),
    ):
        self.norm_type = check_norm_type(norm_type)
        self.nonfinite = check_policy(nonfinite)
        # Not in config(): process groups are neither comparable nor picklable, and a
        # checkpoint written on one layout must load on another.
        self.shard_group = shard_group
        self.extra_groups: tuple[GroupLike, ...] = distributed.as_tuple(extra_groups)
        self.reset()

    # -- what a subclass provides -------------------------------------------------------

    def config(self) -> dict[str, Any]:
        """The constructor arguments: saved in ``state_dict()`` and checked on load."""
        return {"norm_type": self.norm_type, "nonfinite": self.nonfinite}

    def _init_state(self) -> dict[str, Tensor]:
        """Fresh global statistics (CPU tensors; moved to the gradients' device on first use)."""
        return {}

    def _decide(
        self, norms: norms.GradNorms, names: tuple[str, ...], params: list[Tensor]
    ) -> tuple[Tensor, Tensor]:
        """``(threshold, coef)`` for this step: ``coef`` is 0-dim (every gradient) or 1-D (one
        per tensor of ``norms.tensors``), at most 1. Must not change any statistic."""
        raise NotImplementedError

    def _measure(
        self, names: tuple[str, ...], params: list[Tensor], grads: list[Tensor]
    ) -> norms.GradNorms:
        """The step's one norm pass. A clipper that needs finer norms overrides it and derives
        the per-tensor norms from them (AGC: from unit norms), so gradients are read once."""
        return norms.compute(grads, self.norm_type, foreach=None)

    def _update(self, norms: norms.GradNorms, post_norm: Tensor, finite: Tensor) -> None:
        """Learn from this step; every change must be masked by ``finite`` (``torch.where``)."""

    # -- state ----------------------------------------------------------------------------

    def reset(self) -> None:
        """Forget every statistic: the clipper behaves as if just constructed."""
        self._state: dict[str, Tensor] = {
            "steps": torch.zeros((), dtype=torch.long),
            "nonfinite_steps": torch.zeros((), dtype=torch.long),
            **self._init_state(),
        }
        self._param_state: dict[str, dict[str, Tensor]] = {}
        self._device: torch.device | None = None

    @property
    def steps(self) -> Tensor:
        """Number of finite steps seen (0-dim device tensor)."""
        return self._state["steps"]

    @property
    def nonfinite_steps(self) -> Tensor:
        """Number of steps whose gradients held NaN/inf (0-dim device tensor)."""
        return self._state["nonfinite_steps"]

    def state_dict(self) -> StateDict:
        """A checkpointable copy of the clipper: type, version, config and statistics.

        Statistics are keyed by name (per-parameter ones by parameter name). Loading it into
        a clipper built with the same arguments resumes exactly where this one stopped.
        """
        return {
            "type": type(self).__name__,
            "version": self.STATE_VERSION,
            "config": self.config(),
            "state": {k: v.detach().clone() for k, v in self._state.items()},
            "param_state": {
                name: {k: v.detach().clone() for k, v in entry.items()}
                for name, entry in self._param_state.items()
            },
        }

    def load_state_dict(self, state_dict: Mapping[str, Any]) -> None:
        """Restore a :meth:`state_dict`; a mismatch raises ``ValueError`` naming it."""
        own = type(self).__name__
        missing = {"type", "version", "config", "state", "param_state"} - set(state_dict)
        if missing:
            raise ValueError(
                f"not a gradclip clipper state dict: missing {sorted(missing)}; pass the "
                "value returned by `Clipper.state_dict()`"
            )
        if state_dict["type"] != own:
            raise ValueError(
                f"this state dict is from a {state_dict['type']}, not a {own}; load it into "
                f"gradclip.{state_dict['type']}(**state_dict['config'])"
            )
        if state_dict["version"] != self.STATE_VERSION:
            raise ValueError(
                f"{own} state dict version {state_dict['version']} is not supported (this "
                f"gradclip writes version {self.STATE_VERSION}); save it again with a "
                "matching gradclip"
            )
        differing = {
            k: (v, state_dict["config"].get(k))
            for k, v in self.config().items()
            if state_dict["config"].get(k) != v
        }
        if differing:
            shown = ", ".join(f"{k}={theirs!r} (here {ours!r})" for k, (ours, theirs) in differing.items())
            raise ValueError(
                f"the {own} state dict was saved with different arguments: {shown}; build "
                f"the clipper as gradclip.{own}(**state_dict['config'])"
            )
        fresh = self._init_state() | {"steps": None, "nonfinite_steps": None}
        saved = state_dict["state"]
        if set(saved) != set(fresh):
            raise ValueError(
                f"{own} state dict does not match: missing {sorted(set(fresh) - set(saved))}, "
                f"unexpected {sorted(set(saved) - set(fresh))}"
            )
        device = self._device
        self._state = {k: torch.as_tensor(v).clone() for k, v in saved.items()}
        self._param_state = {
            name: {k: torch.as_tensor(v).clone() for k, v in entry.items()}
            for name, entry in state_dict["param_state"].items()
        }
        self._device = None
        if device is not None:
            self._to_device(device)

    def _to_device(self, device: torch.device) -> None:
        if self._device == device:
            return
        self._state = {k: v.to(device) for k, v in self._state.items()}
        self._param_state = {
            name: {k: v.to(device) for k, v in entry.items()}
            for name, entry in self._param_state.items()
        }
        self._device = device

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in self.config().items())
        return f"{type(self).__name__}({args})"

    # -- the step -------------------------------------------------------------------------

    def __call__(self, parameters: Parameters) -> ClipStats:
        """Clip the gradients of ``parameters`` in place and return what was done.

        Args:
            parameters: a module (names from ``named_parameters()``, preferred), a mapping
                name -> parameter, ``(name, parameter)`` pairs, or parameters.

        Returns:
            :class:`~gradclip.ClipStats` of this step (device tensors, no host sync).
        """
        return self._clip(parameters, fused=None)

    def step(self, parameters: Parameters, optimizer: torch.optim.Optimizer) -> ClipStats:
        """Clip, then ``optimizer.step()``, honouring ``nonfinite="skip"``.

        With a torch fused optimizer (``Adam``, ``AdamW``, ``SGD``, ``Adagrad`` with
        ``fused=True``) that updates only these parameters, the clip coefficient and the
        skip decision are handed to the optimizer's fused kernel (``grad_scale``,
        ``found_inf``): no separate multiply, no host sync. Otherwise the gradients are
        clipped first; a skipped step then costs one host read (free on the CPU).

        Example:
            >>> import torch, gradclip
            >>> model = torch.nn.Linear(2, 1)
            >>> opt = torch.optim.AdamW(model.parameters(), fused=True)
            >>> model(torch.ones(1, 2)).sum().backward()
            >>> stats = gradclip.NormClip(1.0).step(model, opt)
        """
        fused = optimizer if self.folds_into_fused and _is_fused(optimizer) else None
        stats = self._clip(parameters, fused=fused)
        if stats.norms.tensors and fused is not None and getattr(fused, "grad_scale", None) is not None:
            try:
                optimizer.step()
            finally:
                del optimizer.grad_scale  # type: ignore[attr-defined]
                del optimizer.found_inf  # type: ignore[attr-defined]
            return stats
        if self.nonfinite == "skip" and bool(stats.skipped):
            return stats
        optimizer.step()
        return stats

    def _clip(
        self, parameters: Parameters, fused: torch.optim.Optimizer | None
    ) -> ClipStats:
        layout = None
        all_names, all_params = _named_params(parameters)
        names, params, grads = _with_grads(all_names, all_params)
        rows = names, params
        if distributed.applies(self.shard_group, self.extra_groups):
            layout = distributed.plan(
                grads, shard_group=self.shard_group, extra_groups=self.extra_groups,
                params=all_params, per_tensor=True,
                whole_tensors=type(self).__name__ if self.needs_whole_tensors else None,
            )
            # what the reduced norms are parallel to: under sharding, every sharded tensor
            # (the same names on every rank), whichever of them this rank holds part of
            rows = tuple(layout.rows_of(names, all_names)), layout.rows_of(params, all_params)
            names, params, grads = tuple(layout.select(names)), layout.select(params), layout.local
        with torch.no_grad():
            if layout is not None and not grads:  # no local part, but in the collectives
                measured = layout.reduce(distributed.nothing_measured(self.norm_type, layout.device))
            else:
                measured = self._measure(names, params, grads)
                if layout is not None:
                    measured = layout.reduce(measured)
            names, params = rows
            total = measured.total
            if not grads and (layout is None or not layout.communicates):
                one = torch.ones(())
                false = torch.zeros((), dtype=torch.bool)
                return ClipStats(total, total, total.new_full((), float("nan")), one, false,
                                 ~false, false, measured, names)
            self._to_device(total.device)
            finite = torch.isfinite(total)
            if self.nonfinite == "error":
                raise_nonfinite(total, measured.per_tensor, names)
            threshold, coef = self._decide(measured, names, params)
            if self.nonfinite == "skip":
                coef = torch.where(finite, coef, torch.ones_like(coef))
                skipped = ~finite
            else:
                skipped = torch.zeros_like(finite)
            if coef.dim() == 0:
                post_norm = total * coef
            elif layout is not None:  # the post-clip norm of every shard and stage
                post_norm = layout.total(measured.per_tensor * coef, self.norm_type)
            else:
                post_norm = torch.linalg.vector_norm(measured.per_tensor * coef, self.norm_type)
            clipped = (coef < 1).any()
            self._update(measured, post_norm, finite)
            self._state["steps"] += finite.long()
            self._state["nonfinite_steps"] += (~finite).long()
            if fused is not None and coef.dim() == 0 and _steps_only(fused, grads):
                fused.grad_scale = coef.reciprocal().float()  # type: ignore[attr-defined]
                fused.found_inf = skipped.float()  # type: ignore[attr-defined]
            else:
                self._scale(measured, coef)
            effective = coef if coef.dim() == 0 else torch.where(
                total == 0, torch.ones_like(total), post_norm / total
            )
            return ClipStats(total, post_norm, threshold, effective, clipped, finite, skipped,
                             measured, names)

    def _scale(self, measured: norms.GradNorms, coef: Tensor) -> None:
        if coef.dim() == 0:
            scale_(measured.groups, coef, foreach=None)
        else:
            scale_each_(measured.groups, coef)


def _steps_only(optimizer: torch.optim.Optimizer, grads: list[Tensor]) -> bool:
    """True when every gradient the optimizer would use is one this clipper measured."""
    ours = {id(g) for g in grads}
    return all(
        p.grad is None or id(p.grad) in ours for group in optimizer.param_groups for p in group["params"]
    )


def global_decision(threshold: Tensor, total: Tensor) -> tuple[Tensor, Tensor]:
    """``(threshold, coef)`` of a clipper with one total-norm threshold (torch's coefficient)."""
    return threshold, clip_coefficient(threshold.to(total.dtype), total)
