"""Spike detection: skip, clip or stop on a gradient (or loss) spike, decided on the device.

A :class:`SpikeDetector` rides on any clipper (``gradclip.NormClip(1.0, spikes="skip")``).
Each step it compares the log of the pre-clip total norm, and the loss when one is passed
(``clipper.step(model, optimizer, loss=loss)``), with their recent values, and calls the
step a **spike** when either lies more than ``sigma`` standard deviations above the mean of
the last ``window`` accepted steps (OLMo-core's ``SkipStepOptimizer`` rule, on the log norm).
A NaN/inf norm or loss is always a spike. Then, by ``policy``:

* ``"skip"``: the optimizer step does not happen (gradients untouched). With a torch fused
  optimizer (``fused=True``) the skip reaches its kernel through ``found_inf``: no host
  sync, and the kernel puts the step counters back. Other optimizers are simply not
  called, which costs :meth:`gradclip.Clipper.step` one host read of the decision.
* ``"clip"``: the gradients are clipped to the detector's bound (the largest norm that is
  not a spike) instead, on top of what the clipper does.
* ``"off"``: detect and record only; training goes exactly as without the detector.

Under ``"skip"`` and ``"clip"`` a spike step enters no statistic: neither the detector's
windows nor the clipper's state (a clipper's threshold never learns from a spike). One
exception keeps a loss that moved to a new level from being a spike forever: a finite loss
whose gradient norm did not spike enters the loss window even when the loss itself is a
spike (the step is still skipped), so the window follows a change of regime within a few
steps, as OLMo-core's does (it keeps every value); a step whose gradient spiked is a glitch,
and neither its norm nor its loss is ever learnt. After
``max_skips`` spikes in a row the run has most likely diverged (a real change of scale
would not stop being a spike): :class:`~gradclip.GradientSpikeError` is raised, naming the
step, the norm, the bound and the layers, instead of skipping forever.

**Every rank decides the same.** The gradient norm is already global (identical on every
rank); the loss is averaged over ``loss_group`` (default: every rank of the default process
group) before it enters the statistic. Every rank must then pass a loss on every step.

**On the device.** The decision, the windows and the counters are device tensors updated in
place (:class:`~gradclip.clippers.state.StateStore`); judging a step reads nothing on the
host and traces with ``torch.compile``. Host work (the forensics of
:mod:`gradclip.clippers.forensics`, the callback, the cap) happens where reading is free
(the CPU) or asked for (``on_spike``); on accelerators the cap is watched without waiting
for the device (a copy read a step later).

Defaults, each from published practice: ``window=128`` and ``sigma=6`` (OLMo-core
``SkipStepOptimizer`` and ``StabilityMonitorCallback``; Levanter's ``SkipStepConfig`` uses
the same), warm-up ``max(20, window // 2)`` steps (OLMo-core waits ``window // 2``; 20 keeps
a short window meaningful), ``score_window=10_000`` (OLMo-core's rolling SpikeScore).

Example:
    >>> import torch, gradclip
    >>> clipper = gradclip.NormClip(10.0, spikes=gradclip.SpikeDetector("skip", window=8))
    >>> p = torch.nn.Parameter(torch.zeros(1))
    >>> for g in [1.0, 1.1, 0.9, 1.0, 1.05, 0.95, 1.0, 1.02, 0.98, 1.0, 1.01, 0.99, 1.0, 1.03,
    ...           0.97, 1.0, 1.02, 0.98, 1.0, 1.01, 500.0]:
    ...     p.grad = torch.tensor([g])
    ...     stats = clipper({"w": p})
    >>> bool(stats.spike), bool(stats.skipped), p.grad     # the x500 step: skipped, untouched
    (True, True, tensor([500.]))
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any, Literal, NamedTuple

import torch
from torch import Tensor

from gradclip import _foreach
from gradclip._checks import ArgumentTypeError, check_choice, check_count, check_real
from gradclip.clippers.forensics import SpikeReport, SpikeWatch, build_report, check_cap
from gradclip.clippers.state import StateStore

if TYPE_CHECKING:
    from torch.distributed import ProcessGroup

    from gradclip.clippers.targets import Target
    from gradclip.norms import GradNorms

__all__ = [
    "POLICIES",
    "SpikeDetector",
    "SpikePolicy",
    "SpikeState",
    "StepLoss",
    "TensorMedians",
    "Verdict",
    "as_detector",
    "check_loss",
    "rank_mean",
]

SpikePolicy = Literal["skip", "clip", "off"]
POLICIES: tuple[str, ...] = ("skip", "clip", "off")

MIN_LOG_STD = 0.01
"""Floor of σ of the log norms: a window of identical norms would otherwise call any larger
norm a spike (with sigma=6, a norm must be at least e^0.06 = 1.06x the typical one)."""
MIN_LOSS_STD = 1e-3
"""Floor of σ of the losses, relative to ``|mean loss|`` (plus 1e-12): the same guard."""
MEDIAN_STEP = math.log(1.05)
"""Each step a tensor's running median moves by at most this in log space (x1.05): the
frugal streaming median (Ma, Muthukrishnan, Sandler 2013), one float per tensor."""
_F32_MAX = torch.finfo(torch.float32).max


class SpikeState(NamedTuple):
    """:class:`SpikeDetector`'s statistics (on the gradients' device after the first step).

    Attributes:
        log_norms: float32, shape ``(window,)``, ring of the log total norms of the last
            accepted steps (spikes and zero gradients are never written).
        norm_count: int64, 0-dim, log norms ever written (next slot: ``norm_count % window``).
        losses: float32, shape ``(window,)``, ring of the (rank-averaged) finite losses of
            the last steps that passed one and whose gradient norm did not spike.
        loss_count: int64, 0-dim, losses ever written.
        run: int64, 0-dim, spikes in a row up to the last step.
        flags: bool, shape ``(score_window,)``, ring of the spike flags of the last steps
            (spikes included: the SpikeScore counts them).
        in_window: int64, 0-dim, spikes among ``flags``.
        judged: int64, 0-dim, steps judged (the step number of the next report).
    """

    log_norms: Tensor
    norm_count: Tensor
    losses: Tensor
    loss_count: Tensor
    run: Tensor
    flags: Tensor
    in_window: Tensor
    judged: Tensor


class TensorMedians(NamedTuple):
    """Per parameter: the running median of its gradient norm, for the forensics.

    Attributes:
        log_median: float32, one per parameter, the log of a streaming estimate of the
            median of the tensor's norm over accepted steps; ``+inf`` before the first.
    """

    log_median: Tensor


class Verdict(NamedTuple):
    """What the detector decided about one step (device tensors; nothing read on the host).

    Attributes:
        spike: bool 0-dim, the step is a spike (NaN/inf included).
        accept: bool 0-dim, the step may enter statistics (``~spike``).
        bound: 0-dim (the total's dtype), the largest norm that is not a spike (``inf`` in
            warm-up).
        loss: float32 0-dim, the rank-averaged loss (NaN when none was passed).
        loss_bound: float32 0-dim, the largest loss that is not a spike (``inf``: none yet).
        score: float32 0-dim, the SpikeScore: spikes among the last ``score_window`` steps,
            as a fraction of them (this step included).
        run: int64 0-dim, spikes in a row, this step included.
        step: int64 0-dim, this step's number (steps judged before it).
        top: int64 ``(k,)``, the tensors with the largest norm-to-median ratio (indices into
            the measured per-tensor norms), largest first.
        ratios: float32 ``(k,)``, their ratios (``inf`` for a non-finite norm).
        state, medians: the detector's state after this step (committed by :meth:`commit`).
        previous: the state and medians the step read (the tensors :meth:`commit` writes).
    """

    spike: Tensor
    accept: Tensor
    bound: Tensor
    loss: Tensor
    loss_bound: Tensor
    score: Tensor
    run: Tensor
    step: Tensor
    top: Tensor
    ratios: Tensor
    state: SpikeState
    medians: TensorMedians
    previous: tuple[SpikeState, TensorMedians]


def check_loss(loss: object) -> Tensor | float | None:
    """A ``loss=`` argument: None, a real number, or a one-element real tensor (detached).

    Example:
        >>> check_loss(torch.tensor([2.5]))
        tensor(2.5000)
    """
    if loss is None:
        return None
    if isinstance(loss, Tensor):
        if loss.numel() != 1 or loss.is_complex() or loss.dtype == torch.bool:
            raise ValueError(
                f"`loss` must be one real number, got a {loss.dtype} tensor of shape "
                f"{tuple(loss.shape)}; pass the scalar training loss, e.g. `loss=loss` for "
                "`loss = criterion(out, y)` (nothing was changed)"
            )
        return loss.detach().reshape(())
    if isinstance(loss, bool) or not isinstance(loss, (int, float)):
        raise ArgumentTypeError(
            f"`loss` must be a scalar tensor or a real number, got {type(loss).__name__} "
            f"{loss!r:.60}; pass e.g. `loss=loss` (nothing was changed)"
        )
    return float(loss)


def rank_mean(loss: Tensor | float, device: torch.device, group: ProcessGroup | None) -> Tensor:
    """``loss`` as a float32 0-dim tensor on ``device``, averaged over the ranks of ``group``
    (the default process group when None) under ``torch.distributed``: one all-reduce, so
    that every rank decides from the same value.

    Example:
        >>> rank_mean(2.5, torch.device("cpu"), None)
        tensor(2.5000)
    """
    value = torch.as_tensor(loss, dtype=torch.float32).to(device)
    if _foreach.default_group_exists():
        size = torch.distributed.get_world_size(group)
        if size > 1:
            value = value.clone()
            torch.distributed.all_reduce(value, group=group)  # SUM: gloo has no AVG
            value = value / size
    return value


class StepLoss:
    """One call's ``loss=`` for whatever reads it (the spike detector, a clipper's rules):
    :func:`rank_mean` over a process group, computed once per group and call, so that a
    detector and a clipper averaging over the same ranks share one all-reduce."""

    def __init__(self, loss: Tensor | float | None, device: torch.device):
        self.loss, self.device = loss, device
        self._means: dict[ProcessGroup | None, Tensor] = {}

    def over(self, group: ProcessGroup | None) -> Tensor | None:
        """The loss averaged over ``group`` (float32, 0-dim, on the step's device); None
        when the call passed none."""
        if self.loss is None:
            return None
        mean = self._means.get(group)
        if mean is None:
            mean = self._means[group] = rank_mean(self.loss, self.device, group)
        return mean


class SpikeMedians:
    """The per-parameter part of a detector, in the shape :class:`StateStore` keeps."""

    State = TensorMedians
    per_tensor_state = True
    _growable_fields: tuple[str, ...] = ()

    def _init_state(self, tensors: int) -> TensorMedians:
        return TensorMedians(torch.full((tensors,), math.inf, dtype=torch.float32))

    def _prepare(self, state: Any, calls: int) -> Any:
        return state

    def _check_state(self, state: Any) -> None:
        pass

class SpikeDetector:
    """Detect gradient (and loss) spikes and skip, clip or only record them (module doc).

    Pass it to a clipper: ``gradclip.AdaptiveClip(spikes=gradclip.SpikeDetector("skip"))``,
    or ``spikes="skip"`` for the defaults. A detector belongs to one clipper: its state is
    part of the clipper's ``state_dict()``.

    A step is a spike when (after the warm-up) ``log(norm) > mean + sigma·σ`` over the log
    norms of the last ``window`` accepted steps, or (when a loss is passed, after its own
    warm-up) the loss lies above the same bound over the window's losses: in log space while
    the loss and every loss in the window are positive, as they are, else on the losses
    themselves; or when either is NaN/inf. σ is the sample standard deviation, floored
    (:data:`MIN_LOG_STD`; :data:`MIN_LOSS_STD` for raw losses).

    The window is a level and a spread: while the norm still falls by orders of magnitude
    within one window (the first hundreds of steps from a random initialisation), the
    spread is wide and only spikes larger than that fall are caught; from then on a spike
    of a few times the typical norm is.

    Args:
        policy: ``"skip"`` (default), ``"clip"`` or ``"off"`` (see the module doc).
        window: accepted steps the statistics look at (int >= 2, default 128).
        sigma: how many standard deviations above the mean is a spike (> 0, default 6).
        warmup: accepted steps before anything is judged (int >= 2; default
            ``max(20, window // 2)``); NaN/inf are spikes from the first step.
        max_skips: spikes in a row that raise :class:`~gradclip.GradientSpikeError` under
            ``"skip"`` and ``"clip"`` (int >= 1, default 10; None: never).
        top_k: layers named in the forensics (int >= 1, default 5).
        score_window: steps the SpikeScore looks at (int >= 1, default 10,000).
        loss_group: the process group the loss is averaged over (default: the default
            group, when ``torch.distributed`` is initialised).
        on_spike: called with a :class:`~gradclip.SpikeReport` on every spike. On the CPU
            this is free; on accelerators it costs one host read of the decision per step.

    Example:
        >>> import gradclip
        >>> gradclip.SpikeDetector("clip", window=64)
        SpikeDetector(policy='clip', window=64, sigma=6.0, warmup=32, max_skips=10, top_k=5, score_window=10000)
    """

    State = SpikeState
    per_tensor_state = False
    _growable_fields: tuple[str, ...] = ()

    def __init__(
        self,
        policy: SpikePolicy = "skip",
        *,
        window: int = 128,
        sigma: float = 6.0,
        warmup: int | None = None,
        max_skips: int | None = 10,
        top_k: int = 5,
        score_window: int = 10_000,
        loss_group: ProcessGroup | None = None,
        on_spike: Callable[[SpikeReport], object] | None = None,
    ):
        self.policy: SpikePolicy = check_choice(policy, "policy", POLICIES, "policy='skip'")  # type: ignore[assignment]
        self.window: int = check_count(window, "window", 2, "window=128")  # type: ignore[assignment]
        self.sigma = check_real(sigma, "sigma", "finite and > 0", lambda v: 0 < v < math.inf, "sigma=6.0")
        default_warmup = max(20, self.window // 2)
        self.warmup: int = check_count(  # type: ignore[assignment]
            default_warmup if warmup is None else warmup, "warmup", 2, f"warmup={default_warmup}"
        )
        self.max_skips = check_count(max_skips, "max_skips", 1, "max_skips=10", none="never raise")
        self.top_k: int = check_count(top_k, "top_k", 1, "top_k=5")  # type: ignore[assignment]
        self.score_window: int = check_count(score_window, "score_window", 1, "score_window=10_000")  # type: ignore[assignment]
        if on_spike is not None and not callable(on_spike):
            raise ArgumentTypeError(
                f"`on_spike` must be a callable taking a SpikeReport, or None, got "
                f"{type(on_spike).__name__}; pass e.g. `on_spike=print`"
            )
        self.loss_group = loss_group
        self.on_spike = on_spike
        self._constants: dict[torch.device, _Constants] = {}
        self.reset()

    def config(self) -> dict[str, Any]:
        """The constructor arguments that shape the state (saved with it, checked on load)."""
        return {
            "policy": self.policy, "window": self.window, "sigma": self.sigma,
            "warmup": self.warmup, "max_skips": self.max_skips, "top_k": self.top_k,
            "score_window": self.score_window,
        }  # fmt: skip

    def __repr__(self) -> str:
        return "SpikeDetector(" + ", ".join(f"{k}={v!r}" for k, v in self.config().items()) + ")"

    # -- state --------------------------------------------------------------------------

    def _init_state(self, tensors: int) -> SpikeState:
        zero = torch.zeros((), dtype=torch.long)
        return SpikeState(
            log_norms=torch.zeros(self.window, dtype=torch.float32), norm_count=zero,
            losses=torch.zeros(self.window, dtype=torch.float32), loss_count=zero.clone(),
            run=zero.clone(), flags=torch.zeros(self.score_window, dtype=torch.bool),
            in_window=zero.clone(), judged=zero.clone(),
        )  # fmt: skip

    def _prepare(self, state: Any, calls: int) -> Any:
        return state

    def _check_state(self, state: SpikeState) -> None:
        counted = int(state.flags.sum())
        if counted != int(state.in_window) or int(state.run) > int(state.judged):
            raise ValueError(
                f"SpikeDetector state dict holds in_window={int(state.in_window)} for "
                f"{counted} flags set, or run={int(state.run)} > judged={int(state.judged)}; "
                "the checkpoint is corrupt"
            )

    def reset(self) -> None:
        """Forget every statistic (the clipper's ``reset()`` calls this)."""
        self._store = StateStore(self)  # type: ignore[arg-type]
        self._medians = StateStore(SpikeMedians())  # type: ignore[arg-type]
        self._watch = SpikeWatch()

    @property
    def state(self) -> SpikeState:
        """The statistics as a :class:`SpikeState` (the live tensors)."""
        return self._store.current(())

    def state_dict(self) -> dict[str, Any]:
        """``{"config", "state", "param_state"}``: a checkpointable copy (the clipper's
        ``state_dict()`` holds it under ``"spikes"``)."""
        return {"config": self.config(), **self._store.state_dict(),
                "param_state": self._medians.state_dict()["param_state"]}  # fmt: skip

    def load_state_dict(self, state_dict: Mapping[str, Any]) -> None:
        """Restore a :meth:`state_dict`, every tensor checked before anything is replaced."""
        if not isinstance(state_dict, Mapping) or not {"config", "state", "param_state"} <= set(state_dict):
            raise ValueError(
                "not a SpikeDetector state dict: it must hold 'config', 'state' and "
                "'param_state'; pass the value of `clipper.state_dict()['spikes']`"
            )
        theirs, mine = state_dict["config"], self.config()
        if not isinstance(theirs, Mapping) or any(theirs.get(k) != v for k, v in mine.items()):
            saved = dict(theirs) if isinstance(theirs, Mapping) else theirs
            raise ValueError(
                f"the spike detector state was saved with SpikeDetector(**{saved!r}), and this "
                f"detector is {self!r}; build it with the saved arguments (nothing was changed)"
            )
        fresh = StateStore(self)  # type: ignore[arg-type]
        fresh.load(state_dict["state"], {})
        medians = StateStore(SpikeMedians())  # type: ignore[arg-type]
        medians.load({k: v for k, v in fresh.state_dict()["state"].items() if k in ("steps", "nonfinite_steps")},
                     state_dict["param_state"])  # fmt: skip
        if self._store.device is not None:
            fresh.to(self._store.device)
            medians.to(self._store.device)
        self._store, self._medians, self._watch = fresh, medians, SpikeWatch()

    # -- the step -----------------------------------------------------------------------

    def _consts(self, device: torch.device) -> _Constants:
        """The step's constants as device tensors, built once per device (an op on a Python
        number costs about twice one on a tensor, and a step is mostly such ops)."""
        consts = self._constants.get(device)
        if consts is None:
            f32 = {"dtype": torch.float32, "device": device}
            consts = self._constants[device] = _Constants(
                slots=torch.arange(self.window, device=device),
                score_slots=torch.arange(self.score_window, device=device),
                sigma=torch.tensor(self.sigma, **f32),
                min_log_std=torch.tensor(MIN_LOG_STD, **f32),
                inf=torch.tensor(math.inf, **f32),
                nan=torch.tensor(math.nan, **f32),
                tiny=torch.tensor(torch.finfo(torch.float32).tiny, **f32),
                step=torch.tensor(MEDIAN_STEP, **f32),
                zero=torch.zeros((), dtype=torch.long, device=device),
            )
        return consts

    def judge(self, norms: GradNorms, loss: Tensor | None, names: tuple[str, ...]) -> Verdict:
        """The verdict on this step (pure tensor ops); nothing is changed until :meth:`commit`.
        ``loss``: the step's loss averaged over :attr:`loss_group` (``StepLoss.over``; a 0-dim
        tensor), or None."""
        total = norms.total
        device = total.device
        self._store.to(device)
        self._medians.to(device)
        state: SpikeState = self._store.prepare(())
        medians: TensorMedians = self._medians.prepare(names)
        k = self._consts(device)
        window = self.window

        # the norm in log space (float32: |log| < 710), against its window's moments
        x = torch.log(torch.maximum(total.float(), k.tiny))  # NaN stays NaN, inf stays inf
        mean, std = _moments(state.log_norms, state.norm_count, k.slots, window)
        log_bound = mean + k.sigma * torch.maximum(std, k.min_log_std)
        norm_ready = state.norm_count >= self.warmup
        norm_spike = ~(x < k.inf) | (norm_ready & (x > log_bound))  # NaN and inf: always
        spike = norm_spike
        bound = torch.where(norm_ready, torch.exp(log_bound), k.inf).to(total.dtype)

        # the loss, averaged over ranks, the same way (no log: a loss may be negative)
        losses, loss_count = state.losses, state.loss_count
        if loss is None:
            loss_out, loss_bound = k.nan, k.inf
        else:
            wide = _foreach.wide_dtype(device)  # a huge finite loss squared overflows float32
            ring, lvalue = state.losses.to(wide), loss.to(wide)
            lmean, lstd = _moments(ring, loss_count, k.slots, window)
            raw_bound = lmean + self.sigma * torch.maximum(lstd, MIN_LOSS_STD * lmean.abs() + 1e-12)
            # While every loss is positive, judged in log space as the norm is: a heavy-tailed
            # loss (a power law) then fires as rarely as a light-tailed one.
            filled = k.slots < torch.clamp(loss_count, max=window)
            positive = ~((ring <= 0) & filled).any() & (lvalue > 0)
            logs = torch.log(torch.where(filled & (ring > 0), ring, 1.0))
            gmean, gstd = _moments(logs, loss_count, k.slots, window)
            log_bound = torch.exp(gmean + self.sigma * torch.maximum(gstd, k.min_log_std.to(wide)))
            lbound = torch.where(positive, log_bound, raw_bound)
            loss_ready = loss_count >= self.warmup
            loss_bound = torch.where(loss_ready, lbound, math.inf).float()
            spike = spike | ~torch.isfinite(lvalue) | (loss_ready & (lvalue > lbound))
            loss_out = loss
        accept = ~spike

        # the windows: written by accepted steps only (never a zero gradient's log)
        write = accept & (x > torch.log(k.tiny))
        log_norms = torch.where((k.slots == torch.remainder(state.norm_count, window)) & write,
                                x, state.log_norms)  # fmt: skip
        norm_count = state.norm_count + write
        if loss is not None:  # every finite loss of a step whose gradient did not spike
            learn = ~norm_spike & torch.isfinite(loss)
            at = k.slots == torch.remainder(loss_count, window)
            losses = torch.where(at & learn, loss.clamp(-_F32_MAX, _F32_MAX), losses)
            loss_count = loss_count + learn
        # the SpikeScore ring and the run of spikes: every step
        at = k.score_slots == torch.remainder(state.judged, self.score_window)
        leaving = (state.flags & at).any()
        flags = torch.where(at, spike, state.flags)
        in_window = state.in_window + spike.long() - leaving.long()
        judged = state.judged + 1
        run = torch.where(spike, state.run + 1, k.zero)
        score = in_window.float() / torch.clamp(judged, max=self.score_window).float()

        # per tensor: the ratio of its norm to its running median (forensics), then the median
        logs = torch.log(torch.maximum(norms.per_tensor.float(), k.tiny))
        log_median = medians.log_median
        ratios = torch.exp(logs - log_median)  # inf for a NaN/inf norm or a fresh median: 0
        ratios = torch.where(torch.isnan(ratios) | torch.isinf(logs), k.inf, ratios)
        ratios_top, top = torch.topk(ratios, min(self.top_k, ratios.numel()))
        moved = log_median + k.step * torch.sign(logs - log_median)
        new_median = torch.where(torch.isinf(log_median), logs, moved)
        ok = (logs > torch.log(k.tiny)) & (logs < k.inf) & accept  # False for NaN
        log_median = torch.where(ok, new_median, log_median)

        new_state = SpikeState(log_norms, norm_count, losses, loss_count, run, flags, in_window, judged)
        return Verdict(spike, accept, bound, loss_out, loss_bound, score, run, state.judged.clone(),
                       top, ratios_top, new_state, TensorMedians(log_median), (state, medians))  # fmt: skip

    def commit(self, verdict: Verdict) -> None:
        """Write the verdict's state into the detector's tensors, in place (every field of
        the new state is already what it must be: a spike changed only the run, the score
        and the step count)."""
        state, medians = verdict.previous
        for before, after in zip((*state, *medians), (*verdict.state, *verdict.medians), strict=True):
            before.copy_(after)
        self._store.values["steps"].add_(1)

    def observe(self, verdict: Verdict, norms: GradNorms, target: Target) -> SpikeReport | None:
        """Host work after the decision (never while compiling): on the CPU, or with
        ``on_spike``, read the decision and, on a spike, build the :class:`SpikeReport`
        (max-abs of the named layers measured then), call ``on_spike`` and raise
        :class:`~gradclip.GradientSpikeError` once ``max_skips`` spikes came in a row; on
        accelerators without ``on_spike``, only watch the cap without waiting for the
        device (the error comes a step or two late; those steps are spikes too)."""
        if _foreach.is_compiling():
            return None
        device = verdict.spike.device
        capped = self.max_skips is not None and self.policy != "off"
        if not (_foreach.is_host_device(device) or self.on_spike is not None):
            if capped:
                self._watch.post(verdict, self.max_skips, target.names, norms, self.policy)  # type: ignore[arg-type]
            return None
        report = build_report(verdict, norms, target, self.policy)
        if report is None:
            return None
        if self.on_spike is not None:
            self.on_spike(report)
        if capped:
            check_cap(report, self.max_skips)  # type: ignore[arg-type]
        return report


def _moments(ring: Tensor, count: Tensor, slots: Tensor, window: int) -> tuple[Tensor, Tensor]:
    """Mean and sample standard deviation of the filled part of a ring."""
    n = torch.clamp(count, max=window)
    valid = slots < n
    nf = n.to(ring.dtype).clamp_min(1)
    mean = torch.where(valid, ring, 0).sum() / nf
    var = torch.where(valid, (ring - mean).square(), 0).sum() / (nf - 1).clamp_min(1)
    return mean, var.sqrt()


class _Constants(NamedTuple):
    slots: Tensor  # arange(window)
    score_slots: Tensor  # arange(score_window)
    sigma: Tensor  # float32 0-dim from here on
    min_log_std: Tensor
    inf: Tensor
    nan: Tensor
    tiny: Tensor  # the smallest normal float32: log(norm) of a zero gradient
    step: Tensor  # MEDIAN_STEP
    zero: Tensor  # int64


def as_detector(spikes: object) -> SpikeDetector | None:
    """A clipper's ``spikes=`` argument as a detector: None, a :class:`SpikeDetector`, a
    policy name (the defaults), or the mapping of a saved config (``SpikeDetector(**it)``).

    Example:
        >>> as_detector("clip").policy
        'clip'
    """
    if spikes is None or isinstance(spikes, SpikeDetector):
        return spikes
    if isinstance(spikes, str):
        return SpikeDetector(check_choice(spikes, "spikes", POLICIES, "spikes='skip'"))  # type: ignore[arg-type]
    if isinstance(spikes, Mapping):
        return SpikeDetector(**spikes)
    raise ArgumentTypeError(
        f"`spikes` must be a SpikeDetector, one of {', '.join(map(repr, POLICIES))} or None, "
        f"got {type(spikes).__name__} {spikes!r:.60}; pass e.g. `spikes='skip'`"
    )
