"""What every integration shares: the install hint, which parameters to clip, unscaling once,
the skip decision (``nonfinite="skip"``, a spike detector's ``"skip"``), the logged figures
(device counters, one host read) and the user's :class:`~gradclip.GradMonitor`.

**A skipped step inside a framework.** Lightning and the Hugging Face Trainer call
``optimizer.step()`` themselves, after the callback. A skipped step is handed to them by
setting the clipped parameters' gradients to ``None``: torch's optimizers leave a parameter
without a gradient alone (no update, no weight decay, its Adam step counter unchanged:
their per-parameter state is untouched). The framework itself counts the step as taken:
its global step advances, its learning-rate scheduler steps, and a ``GradScaler`` updates
its scale as after a finite step. That is what both frameworks do for a step whose
gradients a user zeroed, and it keeps their step-based schedules (logging, checkpoints,
``max_steps``) where the user put them; the schedule moves on by one step that did not
train.

Nothing here imports a framework.
"""

from __future__ import annotations

import importlib
from collections.abc import Iterator
from types import ModuleType
from typing import Any

import torch
from torch import Tensor

from gradclip import _foreach
from gradclip.clippers import Clipper, Parameters
from gradclip.clippers.adaptive import known_optimizers
from gradclip.monitor import GradMonitor
from gradclip.stats import ClipStats

__all__ = [
    "FIGURES",
    "SPIKE_FIGURES",
    "ClipLog",
    "check_monitor",
    "clip_target",
    "drop_grads_if_skipped",
    "keyed",
    "load_clipper",
    "record_step",
    "require",
    "unscale_once",
]

FIGURES = ("grad_norm", "grad_norm_clipped", "threshold", "clip_rate", "nonfinite_steps")
"""The logged figures, each under ``gradclip/``: pre- and post-clip total norm of the last step,
its threshold, the fraction of optimizer steps clipped so far, non-finite steps so far."""

SPIKE_FIGURES = ("spikes", "spike_score")
"""Logged too when the clipper has a spike detector: spikes so far, and the SpikeScore."""


def require(modules: tuple[str, ...], extra: str, what: str) -> ModuleType:
    """The first of ``modules`` that imports; else ``ModuleNotFoundError`` with the pip command."""
    for name in modules:
        try:
            return importlib.import_module(name)
        except ModuleNotFoundError as err:
            if err.name is None or name.split(".")[0] != err.name.split(".")[0]:
                raise  # the framework is there but something it needs is not: show that
    raise ModuleNotFoundError(
        f"{what} needs {modules[0].split('.')[0]}, which is not installed; install it with "
        f"`pip install 'gradclip[{extra}]'`",
        name=modules[0],
    )


def _parameters(optimizer: torch.optim.Optimizer) -> Iterator[Tensor]:
    for group in optimizer.param_groups:
        yield from group["params"]


def clip_target(module: torch.nn.Module, optimizer: torch.optim.Optimizer | None) -> Parameters:
    """What the clipper is called on for one optimizer's step.

    The module itself when the optimizer holds all its trainable parameters (names from
    ``named_parameters()``, and AGC finds the head); otherwise ``(name, parameter)`` pairs of
    the optimizer's parameters only, so that another optimizer's gradients stay untouched.
    """
    if optimizer is None:
        return module
    held = {id(p) for p in _parameters(optimizer)}
    named = list(module.named_parameters())
    if all(id(p) in held for _, p in named if p.requires_grad):
        return module
    names = {id(p): n for n, p in named}
    return [(names.get(id(p), f"optimizer.{i}"), p) for i, p in enumerate(_parameters(optimizer))]


def unscale_once(scaler: torch.amp.GradScaler, optimizer: torch.optim.Optimizer) -> None:
    """``scaler.unscale_(optimizer)`` unless it already ran since the last ``update()``.

    A second ``unscale_`` raises in torch, and the frameworks unscale only on some paths (not
    for fused optimizers; not before their own clip was turned off), so the integrations ask.
    """
    if not scaler.is_enabled():
        return
    if not _foreach.grads_unscaled(scaler, optimizer):
        scaler.unscale_(optimizer)


def drop_grads_if_skipped(clipper: Clipper, stats: ClipStats, target: Parameters) -> None:
    """A skipped step (``nonfinite="skip"``, a spike detector's ``"skip"``) must not update:
    the gradients of the clipped parameters are set to ``None``, so the framework's
    ``optimizer.step()`` leaves them alone (see the module doc). Costs one host read per
    step, only under those policies (free on the CPU)."""
    if not clipper.skips or not bool(stats.skipped):
        return
    if isinstance(target, torch.nn.Module):
        params = list(target.parameters())
    else:
        params = [p for _, p in target]  # type: ignore[misc]
    for p in params:
        p.grad = None


