"""Strategies run side by side on one embedded task: the data behind ``gradclip demo``.

A *strategy* is a way of clipping (none, a fixed threshold, or one of gradclip's clippers at
its defaults). :func:`compare` trains the task once per strategy on the same data and seed
and returns a :class:`Comparison`: the per-step records of every run and a one-line summary
of each (final metric, diverged or not, clip rate, update sizes). Rendering lives in
:mod:`gradclip.demo.render`; the command line in :mod:`gradclip.cli`.

Example:
    >>> from gradclip.demo.compare import compare
    >>> result = compare("sgd-heavy-tail", ["none", "adaptive"], steps=50)
    >>> [row.strategy for row in result.rows]
    ['none', 'adaptive']
"""

from __future__ import annotations

import math
import statistics
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Literal

import torch

import gradclip
from gradclip.demo.problems import optimizer_of
from gradclip.demo.runner import RunResult, run
from gradclip.demo.tasks import Task, resolve

__all__ = [
    "STRATEGIES",
    "Comparison",
    "Row",
    "Strategy",
    "check_strategies",
    "compare",
    "spike_steps",
]


@dataclass(frozen=True)
class Strategy:
    """A way of clipping: its command-line name, what it is, and how to build it for a task.

    Attributes:
        name: the name on the command line (``--strategies``).
        describe: the label of the strategy on ``task`` (``"fixed 0.3 (good)"``).
        build: a fresh clipper for ``task``, or None for no clipping.
        threshold: what the clipper's reported threshold measures: ``"norm"`` (a threshold
            on the total gradient norm, comparable with it) or ``"ratio"`` (AGC's bound on
            each row's gradient-to-weight norm ratio, not a norm).
    """

    name: str
    describe: Callable[[Task], str]
    build: Callable[[Task], gradclip.Clipper | None]
    threshold: Literal["norm", "ratio"] = "norm"


def _fixed(index: int, word: str) -> Strategy:
    return Strategy(
        name=f"fixed-{word.replace(' ', '-')}",
        describe=lambda task: f"fixed {task.fixed[index]:g} ({word})",
        build=lambda task: gradclip.NormClip(task.fixed[index]),
    )


def _clipper(
    name: str,
    label: str,
    cls: Callable[[], gradclip.Clipper],
    threshold: Literal["norm", "ratio"] = "norm",
) -> Strategy:
    return Strategy(name=name, describe=lambda task: label, build=lambda task: cls(),
                    threshold=threshold)  # fmt: skip


def _adaptive(name: str, label: str, **options: object) -> Strategy:
    # the recommended default is given the optimizer stepped after the clip: its rule follows
    # the optimizer's kind (gradclip.AdaptiveClip's doc)
    return Strategy(name=name, describe=lambda task: label,
                    build=lambda task: gradclip.AdaptiveClip(optimizer=optimizer_of(task.config),
                                                             **options))  # fmt: skip


STRATEGIES: dict[str, Strategy] = {
    s.name: s
    for s in (
        Strategy("none", lambda task: "no clipping", lambda task: None),
        _fixed(0, "low"),
        _fixed(1, "good"),
        _fixed(2, "high"),
        _clipper("autoclip", "AutoClip (p=10)", gradclip.AutoClip),
        _clipper("zclip", "ZClip", gradclip.ZClip),
        _clipper("agc", "AGC (0.01)", gradclip.AGC, threshold="ratio"),
        _clipper("adagc", "AdaGC", gradclip.AdaGC),
        _adaptive("adaptive", "AdaptiveClip (default)"),
        _clipper("skip", "skip spikes (no clipping)",
                 lambda: gradclip.NormClip(math.inf, spikes="skip")),
        _adaptive("adaptive-skip", "AdaptiveClip + skip spikes", spikes="skip"),
    )
}
"""Every strategy of the demo by name, in table order. The fixed thresholds are the task's
own (:attr:`Task.fixed`): the best of a sweep, one 10x lower and one far higher (too low or
too high for SGD; Adam, which normalises its updates, hardly minds a low one). ``AdaptiveClip``
is built as recommended, given the task's optimizer (``optimizer=``). The last two skip the
steps a :class:`gradclip.SpikeDetector` (its defaults) calls spikes, judging each step's
gradient norm and loss: alone, and on top of ``AdaptiveClip``."""


@dataclass(frozen=True)
class Row:
    """One run, summarised: a line of the demo's table.

    Attributes:
        strategy, label: the strategy's name and its description on this task.
        metric: the task's final metric (lower is better; ``inf`` once weights are NaN/inf).
        diverged: the metric is non-finite or above the task's failure level.
        steps: steps run (fewer than asked when the weights became non-finite).
        clip_rate: fraction of steps whose gradients were scaled down.
        median_update, max_update: ``||θ_after - θ_before||`` over the finite steps.
        spikes: steps whose update exceeded 10x the median update (see :func:`spike_steps`).
        nonfinite_steps: steps with a NaN/inf loss, gradient norm or update.
        ratio_to_best: ``metric`` over the best metric of the fixed thresholds run here.
    """

    strategy: str
    label: str
    metric: float
    diverged: bool
    steps: int
    clip_rate: float
    median_update: float
    max_update: float
    spikes: int
    nonfinite_steps: int
    ratio_to_best: float


