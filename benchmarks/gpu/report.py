"""The GPU benchmark's output: the table, the issue's targets checked against the rows, the files.

A result is the dict ``bench_gpu.run`` builds (environment, copy bandwidth, one dict per row);
:func:`check_targets` reads only that, so a saved ``bench_gpu.json`` can be checked again.

Example:
    >>> from gpu import report
    >>> row = {"set": "gpt2", "op": "norm", "mode": "-", "variant": "gradclip", "of_copy": 0.9,
    ...        "gbps": 3900.0, "median_ms": 0.13, "error": ""}
    >>> result = {"rows": [row], "smoke": False, "skipped": {},
    ...           "sets": {"gpt2": {"large": True, "step": False}}}
    >>> [(c["set"], c["verdict"]) for c in report.check_targets(result)][:1]
    [('gpt2', 'met')]
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

__all__ = ["GOALS", "check_targets", "progress", "render", "write"]

GOALS = {
    "norm_of_copy": 0.85,  # the norm pass, as a fraction of the copy bandwidth (large sets)
    "fold_vs_eager": 0.85,  # gradclip's clip + fused AdamW, over torch eager's
    "fold_vs_compile": 1.0,  # ... over torch.compile(clip + step)
    "small_vs_torch": 1.0,  # 10,000 small tensors: gradclip's clip time over torch's
}
SMOKE = "CPU SMOKE RUN, NOT A GPU FIGURE: toy sets on the CPU, proving the script runs end to end"


def _f(value: Any) -> float:
    return math.nan if value is None else float(value)


def _find(rows: list[dict], set_: str, op: str, mode: str, variant: str) -> dict | None:
    for r in rows:
        if (r["set"], r["op"], r["mode"], r["variant"]) == (set_, op, mode, variant):
            return r
    return None


def _verdict(measured: float, goal: float, below: bool = True) -> str:
    if math.isnan(measured):
        return "not measured"
    return "met" if (measured <= goal if below else measured >= goal) else "missed"


def check_targets(result: dict) -> list[dict]:
    """The issue's targets, each with the measured figure and a verdict (met / missed / not
    measured); a CPU smoke run's verdicts say that they are not GPU figures."""
    rows, sets = result["rows"], result["sets"]
    checks: list[dict] = []

    def add(target: str, set_: str, mode: str, measured: float, goal: float, detail: str,
            below: bool = True) -> None:
        verdict = _verdict(measured, goal, below)
        if result.get("smoke"):
            verdict += " (CPU smoke, not a GPU figure)"
        checks.append({"target": target, "set": set_, "mode": mode, "measured": measured,
                       "goal": goal, "verdict": verdict, "detail": detail})

    for name, info in sets.items():
        if not info.get("large"):
            continue
        ours, theirs = (_find(rows, name, "norm", "-", v) for v in ("gradclip", "torch"))
        detail = " / ".join(
            f"{label} {_f(r and r.get('gbps')):.0f} GB/s ({_f(r and r.get('of_copy')):.0%})"
            for label, r in (("gradclip", ours), ("torch", theirs)))
        add("norm pass >= 85% of copy bandwidth", name, "-", _f(ours and ours.get("of_copy")),
            GOALS["norm_of_copy"], detail, below=False)
    for name, info in sets.items():
        if not info.get("step"):
            continue
        for mode in ("noclip", "clip"):
            fold = _find(rows, name, "step", mode, "gradclip")
            eager = _find(rows, name, "step", mode, "torch")
            detail = (f"gradclip {_f(fold and fold.get('median_ms')):.3f} ms, torch eager "
                      f"{_f(eager and eager.get('median_ms')):.3f} ms (paired median)")
            add("clip + fused AdamW <= 0.85x torch eager", name, mode,
                _f(fold and fold.get("ratio")), GOALS["fold_vs_eager"], detail)
            for variant in ("torch-compile", "torch-compile-one"):
                other = _find(rows, name, "step", mode, variant)
                ratio = math.nan
                if fold and other and not other.get("error") and _f(other.get("median_ms")) > 0:
                    ratio = _f(fold.get("median_ms")) / _f(other.get("median_ms"))
                why = (other or {}).get("error") or f"{variant} {_f(other and other.get('median_ms')):.3f} ms"
                add(f"clip + fused AdamW <= {variant}", name, mode, ratio,
                    GOALS["fold_vs_compile"], why)
    for name, info in sets.items():
        if info.get("large") or info.get("step"):
            continue
        for mode in ("noclip", "clip"):
            ours, theirs = (_find(rows, name, "clip", mode, v) for v in ("gradclip", "torch"))
            k_ours, k_theirs = (_f(r and r.get("launches")) for r in (ours, theirs))
            d_ours, d_theirs = (_f(r and r.get("kernels")) for r in (ours, theirs))
            launch = k_ours / k_theirs if k_theirs > 0 else math.nan
            add("small tensors: launches below torch's", name, mode, launch, 1.0 - 1e-9,
                f"gradclip {k_ours:.0f}, torch {k_theirs:.0f} launch calls per call "
                f"({d_ours:.0f} / {d_theirs:.0f} device kernels and copies)")
            add("small tensors: time below torch's", name, mode, _f(ours and ours.get("ratio")),
                GOALS["small_vs_torch"] - 1e-9,
                f"gradclip {_f(ours and ours.get('median_ms')):.3f} ms, torch "
                f"{_f(theirs and theirs.get('median_ms')):.3f} ms")
    for name, why in result.get("skipped", {}).items():
        checks.append({"target": "(set not measured)", "set": name, "mode": "-",
                       "measured": math.nan, "goal": math.nan, "verdict": "not measured",
                       "detail": why})
    return checks


