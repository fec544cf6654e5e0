"""One runner for every task: train once with a clip function, record every step.

:func:`run` builds the task's problem from a seed, trains it with the clip function called
between ``backward()`` and ``optimizer.step()``, and returns a :class:`RunResult`: per step,
the training loss, the gradient norm before and after clipping, the threshold, the size of
the update and whether the step was clipped; and the task's final metric.

Example:
    >>> import gradclip
    >>> from gradclip.demo.runner import run
    >>> result = run("sgd-heavy-tail", lambda m: gradclip.clip_grad_norm_(m.parameters(), 0.5),
    ...              steps=50)
    >>> len(result.losses), result.diverged
    (50, False)
"""

from __future__ import annotations

import inspect
import math
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from gradclip.clippers import GradientSpikeError
from gradclip.demo.problems import build_problem
from gradclip.demo.tasks import Task, resolve
from gradclip.functional import grad_norms
from gradclip.stats import ClipStats

__all__ = ["ClipFn", "RunResult", "run"]

ClipFn = Callable[[nn.Module], object]
"""Called with the model after ``backward()`` and before ``optimizer.step()``.

It may take a keyword ``loss``: it then gets the step's training loss (a detached 0-dim
tensor), which a :class:`gradclip.Clipper` with a spike detector judges. It may clip the
gradients in place, and may return ``None``, a 0-dim tensor (the pre-clip
total norm, as ``clip_grad_norm_`` returns) or an object with a ``norm`` attribute (the
pre-clip total norm) and optionally ``post_norm``, ``threshold``, ``clipped``, ``finite``
and ``skipped`` (a :class:`gradclip.ClipStats` has all of them). When ``skipped`` is true
the runner does not call ``optimizer.step()``, as :meth:`gradclip.Clipper.step` does.
A clip function with a ``step(model, optimizer)`` method (a :class:`gradclip.Clipper`) is
called through it instead, and steps the optimizer itself: it then sees the optimizer's
groups (Muon's are left out, see :meth:`gradclip.Clipper.step`).
"""


@dataclass
class RunResult:
    """What one run of a task did, step by step.

    Per-step lists hold one entry per step actually run (a run stops early once the
    parameters are non-finite). NaN marks a value the clip function did not report.

    Attributes:
        task: the task key.
        seed: the run seed.
        steps: steps actually run.
        planned_steps: steps the run was asked for.
        losses: training loss per step (corrupted batches included).
        metric: the task's final metric (lower is better); ``inf`` when the parameters
            became non-finite.
        diverged: the metric is non-finite or above the task's ``failure_level``.
        nonfinite_steps: steps whose loss, pre-clip gradient norm or update was NaN/inf
            (or that the clip function reported as not ``finite``).
        skipped_steps: steps where the clip function asked to skip the optimizer step.
        pre_norms: total gradient 2-norm before clipping; where the clip left parameter
            groups out (Muon's), the norm of the groups it clipped, which its threshold met
            (:meth:`gradclip.ClipStats.clipped_norms`).
        post_norms: the same norm after clipping (``pre_norms`` without a clip function).
        thresholds: the clipping threshold (NaN without a clip function or when unreported).
        update_norms: ``||theta_after - theta_before||`` of the optimizer step (0 if skipped).
        clipped: whether the step was clipped (reported ``clipped``, else
            ``post_norm < pre_norm``; False when unknown).
        wall_time_s: wall time of the whole run, metric included.
    """

    task: str
    seed: int
    steps: int
    planned_steps: int
    losses: list[float]
    metric: float
    diverged: bool
    nonfinite_steps: int
    skipped_steps: int
    pre_norms: list[float]
    post_norms: list[float]
    thresholds: list[float]
    update_norms: list[float]
    clipped: list[bool]
    wall_time_s: float


_NAN = float("nan")


def _as_float(value: object) -> float:
    if value is None:
        return _NAN
    if isinstance(value, Tensor):
        if value.numel() != 1:
            return _NAN
        return float(value.detach().reshape(()).item())
    try:
        return float(value)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return _NAN


def _as_bool(value: object) -> bool | None:
    if value is None:
        return None
    if isinstance(value, Tensor):
        return bool(value.detach().reshape(-1).any().item()) if value.numel() else None
    return bool(value)


def _takes_loss(clip: ClipFn | None) -> bool:
    """Whether ``clip`` takes a ``loss`` keyword (a clipper does)."""
    if clip is None:
        return False
    try:
        parameters = inspect.signature(clip).parameters
    except (TypeError, ValueError):  # a builtin without a signature
        return False
    return "loss" in parameters or any(p.kind is p.VAR_KEYWORD for p in parameters.values())


def _flat(params: list[nn.Parameter]) -> Tensor:
    return torch.cat([p.detach().reshape(-1) for p in params])


