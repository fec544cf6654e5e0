"""What ``max_norm`` to use: a threshold from the norms a run produced, with its evidence.

The rule (:func:`recommend_max_norm`), and why:

* Clipping is for the rare steps whose gradient is far larger than usual; on typical steps
  it should do nothing, or it acts as a hidden cut of the learning rate. So the threshold
  must sit just above the *typical* pre-clip norms and below the spikes.
* Gradient norms are positive and vary multiplicatively, so they are measured on a log
  scale. There, the median and the MAD (median absolute deviation, x1.4826 to estimate a
  standard deviation) describe the typical norms and are not moved by spikes, whatever
  their size or number (up to half of the steps).
* A *spike* is a norm more than ``SPIKE_Z`` (3.5, the usual outlier cut of modified z-scores,
  Iglewicz & Hoaglin 1993) robust standard deviations above the median log-norm; the
  deviation is floored at ``MIN_LOG_SPREAD`` so that very steady norms do not make a 10%
  bump a spike.
* The recommended ``max_norm`` is the smallest two-significant-digit number above the
  ``QUANTILE`` (99th percentile) of the non-spike norms (a value people can type, never
  below the quantile): on the recorded run it would have clipped at most about 1% of the
  typical steps, and every spike.
* The norms of a clipped run show how it trains at its own threshold, not far above it: its
  clipping shaped them (an exploding RNN clipped at 1 records norms of 10-100 and would
  diverge at them). So the recommendation stays within ``RAISE`` (3x, one step of the 1, 3,
  10 grid) of the largest norm the run applied after clipping; when the norms ask for more,
  it says so: record a run at the new threshold and ask again, a step at a time.
* A run whose threshold still clipped at least half of its last quarter (``BINDING``) trained
  at that threshold's update size to the end, as at a learning rate: one log cannot tell on
  which side of the best threshold it stands, and a warning says so. Measured on logs at
  every threshold of the quality benchmark's grid (``benchmarks/recommend_grid.py``),
  following the norms up is right below the best threshold and wrong above it (the violent
  RNN and heavy-tailed SGD clipped at 1 to the end train best at 0.3 and 0.1; at 3 the RNN
  diverged on 4 of 12 seeds), and lowering the threshold when the loss has levelled off, the
  learning-rate rule, is right above it and wrong below: neither wins everywhere, so the rule
  stays with the norms, and two runs' losses, or :func:`gradclip.find_max_norm`, decide.
* Given the optimizer (``optimizer=``, or named by the log: a monitor records the one it
  steps), and where it normalises its update (Adam and its kin,
  :func:`~gradclip.clippers.adaptive.normalises`), the threshold does not set the step size:
  the learning rate does. There a threshold just below the typical norms (their 1% quantile)
  gives every step the same gradient norm, and a spike then reaches the optimizer's moment
  estimates as one ordinary step instead of one 100x larger, which its second moment would
  remember for hundreds of steps. On the quality benchmark's Adam task with rare corrupted
  batches, over 96 seeds, this scores 1.00x the best fixed threshold, where the threshold just
  above the typical norms scored 1.21x. What it changes is how the steps weigh against each
  other: where the norms fall over the run, Adam's second moment lags behind them and its
  steps shrink, an annealing that clipping every step undoes. So only where the settled
  norms changed less than ``DRIFT`` (10x) either way from the first tenth of the run to the
  last; otherwise the rule above (an AdamW image classifier whose norms fall ~1000x in 600
  steps: 1.82x the best fixed threshold over 24 seeds without this guard, 0.95x with it).
  Such a threshold applies from the first step, the start of training included: a start
  clipped less fills the second moment with its large norms and shrinks the steps after it
  (on the Adam task, the recorded 1 during its first 6-13 steps and the threshold after them
  scored 1.09x over 24 seeds).

Only finite, non-skipped steps count. Where the clip left parameter groups out (an
orthogonalising optimizer's, Muon's, by ``Clipper.step``), the norms are those of the groups
it clipped (:meth:`~gradclip.History.clipped_norm`): the threshold is applied to them, not to
the total. The norms a run records depend on how it was clipped; after changing ``max_norm``,
record again and check.

Example:
    >>> import gradclip
    >>> h = gradclip.History.from_norms([1.0, 1.1, 0.9, 1.2, 1.0, 50.0] * 10, threshold=10.0)
    >>> rec = gradclip.recommend_max_norm(h)
    >>> rec.max_norm, rec.spike_count, rec.projected_clip_rate
    (1.3, 10, 0.16666666666666666)
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch import Tensor

from gradclip.clippers.adaptive import OptimizerKinds, optimizer_class, optimizer_kind
from gradclip.history import History
from gradclip.monitor import GradMonitor
from gradclip.readlog import read_log
from gradclip.scale import TORCH_EPS

__all__ = [
    "BINDING",
    "DRIFT",
    "QUANTILE",
    "RAISE",
    "SPIKE_Z",
    "Recommendation",
    "optimizer_class",
    "recommend_max_norm",
    "render_text",
]

QUANTILE = 0.99
"""Quantile of the typical (non-spike) pre-clip norms that becomes the threshold."""
SPIKE_Z = 3.5
"""Robust z-score (of the log-norm) above which a step is a spike."""
MIN_LOG_SPREAD = 0.1
"""Floor of the robust standard deviation of log-norms (a spike is then > 1.42x the median)."""
FROZEN_COEF = 1e-3
"""A step scaled by less than this barely moves the weights: its update is frozen."""
RAISE = 3.0
"""The recommendation is at most this many times the largest norm the recorded run applied
(after its clipping): above it, the log cannot tell whether training stays stable."""
BINDING = 0.5
"""When the recorded threshold still clipped at least this share of the last quarter of the
run's settled steps, it set the size of the updates to the end (a warning says what that
means for the recommendation)."""
DRIFT = 10.0
"""Settled norms whose median changed more than this factor, either way, from the first tenth
of the run to the last do not suit one fixed threshold (a warning says so); under an optimizer
that normalises its update, the recommendation then stays with the typical norms (see the
module doc)."""
MIN_STEPS = 50
"""Fewer finite steps than this make a rough recommendation (a warning says so)."""
START_STEPS = 5
"""When at least this many of the first steps in a row lie above the spike cut, they are the
start of training (norms far above those the run settles at), not spikes: they are listed
apart, and a warning says that the threshold, set from the settled norms, would hold them back."""


@dataclass(frozen=True)
class Recommendation:
    """A ``max_norm`` and the evidence behind it.

    Attributes:
        max_norm: the recommended threshold (None when no finite norm was recorded).
        norm_type: p of the norms (the threshold is for the same p).
        rule: how ``max_norm`` was chosen, in words.
        steps, finite_steps: steps seen / finite, non-skipped steps used.
        quantiles: ``{"p10", "p50", "p90", "p99", "max"}`` of the pre-clip norms used.
        spike_cut: norms above this are spikes (left out of the threshold).
        spike_count: number of spikes; ``spikes``: the largest ones as ``(step, norm)``.
        recorded_threshold: the median threshold the run used (None: none recorded).
        recorded_clip_rate: fraction of steps the run clipped.
        projected_clip_rate: fraction of the used steps ``max_norm`` would have clipped.
        min_coef: smallest clip coefficient recorded; ``frozen_steps``: steps below 1e-3.
        nonfinite_steps: steps whose gradients held NaN/inf.
        warnings: plain-language findings, most serious first.
        start_steps: the first steps, in a row, above the spike cut (at least ``START_STEPS``,
            else 0): the start of training, neither typical norms nor spikes.
        settled_step: the recorded step after the start (0 without one): from there on the
            norms had settled and ``max_norm`` applies (:meth:`threshold_at`). 0 too where
            ``max_norm`` clips every typical step under an optimizer that normalises its
            update: there clipping the start costs no step size, and keeps the optimizer's
            second moment from remembering its large norms.
        late_clip_rate: the share of the last quarter of the settled steps that the recorded
            run clipped (None where no threshold was recorded): from ``BINDING`` (1/2) on, its
            threshold set the update size to the end, and a warning says what a single log
            cannot tell.
        drift: the median of the last tenth of the settled norms over that of the first tenth
            (None: fewer than 50 settled steps).
        normalising: whether the optimizer normalises its update (None: none given, and the
            log names none).
        optimizer: the optimizer the rule followed: the one given (``optimizer=``), else the
            one the log names (:attr:`gradclip.History.optimizer`); None: neither.
    """

    max_norm: float | None
    norm_type: float
    rule: str
    steps: int
    finite_steps: int
    quantiles: dict[str, float]
    spike_cut: float | None
    spike_count: int
    spikes: tuple[tuple[int, float], ...]
    recorded_threshold: float | None
    recorded_clip_rate: float | None
    projected_clip_rate: float | None
    min_coef: float | None
    frozen_steps: int
    nonfinite_steps: int
    warnings: tuple[str, ...]
    start_steps: int = 0
    settled_step: int = 0
    late_clip_rate: float | None = None
    drift: float | None = None
    normalising: bool | None = None
    optimizer: str | None = None

    def threshold_at(self, step: int) -> float | None:
        """The threshold for training step ``step`` of a run like the recorded one.

        ``max_norm`` once the norms have settled (from :attr:`settled_step`); during the
        start before it, the threshold the recorded run used (``recorded_threshold``; ``inf``,
        no clipping, where it did not clip). ``max_norm`` is set from the settled norms and
        would clip every step of the start, whose norms lie far above them, and hold it back.
        Set it on a :class:`~gradclip.NormClip` before each step (``clipper.max_norm =
        rec.threshold_at(step)``: no recompilation, see its doc). None only where there is no
        recommendation (``max_norm`` is None).

        Example:
            >>> import gradclip
            >>> norms = [60.0, 50.0, 40.0, 30.0, 20.0] + [1.0, 1.1, 0.9, 1.2] * 25
            >>> rec = gradclip.recommend_max_norm(gradclip.History.from_norms(norms, threshold=100.0))
            >>> rec.start_steps, rec.threshold_at(0), rec.threshold_at(5), rec.max_norm
            (5, 100.0, 1.3, 1.3)
        """
        if step < self.settled_step:
            return math.inf if self.recorded_threshold is None else self.recorded_threshold
        return self.max_norm

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-ready data (non-finite floats as strings)."""

        def fix(v: Any) -> Any:
            if isinstance(v, float) and not math.isfinite(v):
                return str(v)
            if isinstance(v, list | tuple):
                return [fix(x) for x in v]
            if isinstance(v, dict):
                return {k: fix(x) for k, x in v.items()}
            return v

        return fix(asdict(self))  # type: ignore[no-any-return]


