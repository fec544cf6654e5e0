"""``gradclip bench``: how does gradclip's ``clip_grad_norm_`` compare with torch's here?

A few built-in gradient sets (:data:`CASES`, from the cost of a call to memory bandwidth),
each clipped by :func:`gradclip.clip_grad_norm_` and by ``torch.nn.utils.clip_grad_norm_``
on the *same* gradients, interleaved in one process: every repetition calls both in one
order and then in the other, so neither always goes first. A row reports the median
time per call of each and the median [min-max] of the per-repetition ratios gradclip/torch.
Modes: ``noclip`` (``max_norm`` 10x the gradients' norm) and ``clip`` (0.98x, re-anchored
after every call, so every call clips). :func:`render` prints a result with a one-line
reading.

The project's development benchmarks (more gradient sets, load detection, accuracy against
float64, the small-model ladder) live in the repository's ``benchmarks/`` folder.

Example:
    >>> from gradclip import _bench
    >>> result = _bench.run(cases=["tiny"], norm_types=[2.0], modes=["clip"], reps=1)
    >>> row = result.rows[0]
    >>> (row.case, row.mode, row.clipped, row.ratio_min <= row.ratio <= row.ratio_max)
    ('tiny', 'clip', 1.0, True)
"""

from __future__ import annotations

import itertools
import json
import math
import os
import platform
import statistics
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from torch import Tensor

import gradclip
from gradclip.scale import TORCH_EPS

__all__ = [
    "CASES",
    "MODES",
    "BenchResult",
    "Case",
    "Row",
    "check_json_path",
    "render",
    "run",
    "to_dict",
    "write_json",
]

Shape = tuple[int, ...]
ClipFn = Callable[..., Tensor]
"""``fn(parameters, max_norm, norm_type) -> total norm``, as both clip functions are called."""

MODES = ("noclip", "clip")
_MAX_NORM_FACTOR = {"noclip": 10.0, "clip": 0.98}
_KIND = "gradclip bench"  # marks the JSON files this command writes: the only ones it replaces


def _mlp(*sizes: int) -> list[Shape]:
    """Weights ``(out, in)`` and biases of ``nn.Linear(sizes[i], sizes[i + 1])`` layers."""
    return [s for a, b in itertools.pairwise(sizes) for s in ((b, a), (b,))]


def _gpt2_small() -> list[Shape]:
    """The 148 tensor shapes of GPT-2 small (124,439,808 elements; the LM head tied)."""
    d = 768
    attention = [(d,), (d,), (d, 3 * d), (3 * d,), (d, d), (d,)]  # ln_1, c_attn, c_proj
    mlp = [(d,), (d,), (d, 4 * d), (4 * d,), (4 * d, d), (d,)]  # ln_2, c_fc, c_proj
    return [(50257, d), (1024, d), *(attention + mlp) * 12, (d,), (d,)]


@dataclass(frozen=True)
class Case:
    """A built-in gradient set: its name, what it stands for, and its tensor shapes."""

    name: str
    description: str
    shapes: Callable[[], list[Shape]]


CASES: dict[str, Case] = {
    c.name: c
    for c in (
        Case("tiny", "MLP 4-4-1: the cost of a call itself", lambda: _mlp(4, 4, 1)),
        Case("mnist", "MLP 784-256-10 (MNIST): a small model", lambda: _mlp(784, 256, 10)),
        Case("many", "2,000 tensors of 1,000: the cost per tensor", lambda: [(1000,)] * 2000),
        Case("gpt2", "GPT-2 small's shapes, 500 MB: memory bandwidth", _gpt2_small),
    )
}
"""The gradient sets, by name, smallest first; float32 gradients ~ N(0, 1e-3²), seeded."""


@dataclass(frozen=True)
class Row:
    """One (case, norm type, mode): gradclip vs torch on the same gradients.

    Attributes:
        case, n_tensors, numel, norm_type, mode: what was measured.
        gradclip_s, torch_s: median time of one call, in seconds.
        ratio, ratio_min, ratio_max: gradclip/torch per repetition: median, min, max.
        reps, calls_per_rep: repetitions, and calls of each function in one.
        clipped: fraction of the timed calls that clipped (1 in ``clip``, 0 in ``noclip``).
    """

    case: str
    n_tensors: int
    numel: int
    norm_type: float
    mode: str
    gradclip_s: float
    torch_s: float
    ratio: float
    ratio_min: float
    ratio_max: float
    reps: int
    calls_per_rep: int
    clipped: float