@dataclass(frozen=True)
class Comparison:
    """What :func:`compare` produced: the task, the settings, one run and one row per strategy."""

    task: Task
    seed: int
    steps: int
    device: str
    runs: dict[str, RunResult]
    rows: list[Row]
    wall_time_s: float

    @property
    def best_fixed(self) -> Row | None:
        """The fixed-threshold row with the lowest metric (None if no fixed one ran)."""
        fixed = [r for r in self.rows if r.strategy.startswith("fixed-")]
        return min(fixed, key=lambda r: r.metric) if fixed else None


def spike_steps(updates: Sequence[float], factor: float = 10.0) -> list[int]:
    """Steps whose update size is non-finite or above ``factor`` times the median finite one."""
    finite = [u for u in updates if math.isfinite(u)]
    if not finite:
        return list(range(len(updates)))
    limit = factor * statistics.median(finite)
    return [i for i, u in enumerate(updates) if not math.isfinite(u) or (limit > 0 and u > limit)]


def check_strategies(names: Sequence[str]) -> list[str]:
    """``names`` without repeats, or ``ValueError`` listing the valid choices."""
    unknown = [n for n in names if n not in STRATEGIES]
    if unknown:
        raise ValueError(
            f"unknown strategy {', '.join(map(repr, unknown))}; choose from: {', '.join(STRATEGIES)}"
        )
    if not names:
        raise ValueError(f"no strategy given; choose from: {', '.join(STRATEGIES)}")
    return list(dict.fromkeys(names))


def compare(
    task: str | Task,
    strategies: Sequence[str] = tuple(STRATEGIES),
    *,
    seed: int = 0,
    steps: int | None = None,
    quick: bool = False,
    device: str = "cpu",
    progress: Callable[[str, int, int], None] | None = None,
    record: Callable[[str, gradclip.Clipper | None], Callable[[object], object]] | None = None,
) -> Comparison:
    """Train ``task`` once per strategy, same data and seed, and summarise every run.

    Args:
        task: a key of :data:`gradclip.demo.tasks.TASKS` or a :class:`Task`.
        strategies: names of :data:`STRATEGIES`, run in this order.
        seed: the run seed (initialisation and batches).
        steps: steps per run; default the task's (its quick count with ``quick``).
        quick: use the task's quick step count.
        device: where to train (``"cpu"``; ``"cuda"`` when available).
        progress: called as ``progress(strategy, done, total)`` after every step.
        record: for a strategy and its clipper, a function applied to what the clipper
            returned each step (e.g. a :class:`gradclip.GradMonitor`'s ``record``); its
            result is what the runner sees.

    Returns:
        A :class:`Comparison`. The same arguments give the same numbers (for a given number
        of torch threads and device).
    """
    spec = resolve(task)
    names = check_strategies(strategies)
    start = time.perf_counter()
    runs: dict[str, RunResult] = {}
    for name in names:
        clipper = STRATEGIES[name].build(spec)
        hook = record(name, clipper) if record is not None else None
        clip = None if clipper is None else _clip_fn(clipper, hook)
        report = None if progress is None else (lambda done, total, n=name: progress(n, done, total))
        with warnings.catch_warnings():
            # the task's description says so once; every clipper would warn again
            warnings.filterwarnings("ignore", message=".* leaves the parameter group")
            runs[name] = run(spec, clip, seed=seed, steps=steps, quick=quick, progress=report,
                             device=device)
    rows = _rows(spec, runs)
    total = next(iter(runs.values())).planned_steps
    return Comparison(spec, seed, total, str(device), runs, rows, time.perf_counter() - start)


def _clip_fn(
    clipper: gradclip.Clipper, hook: Callable[[object], object] | None
) -> Callable[[torch.nn.Module], object]:
    if hook is None:
        return clipper
    return _Hooked(clipper, hook)


@dataclass(frozen=True)
class _Hooked:
    """A clipper whose stats go through ``hook``; the runner steps it as the clipper
    (:meth:`gradclip.Clipper.step`: it sees the optimizer's groups), with the loss for a
    spike detector."""

    clipper: gradclip.Clipper
    hook: Callable[[object], object]

    def __call__(self, model: torch.nn.Module, loss: torch.Tensor | None = None) -> object:
        return self.hook(self.clipper(model, loss=loss))

    def step(self, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
             loss: torch.Tensor | None = None) -> object:
        return self.hook(self.clipper.step(model, optimizer, loss=loss))


def _rows(task: Task, runs: dict[str, RunResult]) -> list[Row]:
    fixed = [r.metric for name, r in runs.items() if name.startswith("fixed-")]
    best = min(fixed) if fixed else math.nan
    rows = []
    for name, r in runs.items():
        finite = [u for u in r.update_norms if math.isfinite(u)]
        ratio = r.metric / best if best > 0 and math.isfinite(best) else math.nan
        rows.append(Row(
            strategy=name,
            label=STRATEGIES[name].describe(task),
            metric=r.metric,
            diverged=r.diverged,
            steps=r.steps,
            clip_rate=sum(r.clipped) / max(1, len(r.clipped)),
            median_update=statistics.median(finite) if finite else math.nan,
            max_update=max(finite) if finite else math.nan,
            spikes=len(spike_steps(r.update_norms)),
            nonfinite_steps=r.nonfinite_steps,
            ratio_to_best=ratio,
        ))
    return rows