def _history(history: History | GradMonitor | Sequence[float] | Tensor | str | os.PathLike[str]) -> History:
    if isinstance(history, History):
        return history
    if isinstance(history, GradMonitor):
        history.flush()
        return history.history()
    if isinstance(history, str | os.PathLike):
        return read_log(history)
    return History.from_norms(history)


def recommend_max_norm(
    history: History | GradMonitor | Sequence[float] | Tensor | str | os.PathLike[str],
    *,
    optimizer: OptimizerKinds | None = None,
    top_spikes: int = 5,
) -> Recommendation:
    """Recommend a fixed ``max_norm`` from a recorded run (see the module doc for the rule).

    Args:
        history: a :class:`~gradclip.History` (e.g. from :func:`~gradclip.read_log`), a
            :class:`~gradclip.GradMonitor`, the path of a monitor log, or the pre-clip
            total norms of each step (a sequence or 1-D tensor).
        optimizer: the optimizer the recorded run stepped after the clip, a list of them
            (``[muon, adamw]``), its class, or the name of its ``torch.optim`` class
            (``"AdamW"``, any case). Where it normalises its update and the norms are steady,
            the threshold clips every typical step (see the module doc). Only its kind is
            read. None (default): the one the log names (a :class:`~gradclip.GradMonitor`
            records the optimizer it steps, or is given), else the rule for any optimizer,
            which sits above the typical norms.
        top_spikes: how many of the largest spikes to list.

    Returns:
        A :class:`Recommendation`: the threshold, the evidence, and warnings such as
        "clipping fired on 100% of steps".

    Example:
        >>> import gradclip
        >>> rec = gradclip.recommend_max_norm([2.0, 2.2, 1.8, 2.1] * 25)
        >>> rec.max_norm, rec.projected_clip_rate
        (2.3, 0.0)
        >>> gradclip.recommend_max_norm([2.0, 2.2, 1.8, 2.1] * 25, optimizer="AdamW").max_norm
        1.7
    """
    given = None if optimizer is None else optimizer_kind(optimizer, "the one the recorded run stepped")
    h = _history(history)
    if given is None:  # the one the log names (GradMonitor.step records it), if any
        named, normalising = h.optimizer, h.normalising
        whose = "each the log names" if named is None else f"{named}, as the log names it"
    else:
        (named, normalising), whose = given, given[0]
    steps = len(h)
    judged, left_out = h.clipped_norm()  # the total, or the clipped groups' norm (Muon aside)
    used = h.finite & ~h.skipped & (judged > 0) & torch.isfinite(judged)
    norms, at = judged[used], h.steps[used]
    has_thr = torch.isfinite(h.threshold) & h.finite
    recorded_thr = float(h.threshold[has_thr].median()) if has_thr.any() else None
    recorded_rate = float(h.clipped.double().mean()) if steps else None
    coefs = h.coef[torch.isfinite(h.coef)]
    min_coef = float(coefs.min()) if coefs.numel() else None
    frozen = int((coefs < FROZEN_COEF).sum())
    nonfinite = int((~h.finite).sum())
    if norms.numel() == 0:
        return Recommendation(
            None, h.norm_type, "no finite pre-clip norm was recorded", steps, 0, {}, None, 0,
            (), recorded_thr, recorded_rate, None, min_coef, frozen, nonfinite,
            ("no finite, non-skipped step with a non-zero norm was recorded: nothing to "
             "recommend from", *_nonfinite_warning(h, nonfinite)), normalising=normalising,
            optimizer=named,
        )  # fmt: skip

    logs = norms.log()
    med = logs.median()
    spread = max(1.4826 * float((logs - med).abs().median()), MIN_LOG_SPREAD)
    spike_cut = _exp(float(med) + SPIKE_Z * spread)
    spike_mask = norms > spike_cut
    typical = norms[~spike_mask]
    start = _leading(spike_mask)
    start = start if start >= START_STEPS else 0
    spike_mask[:start] = False
    drift = _drift(norms[start:])
    steady = drift is not None and 1 / DRIFT <= drift <= DRIFT
    below = bool(normalising) and steady  # clip every typical step (the module doc)
    settled = int(at[start - 1]) + 1 if start and not below else 0  # the step after the start
    quantile = 1 - QUANTILE if below else QUANTILE
    max_norm = _round_past(float(torch.quantile(typical, quantile)), up=not below)
    # The largest norm the run applied on a step that moved the weights (the clipped steps'
    # threshold, the others' own norm): a frozen step shows nothing of how training goes.
    coef = h.coef[used].nan_to_num(nan=1.0).clamp(max=1.0)
    moved = coef >= FROZEN_COEF
    applied = float((norms * coef)[moved].max()) if bool(moved.any()) else math.inf
    suggested, max_norm = max_norm, min(max_norm, _round_sig(RAISE * applied))
    late = _late_clip_rate(h.clipped[used][start:]) if recorded_thr is not None else None
    order = norms[spike_mask].argsort(descending=True)[:top_spikes]
    spikes = tuple(
        (int(s), float(v))
        for s, v in zip(at[spike_mask][order].tolist(), norms[spike_mask][order].tolist(), strict=True)
    )
    q = torch.quantile(norms, torch.tensor([0.1, 0.5, 0.9, 0.99], dtype=norms.dtype)).tolist()
    quantiles = {"p10": q[0], "p50": q[1], "p90": q[2], "p99": q[3], "max": float(norms.max())}
    projected = float((norms + TORCH_EPS > max_norm).double().mean())
    median = quantiles["p50"]
    of = f" of the groups the clip compared with it ({', '.join(left_out)} left out)" if left_out else ""
    rule = (
        f"just {'below' if below else 'above'} the {quantile:.0%} quantile of the "
        f"{typical.numel()} typical pre-clip norms{of} (the "
        + (f"{start} steps of the start and the " if start else "")
        + f"{int(spike_mask.sum())} spikes above {spike_cut:.4g}, i.e. more than {SPIKE_Z} robust "
        "standard deviations of log-norm above the median, left out)"
        + (f", held to {RAISE:g}x the largest norm the run applied ({applied:.4g})"
           if max_norm < suggested else "")
        + (f": every typical step clipped to one norm, as the optimizer ({whose}) normalises its update "
           f"(its learning rate sets the step size) and the settled norms changed only "
           f"{drift:.3g}x over the run" if below else "")
        + (", from the first step: clipping the start costs no step size either, and keeps the "
           "optimizer's second moment from remembering its large norms" if below and start else "")
        + ("" if not normalising or below else
           f"; the optimizer ({whose}) normalises its update, but "
           + (f"the settled norms changed {drift:.3g}x over the run: clipping every step would "
              "undo the shrinking of its steps as they fall" if drift is not None else
              "too few settled steps tell whether its norms are steady"))
    )

    warnings: list[str] = []
    # Clipping as a learning-rate cut: not where the optimizer normalises its update
    lr_cut = recorded_rate is not None and recorded_thr is not None and not normalising
    if lr_cut and recorded_rate >= 0.99:
        warnings.append(
            f"clipping fired on {recorded_rate:.0%} of steps: the threshold ({recorded_thr:.4g}) "
            f"is below the typical norm (median {median:.4g}), updates are being shrunk every "
            "step (clipping acts as a smaller learning rate)"
        )
    elif lr_cut and recorded_rate >= 0.5:
        warnings.append(
            f"clipping fired on {recorded_rate:.0%} of steps: more than spikes are being "
            f"clipped; the threshold ({recorded_thr:.4g}) is near or below the typical norm, "
            f"so it acts as a learning-rate cut on most steps (median factor "
            f"{_median_factor(h.coef):.2g} where it clipped)"
        )
    binding = lr_cut and late is not None and late >= BINDING
    if max_norm < suggested:
        warnings.append(
            f"the typical norms ask for max_norm={suggested:.4g}, but this run applied norms up "
            f"to {applied:.4g} (it clipped them): above {RAISE:g}x that, this log cannot tell "
            f"whether training stays stable, so {max_norm:.4g} is recommended"
            + ("" if binding else ". Record a run at it and ask again, raising a step at a time")
        )
    if binding:
        warnings.append(
            f"the threshold {recorded_thr:.4g} still clipped {late:.0%} of the last quarter's "
            "steps: it set the size of the updates to the end of the run, as a learning rate "
            "does, and a single log cannot tell whether a higher or a lower threshold trains better. "
            "If the loss was still falling, a higher one may train faster (the recommendation "
            "follows the norms up); if it had levelled off, a lower one may end lower, as a "
            "learning-rate decay does. Compare two runs' losses, or measure with "
            "gradclip.find_max_norm"
        )
    warnings += _group_cuts(h)
    if not below and recorded_thr is not None and recorded_thr > 0 and median / recorded_thr >= 2:
        warnings.append(
            f"the threshold {recorded_thr:.4g} is {median / recorded_thr:.3g}x below the median "
            f"pre-clip norm {median:.4g}"
            + ("" if binding else f": raise it to about {max_norm:.4g}")
        )
    if frozen:
        warnings.append(
            f"coefficient below {FROZEN_COEF:g} on {frozen} step(s) (smallest {min_coef:.2g}): "
            "those steps' gradients are all but dropped; without momentum the updates are frozen "
            "there, with it (SGD's or Adam's) the weights move by the earlier steps' momentum only"
        )
    if recorded_thr is not None and recorded_rate == 0 and spikes:
        warnings.append(
            f"clipping never fired, yet {int(spike_mask.sum())} spike(s) went through (largest "
            f"{spikes[0][1]:.4g}, {spikes[0][1] / median:.3g}x the median): the threshold "
            f"{recorded_thr:.4g} is above them"
        )
    if start and not below:
        peak = float(norms[:start].max())
        warnings.append(
            f"the first {start} steps (to step {settled - 1}) had norms up to {peak:.4g}, "
            f"{peak / median:.3g}x the median: the start of training, not spikes. From the first "
            f"step, max_norm={max_norm:.4g} would clip every one of them and hold the start back: "
            f"apply it from step {settled} on, once the norms have settled "
            "(Recommendation.threshold_at(step) gives each step's threshold), or use "
            "gradclip.AdaptiveClip, whose warm-up follows the start"
        )
    warnings += _nonfinite_warning(h, nonfinite)
    if drift is not None and not steady:
        warnings.append(
            f"the typical norm changed {drift:.3g}x from the first to the last tenth of the run: "
            "one fixed threshold fits only part of it; consider gradclip.AdaptiveClip"
        )
    if norms.numel() < MIN_STEPS:
        warnings.append(
            f"only {norms.numel()} usable steps: the recommendation is rough; record a few "
            "hundred steps"
        )
    return Recommendation(
        max_norm=max_norm,
        norm_type=h.norm_type,
        rule=rule,
        steps=steps,
        finite_steps=int(norms.numel()),
        quantiles=quantiles,
        spike_cut=spike_cut,
        spike_count=int(spike_mask.sum()),
        spikes=spikes,
        recorded_threshold=recorded_thr,
        recorded_clip_rate=recorded_rate,
        projected_clip_rate=projected,
        min_coef=min_coef,
        frozen_steps=frozen,
        nonfinite_steps=nonfinite,
        warnings=tuple(warnings),
        start_steps=start,
        settled_step=settled,
        late_clip_rate=late,
        drift=drift,
        normalising=normalising,
        optimizer=named,
    )


