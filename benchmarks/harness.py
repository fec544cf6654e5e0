"""The benchmark harness: :func:`gradclip.clip_grad_norm_` against ``torch.nn.utils.clip_grad_norm_``.

Data, rendering and command line stay apart: :mod:`cases` builds the gradient sets,
:mod:`records` says what to run and holds what was measured, this module measures and
returns a :class:`BenchResult`, :mod:`targets` holds the project's goals and :mod:`render`
prints a result.

**Measurement** (:func:`run`, :func:`run_grad_set`). Both implementations run on the *same*
gradients, interleaved in one process: every repetition runs ours, torch's and the read
floor (one ``torch.sum`` over a flat buffer of the same bytes and dtype) in an order that
alternates which goes first. Times are per-repetition pairs: the ratio ours/torch is
reported as median [min-max]. A repetition during which other processes used more than
``max_foreign_cores`` of CPU (:class:`ForeignLoad`: ``/proc/stat`` busy time minus our own
CPU time) is not quiet; repetitions run until ``reps`` quiet ones are collected (at most
``max_reps``), and only the quiet ones are used, unless fewer than half of ``reps`` were
quiet: then all are used and the record says ``quiet=False``. Modes: ``noclip``
(``max_norm`` = 10x the current norm) and ``clip`` (``max_norm`` = 0.98x the current norm,
re-anchored after every call, so every call really clips). The returned norms are also
compared with a float64 reference.

Example:
    >>> import cases, harness
    >>> gs = cases.make_grad_set("demo", [("w", (64, 64)), ("b", (64,))])
    >>> cfg = harness.BenchConfig(norm_types=(2.0,), modes=("noclip",), reps=2)
    >>> records, accuracy = harness.run_grad_set(gs, cfg)
    >>> records[0].mode, records[0].reps_run >= 2
    ('noclip', True)
"""

from __future__ import annotations

import gc
import math
import os
import platform
import statistics
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

import torch
from torch import Tensor

import gradclip
from cases import CASES, GradSet, make_grad_set, reference_norm
from records import (
    MODES,
    AccuracyRecord,
    BenchConfig,
    BenchRecord,
    BenchResult,
    config,
    fmt_p,
)

__all__ = [
    "MODES",
    "AccuracyRecord",
    "Anchor",
    "BenchConfig",
    "BenchRecord",
    "BenchResult",
    "ClipFn",
    "ForeignLoad",
    "Progress",
    "commit",
    "config",
    "env",
    "fmt_p",
    "run",
    "run_grad_set",
]  # the records are re-exported: a script needs only ``import harness``

ClipFn = Callable[..., Tensor]
"""``fn(params, max_norm, norm_type) -> total norm``: what the harness times."""
Progress = Callable[[str], None]

_MAX_NORM_FACTOR = {"noclip": 10.0, "clip": 0.98}
_EPS = 1e-6  # torch's clip_coef = max_norm / (total + 1e-6)


class ForeignLoad:
    """CPU used by other processes during a time window, in cores (Linux ``/proc/stat``).

    Busy time of all CPUs (steal included) minus our own CPU time, less one tick of
    rounding slack, divided by the wall time. 0 where ``/proc/stat`` is unavailable.
    """

    def __init__(self) -> None:
        self.tick = 1.0 / os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 0.01
        self._start = self._sample()

    @staticmethod
    def _busy_ticks() -> int | None:
        try:
            with open("/proc/stat") as f:
                fields = f.readline().split()[1:]
        except OSError:
            return None
        values = [int(v) for v in fields[:8]]
        return sum(values) - values[3] - values[4]  # all but idle and iowait

    def _sample(self) -> tuple[int | None, float, float]:
        return self._busy_ticks(), time.process_time(), time.perf_counter()

    def start(self) -> None:
        """Open a window."""
        self._start = self._sample()

    def stop(self) -> float:
        """Close the window: the other processes' CPU use during it, in cores."""
        busy0, own0, wall0 = self._start
        busy1, own1, wall1 = self._sample()
        if busy0 is None or busy1 is None or wall1 <= wall0:
            return 0.0
        foreign = (busy1 - busy0) * self.tick - (own1 - own0) - self.tick
        return max(0.0, foreign) / (wall1 - wall0)


class Anchor:
    """Keeps ``max_norm`` at a fixed factor of the gradients' current norm.

    After a call that returned the pre-clip norm ``n`` with ``max_norm`` ``m``, the current
    norm is ``n * min(1, m / (n + 1e-6))``. In ``clip`` mode every call shrinks the
    gradients by ~2%; when they fall below a quarter of their initial norm they are scaled
    back up, outside the timed region.
    """

    def __init__(self, grads: list[Tensor], norm: float, factor: float) -> None:
        self.grads, self.norm, self.initial, self.factor = grads, norm, norm, factor

    def max_norm(self) -> float:
        """The ``max_norm`` of the next call."""
        return self.factor * self.norm

    def update(self, returned: float, max_norm: float) -> bool:
        """Record a call's result; True if that call clipped."""
        coef = min(1.0, max_norm / (returned + _EPS))
        self.norm = returned * coef
        if self.norm < self.initial / 4:
            scale = self.initial / self.norm
            with torch.no_grad():
                torch._foreach_mul_(self.grads, scale)
            self.norm *= scale
        return coef < 1.0