@dataclass(frozen=True)
class BenchResult:
    """The rows of one run, and the machine they were measured on (versions, threads, CPU)."""

    rows: list[Row]
    env: dict[str, str]


def _params(case: Case) -> list[torch.nn.Parameter]:
    generator = torch.Generator().manual_seed(0)
    params = []
    try:
        for shape in case.shapes():
            # the parameter's own data is never read: left uninitialised, it costs no memory
            param = torch.nn.Parameter(torch.empty(shape))
            param.grad = torch.empty(shape).normal_(0.0, 1e-3, generator=generator)
            params.append(param)
    except (MemoryError, RuntimeError) as exc:
        if isinstance(exc, RuntimeError) and "allocate" not in str(exc):
            raise
        raise MemoryError(f"not enough memory for the gradients of case {case.name!r}") from exc
    return params


def _measure(params: list[torch.nn.Parameter], p: float, mode: str, reps: int,
             rep_seconds: float, fns: tuple[ClipFn, ClipFn]) -> dict[str, float]:  # fmt: skip
    """The timing fields of a :class:`Row` for one norm type and mode."""
    grads = [q.grad for q in params]
    initial = norm = float(gradclip.get_total_norm(grads, p))
    clipped = []

    def call(fn: ClipFn) -> float:
        nonlocal norm
        max_norm = _MAX_NORM_FACTOR[mode] * norm
        start = time.perf_counter()
        returned = fn(params, max_norm, p)
        elapsed = time.perf_counter() - start
        coef = min(1.0, max_norm / (float(returned) + TORCH_EPS))
        clipped.append(coef < 1.0)
        norm = float(returned) * coef
        if norm < initial / 4:  # each clipping call shrinks them 2%: scale back up, untimed
            with torch.no_grad():
                for g in grads:
                    g.mul_(initial / norm)
            norm = initial
        return elapsed

    warm = [call(fn) for _ in range(3) for fn in fns]
    calls = max(1, min(10_000, math.ceil(rep_seconds / 2 / max(warm[-1] + warm[-2], 1e-9))))
    clipped.clear()
    times = []  # per repetition: (ours, theirs), mean seconds per call
    for _ in range(reps):
        total = [0.0, 0.0]
        # both orders in every repetition: whichever runs first finds the gradients colder,
        # and alternating it between repetitions left that in the median of an odd number
        for order in ((0, 1), (1, 0)):
            for _ in range(calls):
                for i in order:
                    total[i] += call(fns[i])
        times.append((total[0] / (2 * calls), total[1] / (2 * calls)))
    ratios = [ours / theirs for ours, theirs in times]
    return {"gradclip_s": statistics.median(t[0] for t in times), "reps": reps,
            "torch_s": statistics.median(t[1] for t in times), "ratio": statistics.median(ratios),
            "ratio_min": min(ratios), "ratio_max": max(ratios), "calls_per_rep": calls,
            "clipped": sum(clipped) / len(clipped)}  # fmt: skip


def _env() -> dict[str, str]:
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next((x.split(":", 1)[1].strip() for x in f if x.startswith("model name")), cpu)
    except OSError:
        pass
    return {"gradclip": gradclip.__version__, "torch": torch.__version__, "cpu": cpu,
            "threads": str(torch.get_num_threads()), "cpus": str(os.cpu_count())}  # fmt: skip


