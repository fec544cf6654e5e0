"""Issue 18's acceptance: "1 or 10?" answered on each task, against the best fixed threshold.

On every task of :mod:`gradclip.demo.tasks` (the four the defaults were chosen on, and the
real-data tasks that judge them; not ``muon-adamw``, see :data:`TASKS`), ``--seeds`` seeds
each, the median over seeds of:

* ``none``, and ``fixed C`` for C in 0.01, 0.03, ..., 100 (``NormClip``): the full sweep; its
  best is the reference (``fixed 1`` is the industry default ``max_norm=1.0``);
* ``default``: the recommended default, ``AdaptiveClip(optimizer=...)`` (the task's optimizer
  decides its mode);
* ``finder``: ``gradclip.find_max_norm`` run at the first step with a budget of 20% of one
  training run (:func:`gradclip.demo.search.search_task`), then a full run with its choice
  (a fixed threshold, no clipping, or the default); its cost is the search's steps over the
  run's, and its wall time over that of the default's run;
* ``recommend``: ``gradclip.recommend_max_norm`` on the log of the ``fixed 1`` run, given the
  task's optimizer (``optimizer=``: only its kind is read, as a user names it), then a
  full run with the recommended threshold, applied as the recommendation says
  (``Recommendation.threshold_at``): where it found a start of training (norms far above the
  settled ones), from the step after it, and at the recorded run's 1 before
  (``fixed 1 then C from N``).

Acceptance (per task): finder and default within 1.1x of the best fixed threshold, the
recommendation within 1.15x, the finder's cost at most 20% of a run. Each verdict comes with
a 90% interval of its ratio (:func:`interval`: the seeds resampled), which says whether a
pass or a fail is more than the seeds' luck.

Results are appended to the JSON file after every job, and ``--resume`` skips the jobs a
file already holds, so a long evaluation can be stopped and continued. ``--first-seed`` and
``--methods`` run more seeds of a part of it (new seeds of one verdict, in processes side by
side), and ``--render`` reads several files as one.

Example:
    python benchmarks/bench_quality.py --acceptance --seeds 6 --json benchmarks/results/acceptance-DATE.json
    python benchmarks/bench_quality.py --acceptance --render benchmarks/results/acceptance-DATE.json
    python benchmarks/acceptance.py --tasks cnn-digits/adamw --methods default --first-seed 24 --seeds 60 --json more.json
    python benchmarks/acceptance.py --render more.json others.json --tasks cnn-digits/adamw
"""

from __future__ import annotations

import argparse
import functools
import json
import math
import random
import statistics
import sys
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass, field
from multiprocessing import get_context
from pathlib import Path
from typing import Any

import torch

import gradclip
from bench_quality import ratio
from gradclip.demo.problems import optimizer_of
from gradclip.demo.runner import run
from gradclip.demo.search import search_task
from gradclip.demo.tasks import TASKS as ALL_TASKS
from gradclip.demo.tasks import resolve

FIXED: tuple[float, ...] = (0.01, 0.03, 0.1, 0.3, 1.0, 3.0, 10.0, 30.0, 100.0)
"""The sweep: the quality benchmark's, extended down to 0.01 (on heavy-tailed and on
label-noise SGD the best of 0.1 to 100 was 0.1, its lowest: the best might lie below it)."""
TASKS: tuple[str, ...] = tuple(key for key in ALL_TASKS if key != "muon-adamw")
"""The tasks judged. ``muon-adamw`` has its own rule in :mod:`bench_quality`: clipping its
AdamW groups at 0.1, 1 or 10 trains within 1% of no clipping (``results/muon-2026-12-04.txt``),
so there is nothing to choose, and at ~30 s a run its sweep would double this benchmark's time."""
TUNED_ON: tuple[str, ...] = (
    "rnn-addition/violent", "rnn-addition/moderate", "adam-spikes", "sgd-heavy-tail"
)  # fmt: skip
"""The tasks the defaults were chosen on; every other task only judges them."""
BUDGET = 0.2
LIMITS = {"finder": 1.1, "default": 1.1, "recommend": 1.15}
SPLITS = 200
"""Random halves of the seeds for :func:`halves`."""
SWEEP = ("none", *(f"fixed {c:g}" for c in FIXED))
METHODS = ("default", "finder", "recommend")
"""What is judged against the sweep (``--methods`` runs a part of them, and the sweep)."""


@dataclass(frozen=True)
class Run:
    """One full training run."""

    task: str
    strategy: str
    seed: int
    metric: float
    diverged: bool
    clip_rate: float
    wall_time_s: float