def run(
    task: str | Task,
    clip: ClipFn | None,
    *,
    seed: int = 0,
    steps: int | None = None,
    quick: bool = False,
    progress: Callable[[int, int], None] | None = None,
    device: str | torch.device = "cpu",
) -> RunResult:
    """Train ``task`` once with ``clip`` between ``backward()`` and ``optimizer.step()``.

    The pre-clip norm comes from the clip function when it reports one (a returned 0-dim
    tensor or ``.norm``); otherwise the runner measures it with :func:`gradclip.grad_norms`
    before calling ``clip`` (on the first step it always does, since it cannot know yet;
    from then on only while the clip function reports nothing). Non-finite losses and
    gradients do not stop the run, as in unprotected training; once the parameters are
    non-finite it stops early, with ``metric = inf`` and ``diverged = True``, as it does when
    a spike detector stops the run (:class:`gradclip.GradientSpikeError`: too many spikes in
    a row).

    Args:
        task: a key of :data:`gradclip.demo.tasks.TASKS` or a :class:`Task`.
        clip: the clip function (see :data:`ClipFn`), or None for no clipping.
        seed: seeds the initialisation and the training batches (the validation / test
            data and the teacher are fixed per task).
        steps: steps to run; default ``task.steps`` (``task.quick_steps`` if ``quick``).
        quick: use the task's quick step count.
        progress: called as ``progress(done, total)`` after every step.
        device: where the model and its data live (the data is generated on the CPU from
            the seed and moved, so a seed means the same data on every device).

    Returns:
        A :class:`RunResult`. Identical seeds give identical results (for a given number
        of torch threads).
    """
    spec = resolve(task)
    total = steps if steps is not None else (spec.quick_steps if quick else spec.steps)
    if not isinstance(total, int) or isinstance(total, bool) or total < 1:
        raise ValueError(f"`steps` must be a positive int, got {total!r}")
    start = time.perf_counter()
    problem = build_problem(spec.config, seed, total, torch.device(device))
    model, optimizer = problem.model, problem.optimizer
    params = [p for p in model.parameters() if p.requires_grad]

    losses: list[float] = []
    pre_norms: list[float] = []
    post_norms: list[float] = []
    thresholds: list[float] = []
    update_norms: list[float] = []
    clipped: list[bool] = []
    nonfinite = skipped_steps = 0
    measure = True
    exploded = False
    # a clipper steps itself: it sees the optimizer (Muon groups, fused folds, skips)
    stepped = callable(getattr(clip, "step", None))
    takes_loss = _takes_loss(clip.step if stepped else clip)  # type: ignore[union-attr]
    before = _flat(params)
    for step in range(total):
        optimizer.zero_grad(set_to_none=True)
        loss = problem.loss(step)
        loss.backward()
        measured = grad_norms(params).total.item() if (clip is None or measure) else _NAN
        try:
            if clip is None:
                out = None
            elif stepped:
                kwargs = {"loss": loss.detach()} if takes_loss else {}
                out = clip.step(model, optimizer, **kwargs)  # type: ignore[union-attr]
            else:
                out = clip(model, loss=loss.detach()) if takes_loss else clip(model)
        except GradientSpikeError:  # a spike detector's cap: the run has diverged
            exploded = True
            break

        norm = post = threshold = _NAN
        was_clipped = finite = skip = None
        if isinstance(out, Tensor):
            norm = _as_float(out)
        elif out is not None:
            # a ClipStats: the norms its threshold met (with Muon's groups left out, the others')
            pre_post = (out.clipped_norms() if isinstance(out, ClipStats)
                        else (getattr(out, "norm", None), getattr(out, "post_norm", None)))  # fmt: skip
            norm, post = _as_float(pre_post[0]), _as_float(pre_post[1])
            threshold = _as_float(getattr(out, "threshold", None))
            was_clipped = _as_bool(getattr(out, "clipped", None))
            finite = _as_bool(getattr(out, "finite", None))
            skip = _as_bool(getattr(out, "skipped", None))
        reported = not math.isnan(norm) or (finite is not None and not finite)
        if not reported:
            norm = measured
        measure = not reported
        if clip is None:
            post = norm
        if was_clipped is None:
            was_clipped = bool(post < norm)

        loss_value = loss.item()
        if finite is None:
            finite = math.isfinite(norm)

        if skip:
            skipped_steps += 1
            update = 0.0
        else:
            if not stepped:
                optimizer.step()
            after = _flat(params)
            update = (after - before).norm().item()
            if not math.isfinite(update) and not bool(torch.isfinite(after).all()):
                exploded = True
            before = after
        if not (finite and math.isfinite(loss_value) and math.isfinite(update)):
            nonfinite += 1
        problem.after_step(step)

        losses.append(loss_value)
        pre_norms.append(norm)
        post_norms.append(post)
        thresholds.append(threshold)
        update_norms.append(update)
        clipped.append(was_clipped)
        if progress is not None:
            progress(step + 1, total)
        if exploded:
            break

    metric = math.inf if exploded else problem.metric()
    if not math.isfinite(metric):
        metric = math.inf
    return RunResult(
        task=spec.key,
        seed=seed,
        steps=len(losses),
        planned_steps=total,
        losses=losses,
        metric=metric,
        diverged=not metric <= spec.failure_level,
        nonfinite_steps=nonfinite,
        skipped_steps=skipped_steps,
        pre_norms=pre_norms,
        post_norms=post_norms,
        thresholds=thresholds,
        update_norms=update_norms,
        clipped=clipped,
        wall_time_s=time.perf_counter() - start,
    )