# A repetition runs one order of (ours, torch, floor) and then its mirror image (ours and
# torch swapped), so each repetition's ratio is free of the order effect: whichever of the
# two runs first finds the gradients colder. Rotating single orders left it in the median
# whenever the repetitions did not cover the orders evenly (an A/A comparison at 5.3M
# parameters, one thread: 1.07-1.08 with 9 repetitions, 1.00 with 12).
_PAIRS = (
    (("ours", "torch", "floor"), ("torch", "ours", "floor")),
    (("floor", "ours", "torch"), ("floor", "torch", "ours")),
    (("ours", "floor", "torch"), ("torch", "floor", "ours")),
)


def _measure(
    gs: GradSet,
    p: float,
    mode: str,
    norm: float,
    floor_buf: Tensor,
    cfg: BenchConfig,
    ours: ClipFn,
    theirs: ClipFn,
) -> tuple[BenchRecord, float]:
    """Time one (norm type, mode); also return the gradients' norm afterwards."""
    grads = [param.grad for param in gs.params if param.grad is not None]
    anchor = Anchor(grads, norm, _MAX_NORM_FACTOR[mode])
    fns = {"ours": ours, "torch": theirs}
    clipped = [0, 0]  # clipping calls, timed calls

    def call(variant: str, count: bool) -> float:
        if variant == "floor":
            start = time.perf_counter()
            torch.sum(floor_buf)
            return time.perf_counter() - start
        max_norm = anchor.max_norm()
        start = time.perf_counter()
        returned = fns[variant](gs.params, max_norm, p)
        elapsed = time.perf_counter() - start
        did_clip = anchor.update(float(returned), max_norm)
        if count:
            clipped[0] += did_clip
            clipped[1] += 1
        return elapsed

    # Warm-up (caches, allocator, lazy initialisation); its duration sets the calls per rep.
    for order in _PAIRS[0]:
        warm = sum(call(v, count=False) for v in order)
    per_order = cfg.min_rep_seconds / 2 / max(warm, 1e-9)
    calls = max(1, min(cfg.max_calls_per_rep, math.ceil(per_order)))

    load = ForeignLoad()
    reps: list[tuple[dict[str, float], bool]] = []
    quiet_count = 0
    max_reps = cfg.max_reps or 2 * cfg.reps
    deadline = math.inf if cfg.max_seconds is None else time.perf_counter() + cfg.max_seconds
    while quiet_count < cfg.reps and len(reps) < max_reps:
        if len(reps) >= min(3, cfg.reps) and time.perf_counter() > deadline:
            break
        pair = _PAIRS[len(reps) % len(_PAIRS)]
        totals = dict.fromkeys(pair[0], 0.0)
        load.start()
        for order in pair:
            for _ in range(calls):
                for variant in order:
                    totals[variant] += call(variant, count=True)
        quiet = load.stop() <= cfg.max_foreign_cores
        quiet_count += quiet
        reps.append(({k: v / (2 * calls) for k, v in totals.items()}, quiet))

    quiet_reps = [t for t, q in reps if q]
    enough = len(quiet_reps) >= math.ceil(cfg.reps / 2)  # else the load was not occasional
    used = quiet_reps if enough else [t for t, _ in reps]
    ratios = [t["ours"] / t["torch"] for t in used]
    record = BenchRecord(
        case=gs.name,
        dtype=str(gs.dtype).removeprefix("torch."),
        n_tensors=gs.n_tensors,
        numel=gs.numel,
        norm_type=p,
        mode=mode,
        ours_ms=1e3 * statistics.median(t["ours"] for t in used),
        torch_ms=1e3 * statistics.median(t["torch"] for t in used),
        floor_ms=1e3 * statistics.median(t["floor"] for t in used),
        ratio=statistics.median(ratios),
        ratio_min=min(ratios),
        ratio_max=max(ratios),
        ours_x_floor=statistics.median(t["ours"] / t["floor"] for t in used),
        torch_x_floor=statistics.median(t["torch"] / t["floor"] for t in used),
        reps_used=len(used),
        reps_run=len(reps),
        calls_per_rep=calls,
        quiet=enough,
        clipped=clipped[0] / max(1, clipped[1]),
    )
    return record, anchor.norm


