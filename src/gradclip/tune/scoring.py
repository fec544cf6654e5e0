"""How the finder scores trials and decides: the grid, tail means, paired margins, ties.

Every function here is pure, on :class:`~gradclip.tune.results.Trial` values: the search
(:mod:`gradclip.tune.search`) runs the trials, this module judges them.

Example:
    >>> from gradclip.tune.scoring import log_grid, score
    >>> log_grid([0.5] * 10)
    (0.01, 0.03, 0.1, 0.3, 1.0, 3.0)
    >>> round(score([9.0, 9.0, 1.0, 4.0], steps=4), 6)   # geometric mean of the last half
    2.0
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Sequence
from typing import Literal

from gradclip.tune.results import Candidate, Round, Trial

__all__ = [
    "ABOVE",
    "BELOW",
    "BLOCKS",
    "CONFIRM",
    "CONFIRM_CANDIDATES",
    "DEFAULT_GRID",
    "HEADROOM",
    "PER_DECADE",
    "SETTLED",
    "TAIL",
    "TOLERANCE",
    "WARMING",
    "Z",
    "confirmation_set",
    "decide",
    "drift",
    "log_grid",
    "margin",
    "rank",
    "score",
    "settled",
    "warnings_for",
]

PER_DECADE = 2
"""Grid points per decade: the round values 1 and 3 (x 10^k)."""
BELOW, ABOVE = 100.0, 10.0
"""The grid spans [median / BELOW, median x ABOVE] of the norms seen."""
TAIL = 0.5
"""The score is the mean loss over this last fraction of a round."""
BLOCKS = 8
"""The tail is cut into this many blocks for the standard error of a difference."""
Z = 2.0
"""Two candidates tie when their mean loss differs by less than Z standard errors..."""
TOLERANCE = 0.005
"""... or by less than this fraction (0.5%): a difference too small to matter."""
CONFIRM = 0.5
"""The confirmation round lasts this fraction of the first round's horizon."""
CONFIRM_CANDIDATES = 3
"""How many of the first round's best fixed thresholds the confirmation round runs."""
DEFAULT_GRID = 6
"""The size of :func:`log_grid`'s grid (3 decades, two points each), for the budget."""
SETTLED = 1.5
"""A round saw steady training when its best candidate's mean loss over its first quarter and
over its last differ by less than this factor, either way. On the quality benchmark's tasks
(acceptance-2026-12-05): 1.03-1.26x where the loss is flat within the first round, 3.5-44x at
the start of training, where a short run over-weighs the default's warm-up (0.25x: a loss
rising under heavy-tailed noise)."""


WARMING = 1.5
"""A learning rate that grew by this factor or more over round 1 was still warming up."""


HEADROOM = 3.0
"""When every candidate ties on steady training, the guard kept is the lowest quiet threshold
at least this many times the largest norm seen: a run's first norms are often not its largest
(they rise with a learning-rate warm-up, and while a network learns: 2-7x within the AdamW
CNN's first 60 steps, 8x over the SGD CNN's run), and a threshold at their edge clips the first
larger ones (the AdamW CNN: 1 at the edge was 1.16x the best fixed threshold over 12 seeds, 3 the
best; over 144 seeds they score the same, 1.01x and 1.00x: there the guard neither costs nor gains).
One step of the grid (1 and 3 x 10^k)."""


def log_grid(
    norms: Sequence[float], below: float = BELOW, above: float = ABOVE
) -> tuple[float, ...]:
    """Round thresholds (1 and 3 x 10^k) from ``median / below`` to ``median x above``.

    ``norms``: the pre-clip norms seen; only finite, positive ones count. Raises
    ``ValueError`` when there is none.

    Example:
        >>> log_grid([2.0, 4.0, 6.0])
        (0.1, 0.3, 1.0, 3.0, 10.0, 30.0)
    """
    usable = [n for n in norms if math.isfinite(n) and n > 0]
    if not usable:
        raise ValueError("no finite, positive gradient norm was seen: nothing to centre the "
                         "candidate thresholds on; pass `candidates=` explicitly")  # fmt: skip
    median = statistics.median(usable)
    lo, hi = math.log10(median / below), math.log10(median * above)
    values = []
    for k in range(math.floor(lo) - 1, math.ceil(hi) + 1):
        for m in (1.0, 3.0):
            value = float(f"{m * 10.0**k:.3g}")
            if median / below <= value <= median * above:
                values.append(value)
    return tuple(values)


