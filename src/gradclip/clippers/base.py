"""The Clipper protocol: a small stateful object called after ``backward()``, before ``step()``.

An algorithm is a pure tensor function, its **step**::

    _step(norms, state) -> Step(threshold, coef, new_state)

``norms`` is the step's one measurement (:class:`~gradclip.GradNorms`), ``state`` the
clipper's typed ``State`` NamedTuple (None for a clipper without statistics). The step reads
no value on the host, branches on no tensor value and changes nothing: it returns the new
state, which the base commits (masked so that a non-finite step never changes a statistic).
Everything else is done once, for every algorithm, by :mod:`gradclip.clippers.pipeline`:
resolving parameters and names, the norm pass, the non-finite policy, scaling or folding the
coefficient into a fused optimizer (:mod:`gradclip.clippers.fold`), :class:`ClipStats`, and
checkpoints (:mod:`gradclip.clippers.state`).

To write a clipper: subclass :class:`Clipper`, set ``State`` to a documented NamedTuple of
tensors, and implement ``_init_state`` and ``_step``; ``config`` returns the constructor
arguments. A clipper that measures something finer than per-tensor norms (AGC's rows)
overrides ``_measure``, ``_factors`` and ``_apply``.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import replace
from typing import TYPE_CHECKING, Any, ClassVar, Generic, NamedTuple, TypeVar

import torch
from torch import Tensor

from gradclip import _foreach, distributed, norms
from gradclip._checks import check_norm_type
from gradclip.clippers import fold, pipeline
from gradclip.clippers.groups import Grouping
from gradclip.clippers.spikes import SpikeDetector, SpikePolicy, StepLoss, as_detector, check_loss
from gradclip.clippers.state import StateStore
from gradclip.clippers.targets import Parameters, Target, resolve
from gradclip.nonfinite import NonFinitePolicy, check_policy
from gradclip.paramgroups import GroupsLike, OrthogonalRule, muon_like
from gradclip.scale import scale_, scale_each_

if TYPE_CHECKING:
    from torch.distributed import ProcessGroup

    from gradclip.distributed import GroupLike
    from gradclip.stats import ClipStats

Optimizers = torch.optim.Optimizer | Sequence[torch.optim.Optimizer]
"""What :meth:`Clipper.step` steps: an optimizer, or several (Muon beside AdamW)."""

__all__ = ["Clipper", "Optimizers", "Step", "as_optimizers", "optimizer_list"]

S = TypeVar("S")
StateDict = dict[str, Any]


class Step(NamedTuple):
    """What a clipper's pure step decides.

    Attributes:
        threshold: 0-dim, the threshold of this step (reported in ``ClipStats.threshold``).
        coef: the multiplier of the gradients, at most 1: 0-dim (every gradient), 1-D with
            one entry per measured tensor, or whatever the clipper's ``_apply`` takes.
        state: the clipper's state after this step (committed only if the step is finite).
    """

    threshold: Tensor
    coef: Tensor
    state: Any


class Clipper(Generic[S]):
    """Base class of every clipper. Call it on a module or parameters after ``backward()``.

    Statistics are 0-dim or small device tensors (see each clipper's ``State``), updated
    without reading a value on the host; a non-finite step never changes them.

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
        groups: parameter groups to clip by (``optimizer.param_groups``, the optimizer,
            several optimizers, or ``{name: parameters}``); see
            :mod:`gradclip.clippers.groups`. Default None: one norm over everything, except
            that :meth:`step` leaves an orthogonalising optimizer's groups out.
        policy: per-group policies: one per group, ``{group name: policy}``, or one for
            all (``"exclude"``, ``"own"``, ``"shared"``, ``"shared:<key>"``, a threshold, a
            clipper); see :mod:`gradclip.grouping`.
        orthogonal: which groups an orthogonalising optimizer (Muon) updates: they are left
            out unless a policy names them. Default :func:`gradclip.muon_like`; None: no rule.
        spikes: a :class:`~gradclip.SpikeDetector` that skips, clips or records gradient
            spikes (``"skip"``, ``"clip"`` or ``"off"``: one with its defaults; None: none).
            Pass the loss to :meth:`step` / ``__call__`` (``loss=loss``) to judge it too.
    """

    STATE_VERSION: ClassVar[int] = 1
    State: ClassVar[Any] = None
    """The NamedTuple type of the clipper's statistics, or None when it keeps none."""
    per_tensor_state: ClassVar[bool] = False
    """``State`` holds one row per parameter, saved by parameter name (AdaGC)."""
    folds_into_fused: ClassVar[bool] = True
    """One global coefficient: foldable into a fused optimizer's ``grad_scale``."""
    needs_whole_tensors: ClassVar[bool] = False
    """Decides per row of a tensor (AGC): refuses flat shards (``shard_group``: FSDP1,
    ZeRO), whose rows no rank can tell apart; DTensor rows are fine."""
    threshold_arg: ClassVar[str | None] = None
    """The constructor argument that is the clipper's one threshold (``max_norm``), if any:
    a number as a group's policy builds the clipper at that threshold."""
    reads_loss: bool = False
    """:meth:`_step` takes the call's ``loss=`` as a third argument (AdaptiveClip's growth
    follows it): a float32 0-dim tensor, averaged over the ranks of :attr:`loss_group`, or None.
    Where False, no loss is averaged for the clipper (no all-reduce)."""
    loss_group: ProcessGroup | None = None
    """Where :attr:`reads_loss`, the process group the loss is averaged over (None: the default
    group, when ``torch.distributed`` is initialised)."""
    _growable_fields: tuple[str, ...] = ()
    _optional_fields: tuple[str, ...] = ()
    """``State`` fields a checkpoint may lack (written before they existed): a fresh
    state's values fill them on load."""

    def __init__(
        self,
        *,
        norm_type: float | str = 2.0,
        nonfinite: NonFinitePolicy = "propagate",
        shard_group: ProcessGroup | None = None,
        extra_groups: Iterable[GroupLike] = (),
        groups: GroupsLike = None,
        policy: object = None,
        orthogonal: OrthogonalRule | None = muon_like,
        spikes: SpikeDetector | SpikePolicy | None = None,
    ):
        self.norm_type = check_norm_type(norm_type)
        self.nonfinite = check_policy(nonfinite)
        self.spikes: SpikeDetector | None = as_detector(spikes)
        # Not in config(): process groups are neither comparable nor picklable, and a
        # checkpoint written on one layout must load on another.
        self.shard_group = shard_group
        self.extra_groups: tuple[GroupLike, ...] = distributed.as_tuple(extra_groups)
        self._grouping = Grouping(self, groups, policy, orthogonal)
        self.reset()

    # -- what a subclass provides -------------------------------------------------------

    def config(self) -> dict[str, Any]:
        """The constructor arguments: saved in ``state_dict()`` and checked on load."""
        return {"norm_type": self.norm_type, "nonfinite": self.nonfinite, **self._spikes_config()}

    def _spikes_config(self) -> dict[str, Any]:
        """``{"spikes": the detector's config}`` with a detector, else nothing (a clipper
        without one keeps the config, and the checkpoints, it always had)."""
        return {} if self.spikes is None else {"spikes": self.spikes.config()}

    def _init_state(self, tensors: int) -> S:
        """The ``State`` before the first step (CPU tensors); with ``per_tensor_state``, the
        state of ``tensors`` parameters never seen (one row each)."""
        raise NotImplementedError

    def _step(self, norms: norms.GradNorms, state: S) -> Step:
        """This step's threshold, coefficient and new state; a pure tensor function."""
        raise NotImplementedError

    def _run_step(self, norms: norms.GradNorms, state: S, loss: StepLoss | None) -> Step:
        """:meth:`_step`, given the call's loss averaged over :attr:`loss_group` where the
        clipper reads it (:attr:`reads_loss`)."""
        if not self.reads_loss or loss is None:
            return self._step(norms, state)
        return self._step(norms, state, loss.over(self.loss_group))  # type: ignore[call-arg]

    def _prepare(self, state: S, calls: int) -> S:
        """The state before a step, given the number of earlier calls (a host count): a
        clipper whose buffers grow returns a larger state here. Default: unchanged."""
        return state

    def _check_state(self, state: S) -> None:
        """Raise ``ValueError`` if a loaded ``state`` breaks a rule of the algorithm beyond
        the dtype, shape and NaN checks every state gets (called by ``load_state_dict``)."""

    def _measure(self, target: Target) -> norms.GradNorms:
        """The step's one norm pass over ``target.grads`` (global under a layout)."""
        layout = target.layout
        if layout is not None and not target.grads:  # no local part, but in the collectives
            return layout.reduce(distributed.nothing_measured(self.norm_type, layout.device))
        measured = norms.compute(target.grads, self.norm_type, foreach=None)
        return measured if layout is None else layout.reduce(measured)

    def _factors(self, measured: norms.GradNorms, coef: Tensor) -> Tensor:
        """The factor by which each tensor's norm shrinks under ``coef`` (1-D, one per entry
        of ``measured.per_tensor``), for a ``coef`` that is not 0-dim."""
        return coef

    def _apply(self, measured: norms.GradNorms, coef: Tensor) -> None:
        """Scale the measured gradients in place by ``coef`` (see :class:`Step`)."""
        if coef.dim() == 0:
            scale_(measured.groups, coef, foreach=None)
        else:
            scale_each_(measured.groups, coef)

    # -- state ----------------------------------------------------------------------------

    def _at_threshold(self, value: float) -> Clipper:
        """This clipper at another threshold (a group's policy): same config otherwise."""
        return type(self)(**{**self.config(), self.threshold_arg: value})  # type: ignore[dict-item]

    def reset(self) -> None:
        """Forget every statistic: the clipper behaves as if just constructed."""
        self._store = StateStore(self)
        grouping = getattr(self, "_grouping", None)
        if grouping is not None:
            grouping.reset()
        if self.spikes is not None:
            self.spikes.reset()

    @property
    def state(self) -> S:
        """The clipper's statistics as its ``State`` NamedTuple (the live tensors; for
        per-tensor state, the rows of the parameters of the last call)."""
        store = self._store
        names = store._bound.names if store._bound is not None else ()
        return store.current(names)

    @property
    def uses_loss(self) -> bool:
        """Whether a call's ``loss=`` is read: by this clipper's rule (:attr:`reads_loss`), by
        a parameter group's own clipper, or by the spike detector. An integration that cannot
        find the loss warns where this is True."""
        return self.reads_loss or self.spikes is not None or self._grouping.reads_loss()

    @property
    def steps(self) -> Tensor:
        """Number of finite steps seen (0-dim int64 device tensor)."""
        return self._store.values["steps"]

    @property
    def nonfinite_steps(self) -> Tensor:
        """Number of steps whose gradients held NaN/inf (0-dim int64 device tensor)."""
        return self._store.values["nonfinite_steps"]

    def state_dict(self) -> StateDict:
        """A checkpointable copy of the clipper: type, version, config and statistics.

        Statistics are keyed by name (per-parameter ones by parameter name). Loading it into
        a clipper built with the same arguments resumes exactly where this one stopped.
        """
        saved = {
            "type": type(self).__name__,
            "version": self.STATE_VERSION,
            "config": self.config(),
            **self._store.state_dict(),
        }
        if self._grouping.configured:
            saved["groups"] = self._grouping.state_dict()
        if self.spikes is not None:
            saved["spikes"] = self.spikes.state_dict()
        return saved

    def load_state_dict(self, state_dict: Mapping[str, Any]) -> None:
        """Restore a :meth:`state_dict`. Every tensor is checked (dtype, shape, no NaN, the
        algorithm's own rules) before anything is replaced; a mismatch raises ``ValueError``
        naming it."""
        own = type(self).__name__
        if not isinstance(state_dict, Mapping):
            raise TypeError(f"`state_dict` must be a mapping, got {type(state_dict).__name__}; "
                            f"pass the value returned by `{own}.state_dict()`")
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
        theirs = state_dict["config"]
        differing = {
            k: (v, theirs.get(k)) for k, v in self.config().items() if theirs.get(k) != v
        } if isinstance(theirs, Mapping) else {"config": (self.config(), theirs)}
        if differing:
            shown = ", ".join(f"{k}={t!r} (here {o!r})" for k, (o, t) in differing.items())
            raise ValueError(
                f"the {own} state dict was saved with different arguments: {shown}; build "
                f"the clipper as gradclip.{own}(**state_dict['config'])"
            )
        grouping = self._grouping
        if grouping.configured != ("groups" in state_dict):
            raise ValueError(
                f"the {own} state dict was saved "
                + ("with" if "groups" in state_dict else "without")
                + " groups=, and this clipper was built "
                + ("with" if grouping.configured else "without")
                + " them; build it as the saved one was"
            )
        if (self.spikes is None) != ("spikes" not in state_dict):
            has = "has" if "spikes" in state_dict else "has no"
            raise ValueError(
                f"the {own} state dict {has} spike detector state and this clipper "
                f"{'has no' if self.spikes is None else 'has a'} detector; build the clipper as "
                f"gradclip.{own}(**state_dict['config'])"
            )
        store = StateStore(self)
        store.load(state_dict["state"], state_dict["param_state"])  # all checked first
        detector = self.spikes
        saved = None if detector is None else (detector._store, detector._medians, detector._watch)
        try:
            if detector is not None:
                detector.load_state_dict(state_dict["spikes"])
            if grouping.configured:
                grouping.load(state_dict["groups"])
        except ValueError:  # nothing replaced: the detector goes back too
            if detector is not None and saved is not None:
                detector._store, detector._medians, detector._watch = saved
            raise
        if self._store.device is not None:
            store.to(self._store.device)
        self._store = store

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in self.config().items())
        return f"{type(self).__name__}({args})"

    # -- the step -------------------------------------------------------------------------

    def check_optimizer(self, optimizer: Optimizers) -> None:
        """Called with the optimizer(s) stepped after this clip: by :meth:`step`, and by the
        integrations, whose framework steps them. A clipper whose rule depends on the
        optimizer's kind (:class:`~gradclip.AdaptiveClip`) warns here, once, when it was
        built for another kind; the others do nothing."""

    @property
    def skips(self) -> bool:
        """Whether a step may be skipped (``nonfinite="skip"``, or a detector's ``"skip"``):
        the caller must then not step the optimizer when ``ClipStats.skipped`` is True."""
        return self.nonfinite == "skip" or (self.spikes is not None and self.spikes.policy == "skip")

    def __call__(self, parameters: Parameters, *, loss: Tensor | float | None = None) -> ClipStats:
        """Clip the gradients of ``parameters`` in place and return what was done.

        Args:
            parameters: a module (names from ``named_parameters()``, preferred), a mapping
                name -> parameter, ``(name, parameter)`` pairs, or parameters.
            loss: this step's loss (a scalar tensor or number) for the spike detector; it is
                averaged over ranks under ``torch.distributed`` (every rank must pass one).

        Returns:
            :class:`~gradclip.ClipStats` of this step (device tensors, no host sync). When
            ``stats.skipped`` is True, do not step the optimizer (:meth:`step` does that).
        """
        loss = check_loss(loss)
        target = self._resolve(parameters)
        return self._clip(target, self._grouping.bind(target, None), fold=None, loss=loss)

    def step(
        self,
        parameters: Parameters,
        optimizer: Optimizers,
        *,
        loss: Tensor | float | None = None,
    ) -> ClipStats:
        """Clip, then ``optimizer.step()``, honouring skipped steps (``nonfinite="skip"``,
        and spikes under a detector's ``"skip"``).

        ``optimizer`` may be several optimizers (``[muon, adamw]``): each is stepped.

        **Orthogonalising optimizers.** The groups of an optimizer that orthogonalises its
        update (``torch.optim.Muon`` and its kin, by the rule ``orthogonal=``, default
        :func:`gradclip.muon_like`) are left out of the norm and the clip, with a warning the
        first time; the other groups are clipped on their one shared norm, as without Muon.
        Give those groups a policy (``groups=``, ``policy=``) or build the clipper with
        ``orthogonal=None`` to clip them.

        With a torch fused optimizer (``Adam``, ``AdamW``, ``SGD``, ``Adagrad`` with
        ``fused=True``) that updates exactly these gradients, the clip coefficient and the
        skip decision are handed to the optimizer's fused kernel (``grad_scale``,
        ``found_inf``): no separate multiply, no host sync, and a skipped step leaves the
        parameters, the optimizer's state and its step counters as they were (the kernel
        puts the counters back). A clipper whose coefficient does not fold (AGC, AdaGC,
        ValueClip) scales the gradients itself and still hands over the skip. Otherwise
        (``foreach`` or for-loop optimizers, which take no ``found_inf``) the gradients are
        clipped first and a skipped step is not handed to the optimizer at all, which costs
        one host read of the decision (free on the CPU).

        Example:
            >>> import torch, gradclip
            >>> model = torch.nn.Linear(2, 1)
            >>> opt = torch.optim.AdamW(model.parameters(), fused=True)
            >>> model(torch.ones(1, 2)).sum().backward()
            >>> stats = gradclip.NormClip(1.0).step(model, opt)
        """
        loss = check_loss(loss)
        optimizers = as_optimizers(optimizer)
        self.check_optimizer(optimizers)
        target = self._resolve(parameters)
        grouped = self._grouping.bind(target, optimizers)
        folded = None
        # Not while compiling: torch's optimizer.step() breaks the graph on purpose, and a
        # grad_scale set on the optimizer inside a graph does not survive that break.
        # A skipping clipper folds its decision (found_inf) even when its coefficient cannot.
        foldable = (self.folds_into_fused or self.skips) and not _foreach.is_compiling()
        if foldable and grouped is None and len(optimizers) == 1:
            folded = fold.plan(optimizers[0], target.grads)
        stats = self._clip(target, grouped, fold=folded, loss=loss)
        if folded is not None and folded.armed:
            folded.step()
            return stats
        if self.skips:
            if _foreach.capturing():
                raise RuntimeError(
                    "a skipped step (nonfinite='skip', or a spike detector's 'skip') with this "
                    "optimizer is decided on the host (one read), which a CUDA graph capture "
                    "cannot contain; use one fused optimizer (fused=True), which skips through "
                    "found_inf on the device, or nonfinite='propagate' and spikes='clip'"
                )
            if bool(stats.skipped):
                return stats
        for opt in optimizers:
            opt.step()
        return stats

    def _clip(self, target: Target, grouped: Any, fold: Any,
              loss: Tensor | float | None = None) -> ClipStats:
        if grouped is not None and grouped.passive:  # it measures on its own: tell it
            target = replace(target, excluded=grouped.excluded_ids())
            grouped.target = target
        return pipeline.clip(self, target, fold=fold, grouped=grouped, loss=loss)

    def _resolve(self, parameters: Parameters) -> Target:
        return resolve(
            parameters, shard_group=self.shard_group, extra_groups=self.extra_groups,
            whole_tensors=type(self).__name__ if self.needs_whole_tensors else None,
        )


