"""The max_norm finder on an embedded task: the data behind ``gradclip tune``.

:func:`search_task` builds a task's problem (:mod:`gradclip.demo.problems`) from a seed and
runs :func:`gradclip.find_max_norm` on it from the first step, with the task's own training
step and its data generator named so that every candidate sees the same batches. The
search's horizon follows from ``budget``, a fraction of the task's full run.

Example:
    >>> from gradclip.demo.search import search_task
    >>> search = search_task("sgd-heavy-tail", horizon=10, candidates=[0.1, 1.0])
    >>> search.choice.name in {"0.1", "1", "none", "adaptive"}, search.cost.run_steps
    (True, 4000)
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import torch

from gradclip.demo.problems import as_passed, build_problem
from gradclip.demo.tasks import Task, resolve
from gradclip.tune import CONFIRM, MaxNormSearch, TrialClip, find_max_norm

__all__ = ["search_task"]


def search_task(
    task: str | Task,
    *,
    seed: int = 0,
    budget: float = 0.2,
    horizon: int | None = None,
    candidates: Iterable[float] | None = None,
    device: str | torch.device = "cpu",
    progress: Callable[[str], None] | None = None,
    **options: Any,
) -> MaxNormSearch:
    """Run the finder on ``task`` at its first step (the state a full run starts from).

    Args:
        task: a key of :data:`gradclip.demo.tasks.TASKS` or a :class:`Task`.
        seed: the run seed (initialisation and batches), as in :func:`gradclip.demo.runner.run`.
        budget: the search's cost as a fraction of the task's full run (default 0.2).
        horizon: steps per candidate (default: from ``budget``).
        candidates: thresholds to try (default: a grid around the norms seen).
        device: where the model lives.
        progress: called with one line per trial.
        options: passed on to :func:`gradclip.find_max_norm`.

    ``muon-adamw`` steps Muon and AdamW as one (:class:`~gradclip.demo.problems.MuonAdamW`):
    the finder gets the two optimizers, as a user passes ``[muon, adamw]``.
    """
    spec = resolve(task)
    problem = build_problem(spec.config, seed, spec.steps, torch.device(device))
    model, optimizer = problem.model, problem.optimizer

    def train_step(index: int, clip: TrialClip) -> torch.Tensor:
        optimizer.zero_grad(set_to_none=True)
        loss = problem.loss(index)
        loss.backward()
        # clip, then step, as the runner trains (Muon's groups left out, the loss followed)
        clip.step(model, optimizer, loss=loss.detach())
        problem.after_step(index)  # the learning-rate schedule, where the task has one
        return loss

    return find_max_norm(
        model, as_passed(optimizer), train_step, range(int(spec.steps * (1 + CONFIRM))),
        horizon=horizon, run_steps=spec.steps, budget=budget, candidates=candidates,
        scheduler=getattr(problem, "scheduler", None), generators=[problem.gen],
        progress=progress, **options,
    )  # fmt: skip
