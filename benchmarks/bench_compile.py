"""The compiled "clip + optimizer step" recipe against eager and against torch, on the CPU.

One clip and one AdamW step per call, on the same gradients (restored before each call), for:

* ``torch eager``: ``torch.nn.utils.clip_grad_norm_`` then ``AdamW(fused=True).step()``;
* ``torch compiled``: the same two lines, each compiled (``optimizer.step`` breaks any
  enclosing graph on purpose, so torch's advice is to compile it on its own);
* ``gradclip eager``: ``NormClip(...).step(model, AdamW(fused=True))`` (the clip folded into
  the fused kernel);
* ``gradclip compiled``: the README recipe: ``torch.compile(clipper, fullgraph=True)`` and a
  separately compiled ``optimizer.step`` (torch's step breaks any enclosing graph on purpose).

Repetitions are interleaved (the order rotates every repetition); the table gives the median
per-call time and its ratio to torch eager. Run: ``python benchmarks/bench_compile.py [--out DIR]``.
"""

from __future__ import annotations

import argparse
import datetime
import itertools
import json
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

import gradclip

HIDDEN = (512, 512, 512, 512)
MAX_NORM = 0.5  # below the gradients' norm: every call clips


def _model() -> torch.nn.Module:
    torch.manual_seed(0)
    sizes = (256, *HIDDEN, 10)
    layers = [torch.nn.Linear(a, b) for a, b in itertools.pairwise(sizes)]
    return torch.nn.Sequential(*layers)


def _setup(name: str):
    model = _model()
    x = torch.randn(64, 256, generator=torch.Generator().manual_seed(1))
    model(x).pow(2).sum().backward()
    grads = [p.grad.clone() for p in model.parameters()]
    # fused everywhere: torch 2.13 cannot compile the CPU foreach AdamW step of this model
    # ("Expected scalars to be on CPU, got meta" in _foreach_addcdiv_)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)
    clipper = gradclip.NormClip(MAX_NORM)

    def restore() -> None:
        for p, g in zip(model.parameters(), grads, strict=True):
            p.grad.copy_(g)

    if name == "torch eager":
        def call() -> None:
            torch.nn.utils.clip_grad_norm_(model.parameters(), MAX_NORM)
            opt.step()
    elif name == "torch compiled":
        clip_t = torch.compile(lambda: torch.nn.utils.clip_grad_norm_(model.parameters(), MAX_NORM),
                               fullgraph=True)
        step_t = torch.compile(opt.step)

        def call() -> None:
            clip_t()
            step_t()
    elif name == "gradclip eager":
        def call() -> None:
            clipper.step(model, opt)
    else:
        clip = torch.compile(lambda: clipper(model), fullgraph=True)
        step = torch.compile(opt.step)

        def call() -> None:
            clip()
            step()
    restore()
    clipper(model)  # warm-up: the clipper's state on the device (the recipe's first step)
    restore()
    opt.step()
    return call, restore


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reps", type=int, default=15)
    parser.add_argument("--calls", type=int, default=20, help="calls per repetition")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", type=Path, help="folder for compile-<date>.txt/.json")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    names = ["torch eager", "torch compiled", "gradclip eager", "gradclip compiled"]
    print("compiling (first calls)...", file=sys.stderr)
    setups = {}
    for name in names:
        call, restore = _setup(name)
        for _ in range(3):  # compile and warm up
            restore()
            call()
        setups[name] = (call, restore)
    times: dict[str, list[float]] = {n: [] for n in names}
    for rep in range(args.reps):
        order = names[rep % len(names):] + names[: rep % len(names)]
        for name in order:
            call, restore = setups[name]
            total = 0.0
            for _ in range(args.calls):
                restore()
                start = time.perf_counter()
                call()
                total += time.perf_counter() - start
            times[name].append(total / args.calls * 1e6)
    base = statistics.median(times["torch eager"])
    params = sum(p.numel() for p in _model().parameters())
    lines = [
        f"clip + AdamW step, MLP {params / 1e6:.2f}M parameters, {args.threads} thread(s), "
        f"torch {torch.__version__}, {platform.processor() or platform.machine()}, "
        f"{datetime.date.today()}",
        f"{'variant':20s} {'median us':>10s} {'min-max us':>18s} {'/ torch eager':>14s}",
    ]
    for name in names:
        ts = times[name]
        med = statistics.median(ts)
        lines.append(f"{name:20s} {med:10.0f} {min(ts):8.0f}-{max(ts):<9.0f} {med / base:13.2f}x")
    print("\n".join(lines))
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        stem = args.out / f"compile-{datetime.date.today()}"
        stem.with_suffix(".txt").write_text("\n".join(lines) + "\n")
        stem.with_suffix(".json").write_text(json.dumps({"times_us": times, "args": vars(args)},
                                                         default=str, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