def check_monitor(monitor: object) -> GradMonitor | None:
    """``monitor`` if it is None or a :class:`~gradclip.GradMonitor`; else ``TypeError``."""
    if monitor is not None and not isinstance(monitor, GradMonitor):
        raise TypeError(
            f"`monitor` must be a gradclip.GradMonitor or None, got {type(monitor).__name__} "
            f"{monitor!r:.60}; pass e.g. gradclip.GradMonitor(log='grads.jsonl')"
        )
    return monitor


def record_step(
    monitor: GradMonitor | None, stats: ClipStats, step: int | None = None, optimizer: object = None
) -> None:
    """Hand one optimizer step's ClipStats to ``monitor`` (per-tensor norms included: no
    second pass, and no host read outside the monitor's own flushes), with the optimizer the
    framework steps after it where that is a ``torch.optim.Optimizer`` (the log names its
    kind; a wrapper's is not known). Nothing when there is no monitor, or when no parameter
    had a gradient."""
    if monitor is not None and stats.norms.tensors:
        monitor.record(stats, step=step, optimizer=known_optimizers(optimizer))


class ClipLog:
    """The figures of one clipper: the last step's :class:`~gradclip.ClipStats` and the clip
    rate, as device counters (no host read per step); :meth:`read` reads them in one go.
    Each step also goes to ``monitor``, the user's :class:`~gradclip.GradMonitor`, if any."""

    def __init__(self, clipper: Clipper, monitor: GradMonitor | None = None):
        self.clipper = clipper
        self.monitor = monitor
        self.last: ClipStats | None = None
        self.steps = torch.zeros((), dtype=torch.long)
        self.clipped = torch.zeros((), dtype=torch.long)
        self.spikes = torch.zeros((), dtype=torch.long)

    def record(self, stats: ClipStats, *, step: int | None = None, main: bool = True,
               optimizer: object = None) -> None:  # fmt: skip
        """Count one optimizer step (nothing when no parameter had a gradient), and record it
        in the monitor as training step ``step`` on the main process (``main``) only: every
        rank sees the same norms, and one log needs one writer. ``optimizer``: the one
        stepped after it (:func:`record_step`)."""
        if not stats.norms.tensors:
            return
        device = stats.clipped.device
        self.steps = self.steps.to(device) + 1
        self.clipped = self.clipped.to(device) + stats.clipped.long()
        self.spikes = self.spikes.to(device) + stats.spike.long()
        self.last = stats
        if main:
            record_step(self.monitor, stats, step, optimizer)

    def tensors(self) -> dict[str, Tensor]:
        """The figures as 0-dim device tensors (empty before the first clipped step)."""
        if self.last is None:
            return {}
        last = self.last
        values = (
            last.norm.float(),
            last.post_norm.float(),
            last.threshold.float(),
            self.clipped.float() / self.steps.clamp(min=1).float(),
            self.clipper.nonfinite_steps.to(last.norm.device).float(),
        )
        figures = dict(zip(FIGURES, values, strict=True))
        if self.clipper.spikes is not None:
            figures.update(zip(SPIKE_FIGURES, (self.spikes.float(), last.spike_score.float()), strict=True))
        return figures

    def read(self) -> dict[str, float]:
        """The figures as Python floats: one host read."""
        figures = self.tensors()
        if not figures:
            return {}
        values = torch.stack(list(figures.values())).cpu().tolist()
        return dict(zip(figures, values, strict=True))

    def state_dict(self) -> dict[str, Any]:
        state = {"steps": int(self.steps), "clipped": int(self.clipped)}
        if self.clipper.spikes is not None:
            state["spikes"] = int(self.spikes)
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.steps = torch.tensor(int(state["steps"]))
        self.clipped = torch.tensor(int(state["clipped"]))
        self.spikes = torch.tensor(int(state.get("spikes", 0)))  # absent before spike detection
        self.last = None


def keyed(figures: dict[str, Any], prefix: str) -> dict[str, Any]:
    """``figures`` under ``prefix`` (``"gradclip/"`` or ``"gradclip/opt1/"``)."""
    return {prefix + k: v for k, v in figures.items()}


def load_clipper(clipper: Clipper, state: dict[str, Any], where: str) -> None:
    """``clipper.load_state_dict(state)`` with the checkpoint named in the error."""
    try:
        clipper.load_state_dict(state)
    except ValueError as err:
        raise ValueError(
            f"cannot resume gradclip from {where}: {err}. Resume with the clipper the checkpoint "
            f"was written with, or start the clipper afresh by leaving out its saved state"
        ) from err
