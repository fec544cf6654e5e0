"""What a benchmark run is asked (:class:`BenchConfig`) and what it returns (the records).

Plain frozen dataclasses, so a result renders as a table (:mod:`render`) or as JSON with
:func:`dataclasses.asdict`; :mod:`harness` fills them.

Example:
    >>> import records
    >>> records.config(quick=True, reps=3).max_reps
    6
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field, replace

from cases import CASES, QUICK_CASES

__all__ = [
    "MODES",
    "AccuracyRecord",
    "BenchConfig",
    "BenchRecord",
    "BenchResult",
    "config",
    "fmt_p",
]

MODES = ("noclip", "clip")


def fmt_p(p: float) -> str:
    """A norm type as the tables and progress lines print it: ``2``, ``inf``."""
    return "inf" if math.isinf(p) else f"{p:g}"


@dataclass(frozen=True)
class BenchConfig:
    """What to run and how carefully.

    Attributes:
        cases: names from :data:`CASES`.
        norm_types: values of ``norm_type`` (``math.inf`` for the max norm).
        modes: ``"noclip"`` and/or ``"clip"``.
        reps: quiet repetitions wanted per (case, norm type, mode).
        max_reps: repetitions allowed in all while waiting for quiet ones (default 2x reps).
        max_seconds: per measurement, start no repetition after this many seconds once
            ``min(3, reps)`` have run (a time budget for loaded machines); None: no limit.
        min_rep_seconds: a repetition repeats every variant until it lasts this long, so the
            CPU-load accounting (10 ms ticks) can see foreign load.
        max_calls_per_rep: at most this many calls of each variant per repetition (raise
            it for calls of a few microseconds, so a repetition still lasts long enough).
        max_foreign_cores: a repetition is quiet when other processes used at most this many
            cores during it.
        seed: seed of the gradient sets.

    Example:
        >>> import harness
        >>> harness.BenchConfig(reps=5).max_reps
        10
    """

    cases: tuple[str, ...] = tuple(CASES)
    norm_types: tuple[float, ...] = (2.0, math.inf)
    modes: tuple[str, ...] = MODES
    reps: int = 15
    max_reps: int | None = None
    max_seconds: float | None = None
    min_rep_seconds: float = 0.1
    max_calls_per_rep: int = 20
    max_foreign_cores: float = 0.25
    seed: int = 0

    def __post_init__(self) -> None:
        unknown = [c for c in self.cases if c not in CASES]
        if unknown:
            raise ValueError(f"unknown case(s) {unknown}; valid cases: {list(CASES)}")
        bad_modes = [m for m in self.modes if m not in MODES]
        if bad_modes:
            raise ValueError(f"unknown mode(s) {bad_modes}; valid modes: {list(MODES)}")
        if self.reps < 1:
            raise ValueError(f"`reps` must be >= 1, got {self.reps}")
        if self.max_calls_per_rep < 1:
            raise ValueError(f"`max_calls_per_rep` must be >= 1, got {self.max_calls_per_rep}")
        if self.max_reps is None:
            object.__setattr__(self, "max_reps", 2 * self.reps)
        elif self.max_reps < self.reps:
            raise ValueError(f"`max_reps` must be >= reps ({self.reps}), got {self.max_reps}")


def config(
    *,
    quick: bool = False,
    cases: Sequence[str] | None = None,
    norm_types: Sequence[float] | None = None,
    modes: Sequence[str] | None = None,
    reps: int | None = None,
) -> BenchConfig:
    """The full (default) or quick configuration, with the given fields overridden.

    Quick: :data:`QUICK_CASES` (no gpt2-bf16, no huge100M), 7 repetitions, but none
    started after 2 s per measurement once 3 have run: about 20 s on 2 quiet cores (more
    when other processes load them: every call slows down). Full: every case, 15
    repetitions, a few minutes.

    Example:
        >>> import harness
        >>> harness.config(quick=True).cases
        ('gpt2', 'resnet50', 'tiny2000')
    """
    base = BenchConfig(cases=QUICK_CASES, reps=7, max_seconds=2.0) if quick else BenchConfig()
    overrides: dict[str, object] = {}
    if cases is not None:
        overrides["cases"] = tuple(cases)
    if norm_types is not None:
        overrides["norm_types"] = tuple(float(p) for p in norm_types)
    if modes is not None:
        overrides["modes"] = tuple(modes)
    if reps is not None:
        overrides["reps"] = reps
        overrides["max_reps"] = None
    return replace(base, **overrides) if overrides else base


@dataclass(frozen=True)
class BenchRecord:
    """Timing of one (case, norm type, mode): ours vs torch on the same gradients.

    Times are medians over the repetitions used, in milliseconds per call; ratios are
    medians of per-repetition paired ratios (lower is faster for us).

    Attributes:
        case, dtype, n_tensors, numel, norm_type, mode: what was measured.
        ours_ms, torch_ms, floor_ms: median time of one call; the floor is one
            ``torch.sum`` over a flat buffer with the same number of bytes and dtype.
        ratio, ratio_min, ratio_max: ours/torch, median and range over repetitions.
        ours_x_floor, torch_x_floor: time as a multiple of the floor (paired median).
        reps_used, reps_run: repetitions kept / run; calls_per_rep: calls of each
            implementation per repetition.
        quiet: True if the repetitions used were all quiet (little foreign CPU load).
        clipped: fraction of timed calls that clipped (1 in ``clip`` mode, 0 in ``noclip``).
    """

    case: str
    dtype: str
    n_tensors: int
    numel: int
    norm_type: float
    mode: str
    ours_ms: float
    torch_ms: float
    floor_ms: float
    ratio: float
    ratio_min: float
    ratio_max: float
    ours_x_floor: float
    torch_x_floor: float
    reps_used: int
    reps_run: int
    calls_per_rep: int
    quiet: bool
    clipped: float


@dataclass(frozen=True)
class AccuracyRecord:
    """Returned total norms of one (case, norm type) vs a float64 reference.

    Attributes:
        reference: the float64 norm (:func:`cases.reference_norm`).
        ours, torch: the norms returned by each implementation, as Python floats.
        ours_rel_err, torch_rel_err: ``|norm - reference| / reference``.
    """

    case: str
    dtype: str
    norm_type: float
    reference: float
    ours: float
    torch: float
    ours_rel_err: float
    torch_rel_err: float


@dataclass(frozen=True)
class BenchResult:
    """Everything one benchmark run measured.

    Attributes:
        records: one :class:`BenchRecord` per (case, norm type, mode).
        accuracy: one :class:`AccuracyRecord` per (case, norm type).
        config: the configuration that ran.
        env: versions, threads and machine, as strings.
        wall_seconds: duration of the whole run, building the gradient sets included.
    """

    records: list[BenchRecord]
    accuracy: list[AccuracyRecord]
    config: BenchConfig
    env: dict[str, str] = field(default_factory=dict)
    wall_seconds: float = 0.0