def _median_factor(coefs: Tensor) -> float:
    """The median clip coefficient over the steps that clipped (NaN: none did)."""
    clipped = coefs[torch.isfinite(coefs) & (coefs < 1)]
    return float(clipped.median()) if clipped.numel() else math.nan


def _group_cuts(h: History) -> list[str]:
    """A warning per parameter group whose threshold scaled its gradients on most steps."""
    out = []
    for group, coef in h.group_columns("coef").items():
        known = coef[torch.isfinite(coef) & h.finite]
        if known.numel() < 2:
            continue
        rate = float((known < 1).double().mean())
        if rate >= 0.5:
            out.append(
                f"the threshold of group {group!r} acts as a learning-rate cut: it scaled the "
                f"group's gradients on {rate:.0%} of steps (median factor "
                f"{_median_factor(known):.2g}), not only on spikes; raise it, or give the group "
                "its own policy (for an orthogonalising optimizer such as Muon: 'exclude')"
            )
    return out


def _round_past(value: float, *, up: bool) -> float:
    """The nearest number with two significant digits strictly above (``up``) or below
    ``value`` > 0 (``value`` itself where no such float exists: next to float64's limits)."""
    exponent = math.floor(math.log10(value)) - 1
    if not -300 < exponent < 300:  # 10**exponent would underflow to 0 or overflow
        return value
    unit = 10.0**exponent
    # 1.2 / 0.1 is 11.999...: it has two digits (and 1.1 / 0.1 is 11.000...01)
    digits = math.floor(value / unit + 1e-9) + 1 if up else math.ceil(value / unit - 1e-9) - 1
    rounded = round(digits * unit, max(0, -exponent))
    past = rounded > value if up else 0 < rounded < value
    return rounded if math.isfinite(rounded) and past else value