def drift(trial: Trial) -> float:
    """The mean loss of ``trial``'s first quarter over that of its last (9.0: the loss fell 9x
    within the round); NaN where a mean is <= 0."""
    q = max(1, len(trial.losses) // 4)
    head, end = statistics.fmean(trial.losses[:q]), statistics.fmean(trial.losses[-q:])
    return head / end if head > 0 and end > 0 else math.nan


def settled(trial: Trial) -> bool:
    """Whether ``trial``'s loss changed by less than ``SETTLED`` over its round (mean of the
    first quarter against the last, :func:`drift`): steady training, not its start. Never for
    losses <= 0.

    Example:
        >>> from gradclip.tune.results import Candidate, Trial
        >>> flat = Trial(Candidate("none"), (2.0, 2.1, 1.9, 2.0), (), (), False, 2.0, 0.0)
        >>> settled(flat), settled(Trial(flat.candidate, (9.0, 5.0, 3.0, 1.0), (), (), False, 1.7, 0.0))
        (True, False)
    """
    return 1 / SETTLED < drift(trial) < SETTLED


def _unsteady(moved: float) -> Literal["sign", "start", "rise"]:
    """What a round whose loss was not steady saw, from its :func:`drift` ``moved``: a mean
    loss <= 0 (steadiness cannot be told), the start of training (the loss fell) or a rise."""
    return "sign" if math.isnan(moved) else "start" if moved > 1 else "rise"


def _tail(values: Sequence[float]) -> Sequence[float]:
    return values[len(values) - max(1, round(TAIL * len(values))):]


def _positive(values: Sequence[float]) -> bool:
    return all(v > 0 for v in values)


def score(losses: Sequence[float], steps: int) -> float:
    """The geometric mean of the tail's losses (the arithmetic mean if one is <= 0): loss
    values are compared as ratios, and one noisy batch moves a ratio less."""
    if len(losses) < steps or not all(math.isfinite(v) for v in losses):
        return math.inf
    tail = _tail(losses)
    if _positive(tail):
        return math.exp(math.fsum(map(math.log, tail)) / len(tail))
    return math.fsum(tail) / len(tail)


def margin(a: Trial, best: Trial, relative: bool) -> tuple[float, float]:
    """Mean of ``a``'s loss minus ``best``'s over the tail (of their logs: a relative
    difference, when ``relative``), and its standard error from block means (steps within
    a block are correlated; blocks much less)."""
    if a.diverged or best.diverged:
        return (math.inf, 0.0)
    f = math.log if relative else float
    diff = [f(x) - f(y) for x, y in zip(_tail(a.losses), _tail(best.losses), strict=True)]
    n = len(diff)
    blocks = min(BLOCKS, n)
    means = [statistics.fmean(diff[i * n // blocks:(i + 1) * n // blocks]) for i in range(blocks)]
    se = statistics.stdev(means) / math.sqrt(blocks) if blocks > 1 else math.inf
    return (statistics.fmean(diff), se)


def rank(
    trials: Sequence[Trial],
) -> tuple[str, tuple[str, ...], dict[str, tuple[float, float]], bool]:
    """The best of the non-adaptive trials, those tied with it, every margin, and whether
    the margins are relative (log-loss differences: every loss positive)."""
    pool = [t for t in trials if t.candidate.kind != "adaptive"] or list(trials)
    best = min(pool, key=lambda t: t.score)
    relative = all(_positive(_tail(t.losses)) for t in trials if not t.diverged)
    margins = {t.candidate.name: margin(t, best, relative) for t in trials}
    tolerance = TOLERANCE * (1.0 if relative else abs(best.score))
    tied = tuple(
        t.candidate.name
        for t in trials
        if t is best
        or (not t.diverged and margins[t.candidate.name][0] <= Z * margins[t.candidate.name][1] + tolerance)
    )
    return best.candidate.name, tied, margins, relative


def decide(
    rounds: list[Round], grid: Sequence[float]
) -> tuple[Candidate, Candidate | None, Literal["clear", "tie", "diverged"], str]:
    """The pick, the best fixed threshold of the last round, the confidence and a statement.

    In order: every candidate diverged (the one that lasted longest); one candidate best
    beyond noise in every round, on steady training or without a default to keep (it); every
    candidate of round 1 tied on steady training (the lowest that clipped none of its steps,
    with HEADROOM); the default lost beyond noise on steady training (the gentlest of round
    1's best); otherwise the default (or the best, without one or where it diverged).
    :mod:`gradclip.tune` explains each guard.
    """
    first = rounds[0]
    usable = [t for t in first.trials if not t.diverged]
    default = next((t for t in first.trials if t.candidate.kind == "adaptive"), None)
    # a default whose loss became non-finite is no fallback
    adaptive = None if default is None or default.diverged else default.candidate
    if not usable:
        latest = max(first.trials, key=lambda t: len(t.losses))
        return (latest.candidate, None, "diverged",
                "every candidate's loss became non-finite; the one that lasted longest is "
                f"{latest.candidate.name}: lower the learning rate")  # fmt: skip
    final = rounds[-1]
    best = final.trial(final.best).candidate
    best_fixed = best if best.kind == "fixed" else None
    agree = all(r.best == best.name for r in rounds)
    alone = all(r.tied == (r.best,) for r in rounds)
    lead = first.trial(first.best)
    steady = settled(lead)
    won = f"{best.name} beat every other candidate beyond noise in {'both rounds' if len(rounds) > 1 else 'the round'}"
    if agree and alone and (steady or adaptive is None):
        return (best, best_fixed, "clear", won)
    tied = sorted({n for r in rounds for n in r.tied}, key=_order)
    if agree and alone:
        # Short-horizon bias: at the start of training the candidate that gains fastest
        # first leads (a lower threshold, a smaller step, can lead for hundreds of steps and
        # lose after); a win there does not displace the default.
        why = won + {
            "sign": ", but a mean loss <= 0 cannot tell steady training from its start",
            "start": ", but only at the start of training, where a short run favours what gains fastest first",
            "rise": ", but only while the loss rose, not on steady training",
        }[_unsteady(drift(lead))]
    elif agree:
        why = f"{', '.join(tied)} tie within noise"
    else:
        why = f"the rounds disagree ({', '.join(f'round {r.index}: {r.best}' for r in rounds)})"
    quiet = [t.candidate for t in first.trials if t.candidate.kind != "adaptive" and t.clip_rate == 0]
    if steady and quiet and len(first.trials) > 1 and len(first.tied) == len(first.trials):
        # Every candidate tied on steady training: within the horizon the threshold made no
        # difference. Clip least, as no clipping would, yet keep a threshold that cuts a
        # spike beyond the horizon: the lowest one that clipped none of its steps, with
        # HEADROOM over the norms seen (later norms may be larger), else the highest.
        seen = max((n for t in first.trials if t.candidate in quiet for n in t.norms
                    if math.isfinite(n)), default=0.0)  # fmt: skip
        fixed = sorted((c for c in quiet if c.kind == "fixed"), key=lambda c: _order(c.name))
        roomy = [c for c in fixed if c.max_norm >= HEADROOM * seen]  # type: ignore[operator]
        guard = roomy[0] if roomy else fixed[-1] if fixed else quiet[0]
        return (guard, best_fixed, "tie",
                f"every candidate tied on steady training (clipping made no measurable "
                f"difference): keep {guard.name}, the lowest that clipped none of the "
                f"{first.steps} steps with {HEADROOM:g}x headroom over the largest norm seen "
                f"({seen:.3g}), a guard against spikes beyond them")  # fmt: skip
    if adaptive is not None and "adaptive" not in first.tied and steady:
        # The default lost beyond noise on steady training, where its warm-up is no excuse:
        # of the candidates tied with the best, the one that clips least.
        gentlest = first.trial(max(first.tied, key=_order)).candidate
        return (gentlest, best_fixed, "tie",
                f"{why}, and the default lost to them on steady training: keep the gentlest of "
                f"round 1's best, {gentlest.name}")  # fmt: skip
    fallback = adaptive if adaptive is not None else best
    return (fallback, best_fixed, "tie",
            f"{why}: no threshold is clearly best, keep {fallback.name}")  # fmt: skip


def _order(name: str) -> float:
    return {"none": math.inf, "adaptive": -1.0}.get(name) or float(name)


def confirmation_set(trials: Sequence[Trial]) -> list[Candidate]:
    """The first round's best fixed thresholds (and no clipping, if among them)."""
    ranked = sorted((t for t in trials if t.candidate.kind != "adaptive" and not t.diverged),
                    key=lambda t: t.score)  # fmt: skip
    return [t.candidate for t in ranked[:CONFIRM_CANDIDATES]]


def warnings_for(
    rounds: Sequence[Round], grid: Sequence[float], choice: Candidate, *, lr_rise: float = 1.0
) -> tuple[str, ...]:
    """Plain-language findings: a pick at the grid's edge that beat the candidates beside it,
    candidates that diverged, a first round run within a learning-rate warm-up (a learning
    rate grew ``lr_rise`` times over it), and one that saw the start of training rather than
    steady training."""
    out = []
    first = rounds[0]
    # Only a pick among round 1's best says which way the best threshold lies: not a guard
    # kept where every candidate tied, nor the highest where no clipping did as well.
    if grid and choice.kind == "fixed" and choice.name in first.tied and len(first.tied) < len(first.trials):
        if choice.max_norm == min(grid):
            out.append(f"the pick {choice.name} is the lowest candidate: a lower threshold may "
                       "be better still; pass lower `candidates=`")  # fmt: skip
        elif choice.max_norm == max(grid) and "none" not in first.tied:
            out.append(f"the pick {choice.name} is the highest candidate: a higher threshold "
                       "may be better; pass higher `candidates=`")  # fmt: skip
    diverged = [t.candidate.name for t in first.trials if t.diverged]
    if diverged:
        out.append(f"diverged within the horizon: {', '.join(diverged)}")
    if lr_rise >= WARMING:
        grew = "from 0" if math.isinf(lr_rise) else f"{lr_rise:.3g}x"
        out.append(f"the learning rate grew {grew} over round 1 (a warm-up): the candidates were "
                   "compared at smaller learning rates than the run trains at, where the threshold "
                   "matters less (a flat loss there is the warm-up's); run the finder after the "
                   "warm-up, from a checkpoint")  # fmt: skip
    best = first.trial(first.best)
    moved = drift(best)
    if best.diverged or settled(best):
        return tuple(out)
    seen = _unsteady(moved)
    if seen == "sign":
        out.append("a mean loss <= 0: the finder compares losses as ratios and cannot tell steady "
                   "training from its start, so a win in round 1 does not displace the default; "
                   "return a loss that stays positive from your step (e.g. not shifted below 0)")  # fmt: skip
        return tuple(out)
    what = (f"saw the start of training, not steady training (the loss of {best.candidate.name} "
            f"fell {moved:.3g}x from its first quarter to its last): a short run there ranks what "
            "gains fastest first" if seen == "start" else
            f"saw no steady training (the loss of {best.candidate.name} rose {1 / moved:.3g}x from "
            "its first quarter to its last): a short run there ranks a passing rise")  # fmt: skip
    out.append(f"round 1 {what}, not what trains best over a run; run the finder after the "
               "warm-up or from a checkpoint, or give it more `budget`")  # fmt: skip
    return tuple(out)