def run(
    cases: Sequence[str] | None = None,
    norm_types: Sequence[float] = (2.0, math.inf),
    modes: Sequence[str] = MODES,
    reps: int = 11,
    rep_seconds: float = 0.05,
    progress: Callable[[str], None] | None = None,
    *,
    ours: ClipFn = gradclip.clip_grad_norm_,
    theirs: ClipFn = torch.nn.utils.clip_grad_norm_,
) -> BenchResult:
    """Time ``ours`` against ``theirs`` on each case, norm type and mode.

    Args:
        cases: names from :data:`CASES` (default: all).
        norm_types: values of ``norm_type``, each > 0 (``math.inf``: the max norm).
        modes: ``"noclip"`` and/or ``"clip"``.
        reps: repetitions per row (>= 1).
        rep_seconds: a repetition calls both functions until it lasts about this long.
        progress: called with a short line before each row (e.g. print to stderr).
        ours, theirs: called as ``fn(parameters, max_norm, norm_type)``.

    Raises:
        ValueError: an unknown case or mode, a norm type <= 0, ``reps`` < 1.
        MemoryError: a case's gradients do not fit in memory.

    Example:
        >>> from gradclip import _bench
        >>> [r.norm_type for r in _bench.run(["tiny"], modes=["noclip"], reps=1).rows]
        [2.0, inf]
    """
    names = list(CASES) if cases is None else list(cases)
    for what, values, valid in (("cases", names, CASES), ("modes", modes, MODES)):
        for value in values:
            if value not in valid:
                raise ValueError(f"unknown {what[:-1]} {value!r} in `{what}`; "
                                 f"choose from {', '.join(valid)}")  # fmt: skip
    for p in norm_types:
        if not p > 0:
            raise ValueError(f"`norm_types` must be > 0 (2.0 or math.inf), got {p}")
    if reps < 1:
        raise ValueError(f"`reps` must be >= 1, got {reps}")
    rows = []
    for name in names:
        if progress is not None:
            progress(f"building {name}: {CASES[name].description}")
        params = _params(CASES[name])
        size = {"n_tensors": len(params), "numel": sum(q.numel() for q in params)}
        for p in norm_types:
            for mode in modes:
                if progress is not None:
                    progress(f"{name} p={_fmt_p(p)} {mode}")
                timing = _measure(params, float(p), mode, reps, rep_seconds, (ours, theirs))
                rows.append(Row(case=name, norm_type=float(p), mode=mode, **size, **timing))
        del params  # free a large case before building the next
    return BenchResult(rows, _env())


def _fmt_p(p: float) -> str:
    return "inf" if math.isinf(p) else f"{p:g}"


def _fmt_time(seconds: float) -> str:
    if seconds < 1e-3:
        return f"{seconds * 1e6:.1f} us"
    return f"{seconds * 1e3:.2f} ms" if seconds < 1 else f"{seconds:.2f} s"


def _reading(rows: Sequence[Row]) -> str:
    """One sentence: in how many rows gradclip was clearly faster, clearly slower, or neither."""
    faster = [r for r in rows if r.ratio_max < 1]
    slower = [r for r in rows if r.ratio_min > 1]
    parts = []
    sides = ((faster, "less", min, "down"), (slower, "more", max, "up"))
    for group, adverb, extreme, word in sides:
        if group:
            r = extreme(group, key=lambda row: row.ratio)
            parts.append(f"{adverb} time than torch in {len(group)} of {len(rows)} rows ({word} "
                         f"to {r.ratio:.2f}x: {r.case} p={_fmt_p(r.norm_type)} {r.mode})")  # fmt: skip
    if unclear := len(rows) - len(faster) - len(slower):
        parts.append(f"no clear difference in {unclear} of {len(rows)} (their [min-max] spans 1)")
    return "Reading: gradclip took " + "; ".join(parts) + "."


