"""A variant of the default against a saved acceptance sweep: minutes, not the 40 of a full run.

Issue 18's default (``AdaptiveClip(optimizer=...)``) is judged against the best fixed
threshold of the sweep that :mod:`acceptance` saves. A variant (keyword arguments of
:class:`gradclip.AdaptiveClip`, as JSON) needs only its own runs: the sweep's runs do not
depend on it. This script trains the variant on each task and seed (``jobs`` processes of
one torch thread each, the tasks' calibration) and prints, per task, its median metric over
the seeds and its ratio to the best fixed threshold of the saved sweep, beside the saved
default's, and every seed's metric (the RNN tasks are a seed lottery: read the seeds).

``{"plain": true}`` drops ``optimizer=`` (the median rule whatever the optimizer).

Example:
    python benchmarks/variants.py '{"warmup_growth": 0.05}' --tasks cnn-digits/sgd lstm-text --seeds 12
    python benchmarks/variants.py '{"plain": true}' --tasks cnn-digits/adamw adam-spikes
    python benchmarks/variants.py '{"spike": null}' --tasks cnn-digits/adamw --seeds 144 --against \
        results/acceptance-2026-12-05-24seeds.json results/acceptance-2026-12-06-adamw-seeds-*.json
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

import gradclip
from acceptance import FIXED, TASKS, _optimizer, interval, map_jobs
from bench_quality import ratio
from gradclip.demo.runner import run

__all__ = ["Row", "best_fixed", "compare", "main", "render", "train"]

SAVED = Path(__file__).resolve().parent / "results" / "acceptance-2026-12-05-12seeds-6.json"
"""The sweep compared against by default (seeds 0-11: ``--seeds 12`` resolves what six cannot,
at twice the time; the default ``--seeds 6`` compares against seeds 0-5 of it)."""


def train(job: tuple[dict[str, Any], str, int]) -> tuple[str, int, float]:
    """One run of the variant: (task, seed, metric; ``inf`` when it diverged)."""
    options, task, seed = job
    options = dict(options)
    plain = options.pop("plain", False)
    clipper = gradclip.AdaptiveClip(**options) if plain else gradclip.AdaptiveClip(
        optimizer=_optimizer(task), **options)  # fmt: skip
    result = run(task, clipper, seed=seed)
    return task, seed, math.inf if result.diverged else result.metric


@dataclass(frozen=True)
class Row:
    """One task: the variant's and the saved default's median metric, as ratios to the best."""

    task: str
    best: str
    variant: float
    variant_ratio: float
    default: float
    default_ratio: float
    seeds: tuple[float, ...]
    interval: tuple[float, float]
    """A 90% interval of the variant's ratio, the seeds resampled (:func:`acceptance.interval`)."""


def _median(runs: list[dict[str, Any]], strategy: str, seeds: int) -> float:
    """The median metric of ``strategy``'s runs (NaN unless there is one per seed)."""
    values = [math.inf if r["diverged"] else r["metric"] for r in runs if r["strategy"] == strategy]
    return statistics.median(values) if len(values) == seeds else math.nan


def best_fixed(runs: list[dict[str, Any]], seeds: int) -> tuple[str, float] | None:
    """Of one task's ``runs``, the sweep's fixed threshold with the lowest median over its
    ``seeds`` runs, and that median; None without a complete sweep."""
    fixed = {s: _median(runs, s, seeds) for s in sorted(f"fixed {c:g}" for c in FIXED)}
    fixed = {s: v for s, v in fixed.items() if not math.isnan(v)}
    if not fixed:
        return None
    best = min(fixed, key=fixed.__getitem__)
    return best, fixed[best]


def compare(results: list[tuple[str, int, float]], saved: dict[str, Any]) -> list[Row]:
    """Rows for the variant's ``results`` against a saved acceptance result (its ``runs``)."""
    rows = []
    for task in dict.fromkeys(t for t, _, _ in results):
        mine = sorted((seed, m) for t, seed, m in results if t == task)
        seeds = {seed for seed, _ in mine}
        runs = [r for r in saved["runs"] if r["task"] == task and r["seed"] in seeds]
        found = best_fixed(runs, len(seeds))
        if found is None:
            raise ValueError(f"the saved result has no sweep for {task} on seeds {sorted(seeds)}")
        best, reference = found
        variant = statistics.median(m for _, m in mine)
        default = _median(runs, "default", len(seeds))
        theirs = {r["seed"]: math.inf if r["diverged"] else r["metric"] for r in runs if r["strategy"] == best}
        rows.append(Row(task, best, variant, ratio(variant, reference), default,
                        ratio(default, reference), tuple(m for _, m in mine),
                        interval([(m, theirs[seed]) for seed, m in mine])))  # fmt: skip
    return rows


def render(rows: list[Row], options: dict[str, Any]) -> str:
    """The table: per task, the variant and the saved default against the best fixed threshold."""
    lines = [f"variant {json.dumps(options)}: median over seeds (ratio to the best fixed)"]
    for r in rows:
        seeds = " ".join(f"{m:.3g}" for m in r.seeds)
        low, high = r.interval
        lines.append(f"  {r.task:22}  variant {r.variant:.4g} ({r.variant_ratio:.2f}x "
                     f"[{low:.2f}-{high:.2f}])  "
                     f"default {r.default:.4g} ({r.default_ratio:.2f}x)  best {r.best}  "
                     f"seeds: {seeds}")  # fmt: skip
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("options", help='AdaptiveClip keyword arguments as JSON, e.g. \'{"window": 64}\'')
    parser.add_argument("--tasks", nargs="+", choices=list(TASKS),
                        help="default: the tasks of the saved result")
    parser.add_argument("--seeds", type=int, default=6)
    parser.add_argument("--jobs", type=int, default=2)
    parser.add_argument("--against", type=Path, nargs="+", default=[SAVED],
                        help="saved acceptance JSON (several: their runs together, e.g. added seeds)")
    args = parser.parse_args(argv)
    try:
        options = json.loads(args.options)
        if not isinstance(options, dict):
            raise ValueError("not an object")
        gradclip.AdaptiveClip(**{k: v for k, v in options.items() if k != "plain"})
    except (ValueError, TypeError) as exc:
        parser.error(f"options: {exc}; pass a JSON object of AdaptiveClip keyword arguments")
    saved = {"runs": [r for path in args.against for r in json.loads(path.read_text())["runs"]]}
    tasks = args.tasks or list(dict.fromkeys(r["task"] for r in saved["runs"]))
    work = [(options, task, seed) for task in tasks for seed in range(args.seeds)]
    results = map_jobs(train, work, args.jobs)
    print(render(compare(results, saved), options))
    return 0


if __name__ == "__main__":
    sys.exit(main())