@dataclass(frozen=True)
class Pick:
    """What a finder search or a recommendation chose for one seed.

    ``strategy`` names the run that scores it (``"fixed 0.3"``, ``"default"``, ``"none"``).
    """

    task: str
    seed: int
    method: str
    strategy: str
    threshold: float | None
    confidence: str
    steps: int
    fraction: float
    seconds: float


def map_jobs(fn: Callable[[Any], Any], work: Sequence[Any], jobs: int) -> list[Any]:
    """``[fn(job) for job in work]`` in ``jobs`` spawned processes (in order), each and this
    one at one torch thread: the tasks' calibration (:mod:`gradclip.demo.tasks`). ``fn``
    must be picklable (a module-level function)."""
    torch.set_num_threads(1)
    if jobs <= 1:
        return [fn(job) for job in work]
    with get_context("spawn").Pool(jobs, torch.set_num_threads, (1,)) as pool:
        return pool.map(fn, work, chunksize=1)


@functools.cache
def _optimizer(task: str) -> torch.optim.Optimizer | list[torch.optim.Optimizer]:
    """The task's optimizer (built once; only its kind is read)."""
    return optimizer_of(resolve(task).config)


class Switched:
    """``NormClip(before)`` for the first ``until`` steps, then ``after``: a recommendation
    applied as :meth:`gradclip.Recommendation.threshold_at` says."""

    def __init__(self, before: float, after: float, until: int):
        self.clip, self.after, self.until, self.steps = gradclip.NormClip(before), after, until, 0

    def __call__(self, model: torch.nn.Module) -> gradclip.ClipStats:
        self.steps += 1
        if self.steps > self.until:
            self.clip.max_norm = self.after
        return self.clip(model)


def clipper(task: str, strategy: str) -> gradclip.Clipper | Switched | None:
    """A fresh clipper for a strategy name (``fixed B then C from N``: :class:`Switched`)."""
    if strategy == "none":
        return None
    if strategy == "default":
        return gradclip.AdaptiveClip(optimizer=_optimizer(task))
    words = strategy.split()
    if words[0] == "fixed" and len(words) == 2:
        return gradclip.NormClip(float(words[1]))
    if words[0] == "fixed" and words[2::2] == ["then", "from"]:
        return Switched(float(words[1]), float(words[3]), int(words[5]))
    raise ValueError(f"unknown strategy {strategy!r}")


def _fixed(threshold: float) -> str:
    return f"fixed {threshold:g}"


def run_strategy(task: str, strategy: str, seed: int) -> tuple[Run, Any]:
    result = run(task, clipper(task, strategy), seed=seed)
    record = Run(task, strategy, seed, result.metric, result.diverged,
                 sum(result.clipped) / max(1, len(result.clipped)), result.wall_time_s)  # fmt: skip
    return record, result


def search(task: str, seed: int) -> Pick:
    found = search_task(task, seed=seed, budget=BUDGET)
    choice = found.choice
    strategy = {"adaptive": "default", "none": "none"}.get(choice.kind) or _fixed(choice.max_norm)  # type: ignore[arg-type]
    return Pick(task, seed, "finder", strategy, choice.max_norm, found.confidence,
                found.cost.steps, found.cost.fraction or math.nan, found.cost.seconds)  # fmt: skip


def recommend(task: str, seed: int) -> tuple[Run, Pick]:
    """The ``fixed 1`` run, and the threshold recommended from its log."""
    record, result = run_strategy(task, "fixed 1", seed)
    history = gradclip.History.from_norms(result.pre_norms, threshold=1.0)
    rec = gradclip.recommend_max_norm(history, optimizer=_optimizer(task))
    if rec.max_norm is None:
        pick = Pick(task, seed, "recommend", "fixed 1", None, "none", 0, 0.0, 0.0)
    else:
        strategy = _fixed(rec.max_norm)
        if rec.settled_step:  # the threshold from the step after the start (threshold_at)
            strategy = f"{_fixed(rec.threshold_at(0))} then {rec.max_norm:g} from {rec.settled_step}"
        pick = Pick(task, seed, "recommend", strategy, rec.max_norm, "-", 0, 0.0, 0.0)
    return record, pick


def _job(job: tuple[str, str, int]) -> dict[str, Any]:
    kind, task, seed = job[0], job[1], job[2]
    if kind == "search":
        return {"picks": [asdict(search(task, seed))]}
    if kind == "recommend":
        record, pick = recommend(task, seed)
        return {"runs": [asdict(record)], "picks": [asdict(pick)]}
    record, _ = run_strategy(task, kind, seed)
    return {"runs": [asdict(record)]}


