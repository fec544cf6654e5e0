"""The finder's results: the candidates, each trial's curves, the rounds, the decision, the cost.

Plain frozen dataclasses; :meth:`MaxNormSearch.to_dict` makes them JSON-ready. Built by
:func:`gradclip.tune.find_max_norm`; drawn by :mod:`gradclip.report.search`.

Example:
    >>> from gradclip.tune.results import Candidate
    >>> Candidate("fixed", 0.3).name, Candidate("none").build().max_norm
    ('0.3', inf)
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field, replace
from typing import Any, Literal

from gradclip.clippers import AdaptiveClip, Clipper, NormClip

__all__ = ["Candidate", "Cost", "MaxNormSearch", "Round", "Trial"]


@dataclass(frozen=True)
class Candidate:
    """A way of clipping the finder tries.

    Attributes:
        kind: ``"fixed"`` (``NormClip(max_norm)``), ``"none"`` (no clipping: the norm is
            measured, nothing is scaled) or ``"adaptive"`` (``AdaptiveClip``, the default).
        max_norm: the threshold of a ``"fixed"`` candidate (None otherwise).
    """

    kind: Literal["fixed", "none", "adaptive"]
    max_norm: float | None = None

    @property
    def name(self) -> str:
        """``"0.3"``, ``"none"`` or ``"adaptive"``."""
        return f"{self.max_norm:g}" if self.kind == "fixed" else self.kind

    def build(self, norm_type: float = 2.0, **adaptive: Any) -> Clipper:
        """A fresh clipper for this candidate (``"none"``: a NormClip at ``inf``, which
        measures and never scales)."""
        if self.kind == "fixed":
            return NormClip(self.max_norm, norm_type)  # type: ignore[arg-type]
        if self.kind == "none":
            return NormClip(math.inf, norm_type)
        return AdaptiveClip(norm_type=norm_type, **adaptive)


@dataclass(frozen=True)
class Trial:
    """One candidate's run in one round.

    Attributes:
        candidate: what was run.
        losses: the loss of each step (the run stops at the first non-finite loss).
        norms: the pre-clip total norm of each step.
        clipped: whether each step was clipped.
        diverged: the loss became non-finite.
        score: geometric mean of the losses over the last half of the round
            (arithmetic if one is <= 0; ``inf`` if diverged).
        seconds: wall time of the run, restore included.
    """

    candidate: Candidate
    losses: tuple[float, ...]
    norms: tuple[float, ...]
    clipped: tuple[bool, ...]
    diverged: bool
    score: float
    seconds: float

    @property
    def clip_rate(self) -> float:
        """Fraction of steps clipped."""
        return sum(self.clipped) / len(self.clipped) if self.clipped else 0.0


@dataclass(frozen=True)
class Round:
    """One round: every trial from the same state on the same batches.

    Attributes:
        index: 1 (all candidates, from your state) or 2 (confirmation, from where round 1's
            best ended, on the next batches).
        first_batch: index of the round's first batch.
        steps: steps per trial.
        trials: the trials, in the order they ran.
        best: name of the best fixed-or-none candidate (lowest score).
        tied: names of the candidates within noise of ``best`` (``best`` included).
        margins: name -> (mean difference to ``best`` over the tail, its standard error):
            of log-losses (a relative difference: 0.01 is 1% higher) when ``relative``, of
            losses otherwise.
        relative: every loss of the round was positive, so losses compare as ratios.
    """

    index: int
    first_batch: int
    steps: int
    trials: tuple[Trial, ...]
    best: str
    tied: tuple[str, ...]
    margins: dict[str, tuple[float, float]] = field(default_factory=dict)
    relative: bool = False

    def trial(self, name: str) -> Trial:
        """The trial of the candidate named ``name``."""
        return next(t for t in self.trials if t.candidate.name == name)


@dataclass(frozen=True)
class Cost:
    """What the search cost.

    Attributes:
        steps: training steps run (every trial of every round).
        seconds: wall time of the whole search.
        snapshot_bytes: size of one snapshot of the training state (two are held at most).
        run_steps: the training run's length, when given.
        fraction: ``steps / run_steps`` (None without ``run_steps``).
    """

    steps: int
    seconds: float
    snapshot_bytes: int
    run_steps: int | None
    fraction: float | None


@dataclass(frozen=True)
class MaxNormSearch:
    """What :func:`find_max_norm` found, and the evidence.

    Attributes:
        choice: what to train with (a fixed threshold, no clipping, or the adaptive
            default when no threshold is clearly better).
        best_fixed: the best fixed threshold found (None when no fixed threshold ran, or
            no clipping was best).
        confidence: ``"clear"`` (the pick beat its neighbours beyond noise in both rounds, on
            steady training where the default ran),
            ``"tie"`` (candidates tie within noise; ``statement`` names them) or
            ``"diverged"`` (every candidate's loss became non-finite).
        statement: the decision in one sentence.
        rounds: the rounds, with every trial's loss curve and norms.
        norms: the pre-clip norms the first trial (the adaptive default) saw.
        cost: steps, wall time and snapshot size.
        warnings: plain-language findings.
    """

    choice: Candidate
    best_fixed: Candidate | None
    confidence: Literal["clear", "tie", "diverged"]
    statement: str
    rounds: tuple[Round, ...]
    norms: tuple[float, ...]
    cost: Cost
    warnings: tuple[str, ...]
    adaptive: dict[str, Any] = field(default_factory=dict, repr=False)

    @property
    def max_norm(self) -> float | None:
        """The chosen fixed threshold (None when the choice is no clipping or adaptive)."""
        return self.choice.max_norm

    def clipper(self) -> Clipper | None:
        """A fresh clipper for :attr:`choice` (None for no clipping)."""
        if self.choice.kind == "none":
            return None
        return self.choice.build(**self.adaptive)

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-ready data (non-finite floats as strings)."""
        # without `adaptive` (the optimizers): asdict would deep-copy their state
        data = asdict(replace(self, adaptive={}))
        data.pop("adaptive")
        return _json_ready(data)  # type: ignore[no-any-return]


def _json_ready(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if isinstance(value, list | tuple):
        return [_json_ready(v) for v in value]
    if isinstance(value, dict):
        return {str(k): _json_ready(v) for k, v in value.items()}
    return value
