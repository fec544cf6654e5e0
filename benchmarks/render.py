"""Print a :class:`records.BenchResult`: a plain-text table (:func:`render`) or JSON (:func:`to_json`).

The table shows each measurement against the project's targets (:mod:`targets`): this is the
development view of ``bench_clip.py``.

Example:
    >>> import harness, render
    >>> "records" in render.to_json(harness.BenchResult([], [], harness.BenchConfig()))
    True
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict
from pathlib import Path

from records import BenchResult, fmt_p
from targets import TARGETS, check_targets

__all__ = ["free_prefix", "jsonable", "render", "table", "to_dict", "to_json"]


def jsonable(value: object) -> object:
    """``value`` with non-finite floats as strings ("inf", "nan": JSON has no literal for them).

    Example:
        >>> import render
        >>> render.jsonable({"p": [2.0, float("inf")]})
        {'p': [2.0, 'inf']}
    """
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if isinstance(value, dict):
        return {k: jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [jsonable(v) for v in value]
    return value


def to_dict(result: BenchResult) -> dict[str, object]:
    """``result`` as plain JSON-ready data (non-finite floats as strings), with target checks.

    Example:
        >>> import harness, render
        >>> sorted(render.to_dict(harness.BenchResult([], [], harness.BenchConfig())))
        ['accuracy', 'config', 'env', 'records', 'targets', 'wall_seconds']
    """
    checks = [{**asdict(c.target), "value": c.value, "met": c.met} for c in check_targets(result)]
    data = {**asdict(result), "targets": checks}
    return jsonable(data)  # type: ignore[return-value]


def to_json(result: BenchResult) -> str:
    """``result`` as an indented JSON document (see :func:`to_dict`)."""
    return json.dumps(to_dict(result), indent=2)


def free_prefix(folder: Path, stem: str) -> Path:
    """``folder/stem``, or ``stem-2``, ``stem-3``, ...: never an existing result file."""
    n = 1
    while True:
        prefix = folder / (stem if n == 1 else f"{stem}-{n}")
        if not any(Path(f"{prefix}{ext}").exists() for ext in (".txt", ".json")):
            return prefix
        n += 1


def table(header: list[str], rows: list[list[str]]) -> list[str]:
    """Lines of a plain-text table: the first three columns left-aligned, the rest right."""
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]

    def line(cells: list[str]) -> str:
        return "  ".join(
            c.ljust(w) if i < 3 else c.rjust(w)
            for i, (c, w) in enumerate(zip(cells, widths, strict=True))
        ).rstrip()

    return [line(header), line(["-" * w for w in widths]), *map(line, rows)]


def render(result: BenchResult) -> str:
    """A plain-text report: timings, accuracy and targets.

    Example:
        >>> import harness, render
        >>> print(render.render(harness.BenchResult([], [], harness.BenchConfig())).splitlines()[0])
        gradclip.clip_grad_norm_ vs torch.nn.utils.clip_grad_norm_ (same gradients, interleaved)
    """
    env = result.env
    out = [
        "gradclip.clip_grad_norm_ vs torch.nn.utils.clip_grad_norm_ (same gradients, interleaved)",
    ]
    if env:
        out.append(
            f"gradclip {env.get('gradclip')}, torch {env.get('torch')}, "
            f"{env.get('threads')} threads, {env.get('cpus')} CPUs ({env.get('cpu')}), "
            f"wall {result.wall_seconds:.1f} s"
        )
    out.append("")
    targets = {(t.case, t.norm_type, t.mode): t.limit for t in TARGETS if t.metric == "ratio"}
    rows = []
    for r in result.records:
        limit = targets.get((r.case, r.norm_type, r.mode))
        verdict = "" if limit is None else f"<={limit:g} " + ("ok" if r.ratio <= limit else "MISS")
        rows.append(
            [
                r.case,
                fmt_p(r.norm_type),
                r.mode,
                f"{r.ours_ms:.2f}",
                f"{r.torch_ms:.2f}",
                f"{r.floor_ms:.2f}",
                f"{r.ratio:.2f} [{r.ratio_min:.2f}-{r.ratio_max:.2f}]",
                f"{r.ours_x_floor:.1f}x",
                f"{r.torch_x_floor:.1f}x",
                f"{r.reps_used}/{r.reps_run}" + ("" if r.quiet else " noisy"),
                verdict,
            ]
        )
    out += table(
        [
            "case",
            "p",
            "mode",
            "ours ms",
            "torch ms",
            "floor ms",
            "ours/torch [min-max]",
            "ours/floor",
            "torch/floor",
            "reps",
            "target",
        ],
        rows,
    )
    if result.accuracy:
        out += ["", "Returned norm, relative error vs float64:"]
        out += table(
            ["case", "p", "dtype", "ours", "torch"],
            [
                [
                    a.case,
                    fmt_p(a.norm_type),
                    a.dtype,
                    f"{a.ours_rel_err:.1e}",
                    f"{a.torch_rel_err:.1e}",
                ]
                for a in result.accuracy
            ],
        )
    checks = check_targets(result)
    measured = [c for c in checks if c.value is not None]
    if measured:
        missed = [c for c in measured if not c.met]
        out += ["", f"Targets: {len(measured) - len(missed)}/{len(measured)} met."]
        for c in missed:
            t = c.target
            what = f"{t.mode} ours/torch" if t.metric == "ratio" else "norm rel. error"
            out.append(
                f"  MISS {t.case} p={fmt_p(t.norm_type)} {what}: {c.value:.3g} > {t.limit:g}"
            )
    out += [
        "",
        "Times: median ms per call; ratios: median [min-max] of per-repetition pairs; "
        "floor: one torch.sum over the same bytes.",
        "reps: used/run (repetitions with foreign CPU load dropped; 'noisy': too few quiet "
        "ones, all used).",
    ]
    return "\n".join(out)
