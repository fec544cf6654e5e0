"""Find ``max_norm`` on your own model: short runs under candidate thresholds, one snapshot.

:func:`find_max_norm` answers "1 or 10?" the way a learning-rate range test answers "which
learning rate?": it snapshots the training state, trains a short horizon from it under each
candidate threshold on the same batches, puts the state back after each, and keeps the
threshold whose loss went lowest, with the evidence (:class:`MaxNormSearch`).

Candidates: the recommended default (:class:`~gradclip.AdaptiveClip`, run first: its
pre-clip norms are the "norms seen"), thresholds log-spaced around those norms (round
values, two per decade, from 1/100 to 10 times their median), and no clipping.

Short-horizon bias, and the guards against it. A few dozen steps are not a training run:
a threshold that looks best early can be worse later (a lower threshold acts as a smaller
learning rate: it may win while the loss is noisy and lose once progress matters, or the
reverse). The finder therefore

1. scores each candidate by its (geometric) mean loss over the last half of the horizon (a
   smoothed trend, not the last, noisy, loss), compared step by step on the same batches
   as loss ratios, with a standard error from block means: differences within two
   standard errors (or under 0.5%) are ties;
2. runs a second, shorter confirmation round on the next batches, starting from where the
   best candidate of the first round ended (later in training), among the best candidates
   of the first round; the pick must hold there too;
3. keeps :class:`~gradclip.AdaptiveClip` (whose warm-up makes it slow in any short run,
   by design) when no fixed threshold is clearly better than its neighbours in both rounds:
   the finder changes the default only when the evidence says so, and says how sure it is.

Everything the finder touches is restored exactly (the model's parameters, buffers and
gradients, the optimizer, scheduler and GradScaler, the RNGs and the data generators you
name): training continues as if the finder had never run, except for the batches an
iterator gave it. See :mod:`gradclip._snapshot`.

Example:
    >>> import torch, gradclip
    >>> torch.manual_seed(0) and None
    >>> model = torch.nn.Linear(8, 1)
    >>> opt = torch.optim.SGD(model.parameters(), lr=0.1)
    >>> data = [(torch.randn(16, 8), torch.randn(16, 1)) for _ in range(30)]
    >>> def train_step(batch, clip):
    ...     x, y = batch
    ...     opt.zero_grad()
    ...     loss = torch.nn.functional.mse_loss(model(x), y)
    ...     loss.backward()
    ...     clip(model)               # between backward() and step(), as a clipper
    ...     opt.step()
    ...     return loss
    >>> before = model.weight.detach().clone()
    >>> search = gradclip.find_max_norm(model, opt, train_step, data, horizon=20)
    >>> search.choice.name in {c.candidate.name for c in search.rounds[0].trials}
    True
    >>> torch.equal(model.weight, before)   # the model is as it was
    True
"""

from __future__ import annotations

import math
import os
import statistics
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from itertools import islice
from typing import Any, Literal

import torch
from torch import Tensor, nn

from gradclip._checks import check_count, check_real
from gradclip._snapshot import Snapshot, SnapshotError, capture
from gradclip.clippers import AdaptiveClip, Clipper, NormClip
from gradclip.stats import ClipStats

__all__ = [
    "ABOVE",
    "BELOW",
    "BLOCKS",
    "CONFIRM",
    "CONFIRM_CANDIDATES",
    "PER_DECADE",
    "TAIL",
    "Candidate",
    "Cost",
    "MaxNormSearch",
    "Round",
    "SnapshotError",
    "StepError",
    "Trial",
    "TrialClip",
    "Z",
    "find_max_norm",
    "log_grid",
    "render_text",
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


class StepError(RuntimeError):
    """The step callable raised; the training state was restored before this was raised."""


@dataclass(frozen=True)
class Candidate:
    """A way of clipping the finder tries.

    Attributes:
        kind: ``"fixed"`` (``NormClip(max_norm)``), ``"none"`` (no clipping: the norm is
            measured, nothing is scaled) or ``"adaptive"`` (``AdaptiveClip``, the default).
        max_norm: the threshold of a ``"fixed"`` candidate (None otherwise).
    """

    kind: Literal["fixed", "none", "adaptive"]
    max_norm: float | None = None

    @property
    def name(self) -> str:
        """``"0.3"``, ``"none"`` or ``"adaptive"``."""
        return f"{self.max_norm:g}" if self.kind == "fixed" else self.kind

    def build(self, norm_type: float = 2.0, **adaptive: Any) -> Clipper:
        """A fresh clipper for this candidate (``"none"``: a NormClip at ``inf``, which
        measures and never scales)."""
        if self.kind == "fixed":
            return NormClip(self.max_norm, norm_type)  # type: ignore[arg-type]
        if self.kind == "none":
            return NormClip(math.inf, norm_type)
        return AdaptiveClip(norm_type=norm_type, **adaptive)


class TrialClip:
    """What the step callable receives as ``clip``: call it as you call a clipper.

    ``clip(model)`` (or parameters, or a name -> parameter mapping) clips in place and
    returns the :class:`~gradclip.ClipStats`; ``clip.step(model, optimizer)`` clips, then
    steps the optimizer. Call it once per step, between ``backward()`` (and
    ``scaler.unscale_(optimizer)`` under AMP) and ``optimizer.step()``; the finder records
    the last call of each step.
    """

    def __init__(self, clipper: Clipper, candidate: Candidate):
        self.clipper, self.candidate = clipper, candidate
        self.last: ClipStats | None = None

    def __call__(self, parameters: Any) -> ClipStats:
        self.last = self.clipper(parameters)
        return self.last

    def step(self, parameters: Any, optimizer: torch.optim.Optimizer) -> ClipStats:
        self.last = self.clipper.step(parameters, optimizer)
        return self.last


@dataclass(frozen=True)
class Trial:
    """One candidate's run in one round.

    Attributes:
        candidate: what was run.
        losses: the loss of each step (the run stops at the first non-finite loss).
        norms: the pre-clip total norm of each step.
        clipped: whether each step was clipped.
        diverged: the loss became non-finite.
        score: geometric mean of the losses over the last :data:`TAIL` of the round
            (arithmetic if one is <= 0; ``inf`` if diverged).
        seconds: wall time of the run, restore included.
    """

    candidate: Candidate
    losses: tuple[float, ...]
    norms: tuple[float, ...]
    clipped: tuple[bool, ...]
    diverged: bool
    score: float
    seconds: float

    @property
    def clip_rate(self) -> float:
        """Fraction of steps clipped."""
        return sum(self.clipped) / len(self.clipped) if self.clipped else 0.0


@dataclass(frozen=True)
class Round:
    """One round: every trial from the same state on the same batches.

    Attributes:
        index: 1 (all candidates, from your state) or 2 (confirmation, from where round 1's
            best ended, on the next batches).
        first_batch: index of the round's first batch.
        steps: steps per trial.
        trials: the trials, in the order they ran.
        best: name of the best fixed-or-none candidate (lowest score).
        tied: names of the candidates within noise of ``best`` (``best`` included).
        margins: name -> (mean difference to ``best`` over the tail, its standard error):
            of log-losses (a relative difference: 0.01 is 1% higher) when ``relative``, of
            losses otherwise.
        relative: every loss of the round was positive, so losses compare as ratios.
    """

    index: int
    first_batch: int
    steps: int
    trials: tuple[Trial, ...]
    best: str
    tied: tuple[str, ...]
    margins: dict[str, tuple[float, float]] = field(default_factory=dict)
    relative: bool = False

    def trial(self, name: str) -> Trial:
        """The trial of the candidate named ``name``."""
        return next(t for t in self.trials if t.candidate.name == name)


@dataclass(frozen=True)
class Cost:
    """What the search cost.

    Attributes:
        steps: training steps run (every trial of every round).
        seconds: wall time of the whole search.
        snapshot_bytes: size of one snapshot of the training state (two are held at most).
        run_steps: the training run's length, when given.
        fraction: ``steps / run_steps`` (None without ``run_steps``).
    """

    steps: int
    seconds: float
    snapshot_bytes: int
    run_steps: int | None
    fraction: float | None


@dataclass(frozen=True)
class MaxNormSearch:
    """What :func:`find_max_norm` found, and the evidence.

    Attributes:
        choice: what to train with (a fixed threshold, no clipping, or the adaptive
            default when no threshold is clearly better).
        best_fixed: the best fixed threshold found (None when no fixed threshold ran, or
            no clipping was best).
        confidence: ``"clear"`` (the pick beat its neighbours beyond noise in both rounds),
            ``"tie"`` (candidates tie within noise; ``statement`` names them) or
            ``"diverged"`` (every candidate's loss became non-finite).
        statement: the decision in one sentence.
        rounds: the rounds, with every trial's loss curve and norms.
        norms: the pre-clip norms the first trial (the adaptive default) saw.
        cost: steps, wall time and snapshot size.
        warnings: plain-language findings.
    """

    choice: Candidate
    best_fixed: Candidate | None
    confidence: Literal["clear", "tie", "diverged"]
    statement: str
    rounds: tuple[Round, ...]
    norms: tuple[float, ...]
    cost: Cost
    warnings: tuple[str, ...]
    adaptive: dict[str, Any] = field(default_factory=dict, repr=False)

    @property
    def max_norm(self) -> float | None:
        """The chosen fixed threshold (None when the choice is no clipping or adaptive)."""
        return self.choice.max_norm

    def clipper(self) -> Clipper | None:
        """A fresh clipper for :attr:`choice` (None for no clipping)."""
        if self.choice.kind == "none":
            return None
        return self.choice.build(**self.adaptive)

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-ready data (non-finite floats as strings)."""
        data = asdict(self)
        data.pop("adaptive")
        return _json_ready(data)  # type: ignore[no-any-return]


def _json_ready(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if isinstance(value, list | tuple):
        return [_json_ready(v) for v in value]
    if isinstance(value, dict):
        return {str(k): _json_ready(v) for k, v in value.items()}
    return value


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


def _tail(values: Sequence[float]) -> Sequence[float]:
    return values[len(values) - max(1, round(TAIL * len(values))):]


def _positive(values: Sequence[float]) -> bool:
    return all(v > 0 for v in values)


def _score(losses: Sequence[float], steps: int) -> float:
    """The geometric mean of the tail's losses (the arithmetic mean if one is <= 0): loss
    values are compared as ratios, and one noisy batch moves a ratio less."""
    if len(losses) < steps or not all(math.isfinite(v) for v in losses):
        return math.inf
    tail = _tail(losses)
    if _positive(tail):
        return math.exp(math.fsum(map(math.log, tail)) / len(tail))
    return math.fsum(tail) / len(tail)


def _margin(a: Trial, best: Trial, relative: bool) -> tuple[float, float]:
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


def _rank(
    trials: Sequence[Trial],
) -> tuple[str, tuple[str, ...], dict[str, tuple[float, float]], bool]:
    """The best of the non-adaptive trials, those tied with it, every margin, and whether
    the margins are relative (log-loss differences: every loss positive)."""
    pool = [t for t in trials if t.candidate.kind != "adaptive"] or list(trials)
    best = min(pool, key=lambda t: t.score)
    relative = all(_positive(_tail(t.losses)) for t in trials if not t.diverged)
    margins = {t.candidate.name: _margin(t, best, relative) for t in trials}
    tolerance = TOLERANCE * (1.0 if relative else abs(best.score))
    tied = tuple(
        t.candidate.name
        for t in trials
        if t is best
        or (not t.diverged and margins[t.candidate.name][0] <= Z * margins[t.candidate.name][1] + tolerance)
    )
    return best.candidate.name, tied, margins, relative


class _Stream:
    """The batches, by index: a sequence is indexed, an iterable is read once and kept."""

    def __init__(self, batches: Iterable[Any] | Sequence[Any]):
        self._seq = batches if isinstance(batches, Sequence) else None
        self._iter: Iterator[Any] | None = None if self._seq is not None else iter(batches)
        self._kept: list[Any] = []

    def get(self, index: int) -> Any:
        if self._seq is not None:
            if index >= len(self._seq):
                raise ValueError(
                    f"`batches` holds {len(self._seq)} batches; the search needs at least "
                    f"{index + 1} (horizon plus confirmation round): pass more batches or a "
                    "smaller `horizon`"
                )
            return self._seq[index]
        if index >= len(self._kept) and self._iter is not None:
            self._kept.extend(islice(self._iter, index + 1 - len(self._kept)))
        if index >= len(self._kept):
            raise ValueError(
                f"`batches` ran out after {len(self._kept)} batches; the search needs at least "
                f"{index + 1} (horizon plus confirmation round): pass more batches or a "
                "smaller `horizon`"
            )
        return self._kept[index]


def _loss_value(loss: object) -> float:
    if isinstance(loss, Tensor):
        if loss.numel() != 1:
            raise StepError(
                f"the step callable must return the loss, one number; got a tensor of shape "
                f"{tuple(loss.shape)}"
            )
        return float(loss.detach().reshape(()).item())
    if isinstance(loss, int | float) and not isinstance(loss, bool):
        return float(loss)
    raise StepError(
        f"the step callable must return the loss (a 0-dim tensor or a float), got "
        f"{type(loss).__name__}"
    )


def run_trial(
    snapshot: Snapshot,
    candidate: Candidate,
    step: Callable[[Any, TrialClip], object],
    stream: _Stream,
    first_batch: int,
    steps: int,
    *,
    norm_type: float = 2.0,
    adaptive: dict[str, Any] | None = None,
) -> Trial:
    """Restore ``snapshot``, then train ``steps`` steps under ``candidate`` (internal)."""
    start = time.perf_counter()
    snapshot.restore()
    clip = TrialClip(candidate.build(norm_type, **(adaptive or {})), candidate)
    losses: list[float] = []
    norms: list[float] = []
    clipped: list[bool] = []
    for i in range(steps):
        clip.last = None
        batch = stream.get(first_batch + i)
        try:
            loss = step(batch, clip)
        except Exception as exc:
            raise StepError(
                f"the step callable raised {type(exc).__name__}: {exc} (candidate "
                f"{candidate.name}, step {i} of round starting at batch {first_batch})"
            ) from exc
        value = _loss_value(loss)
        if clip.last is None:
            raise StepError(
                "the step callable did not call `clip(...)`: call it between backward() and "
                "optimizer.step(), e.g. `clip(model)`"
            )
        losses.append(value)
        norms.append(float(clip.last.norm))
        clipped.append(bool(clip.last.clipped))
        if not math.isfinite(value):
            break
    diverged = len(losses) < steps or not math.isfinite(losses[-1])
    return Trial(candidate, tuple(losses), tuple(norms), tuple(clipped), diverged,
                 _score(losses, steps), time.perf_counter() - start)  # fmt: skip


def _decide(
    rounds: list[Round], grid: Sequence[float]
) -> tuple[Candidate, Candidate | None, Literal["clear", "tie", "diverged"], str]:
    first = rounds[0]
    usable = [t for t in first.trials if not t.diverged]
    adaptive = next((t.candidate for t in first.trials if t.candidate.kind == "adaptive"), None)
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
    if agree and alone:
        return (best, best_fixed, "clear",
                f"{best.name} beat every other candidate beyond noise in "
                f"{'both rounds' if len(rounds) > 1 else 'the round'}")  # fmt: skip
    tied = sorted({n for r in rounds for n in r.tied}, key=_order)
    fallback = adaptive if adaptive is not None else best
    why = (
        f"{', '.join(tied)} tie within noise"
        if agree
        else f"the rounds disagree ({', '.join(f'round {r.index}: {r.best}' for r in rounds)})"
    )
    return (fallback, best_fixed, "tie",
            f"{why}: no threshold is clearly best, keep {fallback.name}")  # fmt: skip


def _order(name: str) -> float:
    return {"none": math.inf, "adaptive": -1.0}.get(name) or float(name)


def _check_candidates(candidates: object) -> tuple[Candidate, ...]:
    if isinstance(candidates, str | bytes) or not isinstance(candidates, Iterable):
        raise TypeError(
            f"`candidates` must be a sequence of positive thresholds, got "
            f"{type(candidates).__name__}; pass e.g. `candidates=[0.1, 1.0, 10.0]`"
        )
    out = []
    for value in candidates:
        number = check_real(value, "candidates", "finite and > 0 (each threshold)",
                            lambda v: 0 < v < math.inf, "candidates=[0.1, 1.0, 10.0]")  # fmt: skip
        out.append(Candidate("fixed", number))
    if not out:
        raise ValueError("`candidates` is empty; pass e.g. `candidates=[0.1, 1.0, 10.0]`, or "
                         "None for a grid around the observed norms")  # fmt: skip
    return tuple(dict.fromkeys(out))


def find_max_norm(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    step: Callable[[Any, TrialClip], object],
    batches: Iterable[Any],
    *,
    horizon: int | None = None,
    run_steps: int | None = None,
    budget: float = 0.2,
    candidates: Iterable[float] | None = None,
    include_none: bool = True,
    include_adaptive: bool = True,
    confirm: bool = True,
    scheduler: Any = None,
    scaler: Any = None,
    generators: Iterable[torch.Generator] = (),
    snapshot: Literal["cpu", "disk"] | str | os.PathLike[str] = "cpu",
    norm_type: float = 2.0,
    progress: Callable[[str], None] | None = None,
) -> MaxNormSearch:
    """Try candidate clipping thresholds on short runs from the current state; keep the best.

    See the module doc for the procedure and its guards against short-horizon bias. The
    step callable is your training step with the clipping passed in::

        def train_step(batch, clip):
            optimizer.zero_grad()
            loss = loss_fn(model(batch))
            loss.backward()                 # scaler.scale(loss).backward(); scaler.unscale_(optimizer)
            clip(model)                     # the candidate's clipping
            optimizer.step()                # scaler.step(optimizer); scaler.update()
            scheduler.step()
            return loss

    Args:
        model, optimizer: what is trained; both are restored exactly afterwards.
        step: ``step(batch, clip) -> loss`` (a 0-dim tensor or float), one training step
            that calls ``clip(...)`` (a :class:`TrialClip`) once between ``backward()`` and
            ``optimizer.step()``.
        batches: the batches, reused for every candidate: a sequence (indexed) or an
            iterable (the first ``horizon * 1.5`` batches are read once and kept in memory).
            To replay data drawn inside ``step`` instead, pass indices (``range(n)``) and
            name the data's generators in ``generators``.
        horizon: steps per candidate in the first round (the confirmation round runs half
            as many). Default: from ``budget`` and ``run_steps``, else 100.
        run_steps: your training run's length: sets the default horizon so the whole
            search costs ``budget`` of it, and reports the cost as a fraction.
        budget: the cost target as a fraction of ``run_steps`` (default 0.2).
        candidates: thresholds to try (each > 0); default: :func:`log_grid` of the norms
            seen under the adaptive default.
        include_none, include_adaptive: also try no clipping / the adaptive default.
        confirm: run the confirmation round (default True).
        scheduler: an LR scheduler your step advances (restored with the optimizer).
        scaler: a ``torch.amp.GradScaler`` your step uses (restored).
        generators: ``torch.Generator`` objects your step draws data or noise from
            (restored before each trial, so each sees the same draws). The global RNGs
            (torch, CUDA, ``random``, NumPy) are always restored.
        snapshot: ``"cpu"`` (default: one copy of the state in CPU memory), ``"disk"`` (a
            temporary file, memory-mapped back) or a folder for that file.
        norm_type: p of the norms.
        progress: called with one line per finished trial.

    Returns:
        A :class:`MaxNormSearch`: ``choice`` (with ``.max_norm`` and ``.clipper()``), the
        best fixed threshold, the confidence, every trial's curves, and the cost.

    Raises:
        TypeError, ValueError: a bad argument (nothing was run or changed).
        SnapshotError: the optimizer keeps state the snapshot cannot restore (nothing was
            changed).
        StepError: the step callable raised or broke the protocol; the state was restored.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"`model` must be a torch.nn.Module, got {type(model).__name__}")
    if not isinstance(optimizer, torch.optim.Optimizer):
        raise TypeError(
            f"`optimizer` must be a torch.optim.Optimizer, got {type(optimizer).__name__}"
        )
    if not callable(step):
        raise TypeError(f"`step` must be callable as step(batch, clip), got {type(step).__name__}")
    if isinstance(batches, str | bytes) or not isinstance(batches, Iterable):
        raise TypeError(
            f"`batches` must be a sequence or an iterable of batches, got {type(batches).__name__}"
        )
    runs = check_count(run_steps, "run_steps", 1, "run_steps=10_000", none="unknown")
    share = check_real(budget, "budget", "in (0, 1]", lambda v: 0 < v <= 1, "budget=0.2")
    fixed = None if candidates is None else _check_candidates(candidates)
    n_trials = (len(fixed) if fixed is not None else _DEFAULT_GRID) + include_none + include_adaptive
    if fixed is None and not include_adaptive:
        raise ValueError("the default candidates are centred on the norms the adaptive "
                         "default sees: pass `candidates=` or keep `include_adaptive=True`")  # fmt: skip
    if horizon is None:
        if runs is None:
            horizon = 100
        else:
            units = n_trials + (CONFIRM * CONFIRM_CANDIDATES if confirm else 0)
            horizon = max(2, int(share * runs / units))
    steps1 = int(check_count(horizon, "horizon", 1, "horizon=100"))  # type: ignore[arg-type]
    steps2 = max(1, round(CONFIRM * steps1)) if confirm else 0
    disk: str | os.PathLike[str] | bool
    if snapshot == "cpu":
        disk = False
    elif snapshot == "disk":
        disk = True
    elif isinstance(snapshot, str | os.PathLike):
        disk = snapshot
        if not os.path.isdir(disk):
            raise ValueError(f"`snapshot` must be 'cpu', 'disk' or an existing folder, got {snapshot!r}")
    else:
        raise TypeError(f"`snapshot` must be 'cpu', 'disk' or a folder path, got {type(snapshot).__name__}")
    for name, obj in (("scheduler", scheduler), ("scaler", scaler)):
        if obj is not None and not (hasattr(obj, "state_dict") and hasattr(obj, "load_state_dict")):
            raise TypeError(f"`{name}` must have state_dict() and load_state_dict(), got "
                            f"{type(obj).__name__}")  # fmt: skip
    gens = tuple(generators)
    for g in gens:
        if not isinstance(g, torch.Generator):
            raise TypeError(f"`generators` must hold torch.Generator objects, got {type(g).__name__}")

    started = time.perf_counter()
    adaptive = {"optimizer": optimizer}  # the default, as it would train this optimizer
    stream = _Stream(batches)
    origin = capture(model, optimizer, scheduler=scheduler, scaler=scaler, generators=gens,
                     disk=disk)  # fmt: skip
    leader: Snapshot | None = None
    trials1: list[Trial] = []
    rounds: list[Round] = []

    def note(trial: Trial, index: int) -> None:
        if progress is not None:
            state = "diverged" if trial.diverged else f"score {trial.score:.4g}"
            progress(f"round {index}: {trial.candidate.name}: {state} "
                     f"(clip rate {trial.clip_rate:.0%}, {trial.seconds:.1f} s)")  # fmt: skip

    try:
        queue: list[Candidate] = [Candidate("adaptive")] if include_adaptive else []
        queue += list(fixed or ())
        queue += [Candidate("none")] if include_none else []
        grid = tuple(c.max_norm for c in fixed or ())  # type: ignore[misc]
        norms: tuple[float, ...] = ()
        best_score = math.inf
        while queue:
            candidate = queue.pop(0)
            trial = run_trial(origin, candidate, step, stream, 0, steps1, norm_type=norm_type,
                              adaptive=adaptive)  # fmt: skip
            trials1.append(trial)
            note(trial, 1)
            if candidate.kind == "adaptive":
                norms = trial.norms
                if fixed is None:  # the grid is centred on the norms just seen
                    grid = log_grid(norms)
                    queue[0:0] = [Candidate("fixed", v) for v in grid]
            elif trial.score < best_score:
                best_score = trial.score
                if confirm:  # where the best candidate ended: the confirmation round's start
                    if leader is not None:
                        leader.close()
                    leader = capture(model, optimizer, scheduler=scheduler, scaler=scaler,
                                     generators=gens, disk=disk)  # fmt: skip
        if not norms:
            norms = trials1[0].norms
        rounds.append(Round(1, 0, steps1, tuple(trials1), *_rank(trials1)))
        chosen = _confirmation_set(trials1)
        if confirm and leader is not None and len(chosen) > 1:
            trials2 = []
            for c in chosen:
                trials2.append(run_trial(leader, c, step, stream, steps1, steps2,
                                         norm_type=norm_type))  # fmt: skip
                note(trials2[-1], 2)
            rounds.append(Round(2, steps1, steps2, tuple(trials2), *_rank(trials2)))
    finally:
        origin.restore()
        origin.close()
        if leader is not None:
            leader.close()

    choice, best_fixed, confidence, statement = _decide(rounds, grid)
    total_steps = sum(len(t.losses) for r in rounds for t in r.trials)
    cost = Cost(total_steps, time.perf_counter() - started, origin.nbytes, runs,
                None if runs is None else total_steps / runs)  # fmt: skip
    warnings = _warnings(rounds, grid, choice)
    return MaxNormSearch(choice, best_fixed, confidence, statement, tuple(rounds), norms, cost,
                         warnings, adaptive)  # fmt: skip