def progress(rows: list) -> str:
    """One stderr line per measured (set, op, mode)."""
    parts = []
    for r in rows:
        r = r if isinstance(r, dict) else vars(r)
        parts.append(f"{r['variant']}={'ERR' if r['error'] else format(_f(r['median_ms']), '.3f')}")
    first = rows[0] if isinstance(rows[0], dict) else vars(rows[0])
    return f"  {first['set']} {first['op']} {first['mode']}: " + " ".join(parts) + " ms"


def _num(value: Any, fmt: str) -> str:
    value = _f(value)
    return "-" if math.isnan(value) else format(value, fmt)


def render(result: dict) -> str:
    """The text report: environment, copy bandwidth, one line per row, the targets."""
    env, copy = result["environment"], result["copy"]
    lines = []
    if result.get("smoke"):
        lines += [SMOKE, ""]
    lines.append(f"gradclip GPU benchmark: {env.get('name')} ({env.get('device')}), torch "
                 f"{env.get('torch')}, CUDA {env.get('cuda')}, {env.get('date')}")
    if env.get("sms"):
        lines.append(f"  {env['sms']} SMs, {env['memory_gib']} GiB, L2 {env['l2_bytes'] / 2**20:.0f} "
                     f"MiB, compute capability {env['capability']}")
    lines.append(f"copy bandwidth: {copy['gbps']:.0f} GB/s (bytes read + written, "
                 f"{copy['bytes'] / 2**30:.2f} GiB per copy, {copy['median_ms']:.3f} ms)")
    for name, info in result["sets"].items():
        lines.append(f"  {name}: {info['description']}")
    header = (f"{'set':<13}{'op':<5}{'mode':<7}{'variant':<18}{'ms':>9} {'[min-max]':<17}"
              f"{'vs torch [min-max]':<22}{'GB/s':>7}{'copy':>6}{'kern':>7}{'launch':>7}{'1st s':>7}  notes")
    lines += ["", header, "-" * len(header)]
    for r in result["rows"]:
        if r["error"]:
            lines.append(f"{r['set']:<13}{r['op']:<5}{r['mode']:<7}{r['variant']:<18}  "
                         f"failed: {r['error']}")
            continue
        spread = f"[{_num(r['min_ms'], '.3f')}-{_num(r['max_ms'], '.3f')}]"
        ratio = (f"{_num(r['ratio'], '.2f')} [{_num(r['ratio_min'], '.2f')}-"
                 f"{_num(r['ratio_max'], '.2f')}]") if r["variant"] != "torch" else ""
        notes = "; ".join([*r["notes"], *([f"{r['graphs']} graphs"] if r["graphs"] else [])])
        lines.append(
            f"{r['set']:<13}{r['op']:<5}{r['mode']:<7}{r['variant']:<18}"
            f"{_num(r['median_ms'], '.3f'):>9} {spread:<17}{ratio:<22}{_num(r['gbps'], '.0f'):>7}"
            f"{_num(r['of_copy'], '.0%'):>6}{r['kernels'] if r['kernels'] is not None else '-':>7}"
            f"{r.get('launches') if r.get('launches') is not None else '-':>7}"
            f"{_num(r['first_call_s'], '.1f'):>7}  {notes}")
    lines += ["", "targets (issue 14), measured on this run:"]
    for c in result.get("targets", []):
        lines.append(f"  [{c['verdict']}] {c['target']} - {c['set']} {c['mode']}: measured "
                     f"{_num(c['measured'], '.3f')} (goal {_num(c['goal'], '.2f')}); {c['detail']}")
    for name, why in result.get("skipped", {}).items():
        lines.append(f"  skipped {name}: {why}")
    if result.get("smoke"):
        lines += ["", SMOKE]
    return "\n".join(lines)


def _clean(value: Any) -> Any:
    """NaN and inf as null: the JSON stays standard."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _clean(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_clean(v) for v in value]
    if isinstance(value, Path):
        return str(value)
    return value


def write(result: dict, out: Path | None) -> None:
    """``bench_gpu.json`` and ``bench_gpu.txt`` in ``out`` (created); nothing when None."""
    if out is None:
        return
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "bench_gpu.json").write_text(json.dumps(_clean(result), indent=1) + "\n")
    (out / "bench_gpu.txt").write_text(render(result) + "\n")