def _save(path: Path | None, meta: dict[str, Any], runs: list[Run], picks: list[Pick]) -> None:
    if path is None:
        return
    payload = {"meta": meta, "runs": [asdict(r) for r in runs], "picks": [asdict(p) for p in picks]}
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(payload, indent=1, allow_nan=True) + "\n")
    tmp.replace(path)


def evaluate(
    tasks: Iterable[str],
    seeds: int,
    path: Path | None = None,
    resume: bool = False,
    progress: Callable[[str], None] | None = None,
    first: int = 0,
    methods: Sequence[str] = METHODS,
) -> tuple[list[Run], list[Pick]]:
    """Every job of seeds ``first`` to ``first + seeds - 1``, in two phases: the sweep and the
    ``methods`` (the default, the searches, the recommendations); then the runs of chosen
    thresholds the sweep does not hold."""
    runs: list[Run] = []
    picks: list[Pick] = []
    started = time.perf_counter()
    if resume and path is not None and path.exists():
        saved = json.loads(path.read_text())
        runs = [Run(**r) for r in saved["runs"]]
        picks = [Pick(**p) for p in saved["picks"]]
    meta = {"seeds": seeds, "first_seed": first, "methods": list(methods), "budget": BUDGET,
            "fixed": list(FIXED), "limits": LIMITS, "torch": torch.__version__,
            "tuned_on": list(TUNED_ON)}  # fmt: skip
    if resume and path is not None and path.exists():
        meta = {**json.loads(path.read_text())["meta"], **meta}
    tasks = list(tasks)

    def done(kind: str, task: str, seed: int) -> bool:
        if kind == "search":
            return any(p.method == "finder" and (p.task, p.seed) == (task, seed) for p in picks)
        if kind == "recommend":
            return any(p.method == "recommend" and (p.task, p.seed) == (task, seed) for p in picks)
        return any((r.task, r.strategy, r.seed) == (task, kind, seed) for r in runs)

    def go(work: list[tuple[str, str, int]]) -> None:
        todo = [j for j in work if not done(*j)]
        for i, job in enumerate(todo):
            out = _job(job)
            runs.extend(Run(**r) for r in out.get("runs", ()))
            picks.extend(Pick(**p) for p in out.get("picks", ()))
            meta["wall_time_s"] = time.perf_counter() - started
            _save(path, meta, runs, picks)
            if progress is not None:
                progress(f"[{i + 1}/{len(todo)}] {job[1]} {job[0]} seed {job[2]}: "
                         + "; ".join(_describe(x) for x in (*out.get("runs", ()), *out.get("picks", ()))))  # fmt: skip

    seed_range = range(first, first + seeds)
    method_of = {"recommend": "recommend", "default": "default", "search": "finder"}  # job kinds
    # the recommendation runs fixed 1 itself: its log is what it reads
    sweep = [s for s in SWEEP if s != "fixed 1" or "recommend" not in methods]
    kinds = [k for k in ("recommend", *sweep, "default", "search") if k not in method_of or method_of[k] in methods]
    go([(kind, t, seed) for t in tasks for seed in seed_range for kind in kinds])
    go([(p.strategy, p.task, p.seed) for p in picks if p.task in tasks and p.seed in seed_range])
    return runs, picks


def reuse(path: Path, tasks: Iterable[str], seeds: int, first: int = 0) -> list[Run]:
    """The sweep's runs (no clipping and the fixed thresholds) from a result of
    ``bench_quality.py --json`` or of this script: the same runner, tasks and seeds give the
    same numbers, so they need not run again (checked: ``fixed 1`` runs again here, inside
    ``recommend``), and a method can be judged again after its rule changed."""
    saved = json.loads(path.read_text())
    wanted = set(tasks)
    return [
        Run(r["task"], r["strategy"], r["seed"], r["metric"], r["diverged"], r["clip_rate"],
            r["wall_time_s"])
        for r in saved["records" if "records" in saved else "runs"]
        if r["task"] in wanted and r["strategy"] in SWEEP and r["strategy"] != "fixed 1"
        and first <= r["seed"] < first + seeds
    ]


RESAMPLES = 2000
"""Bootstrap resamples behind a ratio's interval."""


