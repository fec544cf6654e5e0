"""Can one rule on the gradient norms be within 1.1x of the best fixed threshold on every task?

Issue 18 asks the no-tuning default to be within 1.1x of the best fixed threshold of the sweep
on every task of the acceptance benchmark (:mod:`acceptance`). A rule that sees only the
norms (AdaptiveClip, AutoClip, ZClip, a percentile) clips at some multiple ``k`` of a
statistic of them. This script measures, per task, which multiples would do: it reruns the
sweep's best fixed threshold ``c*`` on every seed (one torch thread each, the tasks'
calibration), takes the median pre-clip norm ``m`` of those runs (the norms a rule clipping
at ``c*`` would see), and prints ``c*/m`` and the band of thresholds within 1.1x of the best
(the sweep's resolution: half a decade), as multiples of ``m``. Where the bands of two tasks
trained by one kind of optimizer (SGD-like, or one that normalises its update: the split
``AdaptiveClip(optimizer=...)`` makes) do not overlap, no multiple of the median norm passes
both. (``m`` is measured under ``c*`` only: the norms under the other thresholds differ, so
the band's ends are approximate; its centre is not.) For SGD-like optimizers it also prints
``lr·c*/‖θ₀‖``, the best threshold as the size of a clipped step against the initial weights:
what a rule on the update size, rather than the norms, would have to hold constant.

Example:
    python benchmarks/spread.py --against benchmarks/results/acceptance-2026-12-05-2.json
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

import gradclip
from acceptance import FIXED, LIMITS, _optimizer, map_jobs
from gradclip.clippers.adaptive import normalises
from gradclip.demo.runner import run

__all__ = ["Band", "bands", "good", "main", "render"]

SAVED = Path(__file__).resolve().parent / "results" / "acceptance-2026-12-05-2.json"


@dataclass(frozen=True)
class Band:
    """One task: its optimizer, best fixed threshold, the median norm under it, the good band."""

    task: str
    optimizer: str
    lr: float
    best: float
    median_norm: float
    good: tuple[float, ...]
    kind: str
    weights: float

    @property
    def step_ratio(self) -> float | None:
        """``lr·c*/‖θ₀‖``: a clipped SGD step against the initial weights (momentum aside);
        None for an optimizer that normalises its update, or weights initialised at zero."""
        if self.kind != "SGD-like" or self.weights == 0:
            return None
        return self.lr * self.best / self.weights

    @property
    def multiple(self) -> float:
        """``c*/m``: the best threshold as a multiple of the median norm under it."""
        return self.best / self.median_norm


def _median_norm(job: tuple[str, float, int]) -> tuple[str, int, float]:
    task, threshold, seed = job
    result = run(task, gradclip.NormClip(threshold), seed=seed)
    finite = [n for n in result.pre_norms if math.isfinite(n)]
    return task, seed, statistics.median(finite)


def _sweep(saved: dict[str, Any], task: str, seeds: int) -> dict[float, float]:
    """The median metric over seeds of each fixed threshold of the sweep, for ``task``."""
    out = {}
    for c in FIXED:
        values = [r["metric"] for r in saved["runs"]
                  if r["task"] == task and r["strategy"] == f"fixed {c:g}" and r["seed"] < seeds]  # fmt: skip
        if len(values) == seeds:
            out[c] = statistics.median(values)
    return out


def good(sweep: dict[float, float]) -> tuple[float, tuple[float, ...]]:
    """The best threshold of a sweep (threshold: median metric) and those within 1.1x of it."""
    best = min(sweep, key=sweep.__getitem__)
    return best, tuple(c for c, m in sweep.items() if m <= LIMITS["default"] * sweep[best])


def bands(saved: dict[str, Any], tasks: list[str], seeds: int, jobs: int) -> list[Band]:
    """Per task: the best threshold, the median norm of its runs, the thresholds within 1.1x."""
    judged = {t: good(_sweep(saved, t, seeds)) for t in tasks}  # task: (best, good ones)
    work = [(t, judged[t][0], seed) for t in tasks for seed in range(seeds)]
    results = map_jobs(_median_norm, work, jobs)
    out = []
    for t in tasks:
        optimizer = _optimizer(t)
        median = statistics.median(m for task, _, m in results if task == t)
        kind = "normalising (Adam family)" if normalises(optimizer) else "SGD-like"
        weights = math.sqrt(math.fsum(float(p.detach().double().pow(2).sum())
                                      for g in optimizer.param_groups for p in g["params"]))  # fmt: skip
        out.append(Band(t, type(optimizer).__name__, optimizer.param_groups[0]["lr"], judged[t][0],
                        median, judged[t][1], kind, weights))  # fmt: skip
    return out


def render(rows: list[Band]) -> str:
    """One line per task, then, per optimizer, whether one multiple fits every band."""
    lines = ["task                    optimizer  lr        best c*  median norm m  c*/m    "
             "lr·c*/|θ0|  within 1.1x, as multiples of m"]  # fmt: skip
    for b in rows:
        band = f"{min(b.good) / b.median_norm:.3g} to {max(b.good) / b.median_norm:.3g}"
        ratio = "-" if b.step_ratio is None else f"{b.step_ratio:.3g}"
        lines.append(f"{b.task:22}  {b.optimizer:9}  {b.lr:<8.3g}  {b.best:<7g}  {b.median_norm:<13.3g}"
                     f"  {b.multiple:<6.3g}  {ratio:<10}  {band}  ({len(b.good)} of {len(FIXED)} "
                     "thresholds)")  # fmt: skip
    for kind in dict.fromkeys(b.kind for b in rows):
        same = [b for b in rows if b.kind == kind]
        low = max(min(b.good) / b.median_norm for b in same)
        high = min(max(b.good) / b.median_norm for b in same)
        verdict = (f"one multiple fits all {len(same)}: {low:.3g} to {high:.3g}" if low <= high
                   else f"no multiple fits all {len(same)} (the bands' highest floor {low:.3g} "
                        f"lies above their lowest ceiling {high:.3g})")  # fmt: skip
        lines.append(f"{kind}: {verdict}")
    ratios = [b.step_ratio for b in rows if b.step_ratio is not None]
    if ratios:
        lines.append(f"lr·c*/|θ0| (SGD-like, weights not initialised at zero): {min(ratios):.3g} "
                     f"to {max(ratios):.3g}, a factor {max(ratios) / min(ratios):.3g}")  # fmt: skip
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--against", type=Path, default=SAVED, help="a saved acceptance JSON")
    parser.add_argument("--seeds", type=int, default=6)
    parser.add_argument("--jobs", type=int, default=2)
    parser.add_argument("--tasks", nargs="+", help="default: the tasks of the saved result")
    args = parser.parse_args(argv)
    saved = json.loads(args.against.read_text())
    tasks = args.tasks or list(dict.fromkeys(r["task"] for r in saved["runs"]))
    print(f"{args.against.name}, seeds 0-{args.seeds - 1}, torch {torch.__version__}")
    print(render(bands(saved, tasks, args.seeds, args.jobs)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
