"""``recommend_max_norm`` on logs recorded at every threshold of the grid, not only at 1.

Issue 18's acceptance asks the recommendation of a log of a ``max_norm=1.0`` run. A user's log
may come from any threshold, and a run that clips to its end shows how training goes at its
threshold, not on which side of the best threshold that lies. This script records, for each
task and seed, a run at every threshold of the acceptance's grid (``NormClip``, as the sweep),
asks for a recommendation from its norms (as the acceptance: ``History.from_norms``), and
scores it by the saved sweep's run at the grid threshold nearest to it (same seed; no new run:
a map of directions, not the acceptance's figure, and a start of training is not treated
apart). Two rules, side by side:

* ``norms``: :func:`gradclip.recommend_max_norm`, given the task's optimizer (the 99th
  percentile of the typical norms, at most ``RAISE`` = 3x the largest norm applied; under
  Adam with steady norms just below their 1st percentile);
* ``plateau``: the learning-rate rule (as ``torch.optim.lr_scheduler.ReduceLROnPlateau``): where
  the optimizer does not normalise its update, the threshold still clipped at least half of the
  last quarter (``BINDING``) and the loss did not fall there beyond two standard errors (a
  least-squares trend of eight block means of the log-loss), one step lower (1/3); otherwise
  as ``norms``.

The table: per task, one row per rule, one column per recorded threshold; each cell is the
median over the seeds of the recommended threshold's metric, over the best fixed threshold's
median on the same seeds (a run that diverged counts with its metric, as in the acceptance).

Example:
    python benchmarks/recommend_grid.py --seeds 4 --json recommend-grid-DATE.json > recommend-grid-DATE.txt
    python benchmarks/recommend_grid.py --seeds 4 --render recommend-grid-DATE.json
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
from pathlib import Path
from typing import Any

import torch

import gradclip
from acceptance import FIXED, TASKS, _optimizer, clipper, map_jobs
from bench_quality import ratio
from gradclip.demo.runner import run
from gradclip.recommend import BINDING
from variants import SAVED, best_fixed

__all__ = ["RULES", "falling", "main", "nearest", "recommend", "record"]

RULES = ("norms", "plateau")
BLOCKS = 8
"""The last quarter's losses are cut into this many blocks for the trend's standard error."""


def falling(losses: list[float], z: float = 2.0) -> bool:
    """Whether the loss fell over the last quarter of ``losses`` beyond ``z`` standard errors:
    the least-squares slope of ``BLOCKS`` block means (of the log-loss when every loss is
    positive), against the residuals' standard error."""
    finite = [v for v in losses if math.isfinite(v)]
    tail = finite[-max(BLOCKS, len(finite) // 4):]
    if len(tail) < BLOCKS:
        return False
    values = [math.log(v) for v in tail] if all(v > 0 for v in tail) else tail
    n = len(values)
    means = [statistics.fmean(values[i * n // BLOCKS:(i + 1) * n // BLOCKS]) for i in range(BLOCKS)]
    slope, intercept = statistics.linear_regression(range(BLOCKS), means)
    residual = sum((y - intercept - slope * x) ** 2 for x, y in enumerate(means))
    sxx = sum((x - (BLOCKS - 1) / 2) ** 2 for x in range(BLOCKS))
    return slope < -z * math.sqrt(residual / (BLOCKS - 2) / sxx)


def recommend(rule: str, norms: list[float], losses: list[float], threshold: float,
              optimizer: torch.optim.Optimizer | None = None) -> float | None:
    """The threshold ``rule`` recommends from a log clipped at ``threshold`` (in a run that
    stepped ``optimizer``; None: not given)."""
    history = gradclip.History.from_norms(norms, threshold=threshold)
    rec = gradclip.recommend_max_norm(history, optimizer=optimizer)
    if rule == "plateau" and not rec.normalising and rec.late_clip_rate is not None \
            and rec.late_clip_rate >= BINDING and not falling(losses):  # fmt: skip
        return threshold / 3
    return rec.max_norm


def nearest(threshold: float | None) -> str:
    """The sweep's strategy nearest to ``threshold`` on a log scale (``none`` beyond the grid's
    top by more than half a step)."""
    if threshold is None or not math.isfinite(threshold) or threshold > FIXED[-1] * 3**0.5:
        return "none"
    best = min(FIXED, key=lambda c: abs(math.log(c / threshold)))
    return f"fixed {best:g}"


def record(job: tuple[str, float, int]) -> dict[str, Any]:
    """One recorded run and what each rule recommends from it."""
    task, threshold, seed = job
    result = run(task, clipper(task, f"fixed {threshold:g}"), seed=seed)
    norms, losses = list(result.pre_norms), list(result.losses)
    optimizer = _optimizer(task)
    picks = {rule: nearest(recommend(rule, norms, losses, threshold, optimizer)) for rule in RULES}
    return {"task": task, "threshold": threshold, "seed": seed, "picks": picks}


def table(records: list[dict[str, Any]], saved: dict[str, Any], seeds: int) -> str:
    metric = {(r["task"], r["strategy"], r["seed"]): r["metric"] for r in saved["runs"]}
    head = "recorded at " + " ".join(f"{c:>7g}" for c in FIXED)
    lines = [f"median over seeds 0-{seeds - 1} of the recommendation's metric / the best fixed "
             "threshold's (the recommendation scored at its nearest grid threshold)", ""]  # fmt: skip
    for task in dict.fromkeys(r["task"] for r in records):
        runs = [r for r in saved["runs"] if r["task"] == task and r["seed"] < seeds]
        found = best_fixed(runs, seeds)
        if found is None:
            raise ValueError(f"the saved result has no sweep for {task} on seeds 0-{seeds - 1}")
        best, reference = found
        lines.append(f"{task} (best {best})")
        lines.append(f"  {head}")
        for rule in RULES:
            cells = []
            for c in FIXED:
                picked = [metric[(task, r["picks"][rule], r["seed"])] for r in records
                          if r["task"] == task and r["threshold"] == c]  # fmt: skip
                cells.append(f"{ratio(statistics.median(picked), reference):7.3g}")
            lines.append(f"  {rule:>11} " + " ".join(cells))
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tasks", nargs="+", choices=list(TASKS), default=list(TASKS))
    parser.add_argument("--seeds", type=int, default=4)
    parser.add_argument("--jobs", type=int, default=2)
    parser.add_argument("--against", type=Path, default=SAVED, help="a saved acceptance JSON")
    parser.add_argument("--json", type=Path, help="also write every record here")
    parser.add_argument("--render", type=Path, help="print the table of records saved by --json")
    args = parser.parse_args(argv)
    saved = json.loads(args.against.read_text())
    if args.render:
        records = json.loads(args.render.read_text())
    else:
        work = [(task, c, seed) for task in args.tasks for c in FIXED for seed in range(args.seeds)]
        records = map_jobs(record, work, args.jobs)
    if args.json:
        args.json.write_text(json.dumps(records, indent=1))
    print(table(records, saved, args.seeds))
    return 0


if __name__ == "__main__":
    sys.exit(main())
