"""The optimizer's update: measuring it (:class:`Snapshot`) and bounding it (:class:`UpdateClip`).

Clipping the gradient does not bound the step: the learning rate, Adam's normalisation and
Muon's orthogonalisation decide its size. These tools look at the update itself,
``Δθ = θ_after - θ_before``, for any torch optimizer: a :class:`Snapshot` copies the
parameters before ``optimizer.step()`` and measures the update afterwards, from the one pass
of :mod:`gradclip.norms` over the differences (and the copies, for ``‖θ‖``).

**Memory.** The snapshot is one copy of the parameters (in their own dtype: 2 bytes per
bfloat16 parameter), kept between steps so that a captured step reuses it, plus, during the
measurement, one transient copy (the differences). On a model that barely fits, that is too
much: measure every N steps only (the monitor's ``updates=N``) or leave it off.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any, NamedTuple

import torch
from torch import Tensor

from gradclip import _foreach, distributed, norms
from gradclip._checks import check_count, check_real
from gradclip.clippers.base import Clipper, Optimizers, Step, as_optimizers
from gradclip.clippers.targets import Parameters, Target, resolve
from gradclip.nonfinite import NonFiniteGradientError, NonFinitePolicy
from gradclip.stats import ClipStats

if TYPE_CHECKING:
    from collections.abc import Iterable

    from torch.distributed import ProcessGroup

    from gradclip.distributed import GroupLike

__all__ = ["Snapshot", "UpdateClip", "UpdateClipState", "UpdateNorms"]


class UpdateNorms(NamedTuple):
    """What one optimizer step did to each parameter tensor (2-norms, float32/float64).

    Attributes:
        names: the parameter names.
        update: ``‖θ_after − θ_before‖`` per tensor (1-D; whole tensors under a layout).
        param: ``‖θ_before‖`` per tensor (1-D).
        total: ``‖Δθ‖`` of every tensor (0-dim).
        param_total: ``‖θ_before‖`` of every tensor (0-dim).
    """

    names: tuple[str, ...]
    update: Tensor
    param: Tensor
    total: Tensor
    param_total: Tensor

    def ratio(self) -> Tensor:
        """``‖Δθ‖ / ‖θ‖`` per tensor (``inf`` for a zero parameter that moved, 0 if not)."""
        return torch.where(self.update == 0, 0.0, self.update / self.param)


class Snapshot:
    """Copies of parameters before an optimizer step, to measure (or bound) the step.

    Call :meth:`take` before ``optimizer.step()`` and :meth:`measure` after. The copies are
    kept between steps (reallocated only when the parameter set changes).

    Example:
        >>> import torch
        >>> w = torch.nn.Parameter(torch.ones(4))
        >>> opt = torch.optim.SGD([w], lr=0.5)
        >>> w.grad = torch.ones(4)
        >>> snap = Snapshot()
        >>> snap.take({"w": w}); opt.step()
        >>> snap.measure().update        # ‖0.5 · (1, 1, 1, 1)‖
        tensor([1.])
    """

    def __init__(self) -> None:
        self.names: tuple[str, ...] = ()
        self.params: list[Tensor] = []
        self.copies: list[Tensor] = []
        self.layout: distributed.Reduction | None = None

    def take(self, parameters: Parameters, target: Target | None = None) -> None:
        """Copy the parameters that have a gradient (``target``: as a clipper resolved them)."""
        if target is None:
            target = resolve(parameters, shard_group=None, extra_groups=())
        params = list(target.local_params)
        if target.layout is not None:
            params = distributed.local_tensors(params)
        if [id(p) for p in params] != [id(p) for p in self.params] or any(
            c.shape != p.shape or c.dtype != p.dtype or c.device != p.device
            for c, p in zip(self.copies, params, strict=True)
        ):
            self.copies = [p.detach().clone() for p in params]
        else:
            with torch.no_grad():
                for copy, p in zip(self.copies, params, strict=True):
                    copy.copy_(p)
        self.params, self.names, self.layout = params, target.local_names, target.layout
        self.target = target

    @torch.no_grad()
    def differences(self) -> list[Tensor]:
        """``θ_now − θ_taken`` per tensor (new tensors)."""
        return [p.detach() - c for p, c in zip(self.params, self.copies, strict=True)]

    @torch.no_grad()
    def measure(self) -> UpdateNorms:
        """The update since :meth:`take`: per tensor and total (no host read)."""
        if not self.params:
            raise RuntimeError("Snapshot.measure() before take(): take a snapshot before the step")
        n = len(self.params)
        per_tensor = norms.compute([*self.differences(), *self.copies], 2.0, None).per_tensor
        update, param = per_tensor[:n], per_tensor[n:]
        layout = self.layout
        names = self.names
        if layout is not None and layout.communicates:  # whole tensors, every rank alike
            update, param = _reduced(layout, update), _reduced(layout, param)
            names = tuple(self.target.names)
        return UpdateNorms(names, update, param, _total(layout, update), _total(layout, param))


class UpdateClipState(NamedTuple):
    """:class:`UpdateClip`'s statistics (on the parameters' device after the first step).

    Attributes:
        history: float32, shape ``(window,)``: the unclipped update norms, a ring.
        count: int64, 0-dim: how many norms were recorded (next slot ``count % window``).
    """

    history: Tensor
    count: Tensor


class UpdateClip(Clipper[UpdateClipState]):
    """Bound the norm of the optimizer's update by a robust statistic of recent update norms.

    Levanter's rule (``clip_update_by_historical_norm``), for any torch optimizer: with
    ``u = θ_after − θ_before`` the update ``optimizer.step()`` made and ``μ``, ``σ`` the mean
    and standard deviation of the last ``window`` unclipped update norms::

        threshold = μ + sigma · max(σ, 1e-6)      (inf until min_history norms are recorded)
        θ ← θ_before + u · min(1, threshold / max(‖u‖, 1e-6))

    The history holds the *unclipped* norms (clipped ones would pull the threshold down
    until it collapses); non-finite and zero updates (a skipped step) are not recorded.
    The parameters are moved back along ``u`` exactly (``lerp``): an update that needs no
    clipping leaves them bit for bit as the optimizer made them.

    Use :meth:`step` (it must run the optimizer between two looks at the parameters); it
    returns :class:`~gradclip.ClipStats` of the *update*: ``norm`` is ``‖u‖``, ``post_norm``
    the norm applied, ``norms`` the per-tensor update norms. Combine it with a gradient
    clipper by calling that clipper first (``clipper(model)``).

    **Memory:** one copy of the parameters kept between steps and one transient copy during
    :meth:`step` (see :mod:`gradclip.clippers.update`), plus ``window`` floats.

    The optimizer's own state (moments, step counts) has already moved when the update is
    bounded or, with ``nonfinite="skip"``, undone: only the parameters are restored.

    Args:
        window: how many recent update norms the statistic looks at (default 128).
        sigma: the threshold is ``sigma`` standard deviations above the mean (default 3).
        min_history: norms recorded before it clips (default ``max(2, window // 2)``, as
            Levanter).
        nonfinite: ``"propagate"`` (a NaN/inf update is kept, unclipped), ``"error"`` (the
            parameters are restored, then :class:`~gradclip.NonFiniteGradientError`) or
            ``"skip"`` (the parameters are restored).
        shard_group, extra_groups: distributed training, as for gradient clippers: the
            update norm is the whole model's, identical on every rank.

    Example:
        >>> import torch, gradclip
        >>> w = torch.nn.Parameter(torch.zeros(2))
        >>> opt = torch.optim.SGD([w], lr=1.0)
        >>> clipper = gradclip.UpdateClip(window=4)
        >>> for g in (1.0, 1.1, 0.9, 1.0, 50.0):      # the last update is a spike
        ...     w.grad = torch.tensor([g, 0.0])
        ...     stats = clipper.step([w], opt)
        >>> bool(stats.clipped), round(float(stats.post_norm), 3)
        (True, 1.212)

    References:
        Levanter (stanford-crfm/levanter), ``optim/clip_update_norm.py``: the rule and its
        defaults (window 128, 3 sigma, half a window of history before clipping).
    """

    State = UpdateClipState
    folds_into_fused = False

    def __init__(
        self,
        window: int = 128,
        sigma: float = 3.0,
        *,
        min_history: int | None = None,
        nonfinite: NonFinitePolicy = "propagate",
        shard_group: ProcessGroup | None = None,
        extra_groups: Iterable[GroupLike] = (),
    ):
        self.window = check_count(window, "window", 1, "window=128")
        self.sigma = check_real(sigma, "sigma", "finite and >= 0", lambda v: 0 <= v < math.inf,
                                "sigma=3.0")
        default = max(2, self.window // 2)  # type: ignore[operator]
        self.min_history = check_count(min_history, "min_history", 1, "min_history=64",
                                       none=f"max(2, window // 2) = {default}") or default
        super().__init__(norm_type=2.0, nonfinite=nonfinite, shard_group=shard_group,
                         extra_groups=extra_groups, orthogonal=None)
        self._snapshot = Snapshot()

    def config(self) -> dict[str, Any]:
        return {"window": self.window, "sigma": self.sigma, "min_history": self.min_history,
                "nonfinite": self.nonfinite}

    def _init_state(self, tensors: int) -> UpdateClipState:
        return UpdateClipState(torch.zeros(self.window, dtype=torch.float32),
                               torch.zeros((), dtype=torch.long))

    def _check_state(self, state: UpdateClipState) -> None:
        if bool((state.history < 0).any()) or bool(torch.isinf(state.history).any()):
            raise ValueError("UpdateClip state dict holds a negative or infinite update norm; "
                             "the checkpoint is corrupt")

    def _step(self, norms: norms.GradNorms, state: UpdateClipState) -> Step:
        history, count = state
        norm = norms.total.float()
        slots = torch.arange(self.window, device=history.device)
        held = torch.clamp(count, max=self.window)
        valid = slots < held
        n = held.clamp(min=1).to(history.dtype)
        mean = torch.where(valid, history, 0.0).sum() / n
        var = torch.where(valid, (history - mean).square(), 0.0).sum() / n
        threshold = mean + self.sigma * var.sqrt().clamp(min=1e-6)
        threshold = torch.where(count >= self.min_history, threshold, math.inf)
        # NaN > threshold is False: a NaN update keeps coefficient 1 (see nonfinite)
        coef = torch.where(norm > threshold, threshold / norm.clamp(min=1e-6), 1.0)
        recorded = torch.isfinite(norm) & (norm > 0)
        write = (slots == torch.remainder(count, self.window)) & recorded
        new = UpdateClipState(torch.where(write, norm, history), count + recorded.long())
        dtype = norms.total.dtype
        return Step(threshold.to(dtype), coef.to(dtype), new)

    # -- the step ---------------------------------------------------------------------------

    def __call__(self, parameters: Parameters) -> ClipStats:
        raise TypeError(
            "UpdateClip bounds the optimizer's update, which exists only around "
            "optimizer.step(): call `clipper.step(model, optimizer)` instead of `clipper(model)`"
        )

    @torch.no_grad()
    def step(self, parameters: Parameters, optimizer: Optimizers) -> ClipStats:
        """Step the optimizer(s), then bound the update they made (see the class doc)."""
        optimizers = as_optimizers(optimizer)
        target = self._resolve(parameters)
        snap = self._snapshot
        snap.take(parameters, target)
        for opt in optimizers:
            opt.step()
        diffs = snap.differences()
        layout = target.layout
        measured = norms.compute(diffs, 2.0, None) if diffs else norms.empty_norms(2.0)
        if layout is not None and layout.communicates:
            if not diffs:
                measured = distributed.nothing_measured(2.0, layout.device)
            measured = layout.reduce(measured)
        total = measured.total
        store = self._store
        store.to(total.device)
        finite = torch.isfinite(total)
        if self.nonfinite == "error" and not bool(finite):
            self._restore(torch.ones((), dtype=torch.bool))
            raise NonFiniteGradientError(
                f"non-finite update norm {total.item()} after optimizer.step(); the parameters "
                "were restored (the optimizer's own state was not). Use nonfinite='skip' to skip "
                "such steps, or find the source (a NaN loss, a learning rate that is too high)."
            )
        state = store.prepare(target.names)
        step = self._step(measured, state)
        store.commit(state, step.state, finite)
        coef = torch.where(finite, step.coef, torch.ones_like(step.coef))
        skipped = ~finite if self.nonfinite == "skip" else torch.zeros_like(finite)
        self._restore(skipped, coef)
        post = torch.where(skipped, 0.0, total * coef)
        return ClipStats(total, post, step.threshold, coef, coef < 1, finite, skipped,
                         measured, target.names)

    def _restore(self, skipped: Tensor, coef: Tensor | None = None) -> None:
        """θ ← θ_before + coef · (θ − θ_before); θ_before where ``skipped``."""
        snap = self._snapshot
        for p, old in zip(snap.params, snap.copies, strict=True):
            if _foreach.is_host_device(p.device) and not _foreach.is_compiling():
                if bool(skipped):
                    p.copy_(old)
                elif coef is not None and bool(coef < 1):
                    p.lerp_(old, (1 - coef).to(p.dtype))
                continue
            weight = (1 - coef).to(p.device, p.dtype) if coef is not None else 0.0
            p.copy_(torch.where(skipped.to(p.device), old, p.lerp(old, weight)))


def _reduced(layout: distributed.Reduction, local: Tensor) -> Tensor:
    """Per-tensor norms of this rank's parts (parallel to ``layout.local``) made whole."""
    measured = norms.GradNorms([], local, norms.total_norm(local, 2.0), 2.0, local.dtype, {})
    return layout.reduce(measured).per_tensor


def _total(layout: distributed.Reduction | None, per_tensor: Tensor) -> Tensor:
    if layout is None or not layout.communicates:
        return norms.total_norm(per_tensor, 2.0)
    return layout.total(per_tensor, 2.0)
