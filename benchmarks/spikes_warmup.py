"""Adam spikes with a learning-rate warm-up: does a warm-up in the schedule make the clip's own ramp redundant?

The default's warm-up ramp clips the first ~80 steps under Adam, which Adam spikes wants (the
default 1.04x the best fixed threshold, without the ramp 1.19x) and a memorising AdamW
classifier does not (``adamw_mlp.py --memorise``: without the ramp 0.98x, with it 2.0x). The
classifier's schedule warms its learning rate up, Adam spikes' does not: if the ramp only
helped without a warm-up in the schedule, the clipper could skip it where one runs. This
script trains ``adam-spikes`` as the demo does, with a linear warm-up of the learning rate
over the first tenth of the run added (``LambdaLR``), under no clipping, fixed thresholds
0.01-3, the default (``AdaptiveClip(optimizer=adam)``, given the loss) and variants (JSON
keyword arguments of :class:`gradclip.AdaptiveClip`), and prints each one's median metric over
the seeds and its ratio to the best fixed threshold's. ~5 s a run, two processes.

Example:
    python benchmarks/spikes_warmup.py --seeds 6 '{"warmup_start": Infinity}'
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
from typing import Any

import torch

import gradclip
from acceptance import map_jobs
from gradclip.demo.problems import build_problem
from gradclip.demo.tasks import TASKS

__all__ = ["FIXED", "main", "train"]

TASK = TASKS["adam-spikes"]
FIXED = (0.01, 0.03, 0.1, 0.3, 1.0, 3.0)
WARMUP = 0.1
"""The warm-up's share of the run."""


def _clipper(strategy: str, optimizer: torch.optim.Optimizer) -> gradclip.Clipper | None:
    if strategy == "no clipping":
        return None
    if strategy.startswith("fixed "):
        return gradclip.NormClip(float(strategy.removeprefix("fixed ")))
    options: dict[str, Any] = json.loads(strategy) if strategy != "default" else {}
    return gradclip.AdaptiveClip(optimizer=optimizer, **options)


def train(job: tuple[str, int]) -> tuple[str, int, float]:
    """One run: (strategy, seed, the task's metric; ``inf`` when it diverged)."""
    strategy, seed = job
    problem = build_problem(TASK.config, seed, TASK.steps, torch.device("cpu"))
    optimizer = problem.optimizer
    ramp = round(WARMUP * TASK.steps)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: min(1.0, (step + 1) / ramp))
    clipper = _clipper(strategy, optimizer)
    for step in range(TASK.steps):
        optimizer.zero_grad(set_to_none=True)
        loss = problem.loss(step)
        loss.backward()
        if clipper is None:
            optimizer.step()
        else:
            clipper.step(problem.model, optimizer, loss=loss.detach())
        problem.after_step(step)
        schedule.step()
    metric = problem.metric()
    return strategy, seed, metric if math.isfinite(metric) else math.inf


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("variants", nargs="*", help="AdaptiveClip keyword arguments as JSON")
    parser.add_argument("--seeds", type=int, default=6)
    parser.add_argument("--jobs", type=int, default=2)
    args = parser.parse_args(argv)
    strategies = ["no clipping", *(f"fixed {c:g}" for c in FIXED), "default", *args.variants]
    results = map_jobs(train, [(s, seed) for s in strategies for seed in range(args.seeds)], args.jobs)
    medians = {s: statistics.median(m for name, _, m in results if name == s) for s in strategies}
    best = min(v for s, v in medians.items() if s.startswith("fixed "))
    print(f"adam-spikes with a {WARMUP:.0%} linear learning-rate warm-up, {args.seeds} seeds: "
          "median test MSE, ratio to the best fixed threshold")  # fmt: skip
    for name, value in medians.items():
        print(f"  {name:50s} {value:.4g}  {value / best:.3f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