def optimizer_list(optimizer: object, fix: str) -> list[torch.optim.Optimizer]:
    """``optimizer`` (a ``torch.optim.Optimizer``, or a list or tuple of them such as
    ``[muon, adamw]``) as a list, where the optimizers themselves are needed (their class
    decides, or their state is copied): ``TypeError`` naming the argument with ``fix`` (what
    they are for) otherwise, ``ValueError`` when one is listed twice. :func:`as_optimizers`
    is the lenient reading that :meth:`Clipper.step` takes (anything that steps).

    Example:
        >>> opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.1)
        >>> optimizer_list(opt, "the ones stepped after the clip") == [opt]
        True
    """
    optimizers = list(optimizer) if isinstance(optimizer, list | tuple) else [optimizer]
    if not optimizers or not all(isinstance(o, torch.optim.Optimizer) for o in optimizers):
        got = ", ".join(type(o).__name__ for o in optimizers) or "an empty list"
        raise TypeError(
            f"`optimizer` must be a torch.optim.Optimizer or a list of them ({fix}), got {got}"
        )
    if len({id(o) for o in optimizers}) != len(optimizers):
        raise ValueError("`optimizer` lists one optimizer twice; list each once")
    return optimizers


def as_optimizers(optimizer: object) -> list[Any]:
    """``optimizer`` as a list of optimizers (one, or several such as ``[muon, adamw]``)."""
    if hasattr(optimizer, "step") and hasattr(optimizer, "param_groups"):
        return [optimizer]
    if isinstance(optimizer, Sequence) and optimizer and all(
        hasattr(o, "step") and hasattr(o, "param_groups") for o in optimizer
    ):
        return list(optimizer)
    raise TypeError(
        f"`optimizer` must be a torch optimizer or a list of them, got "
        f"{type(optimizer).__name__} {optimizer!r:.60}; pass e.g. `clipper.step(model, opt)`"
    )
