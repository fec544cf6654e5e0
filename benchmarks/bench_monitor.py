"""Cost of monitoring: ``GradMonitor(NormClip)`` vs the same ``NormClip`` unmonitored, and the
time of ``gradclip report`` on a 10,000-step log.

The step benchmark reuses :func:`harness.run_grad_set` (GPT-2 and ResNet-50 gradient
sets from :data:`cases.CASES`; both variants on the same gradients, interleaved, in
alternating order; quiet repetitions; median of per-repetition ratios). Its "ours" is the
monitored clipper (per-layer norms at the owning module, a JSON lines log in a temporary
directory, a flush every 100 steps), its "torch" column the plain clipper. Target: ratio
<= 1.10.

Example:
    python benchmarks/bench_monitor.py
    python benchmarks/bench_monitor.py --cases resnet50 --reps 5 --report-steps 0
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

import gradclip
import harness
from cases import CASES, gpt2_shapes, make_grad_set
from gradclip.sinks import encode_record
from render import jsonable

TARGET = 1.10


def clip_fn(names: list[str], log_dir: str | None, every: int):
    """``fn(params, max_norm, norm_type) -> norm``: NormClip, monitored when ``log_dir``."""
    clippers: dict[float, tuple[gradclip.NormClip, gradclip.GradMonitor | None]] = {}

    def fn(params, max_norm, norm_type):
        if norm_type not in clippers:
            clipper = gradclip.NormClip(1.0, norm_type)
            monitor = None
            if log_dir is not None:
                log = Path(log_dir) / f"p{norm_type}.jsonl"
                monitor = gradclip.GradMonitor(clipper, log=log, every=every)
            clippers[norm_type] = (clipper, monitor)
        clipper, monitor = clippers[norm_type]
        clipper.max_norm = max_norm  # the benchmark re-anchors max_norm every call
        named = list(zip(names, params, strict=True))
        return (monitor(named) if monitor is not None else clipper(named)).norm

    return fn


def bench_steps(args: argparse.Namespace) -> list[harness.BenchRecord]:
    cfg = harness.BenchConfig(cases=tuple(args.cases), norm_types=tuple(args.norm_types),
                            reps=args.reps)  # fmt: skip
    records = []
    with tempfile.TemporaryDirectory() as log_dir:
        for case in args.cases:
            print(f"building {case}: {CASES[case].description}", file=sys.stderr)
            names = [name for name, _ in CASES[case].shapes()]
            gs = make_grad_set(case)
            monitored = clip_fn(names, log_dir, args.every)
            plain = clip_fn(names, None, args.every)
            progress = lambda line: print(line, file=sys.stderr, flush=True)  # noqa: E731
            recs, _ = harness.run_grad_set(gs, cfg, progress, ours=monitored, theirs=plain)
            records += recs
            del gs
    return records


def time_record(case: str, every: int, calls: int = 500) -> tuple[float, float]:
    """Mean time of one ``GradMonitor.record`` alone (flushes included) and of one plain
    clip, in ms, on the same gradients: the monitor's absolute cost, less exposed to noise."""
    names = [name for name, _ in CASES[case].shapes()]
    gs = make_grad_set(case)
    named = list(zip(names, gs.params, strict=True))
    clipper = gradclip.NormClip(1e9)
    clips = []
    for _ in range(5):
        start = time.perf_counter()
        stats = clipper(named)
        clips.append(time.perf_counter() - start)
    with tempfile.TemporaryDirectory() as tmp:
        monitor = gradclip.GradMonitor(log=Path(tmp) / "run.jsonl", every=every)
        monitor.record(stats)  # builds the group index and buffers
        start = time.perf_counter()
        for _ in range(calls):
            monitor.record(stats, loss=1.0)
        monitor.flush()
        record_ms = 1e3 * (time.perf_counter() - start) / calls
        monitor.close()
    return record_ms, 1e3 * sorted(clips)[len(clips) // 2]


def layer_names() -> list[str]:
    return sorted({gradclip.monitor.layer_name(n) for n, _ in gpt2_shapes()})


def time_report(steps: int) -> float:
    """Write a GPT-2-shaped log of ``steps`` steps, then time ``gradclip report`` on it."""
    rng = random.Random(0)
    names = layer_names()
    with tempfile.TemporaryDirectory() as tmp:
        log = Path(tmp) / "run.jsonl"
        with log.open("w") as f:
            for step in range(steps):
                norm = math.exp(rng.gauss(0, 0.2)) * (30 if rng.random() < 0.01 else 1)
                coef = min(1.0, 0.1 / (norm + 1e-6))
                f.write(encode_record({
                    "schema": 1, "step": step, "time": time.time(), "norm_type": 2.0,
                    "norm": norm, "post_norm": norm * coef, "threshold": 0.1, "coef": coef,
                    "clipped": coef < 1, "finite": True, "skipped": False,
                    "layers": {n: norm * rng.random() / 5 for n in names},
                    "extra": {"loss": 1 / (step + 1)},
                }))  # fmt: skip
        size = log.stat().st_size
        start = time.perf_counter()
        subprocess.run([sys.executable, "-m", "gradclip", "report", str(log), "-o",
                        str(Path(tmp) / "out")], check=True, stdout=subprocess.DEVNULL)  # fmt: skip
        elapsed = time.perf_counter() - start
    print(f"gradclip report: {steps} steps x {len(names)} layers ({size / 1e6:.0f} MB log): "
          f"{elapsed:.1f} s (target < 20 s)")  # fmt: skip
    return elapsed


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cases", nargs="+", default=["gpt2", "resnet50"], choices=list(CASES))
    parser.add_argument("--norm-types", nargs="+", type=float, default=[2.0, math.inf])
    parser.add_argument("--reps", type=int, default=9)
    parser.add_argument("--every", type=int, default=100, help="monitor flush interval")
    parser.add_argument("--report-steps", type=int, default=10_000, help="0: skip the report timing")
    parser.add_argument("--json", type=Path, help="also write the results as JSON")
    parser.add_argument("--threads", type=int, help="torch.set_num_threads (default: torch's)")
    args = parser.parse_args()
    if args.threads is not None:
        torch.set_num_threads(args.threads)

    records = bench_steps(args)
    print(f"GradMonitor(NormClip) vs NormClip, same gradients, interleaved; torch "
          f"{torch.__version__}, {torch.get_num_threads()} threads, {os.cpu_count()} CPUs "
          "(shared machine: medians)")  # fmt: skip
    header = f"{'case':<10} {'p':>4} {'mode':<7} {'plain ms':>9} {'monitored ms':>13} {'ratio [range]':>22}  reps"
    print(header)
    print("-" * len(header))
    for r in records:
        verdict = "ok" if r.ratio <= TARGET else "MISS"
        print(f"{r.case:<10} {harness.fmt_p(r.norm_type):>4} {r.mode:<7} {r.torch_ms:>9.2f} "
              f"{r.ours_ms:>13.2f} {f'{r.ratio:.3f} [{r.ratio_min:.2f}-{r.ratio_max:.2f}]':>22}  "
              f"{r.reps_used}/{r.reps_run}{'' if r.quiet else ' noisy'}  <={TARGET} {verdict}")  # fmt: skip
    for case in args.cases:
        record_ms, clip_ms = time_record(case, args.every)
        print(f"{case}: record() {1e3 * record_ms:.0f} us/step (flushes included) vs plain clip "
              f"{clip_ms:.2f} ms: {record_ms / clip_ms:.2%} of a step")  # fmt: skip
    report_s = time_report(args.report_steps) if args.report_steps else None
    if args.json is not None:
        args.json.write_text(json.dumps({
            "records": [jsonable(vars(r)) for r in records], "report_seconds": report_s,
        }, indent=2) + "\n")  # fmt: skip
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
