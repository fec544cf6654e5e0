"""The search: snapshot, trials from the same state on the same batches, two rounds, restore.

:func:`find_max_norm` (see :mod:`gradclip.tune` for the procedure) and what it hands the
user's step callable (:class:`TrialClip`); :func:`render_text` prints a result.

Example:
    >>> import torch
    >>> from gradclip.tune.search import find_max_norm
    >>> model = torch.nn.Linear(2, 1)
    >>> opt = torch.optim.SGD(model.parameters(), lr=0.1)
    >>> def train_step(x, clip):
    ...     opt.zero_grad(); loss = model(x).pow(2).mean(); loss.backward()
    ...     clip(model); opt.step(); return loss
    >>> s = find_max_norm(model, opt, train_step, [torch.ones(4, 2)] * 12, horizon=8,
    ...                   candidates=[0.1, 1.0])
    >>> [len(r.trials) for r in s.rounds], s.cost.steps   # 4 trials x 8 steps, 3 x 4
    ([4, 3], 44)
"""

from __future__ import annotations

import math
import os
import statistics
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from itertools import islice
from typing import Any, Literal

import torch
from torch import Tensor, nn

from gradclip._checks import check_count, check_real
from gradclip.clippers import Clipper
from gradclip.clippers.base import Optimizers, optimizer_list
from gradclip.stats import ClipStats
from gradclip.tune.results import Candidate, Cost, MaxNormSearch, Round, Trial
from gradclip.tune.scoring import (
    CONFIRM,
    CONFIRM_CANDIDATES,
    DEFAULT_GRID,
    TAIL,
    confirmation_set,
    decide,
    log_grid,
    rank,
    score,
    warnings_for,
)
from gradclip.tune.snapshot import Snapshot, capture

__all__ = ["StepError", "TrialClip", "find_max_norm", "render_text", "run_trial"]


class StepError(RuntimeError):
    """The step callable raised; the training state was restored before this was raised."""


class TrialClip:
    """What the step callable receives as ``clip``: call it as you call a clipper.

    ``clip(model)`` (or parameters, or a name -> parameter mapping) clips in place and
    returns the :class:`~gradclip.ClipStats`; ``clip.step(model, optimizer)`` clips, then
    steps the optimizer. Call it once per step, between ``backward()`` (and
    ``scaler.unscale_(optimizer)`` under AMP) and ``optimizer.step()``; the finder records
    the last call of each step. Pass ``loss=loss`` as you would to the clipper: the default
    candidate's growth follows it (:class:`~gradclip.AdaptiveClip`, ``follow_loss``).
    """

    def __init__(self, clipper: Clipper, candidate: Candidate):
        self.clipper, self.candidate = clipper, candidate
        self.last: ClipStats | None = None

    def __call__(self, parameters: Any, *, loss: Tensor | float | None = None) -> ClipStats:
        self.last = self.clipper(parameters, loss=loss)
        return self.last

    def step(self, parameters: Any, optimizer: torch.optim.Optimizer, *,
             loss: Tensor | float | None = None) -> ClipStats:
        self.last = self.clipper.step(parameters, optimizer, loss=loss)
        return self.last


class _Stream:
    """The batches, by index: a sequence is indexed, an iterable is read once and kept."""

    def __init__(self, batches: Iterable[Any] | Sequence[Any]):
        self._seq = batches if isinstance(batches, Sequence) else None
        self._iter: Iterator[Any] | None = None if self._seq is not None else iter(batches)
        self._kept: list[Any] = []

    def get(self, index: int) -> Any:
        held = self._seq if self._seq is not None else self._kept
        if held is self._kept and index >= len(held) and self._iter is not None:
            held.extend(islice(self._iter, index + 1 - len(held)))
        if index >= len(held):
            had = f"holds {len(held)}" if held is self._seq else f"ran out after {len(held)}"
            raise ValueError(
                f"`batches` {had} batches; the search needs at least {index + 1} (horizon "
                "plus confirmation round): pass more batches or a smaller `horizon`"
            )
        return held[index]


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


def _learning_rates(optimizers: Sequence[torch.optim.Optimizer]) -> list[float]:
    return [float(g["lr"]) for o in optimizers for g in o.param_groups if "lr" in g]


def _rise(before: Sequence[float], after: Sequence[float]) -> float:
    """The largest factor by which a learning rate grew (inf: from 0; 1.0: none grew)."""
    return max((b / a if a > 0 else math.inf for a, b in zip(before, after, strict=False) if b > a),
               default=1.0)  # fmt: skip


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
        norms.append(float(clip.last.clipped_norms()[0]))  # Muon's groups aside: see there
        clipped.append(bool(clip.last.clipped))
        if not math.isfinite(value):
            break
    diverged = len(losses) < steps or not math.isfinite(losses[-1])
    return Trial(candidate, tuple(losses), tuple(norms), tuple(clipped), diverged,
                 score(losses, steps), time.perf_counter() - start)  # fmt: skip


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
    optimizer: Optimizers,
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
            ``optimizer`` may be a list of the optimizers one step steps (``[muon, adamw]``):
            each is restored, and the adaptive default fits them all (as
            ``AdaptiveClip(optimizer=[muon, adamw])``).
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
        scheduler: an LR scheduler your step advances, or a list of them (restored with
            the optimizers).
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
    optimizers = optimizer_list(optimizer, "the ones your step steps, e.g. [muon, adamw]")
    if not callable(step):
        raise TypeError(f"`step` must be callable as step(batch, clip), got {type(step).__name__}")
    if isinstance(batches, str | bytes) or not isinstance(batches, Iterable):
        raise TypeError(
            f"`batches` must be a sequence or an iterable of batches, got {type(batches).__name__}"
        )
    runs = check_count(run_steps, "run_steps", 1, "run_steps=10_000", none="unknown")
    share = check_real(budget, "budget", "in (0, 1]", lambda v: 0 < v <= 1, "budget=0.2")
    fixed = None if candidates is None else _check_candidates(candidates)
    n_trials = (len(fixed) if fixed is not None else DEFAULT_GRID) + include_none + include_adaptive
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
    schedulers = (list(scheduler) if isinstance(scheduler, list | tuple)
                  else [] if scheduler is None else [scheduler])  # fmt: skip
    checked = [("scheduler", s) for s in schedulers] + ([] if scaler is None else [("scaler", scaler)])
    for name, obj in checked:
        if not (hasattr(obj, "state_dict") and hasattr(obj, "load_state_dict")):
            raise TypeError(f"`{name}` must have state_dict() and load_state_dict(), got "
                            f"{type(obj).__name__}")  # fmt: skip
    gens = tuple(generators)
    for g in gens:
        if not isinstance(g, torch.Generator):
            raise TypeError(f"`generators` must hold torch.Generator objects, got {type(g).__name__}")

    started = time.perf_counter()
    adaptive = {"optimizer": optimizers}  # the default, as it would train these optimizers
    stream = _Stream(batches)
    origin = capture(model, optimizers, scheduler=schedulers, scaler=scaler, generators=gens,
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
        lr_start, lr_rise = _learning_rates(optimizers), 1.0
        while queue:
            candidate = queue.pop(0)
            trial = run_trial(origin, candidate, step, stream, 0, steps1, norm_type=norm_type,
                              adaptive=adaptive)  # fmt: skip
            if not trials1:  # the schedule, the same for every candidate
                lr_rise = _rise(lr_start, _learning_rates(optimizers))
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
                    leader = capture(model, optimizers, scheduler=schedulers, scaler=scaler,
                                     generators=gens, disk=disk)  # fmt: skip
        if not norms:
            norms = trials1[0].norms
        rounds.append(Round(1, 0, steps1, tuple(trials1), *rank(trials1)))
        chosen = confirmation_set(trials1)
        if confirm and leader is not None and len(chosen) > 1:
            trials2 = []
            for c in chosen:
                trials2.append(run_trial(leader, c, step, stream, steps1, steps2,
                                         norm_type=norm_type))  # fmt: skip
                note(trials2[-1], 2)
            rounds.append(Round(2, steps1, steps2, tuple(trials2), *rank(trials2)))
    finally:
        origin.restore()
        origin.close()
        if leader is not None:
            leader.close()

    choice, best_fixed, confidence, statement = decide(rounds, grid)
    total_steps = sum(len(t.losses) for r in rounds for t in r.trials)
    cost = Cost(total_steps, time.perf_counter() - started, origin.nbytes, runs,
                None if runs is None else total_steps / runs)  # fmt: skip
    warnings = warnings_for(rounds, grid, choice, lr_rise=lr_rise)
    return MaxNormSearch(choice, best_fixed, confidence, statement, tuple(rounds), norms, cost,
                         warnings, adaptive)  # fmt: skip


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
    what = {"none": "no clipping",
            "adaptive": "gradclip.AdaptiveClip(optimizer=optimizer) (the default)"}.get(
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