def _round_sig(value: float) -> float:
    """``value`` > 0 to the nearest number with two significant digits."""
    return float(f"{value:.2g}")


def _exp(x: float) -> float:
    """``math.exp`` that saturates to inf instead of raising past float64's range."""
    try:
        return math.exp(x)
    except OverflowError:
        return math.inf


def _nonfinite_warning(h: History, count: int) -> tuple[str, ...]:
    if not count:
        return ()
    first = int(h.steps[~h.finite][0])
    skipped = int((~h.finite & h.skipped).sum())
    fix = (
        "all were skipped"
        if skipped == count
        else "with nonfinite='propagate' they reach the weights: use nonfinite='skip'"
    )
    return (f"{count} step(s) had NaN/inf gradients (first at step {first}); {fix}",)


def _late_clip_rate(clipped: Tensor) -> float | None:
    """The share of True in the last quarter of ``clipped`` (None when it is empty)."""
    if clipped.numel() == 0:
        return None
    return float(clipped[-max(1, clipped.numel() // 4):].double().mean())


def _leading(mask: Tensor) -> int:
    """How many entries of the 1-D boolean ``mask`` are True before its first False."""
    falses = (~mask).nonzero()
    return int(falses[0]) if falses.numel() else mask.numel()


def _drift(norms: Tensor) -> float | None:
    """Median of the last tenth of the norms over that of the first tenth."""
    tenth = norms.numel() // 10
    if tenth < 5:
        return None
    return float(norms[-tenth:].median() / norms[:tenth].median())


def render_text(rec: Recommendation) -> str:
    """The recommendation, its evidence and warnings as plain text.

    Example:
        >>> import gradclip
        >>> print(render_text(gradclip.recommend_max_norm([1.0] * 60)).splitlines()[0])
        recommended max_norm: 1.1 (norm_type 2)
    """
    if rec.max_norm is None:
        lines = ["no recommendation: " + rec.rule]
    else:
        lines = [f"recommended max_norm: {rec.max_norm:.4g} (norm_type {rec.norm_type:g})"]
        if rec.settled_step:
            before = rec.threshold_at(0)
            lines[0] += f" from step {rec.settled_step} on; before it, " + (
                "no clipping" if before == math.inf else f"{before:.4g} as recorded"
            )
        lines.append(f"  rule: {rec.rule}")
        if rec.optimizer is not None:
            does = "normalises" if rec.normalising else "does not normalise"
            lines.append(f"  optimizer: {rec.optimizer} ({does} its update)")
        q = ", ".join(f"{k} {v:.4g}" for k, v in rec.quantiles.items())
        lines.append(f"  pre-clip norms over {rec.finite_steps} of {rec.steps} steps: {q}")
        lines.append(
            f"  it would have clipped {rec.projected_clip_rate:.1%} of those steps"
            + (
                f" (the recorded run: {rec.recorded_clip_rate:.1%} at threshold "
                f"{rec.recorded_threshold:.4g}"
                + (f", {rec.late_clip_rate:.0%} of its last quarter"
                   if rec.late_clip_rate is not None else "")
                + ")"
                if rec.recorded_threshold is not None and rec.recorded_clip_rate is not None
                else ""
            )
        )
        spikes = ", ".join(f"step {s}: {v:.4g}" for s, v in rec.spikes)
        lines.append(f"  spikes (> {rec.spike_cut:.4g}): {rec.spike_count}" + (f"; largest {spikes}" if spikes else ""))
    lines += [f"warning: {w}" for w in rec.warnings]
    return "\n".join(lines)
