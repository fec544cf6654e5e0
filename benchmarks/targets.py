"""The project's speed and accuracy goals for :func:`gradclip.clip_grad_norm_` (CPU, torch 2.13).

Development targets, checked against a :class:`records.BenchResult` by
:func:`check_targets` and printed by ``bench_clip.py``. They are goals for the engine, not
test material (timings on a shared machine are not), and not something a user of
``gradclip bench`` is shown.

Example:
    >>> import targets
    >>> [t for t in targets.TARGETS if t.metric == "rel_err"][0].limit
    1e-05
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

from records import BenchResult

__all__ = ["TARGETS", "Target", "TargetCheck", "check_targets"]


@dataclass(frozen=True)
class Target:
    """A goal: ``metric`` of (case, norm type[, mode]) must be at most ``limit``.

    ``metric`` is ``"ratio"`` (median ours/torch time) or ``"rel_err"`` (relative error of
    our returned norm vs float64; ``mode`` is then None).
    """

    case: str
    norm_type: float
    mode: str | None
    metric: str
    limit: float


@dataclass(frozen=True)
class TargetCheck:
    """A :class:`Target` against a measurement; ``value`` is None when it was not measured."""

    target: Target
    value: float | None

    @property
    def met(self) -> bool | None:
        """True / False, or None when not measured."""
        return None if self.value is None else self.value <= self.target.limit


TARGETS: tuple[Target, ...] = (
    *(Target(c, 2.0, "noclip", "ratio", 0.5) for c in ("gpt2", "resnet50", "tiny2000")),
    *(Target(c, 2.0, "clip", "ratio", 0.9) for c in ("gpt2", "resnet50")),
    *(Target(c, math.inf, "noclip", "ratio", 0.2) for c in ("gpt2", "resnet50")),
    *(Target(c, math.inf, "clip", "ratio", 0.3) for c in ("gpt2", "resnet50")),
    Target("gpt2", 2.0, None, "rel_err", 1e-5),
)
"""The performance and accuracy goals of the engine (CPU, torch 2.13)."""


def check_targets(result: BenchResult, targets: Sequence[Target] = TARGETS) -> list[TargetCheck]:
    """Each target against ``result`` (value None where the run did not measure it).

    Example:
        >>> import harness, targets
        >>> empty = harness.BenchResult([], [], harness.BenchConfig())
        >>> targets.check_targets(empty)[0].met is None
        True
    """
    checks = []
    for t in targets:
        value: float | None = None
        if t.metric == "ratio":
            value = next(
                (
                    r.ratio
                    for r in result.records
                    if (r.case, r.norm_type, r.mode) == (t.case, t.norm_type, t.mode)
                ),
                None,
            )
        else:
            value = next(
                (
                    a.ours_rel_err
                    for a in result.accuracy
                    if (a.case, a.norm_type) == (t.case, t.norm_type)
                ),
                None,
            )
        checks.append(TargetCheck(t, value))
    return checks