def interval(pairs: list[tuple[float, float]], resamples: int = RESAMPLES) -> tuple[float, float]:
    """A 90% paired-bootstrap interval of ``median(a) / median(b)`` over seeds.

    ``pairs`` holds one ``(a, b)`` per seed: a strategy's metric and the best fixed
    threshold's on the same seed. A resample draws as many seeds with replacement and keeps
    each seed's pair together (a seed sets the data and the initialisation of both); the
    interval is the 5th and 95th percentiles of the resampled ratios. Seeded: the same pairs
    give the same interval."""
    rng = random.Random(0)
    n = len(pairs)
    ratios = []
    for _ in range(resamples):
        drawn = [pairs[rng.randrange(n)] for _ in range(n)]
        ratios.append(ratio(statistics.median(a for a, _ in drawn), statistics.median(b for _, b in drawn)))
    ratios.sort()
    return ratios[int(0.05 * resamples)], ratios[math.ceil(0.95 * resamples) - 1]


def halves(
    fixed: dict[str, dict[int, float]], methods: dict[str, dict[int, float]], splits: int = SPLITS
) -> dict[str, float]:
    """The sweep's best as a user would find it: tuned on half of the seeds, judged on the rest.

    ``fixed`` and ``methods`` map a strategy to its metric per seed. Over ``splits`` random
    halves of the seeds that every fixed threshold ran (seeded; the larger half is judged when
    their number is odd), the fixed threshold with the lowest median on one half is *tuned*;
    on the other half, ``"tuned"`` is its median over the best median there (>= 1: how much
    of the best of the full sweep is the seeds' luck, the winner's curse), and each method's
    entry its median over the tuned threshold's, on the seeds it ran. Each value is the median
    over the splits; none without two seeds."""
    seeds = sorted(set.intersection(*(set(v) for v in fixed.values())))
    if len(seeds) < 2:
        return {}

    def med(metric: dict[int, float], on: list[int]) -> float:
        return statistics.median(metric[k] for k in on)

    rng = random.Random(0)
    found: dict[str, list[float]] = {"tuned": [], **{m: [] for m in methods}}
    for _ in range(splits):
        drawn = rng.sample(seeds, len(seeds))
        tune, judge = drawn[: len(seeds) // 2], drawn[len(seeds) // 2 :]
        tuned = min(fixed, key=lambda s: med(fixed[s], tune))
        found["tuned"].append(ratio(med(fixed[tuned], judge), min(med(f, judge) for f in fixed.values())))
        for m, metric in methods.items():
            on = [k for k in judge if k in metric]
            if on:
                found[m].append(ratio(med(metric, on), med(fixed[tuned], on)))
    return {m: statistics.median(v) for m, v in found.items() if v}


def _describe(item: dict[str, Any]) -> str:
    if "metric" in item:
        return f"{item['strategy']} {item['metric']:.4g} ({item['wall_time_s']:.1f} s)"
    return f"{item['method']} -> {item['strategy']} ({item['confidence']}, {item['seconds']:.1f} s)"


@dataclass
class TaskVerdict:
    task: str
    judge: bool
    best: str
    medians: dict[str, float]
    ratios: dict[str, float]
    diverged: dict[str, int]
    seeds: int
    finder_fraction: float
    finder_wall: float
    finder_choices: dict[str, int]
    recommend_choices: dict[str, int]
    passes: dict[str, bool]
    intervals: dict[str, tuple[float, float]]
    tuned: dict[str, float]
    ran: dict[str, int] = field(default_factory=dict)
    """Seeds a method ran where fewer than the sweep's (its ratio is on those seeds)."""


def summarize(runs: list[Run], picks: list[Pick]) -> list[TaskVerdict]:
    """Per task: medians over seeds, ratios to the best fixed threshold, verdicts."""
    out = []
    for task in dict.fromkeys(r.task for r in runs):
        by = {(r.strategy, r.seed): r for r in runs if r.task == task}
        seeds = sorted({r.seed for r in runs if r.task == task})
        medians: dict[str, float] = {}
        diverged: dict[str, int] = {}
        for s in (*SWEEP, "default"):
            values = [by[(s, k)] for k in seeds if (s, k) in by]
            if values:
                medians[s] = statistics.median(r.metric for r in values)
                diverged[s] = sum(r.diverged for r in values)
        mine = [p for p in picks if p.task == task]
        counts: dict[str, dict[str, int]] = {"finder": {}, "recommend": {}}
        per_seed = {"default": {k: by[("default", k)] for k in seeds if ("default", k) in by}}
        for method in ("finder", "recommend"):
            chosen = {p.seed: by.get((p.strategy, p.seed)) for p in mine if p.method == method}
            if chosen and all(c is not None for c in chosen.values()):
                per_seed[method] = chosen  # type: ignore[assignment]
                medians[method] = statistics.median(c.metric for c in chosen.values())  # type: ignore[union-attr]
                diverged[method] = sum(c.diverged for c in chosen.values())  # type: ignore[union-attr]
            for p in mine:
                if p.method == method:
                    counts[method][p.strategy] = counts[method].get(p.strategy, 0) + 1
        fixed = [s for s in medians if s.startswith("fixed ")]
        best = min(fixed, key=lambda s: medians[s])
        # a method is compared on the seeds it ran (fewer than the sweep's where more seeds
        # were added for another): the best fixed threshold's median on those seeds
        best_on = {m: [by[(best, k)].metric for k in r if (best, k) in by] for m, r in per_seed.items()}
        ratios = {s: ratio(m, statistics.median(best_on[s]) if best_on.get(s) else medians[best])
                  for s, m in medians.items()}  # fmt: skip
        ran = {m: len(r) for m, r in per_seed.items() if 0 < len(r) < len(seeds)}
        finder = [p for p in mine if p.method == "finder"]
        fraction = statistics.median(p.fraction for p in finder) if finder else math.nan
        walls = [p.seconds / by[("default", p.seed)].wall_time_s for p in finder
                 if ("default", p.seed) in by]  # fmt: skip
        passes = {m: ratios[m] <= LIMITS[m] for m in LIMITS if m in ratios}
        intervals = {m: interval([(run.metric, by[(best, k)].metric) for k, run in per_seed[m].items()])
                     for m in passes if all((best, k) in by for k in per_seed[m])}  # fmt: skip
        if "finder" in passes:
            passes["finder cost"] = fraction <= BUDGET + 1e-9
        tuned = halves({s: {k: by[(s, k)].metric for k in seeds if (s, k) in by} for s in fixed},
                       {m: {k: r.metric for k, r in runs_.items()} for m, runs_ in per_seed.items()})  # fmt: skip
        out.append(TaskVerdict(task, task not in TUNED_ON, best, medians, ratios, diverged,
                               len(seeds), fraction, statistics.median(walls) if walls else math.nan,
                               counts["finder"], counts["recommend"], passes, intervals, tuned, ran))  # fmt: skip
    return out


def _cell(v: TaskVerdict, s: str) -> str:
    if s not in v.medians:
        return "-"
    m, r = v.medians[s], v.ratios[s]
    text = "inf" if math.isinf(m) else f"{m:.3g} ({r:.2f}x)" if r < 100 else f"{m:.3g} ({r:.1e}x)"
    if v.diverged.get(s):
        text += f" d{v.diverged[s]}/{v.ran.get(s, v.seeds)}"
    if s in v.ran:
        text += f" ({v.ran[s]} of {v.seeds} seeds)"
    return text


def _bracket(bounds: tuple[float, float] | None) -> str:
    if bounds is None:
        return ""
    return " [" + "-".join("inf" if math.isinf(b) else f"{b:.2f}" if b < 100 else f"{b:.1e}"
                           for b in bounds) + "x]"  # fmt: skip


def render(verdicts: list[TaskVerdict], meta: str = "") -> str:
    """The table (median metric and ratio to the best fixed), the picks, the verdicts."""
    rows = ["none", "fixed 1", "default", "finder", "recommend", *(s for s in SWEEP if s not in ("none", "fixed 1"))]
    searched = any(v.finder_choices for v in verdicts)
    grid = [["", *(v.task + (" *" if v.judge else "") for v in verdicts)]]
    grid += [[s, *(_cell(v, s) for v in verdicts)] for s in rows if any(s in v.medians for v in verdicts)]
    grid.append(["best fixed", *(v.best for v in verdicts)])
    if searched:
        grid.append(["finder cost", *(f"{v.finder_fraction:.0%} steps, {v.finder_wall:.0%} time" for v in verdicts)])
    widths = [max(len(r[i]) for r in grid) + 2 for i in range(len(grid[0]))]
    lines = [meta] if meta else []
    lines.append("median metric over seeds (lower is better), ratio to the best fixed threshold; "
                 "* = a judge task (not used to choose defaults)")  # fmt: skip
    lines += ["".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in grid]
    lines.append("")
    if searched or any(v.recommend_choices for v in verdicts):
        for v in verdicts:
            f = ", ".join(f"{k} x{n}" for k, n in v.finder_choices.items())
            r = ", ".join(f"{k} x{n}" for k, n in v.recommend_choices.items())
            lines.append(f"{v.task}: finder chose {f or '-'}; recommend chose {r or '-'}")
        lines.append("")
    limits = ", ".join(f"{m} <= {x}x" for m, x in LIMITS.items())
    lines.append(f"acceptance ({limits} the best fixed; finder cost <= {BUDGET:.0%} of a run):")
    lines.append("  (in brackets: a 90% interval of the ratio, the seeds resampled)")
    for v in verdicts:
        marks = "  ".join(f"{k} {'PASS' if ok else 'FAIL'}{_bracket(v.intervals.get(k))}"
                          for k, ok in v.passes.items())  # fmt: skip
        lines.append(f"  {v.task}: {marks}")
    for m in (*LIMITS, "finder cost"):
        verdict = [v.passes[m] for v in verdicts if m in v.passes]
        if verdict:
            lines.append(f"  {m}: {sum(verdict)}/{len(verdict)} tasks pass")
    if any(v.tuned for v in verdicts):
        lines += ["", f"tuned on half of the seeds, judged on the other half (median over {SPLITS} random halves):",
                  "  the fixed threshold best on one half, over the best on the other; each method over it"]  # fmt: skip
        for v in verdicts:
            if v.tuned:
                rest = ", ".join(f"{m} {x:.2f}x" for m, x in v.tuned.items() if m != "tuned")
                lines.append(f"  {v.task}: tuned {v.tuned['tuned']:.2f}x; {rest}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=6)
    parser.add_argument("--first-seed", type=int, default=0, help="run seeds FIRST to FIRST+SEEDS-1")
    parser.add_argument("--methods", nargs="+", choices=METHODS, default=list(METHODS),
                        help="what to judge against the sweep (which always runs)")
    parser.add_argument("--tasks", nargs="+", choices=list(ALL_TASKS), default=list(TASKS))
    parser.add_argument("--json", type=Path, metavar="PATH", help="results (appended as it runs)")
    parser.add_argument("--resume", action="store_true", help="skip the jobs --json holds")
    parser.add_argument("--render", type=Path, nargs="+", metavar="PATH",
                        help="print a saved result (several: their runs together, e.g. two halves of the seeds)")
    parser.add_argument("--reuse", type=Path, metavar="PATH",
                        help="take the sweep's runs from a bench_quality.py --json result, or this script's")
    args = parser.parse_args(argv)
    if args.render is not None:
        saved = [json.loads(path.read_text()) for path in args.render]
        runs = [Run(**r) for one in saved for r in one["runs"] if r["task"] in args.tasks]
        picks = [Pick(**p) for one in saved for p in one["picks"] if p["task"] in args.tasks]
        seeds = sorted({r.seed for r in runs})
        if not seeds:
            parser.error(f"--render: no run of the tasks {' '.join(args.tasks)} in the files given")
        head = (f"{', '.join(path.name for path in args.render)}: {len(seeds)} seeds "
                f"({seeds[0]}-{seeds[-1]}), torch {', '.join(sorted({one['meta']['torch'] for one in saved}))}, "
                f"wall time {sum(one['meta'].get('wall_time_s', 0) for one in saved):.0f} s")  # fmt: skip
        print(render(summarize(runs, picks), head))
        return 0
    torch.set_num_threads(1)  # the tasks' calibration
    if args.reuse is not None:
        if args.json is None:
            parser.error("--reuse needs --json (the reused runs are saved there)")
        saved = json.loads(args.json.read_text()) if args.json.exists() else {"runs": [], "picks": []}
        have = {(r["task"], r["strategy"], r["seed"]) for r in saved["runs"]}
        extra = [r for r in reuse(args.reuse, args.tasks, args.seeds, args.first_seed)
                 if (r.task, r.strategy, r.seed) not in have]  # fmt: skip
        meta = {**saved.get("meta", {}), "reused": f"{args.reuse.name}: {len(extra)} sweep runs"}
        _save(args.json, meta, [*(Run(**r) for r in saved["runs"]), *extra],
              [Pick(**p) for p in saved["picks"]])
        args.resume = True
    runs, picks = evaluate(args.tasks, args.seeds, args.json, args.resume,
                           progress=lambda line: print(line, file=sys.stderr, flush=True),
                           first=args.first_seed, methods=args.methods)  # fmt: skip
    print(render(summarize(runs, picks), f"gradclip {gradclip.__version__}, torch {torch.__version__}"))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
