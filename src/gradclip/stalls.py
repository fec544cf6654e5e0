"""Stalls: clipping that freezes what it clips.

A clip coefficient far below 1, step after step, shrinks every update of what it scales. When
the updates are then too small to bring the norm down, the norm grows and the coefficient falls
further: a feedback loop that stalls layers silently (NVIDIA/Megatron-LM#5394: a global
coefficient of 2e-8 pushed AdamW's and Muon's inputs under their ``eps``). The
:class:`StallDetector` finds it in the step records: the coefficient of the whole model or of a
parameter group below a floor for many consecutive steps while its norm grows.

Example:
    >>> d = StallDetector(floor=1e-3, steps=4)
    >>> stall = [d.feed(s, "adamw", 10.0 * (s + 1), 1e-5) for s in range(4)][-1]
    >>> stall.first_step, stall.last_step, stall.norm_end
    (0, 3, 40.0)
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from gradclip.stats import GROUP_PREFIX

__all__ = ["STALL_FLOOR", "STALL_STEPS", "Stall", "StallDetector"]

STALL_FLOOR = 1e-3
"""A clip coefficient below this barely moves the weights (see :class:`StallDetector`)."""
STALL_STEPS = 50
"""Consecutive steps below :data:`STALL_FLOOR` that make a stall."""


@dataclass(frozen=True)
class Stall:
    """A run of steps on which clipping stalled a group: its coefficient stayed below the
    floor while its norm grew (the feedback loop of NVIDIA/Megatron-LM#5394).

    Attributes:
        group: the group's name (``"all"``: every gradient, the total norm).
        first_step, last_step: the run, so far.
        norm_start, norm_end: the group's pre-clip norm at its start and at its end.
        min_coef: the smallest coefficient of the run.
        floor: the floor it stayed below.
    """

    group: str
    first_step: int
    last_step: int
    norm_start: float
    norm_end: float
    min_coef: float
    floor: float = STALL_FLOOR

    def describe(self) -> str:
        """One sentence for a warning or a report."""
        who = "every gradient" if self.group == "all" else f"group {self.group!r}"
        return (
            f"the clip coefficient of {who} stayed below {self.floor:g} (smallest "
            f"{self.min_coef:.2g}) for {self.last_step - self.first_step + 1} consecutive steps "
            f"({self.first_step}-{self.last_step}) while its norm grew from {self.norm_start:.4g} "
            f"to {self.norm_end:.4g}: clipping is stalling it (its updates are too small to "
            "bring the norm down, which lowers the coefficient further). Raise its threshold, "
            "clip it on its own norm (policy='own'), or leave it out (policy='exclude')"
        )


class StallDetector:
    """Finds :class:`Stall` runs in a stream of (step, group, norm, coefficient).

    A run starts at a step whose finite coefficient is below ``floor`` and lasts while the
    coefficients stay below it. Once it holds ``steps`` steps and the norm grew (the mean
    log-norm of its last quarter is above that of its first quarter: one noisy step does not
    decide), it is a stall, reported once per run.

    Example:
        >>> d = StallDetector(floor=1e-3, steps=4)
        >>> [d.feed(s, "adamw", 10.0 * (s + 1), 1e-4) for s in range(4)][-1].norm_end
        40.0
    """

    def __init__(self, floor: float = STALL_FLOOR, steps: int = STALL_STEPS):
        self.floor, self.steps = floor, steps
        self._runs: dict[str, _Run] = {}

    def feed(self, step: int, group: str, norm: float, coef: float) -> Stall | None:
        """One step of ``group``; the :class:`Stall` when this step makes the run one."""
        if not (math.isfinite(coef) and coef < self.floor and math.isfinite(norm) and norm > 0):
            self._runs.pop(group, None)
            return None
        run = self._runs.get(group)
        if run is None:
            run = self._runs[group] = _Run(step, norm, max(1, self.steps // 4))
        run.add(norm, coef)
        if run.reported or run.length < self.steps or not run.grew():
            return None
        run.reported = True
        return Stall(group, run.first_step, step, run.first_norm, norm, run.min_coef, self.floor)

    def feed_record(self, record: Mapping[str, Any]) -> list[Stall]:
        """The stalls a step record completes: its total (``"all"``) and its groups."""
        found = []
        step = int(record["step"])
        for group, norm, coef in _group_values(record):
            stall = self.feed(step, group, norm, coef)
            if stall is not None:
                found.append(stall)
        return found


class _Run:
    """One run of steps below the floor: its start, length and the log-norms of its first
    and last quarter."""

    def __init__(self, step: int, norm: float, quarter: int):
        self.first_step, self.first_norm = step, norm
        self.length, self.min_coef, self.reported = 0, math.inf, False
        self.head: list[float] = []
        self.tail: deque[float] = deque(maxlen=quarter)

    def add(self, norm: float, coef: float) -> None:
        self.length += 1
        self.min_coef = min(self.min_coef, coef)
        if len(self.head) < (self.tail.maxlen or 1):
            self.head.append(math.log(norm))
        self.tail.append(math.log(norm))

    def grew(self) -> bool:
        return sum(self.tail) / len(self.tail) > sum(self.head) / len(self.head)


def _group_values(record: Mapping[str, Any]) -> list[tuple[str, float, float]]:
    """(group, norm, coef) of a step record: the total, then each group in its extras."""
    out = [("all", float(record["norm"]), float(record["coef"]))]
    extra = record.get("extra") or {}
    for key, coef in extra.items():
        if key.startswith(GROUP_PREFIX) and key.endswith("/coef"):
            name = key[len(GROUP_PREFIX) : -len("/coef")]
            norm = extra.get(f"{GROUP_PREFIX}{name}/norm", math.nan)
            out.append((name, float(norm), float(coef)))
    return out