def _accuracy(gs: GradSet, p: float, ours: ClipFn, theirs: ClipFn) -> AccuracyRecord:
    """Both implementations' returned norm vs float64, on unchanged gradients (no clipping)."""
    reference = reference_norm([param.grad for param in gs.params if param.grad is not None], p)
    max_norm = 10 * reference
    norm_ours = float(ours(gs.params, max_norm, p))
    norm_torch = float(theirs(gs.params, max_norm, p))

    def rel(x: float) -> float:
        return abs(x - reference) / reference if reference else abs(x)

    return AccuracyRecord(
        case=gs.name,
        dtype=str(gs.dtype).removeprefix("torch."),
        norm_type=p,
        reference=reference,
        ours=norm_ours,
        torch=norm_torch,
        ours_rel_err=rel(norm_ours),
        torch_rel_err=rel(norm_torch),
    )


def run_grad_set(
    gs: GradSet,
    cfg: BenchConfig,
    progress: Progress | None = None,
    *,
    ours: ClipFn = gradclip.clip_grad_norm_,
    theirs: ClipFn = torch.nn.utils.clip_grad_norm_,
) -> tuple[list[BenchRecord], list[AccuracyRecord]]:
    """Benchmark one gradient set for every norm type and mode of ``cfg`` (``cfg.cases`` unused).

    ``ours`` and ``theirs`` are called as ``fn(params, max_norm, norm_type)`` on the same
    gradients; pass another ``ours`` to compare an engine variant.

    Example:
        >>> import cases, harness
        >>> gs = cases.make_grad_set("demo", [("w", (8, 8))])
        >>> cfg = harness.BenchConfig(modes=("clip",), reps=1)
        >>> records, acc = harness.run_grad_set(gs, cfg)
        >>> [(r.norm_type, r.clipped) for r in records]
        [(2.0, 1.0), (inf, 1.0)]
    """
    floor_buf = torch.empty(gs.numel, dtype=gs.dtype).fill_(1e-3)  # written: no zero pages
    records: list[BenchRecord] = []
    accuracy: list[AccuracyRecord] = []
    for p in cfg.norm_types:
        acc = _accuracy(gs, p, ours, theirs)
        accuracy.append(acc)
        norm = acc.reference
        for mode in cfg.modes:
            if progress is not None:
                progress(f"{gs.name} p={fmt_p(p)} {mode}")
            # clip mode shrinks the gradients: the next mode starts from their current norm
            record, norm = _measure(gs, p, mode, norm, floor_buf, cfg, ours, theirs)
            records.append(record)
    return records, accuracy


def commit() -> str:
    """The git commit the run measured (``+dirty`` with uncommitted changes), or "?"."""
    root = Path(__file__).resolve().parents[1]
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=root,
                              capture_output=True, text=True, timeout=10, check=True)  # fmt: skip
        dirty = subprocess.run(["git", "status", "--porcelain", "--", "src"], cwd=root,
                               capture_output=True, text=True, timeout=10, check=True)  # fmt: skip
    except (OSError, subprocess.SubprocessError):
        return "?"
    return head.stdout.strip() + ("+dirty" if dirty.stdout.strip() else "")


def env() -> dict[str, str]:
    """Versions, threads and machine, as strings (the header of every result file)."""
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(
                (line.split(":", 1)[1].strip() for line in f if line.startswith("model name")),
                cpu,
            )
    except OSError:
        pass
    return {
        "gradclip": gradclip.__version__,
        "torch": torch.__version__,
        "python": platform.python_version(),
        "threads": str(torch.get_num_threads()),
        "cpus": str(os.cpu_count()),
        "cpu": cpu,
        "platform": platform.platform(),
    }


def run(cfg: BenchConfig | None = None, progress: Progress | None = None) -> BenchResult:
    """Run the benchmark: build each case once, measure it, free it before the next.

    Args:
        cfg: what to run; default: the full benchmark (:func:`config`).
        progress: called with a short line before each measurement (e.g. print to stderr).

    Returns:
        A :class:`BenchResult`; print it with :func:`render.render` or :func:`render.to_json`.

    Example:
        >>> import harness, render
        >>> result = harness.run(harness.config(quick=True))  # doctest: +SKIP
        >>> print(render.render(result))  # doctest: +SKIP
    """
    cfg = cfg if cfg is not None else config()
    start = time.perf_counter()
    records: list[BenchRecord] = []
    accuracy: list[AccuracyRecord] = []
    for name in cfg.cases:
        if progress is not None:
            progress(f"building {name}: {CASES[name].description}")
        gs = make_grad_set(name, seed=cfg.seed)
        case_records, case_accuracy = run_grad_set(gs, cfg, progress)
        records += case_records
        accuracy += case_accuracy
        del gs
        gc.collect()  # free this case's gradients before building the next
    return BenchResult(records, accuracy, cfg, env(), time.perf_counter() - start)
