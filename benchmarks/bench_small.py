"""Small models: is ``gradclip.clip_grad_norm_`` ever slower than torch's? A ladder of sizes.

A ladder of gradient sets from a 4-4-1 MLP to GPT-2 small (:data:`LADDER`), led by two
overhead rows (one tensor of one element: the cost of a call; 100 such tensors: plus the
cost per tensor). For each model, norm type (2, inf), mode (``noclip``: ``max_norm`` 10x the
norm; ``clip``: 0.98x, every call clips) and ``foreach`` (None, False, True: the argument is
passed to both functions) the harness (:func:`harness.run_grad_set`) times both functions
on the same gradients, interleaved in one process, each repetition in one order and then the
other, with repetitions during foreign CPU load dropped. One thread
(``torch.set_num_threads(1)``) unless ``--threads`` says otherwise: small models are
where the Python around the kernels shows, and one thread keeps the kernels comparable.

``--function`` times another drop-in the same way (:data:`FUNCTIONS`): ``get_total_norm``
(of the gradients, at each norm type) or ``clip_grad_value_`` (at ``clip_value`` = the
``max_norm`` of the row). Neither scales by a norm, so they run the ``noclip`` rows only; in
those no gradient element is changed (``max_norm`` is 10x the total norm, which bounds every
element), while both libraries still run their kernels over every gradient.

Printed: per row the median time per call of each (µs) and gradclip/torch as median
[min-max] over repetitions; then per model the worst and best ratio, and the per-call and
per-tensor overhead from the two overhead rows. ``--out DIR`` also writes
``DIR/small-<date>.txt`` and ``.json`` (``small-<function>-<date>`` for another function; a
suffix ``-2``, ``-3``, ... when they exist).

Example:
    python benchmarks/bench_small.py --out benchmarks/results          # ~5 min, one thread
    python benchmarks/bench_small.py --models mlp-4-4-1 mnist-mlp --foreach none --reps 5
    python benchmarks/bench_small.py --function get_total_norm --out benchmarks/results
"""

from __future__ import annotations

import argparse
import datetime
import functools
import json
import math
import sys
import time
import types
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

import gradclip
import harness
from cases import GradSet, NamedShapes, gpt2_shapes, make_grad_set, mlp_shapes
from render import free_prefix, jsonable, table

__all__ = ["FOREACH", "FUNCTIONS", "LADDER", "Model", "SmallRecord", "main", "render", "run"]


@dataclass(frozen=True)
class Model:
    """A rung of the ladder: a name, what it is, its parameter shapes."""

    name: str
    description: str
    shapes: NamedShapes


def _overhead(n: int) -> NamedShapes:
    return [(f"t{i}", (1,)) for i in range(n)]


LADDER: tuple[Model, ...] = (
    Model("overhead-1", "1 tensor of 1 element: the cost of a call", _overhead(1)),
    Model("overhead-100", "100 tensors of 1 element: + the cost per tensor", _overhead(100)),
    Model("mlp-4-4-1", "MLP 4-4-1", mlp_shapes(4, 4, 1)),
    Model("mlp-6x128", "six Linear(128, 128) layers", mlp_shapes(*[128] * 7)),
    Model("mnist-mlp", "MNIST MLP 784-256-10", mlp_shapes(784, 256, 10)),
    Model("gpt-128x2", "GPT-2 layout, d=128, 2 layers, vocab 1000", gpt2_shapes(1000, 128, 128, 2)),
    Model("gpt-256x4", "GPT-2 layout, d=256, 4 layers, vocab 8192", gpt2_shapes(8192, 256, 256, 4)),
    Model("gpt2", "GPT-2 small", gpt2_shapes()),
)
"""The gradient sets, smallest first; float32 gradients ~ N(0, 1e-3²), seeded."""

FOREACH: dict[str, bool | None] = {"none": None, "false": False, "true": True}


@dataclass(frozen=True)
class SmallRecord:
    """One harness record and the ``foreach`` both functions were called with."""

    foreach: bool | None
    record: harness.BenchRecord


def _total_norm(module: types.ModuleType, params: list, max_norm: float, p: float,
                foreach: bool | None = None) -> torch.Tensor:
    """``get_total_norm`` of the gradients (``max_norm`` unused): the harness reads the norm."""
    return module.get_total_norm([q.grad for q in params if q.grad is not None], p,
                                 foreach=foreach)  # fmt: skip


def _value_clip(module: types.ModuleType, params: list, max_norm: float, p: float,
                foreach: bool | None = None, *, norm: torch.Tensor) -> torch.Tensor:
    """``clip_grad_value_`` at ``clip_value=max_norm``; returns the gradients' norm, which a
    noclip row leaves unchanged (the harness reads it)."""
    module.clip_grad_value_(params, max_norm, foreach=foreach)
    return norm


FUNCTIONS = ("clip_grad_norm_", "get_total_norm", "clip_grad_value_")
"""The drop-ins the ladder can time (``--function``)."""


def _pair(function: str, gs: GradSet) -> tuple[harness.ClipFn, harness.ClipFn]:
    """(gradclip's, torch's) ``function`` as the harness calls it: ``fn(params, max_norm, p,
    foreach=...)`` returning the gradients' total norm before any clip."""
    if function == "clip_grad_norm_":
        return gradclip.clip_grad_norm_, torch.nn.utils.clip_grad_norm_
    if function == "get_total_norm":
        return (functools.partial(_total_norm, gradclip),
                functools.partial(_total_norm, torch.nn.utils))  # fmt: skip
    norm = torch.nn.utils.get_total_norm([q.grad for q in gs.params if q.grad is not None])
    return (functools.partial(_value_clip, gradclip, norm=norm),
            functools.partial(_value_clip, torch.nn.utils, norm=norm))  # fmt: skip


def _with_foreach(fn: harness.ClipFn, foreach: bool | None) -> harness.ClipFn:
    return functools.partial(fn, foreach=foreach)


def _foreach_works(foreach: bool | None, gs: GradSet) -> bool:
    """``foreach=True`` raises where the device has no foreach kernels: skip it there."""
    try:
        torch.nn.utils.clip_grad_norm_(gs.params, 1e9, foreach=foreach)
    except RuntimeError:
        return False
    return True


def run(models: list[Model], foreach: list[bool | None], cfg: harness.BenchConfig,
        progress: harness.Progress, function: str = "clip_grad_norm_") -> list[SmallRecord]:  # fmt: skip
    """Every model x foreach x norm type x mode of ``cfg``, in that order, for ``function``."""
    out = []
    for model in models:
        gs = make_grad_set(model.name, model.shapes, torch.float32)
        ours, theirs = _pair(function, gs)
        for f in foreach:
            if not _foreach_works(f, gs):
                progress(f"{model.name}: foreach={f} unsupported here, skipped")
                continue
            records, _ = harness.run_grad_set(
                gs, cfg, lambda line, f=f: progress(f"{line} foreach={f}"),
                ours=_with_foreach(ours, f), theirs=_with_foreach(theirs, f),
            )  # fmt: skip
            out += [SmallRecord(f, r) for r in records]
    return out


def _us(ms: float) -> str:
    return f"{ms * 1e3:,.1f}"


def _overheads(records: list[SmallRecord]) -> list[str]:
    """Per-call and per-tensor cost of each, from the two overhead rows (p=2, noclip)."""
    pick = {
        r.record.case: r.record
        for r in records
        if r.foreach is None and r.record.norm_type == 2.0 and r.record.mode == "noclip"
    }
    one, many = pick.get("overhead-1"), pick.get("overhead-100")
    if one is None:
        return []
    lines = [
        f"Per call (1 tensor of 1 element, p=2, no clip, foreach=None): torch "
        f"{_us(one.torch_ms)} us, gradclip {_us(one.ours_ms)} us "
        f"({_us(abs(one.ours_ms - one.torch_ms))} us "
        f"{'more' if one.ours_ms > one.torch_ms else 'less'})."
    ]
    if many is not None:
        per = [(m - o) / 99 for m, o in ((many.torch_ms, one.torch_ms), (many.ours_ms, one.ours_ms))]
        lines.append(
            f"Per extra tensor (100 tensors vs 1): torch {_us(per[0])} us, "
            f"gradclip {_us(per[1])} us."
        )
    return lines


_HEADER = ["model", "p", "mode", "foreach", "tensors", "params", "torch us", "gradclip us",
           "gradclip/torch [min-max]", "reps"]  # fmt: skip


def render(records: list[SmallRecord], env: dict[str, str], models: list[Model],
           function: str = "clip_grad_norm_") -> str:  # fmt: skip
    """The table of every row, a per-model summary and the overhead lines."""
    rows = []
    for s in records:
        r = s.record
        rows.append([
            r.case, harness.fmt_p(r.norm_type), r.mode, str(s.foreach), f"{r.n_tensors:,}",
            f"{r.numel:,}", _us(r.torch_ms), _us(r.ours_ms),
            f"{r.ratio:.2f} [{r.ratio_min:.2f}-{r.ratio_max:.2f}]",
            f"{r.reps_used}/{r.reps_run}" + ("" if r.quiet else " noisy"),
        ])  # fmt: skip
    out = [
        f"gradclip.{function} vs torch.nn.utils.{function} on small to GPT-2-small "
        "gradient sets (same gradients, interleaved)",
        f"gradclip {env['gradclip']} ({env.get('commit', '?')}), torch {env['torch']}, "
        f"{env['threads']} thread(s), {env['cpus']} CPUs ({env['cpu']}), wall {env['wall']} s",
        "",
        *table(_HEADER, rows),
        "",
        "Per model, over its rows: the largest and smallest median gradclip/torch.",
    ]
    summary = []
    for model in models:
        mine = [s for s in records if s.record.case == model.name]
        if not mine:
            continue
        worst = max(mine, key=lambda s: s.record.ratio)
        best = min(mine, key=lambda s: s.record.ratio)
        summary.append([
            model.name, f"{mine[0].record.numel:,}", model.description,
            f"{worst.record.ratio:.2f} ({_variant(worst)})",
            f"{best.record.ratio:.2f} ({_variant(best)})",
        ])  # fmt: skip
    out += table(["model", "params", "what", "largest", "smallest"], summary)
    slower = [s for s in records if s.record.ratio > 1]
    out += [
        "",
        f"Median gradclip/torch above 1 (gradclip slower) in {len(slower)} of {len(records)} "
        f"rows; their [min-max] lies wholly above 1 in "
        f"{sum(s.record.ratio_min > 1 for s in slower)}.",
        *_overheads(records),
        "Times: median per call, in microseconds; ratios: median [min-max] of per-repetition "
        "pairs; reps: used/run (repetitions under foreign CPU load dropped; 'noisy': too few "
        "quiet ones, all used).",
    ]
    return "\n".join(out)


def _variant(s: SmallRecord) -> str:
    return f"p={harness.fmt_p(s.record.norm_type)} {s.record.mode} foreach={s.foreach}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--function", choices=FUNCTIONS, default=FUNCTIONS[0],
                        help="the drop-in to time (default clip_grad_norm_; the others: noclip rows)")
    parser.add_argument("--models", nargs="+", choices=[m.name for m in LADDER], metavar="M",
                        help=f"any of {', '.join(m.name for m in LADDER)} (default: all)")
    parser.add_argument("--foreach", nargs="+", choices=list(FOREACH), default=list(FOREACH),
                        help="foreach values passed to both (default: none false true)")
    parser.add_argument("--norm-types", nargs="+", type=float, choices=[2.0, math.inf],
                        default=[2.0, math.inf], metavar="P", help="2 and/or inf (default: both)")
    parser.add_argument("--modes", nargs="+", choices=list(harness.MODES),
                        default=list(harness.MODES), help="default: both")
    parser.add_argument("--reps", type=int, default=7, help="quiet repetitions per row (>= 1)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    parser.add_argument("--rep-seconds", type=float, default=0.1,
                        help="a repetition repeats short calls until it lasts this long")  # fmt: skip
    parser.add_argument("--out", type=Path, metavar="DIR",
                        help="also write DIR/small-<date>.txt and .json")  # fmt: skip
    args = parser.parse_args(argv)
    if args.reps < 1 or args.threads < 1:
        parser.error(f"--reps and --threads must be >= 1, got {args.reps} and {args.threads}")
    if args.out is not None and not args.out.is_dir():
        parser.error(f"--out {args.out}: not a folder; create it or pass another")
    torch.set_num_threads(args.threads)
    if args.function != "clip_grad_norm_":
        if args.modes != list(harness.MODES) and "clip" in args.modes:
            parser.error(f"--function {args.function} does not clip by a norm: noclip rows only")
        args.modes = ["noclip"]
        if args.function == "clip_grad_value_":
            args.norm_types = [2.0]  # no norm type: one row per model and foreach
    models = [m for m in LADDER if args.models is None or m.name in args.models]
    foreach = [FOREACH[f] for f in args.foreach]
    # short calls repeat until a repetition lasts --rep-seconds, so the load accounting sees it
    cfg = harness.BenchConfig(cases=(), norm_types=tuple(args.norm_types),
                              modes=tuple(args.modes), reps=args.reps,
                              min_rep_seconds=args.rep_seconds, max_calls_per_rep=5000)  # fmt: skip
    start = time.perf_counter()
    records = run(models, foreach, cfg, lambda line: print(line, file=sys.stderr, flush=True),
                  args.function)  # fmt: skip
    env = {**harness.env(), "commit": harness.commit(), "wall": f"{time.perf_counter() - start:.0f}"}
    text = render(records, env, models, args.function)
    print(text)
    if args.out is not None:
        name = "small" if args.function == "clip_grad_norm_" else f"small-{args.function}"
        prefix = free_prefix(args.out, f"{name}-{datetime.date.today().isoformat()}")
        Path(f"{prefix}.txt").write_text(text + "\n")
        described = [{"name": m.name, "description": m.description} for m in models]
        data = {"env": env, "function": args.function, "config": asdict(cfg), "models": described,
                "records": [{"foreach": s.foreach, **asdict(s.record)} for s in records]}  # fmt: skip
        Path(f"{prefix}.json").write_text(json.dumps(jsonable(data), indent=1) + "\n")
        print(f"wrote {prefix}.txt and .json", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