_DEFAULT_GRID = 6  # log_grid's size: 3 decades, two points each


def _confirmation_set(trials: Sequence[Trial]) -> list[Candidate]:
    """The first round's best fixed thresholds (and no clipping, if among them)."""
    ranked = sorted((t for t in trials if t.candidate.kind != "adaptive" and not t.diverged),
                    key=lambda t: t.score)  # fmt: skip
    return [t.candidate for t in ranked[:CONFIRM_CANDIDATES]]


def _warnings(rounds: Sequence[Round], grid: Sequence[float], choice: Candidate) -> tuple[str, ...]:
    out = []
    first = rounds[0]
    if grid and choice.kind == "fixed":
        if choice.max_norm == min(grid):
            out.append(f"the pick {choice.name} is the lowest candidate: a lower threshold may "
                       "be better still; pass lower `candidates=`")  # fmt: skip
        elif choice.max_norm == max(grid):
            out.append(f"the pick {choice.name} is the highest candidate: a higher threshold "
                       "may be better; pass higher `candidates=`")  # fmt: skip
    diverged = [t.candidate.name for t in first.trials if t.diverged]
    if diverged:
        out.append(f"diverged within the horizon: {', '.join(diverged)}")
    return tuple(out)


def render_text(search: MaxNormSearch) -> str:
    """The decision, each round's scores and the cost, as plain text.

    Example:
        >>> import torch, gradclip
        >>> from gradclip.tune import render_text
        >>> model = torch.nn.Linear(2, 1)
        >>> opt = torch.optim.SGD(model.parameters(), lr=0.1)
        >>> def train_step(x, clip):
        ...     opt.zero_grad(); loss = model(x).pow(2).mean(); loss.backward()
        ...     clip(model); opt.step(); return loss
        >>> s = gradclip.find_max_norm(model, opt, train_step, [torch.ones(4, 2)] * 12,
        ...                            horizon=8, candidates=[0.1, 1.0])
        >>> render_text(s).splitlines()[0].startswith("use: ")
        True
    """
    c = search.choice
    what = {"none": "no clipping", "adaptive": "gradclip.AdaptiveClip() (the default)"}.get(
        c.kind, f"max_norm={c.name}"
    )
    lines = [f"use: {what}", f"  {search.confidence}: {search.statement}"]
    for r in search.rounds:
        unit = "relative difference" if r.relative else "difference"
        lines.append(f"round {r.index}: {r.steps} steps from batch {r.first_batch}, "
                     f"{len(r.trials)} candidates (score: mean loss over the last "
                     f"{TAIL:.0%}; {unit} ± s.e. vs best)")  # fmt: skip
        for t in sorted(r.trials, key=lambda t: t.score):
            name = t.candidate.name
            diff, se = r.margins.get(name, (0.0, 0.0))
            mark = "best" if name == r.best else ("tie" if name in r.tied else "")
            score = "diverged" if t.diverged else f"{t.score:.5g}"
            extra = f"  {diff:+.2%} ± {se:.2%}" if r.relative else f"  {diff:+.3g} ± {se:.2g}"
            extra = "" if name == r.best or t.diverged else extra
            lines.append(f"  {name:>9}  {score:>10}  clip rate {t.clip_rate:4.0%}{extra}  {mark}")
    n = search.norms
    finite = sorted(v for v in n if math.isfinite(v))
    if finite:
        lines.append(f"norms seen: median {statistics.median(finite):.4g}, max {finite[-1]:.4g} "
                     f"over {len(finite)} steps")  # fmt: skip
    cost = search.cost
    fraction = "" if cost.fraction is None else f" = {cost.fraction:.1%} of a {cost.run_steps}-step run"
    lines.append(f"cost: {cost.steps} steps{fraction}, {cost.seconds:.1f} s; snapshot "
                 f"{cost.snapshot_bytes / 2**20:.1f} MiB")  # fmt: skip
    lines += [f"warning: {w}" for w in search.warnings]
    return "\n".join(lines)