def render(result: BenchResult) -> str:
    """The result as a plain-text table, with a one-line reading and what the columns mean.

    Example:
        >>> from gradclip import _bench
        >>> print(_bench.render(_bench.run(["tiny"], [2.0], ["noclip"], reps=1)))
        ... # doctest: +ELLIPSIS, +NORMALIZE_WHITESPACE
        gradclip.clip_grad_norm_ vs torch.nn.utils.clip_grad_norm_, same gradients, interleaved
        gradclip ..., torch ...
        <BLANKLINE>
        case  tensors  elements  p  mode  gradclip  torch  gradclip/torch [min-max]  reps
        ---- ...
        tiny  4  25  2  noclip ... 1
        <BLANKLINE>
        Reading: gradclip took ...
    """
    env = result.env
    out = ["gradclip.clip_grad_norm_ vs torch.nn.utils.clip_grad_norm_, same gradients, "
           "interleaved", f"gradclip {env.get('gradclip')}, torch {env.get('torch')}, "
           f"{env.get('threads')} threads, {env.get('cpus')} CPUs ({env.get('cpu')})", ""]  # fmt: skip
    cells = [("case", "tensors", "elements", "p", "mode", "gradclip", "torch",
              "gradclip/torch [min-max]", "reps")]  # fmt: skip
    cells += [(r.case, f"{r.n_tensors:,}", f"{r.numel:,}", _fmt_p(r.norm_type), r.mode,
               _fmt_time(r.gradclip_s), _fmt_time(r.torch_s),
               f"{r.ratio:.2f} [{r.ratio_min:.2f}-{r.ratio_max:.2f}]", str(r.reps))
              for r in result.rows]  # fmt: skip
    widths = [max(len(row[i]) for row in cells) for i in range(len(cells[0]))]
    lines = ["  ".join(c.ljust(w) if j in (0, 3, 4) else c.rjust(w)
                       for j, (c, w) in enumerate(zip(row, widths, strict=True))).rstrip()
             for row in cells]  # fmt: skip
    out += [lines[0], "  ".join("-" * w for w in widths), *lines[1:], ""]
    if result.rows:
        out.append(_reading(result.rows))
    out.append("gradclip/torch: time per call, below 1 = gradclip faster; [min-max] over the "
               "repetitions (other programs running meanwhile widen it). Times: medians. Cases:")  # fmt: skip
    out += [f"  {c.name:6} {c.description}" for c in CASES.values()
            if any(r.case == c.name for r in result.rows)]  # fmt: skip
    return "\n".join(out)


def to_dict(result: BenchResult) -> dict[str, object]:
    """``result`` as JSON-ready data (an infinite norm type as the string ``"inf"``).

    Example:
        >>> from gradclip import _bench
        >>> _bench.to_dict(_bench.BenchResult([], {}))["kind"]
        'gradclip bench'
    """
    rows = [{**asdict(r), "norm_type": "inf" if math.isinf(r.norm_type) else r.norm_type}
            for r in result.rows]  # fmt: skip
    return {"kind": _KIND, "version": 1, "env": result.env, "rows": rows}


def _written_by_us(path: Path) -> bool:
    if path.stat().st_size > 10_000_000:
        return False
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, ValueError):
        return False
    return isinstance(data, dict) and data.get("kind") == _KIND


def check_json_path(path: Path) -> None:
    """Refuse a JSON output path that would destroy something this command did not write.

    ``path`` may be new (in an existing folder) or a regular file that an earlier
    ``gradclip bench`` wrote; a link, a folder or any other file is refused.

    Raises:
        ValueError: the path cannot be used, with the reason and what to do.

    Example:
        >>> from pathlib import Path
        >>> from gradclip import _bench
        >>> _bench.check_json_path(Path("no-such-folder") / "out.json")
        Traceback (most recent call last):
        ...
        ValueError: folder no-such-folder does not exist; create it or pass another path
    """
    if path.is_symlink():
        raise ValueError(f"{path} is a symbolic link, never written through; pass another path")
    if path.exists():
        if not path.is_file():
            raise ValueError(f"{path} exists and is not a regular file; pass a file path")
        if not _written_by_us(path):
            raise ValueError(f"{path} exists and was not written by gradclip bench; it is "
                             "left untouched: pass another path or remove it yourself")  # fmt: skip
    elif not path.parent.is_dir():
        raise ValueError(f"folder {path.parent} does not exist; create it or pass another path")


def write_json(result: BenchResult, path: Path) -> None:
    """Write ``result`` (:func:`to_dict`) to ``path`` after :func:`check_json_path`, atomically.

    Raises:
        ValueError: see :func:`check_json_path`.
        OSError: the folder cannot be written.
    """
    check_json_path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            json.dump(to_dict(result), f, indent=2)
            f.write("\n")
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise
