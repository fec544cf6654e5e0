"""The default on seeds no decision saw: against the saved sweep's best threshold, re-run.

The acceptance run (:mod:`acceptance`) judges the default on seeds 0-5, and the loss gate's
constants were chosen looking at those runs. This script trains, on other seeds of every
task, the default given the loss (``AdaptiveClip(optimizer=...)``, as the runner passes the
loss), the same without it (``follow_loss=False``: the rule before the gate) and
``NormClip`` at the best fixed threshold of the saved sweep (the strategy with the lowest
median over its seeds), and prints the medians and their ratios to that threshold. The
threshold is the saved sweep's choice, not a new sweep's: on the new seeds another might
do better.

Example:
    python benchmarks/holdout.py --seeds 6 12 > benchmarks/results/holdout-DATE.txt
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch

import gradclip
import variants
from acceptance import TASKS, _optimizer, map_jobs
from bench_quality import ratio
from gradclip.demo.runner import run

__all__ = ["STRATEGIES", "best_fixed", "main", "render", "train"]

SAVED = Path(__file__).resolve().parent / "results" / "acceptance-2026-12-05-4.json"
"""The sweep whose best thresholds are re-run."""
STRATEGIES = ("default", "without loss", "best fixed")


def best_fixed(saved: dict[str, Any]) -> dict[str, float]:
    """Per task, the fixed threshold of the saved sweep with the lowest median metric
    (:func:`variants.best_fixed`: a diverged run counts as ``inf``); tasks without a complete
    sweep are left out."""
    out = {}
    for task in dict.fromkeys(r["task"] for r in saved["runs"]):
        runs = [r for r in saved["runs"] if r["task"] == task]
        found = variants.best_fixed(runs, len({r["seed"] for r in runs}))
        if found is not None:
            out[task] = float(found[0].split()[1])
    return out


def train(job: tuple[str, str, int, float, int | None]) -> tuple[str, str, int, float]:
    """One run: (strategy, task, seed, metric; ``inf`` when it diverged)."""
    strategy, task, seed, threshold, steps = job
    if strategy == "best fixed":
        clipper: gradclip.Clipper = gradclip.NormClip(threshold)
    else:
        clipper = gradclip.AdaptiveClip(optimizer=_optimizer(task),
                                        follow_loss=strategy == "default")  # fmt: skip
    result = run(task, clipper, seed=seed, steps=steps)
    return strategy, task, seed, math.inf if result.diverged else result.metric


def render(results: list[tuple[str, str, int, float]], thresholds: dict[str, float],
           seeds: range) -> str:
    """Per task, each strategy's median metric and its ratio to the best fixed threshold's."""
    lines = [f"seeds {seeds.start}-{seeds.stop - 1}, median metric (ratio to the saved sweep's best "
             "fixed threshold, re-run on these seeds)"]  # fmt: skip
    passed = dict.fromkeys(STRATEGIES[:2], 0)
    tasks = list(dict.fromkeys(t for _, t, _, _ in results))
    for task in tasks:
        median = {s: statistics.median(m for st, t, _, m in results if (st, t) == (s, task))
                  for s in STRATEGIES}  # fmt: skip
        cells = []
        for s in STRATEGIES:
            r = ratio(median[s], median["best fixed"])
            cells.append(f"{s} {median[s]:.4g} ({r:.2f}x)")
            if s in passed and r <= 1.1:
                passed[s] += 1
        seeds_of = " ".join(f"{m:.3g}" for st, t, _, m in results if (st, t) == ("default", task))
        lines.append(f"  {task:22} best fixed {thresholds[task]:g}: " + "  ".join(cells)
                     + f"   default's seeds: {seeds_of}")  # fmt: skip
    lines.append("within 1.1x: " + ", ".join(f"{s} {n}/{len(tasks)}" for s, n in passed.items()))
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs=2, default=(6, 12), metavar=("FIRST", "STOP"))
    parser.add_argument("--tasks", nargs="+", choices=list(TASKS), default=list(TASKS))
    parser.add_argument("--steps", type=int, default=None, help="steps per run (default: the task's)")
    parser.add_argument("--jobs", type=int, default=2)
    parser.add_argument("--against", type=Path, default=SAVED, help="a saved acceptance JSON")
    args = parser.parse_args(argv)
    seeds = range(*args.seeds)
    if not seeds:
        parser.error(f"--seeds {args.seeds[0]} {args.seeds[1]}: no seed; pass FIRST < STOP")
    thresholds = best_fixed(json.loads(args.against.read_text()))
    missing = [t for t in args.tasks if t not in thresholds]
    if missing:
        parser.error(f"{args.against} holds no sweep for {missing}")
    work = [(s, t, seed, thresholds[t], args.steps)
            for t in args.tasks for seed in seeds for s in STRATEGIES]  # fmt: skip
    start = time.perf_counter()
    results = map_jobs(train, work, args.jobs)
    print(f"gradclip {gradclip.__version__}, torch {torch.__version__}, against {args.against.name}, "
          f"wall {time.perf_counter() - start:.0f} s")  # fmt: skip
    print(render(results, thresholds, seeds))
    return 0


if __name__ == "__main__":
    sys.exit(main())
