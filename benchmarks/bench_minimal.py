"""How far are torch's and gradclip's ``clip_grad_norm_`` from the smallest clip one can write?

At one thread, when a call clips, both libraries run the same kernels (one multi-tensor norm,
one multi-tensor multiply); what separates them is fixed work around the kernels, which runs
cold while the gradients stream through the caches. :func:`minimal_clip` is that fixed work
cut to nothing (no checks, no grouping, no deduplication): the floor for this design. For each
model of the small-model ladder (``bench_small.LADDER``), p=2, every call clipping, the
harness (:func:`harness.run_grad_set`) pairs minimal/torch, gradclip/minimal and
gradclip/torch, each on the same gradients, interleaved, both orders in every repetition.

Example:
    python benchmarks/bench_minimal.py --models gpt-256x4 --out benchmarks/results   # ~1 min
"""

from __future__ import annotations

import argparse
import datetime
import sys
import time
from pathlib import Path

import torch
from torch import Tensor

import gradclip
import harness
from bench_small import LADDER
from cases import make_grad_set
from render import free_prefix, table

__all__ = ["PAIRS", "main", "minimal_clip", "run"]


@torch.no_grad()
def minimal_clip(params: list[Tensor], max_norm: float, norm_type: float = 2.0) -> Tensor:
    """torch's clip, with nothing around its kernels: one ``_foreach_norm``, the total, the
    coefficient on the host (free on the CPU), one ``_foreach_mul_`` when it is below 1. For
    plain CPU tensors of one dtype only.

    Example:
        >>> p = torch.nn.Parameter(torch.zeros(2)); p.grad = torch.tensor([3.0, 4.0])
        >>> minimal_clip([p], 1.0), p.grad
        (tensor(5.), tensor([0.6000, 0.8000]))
    """
    grads = [p.grad for p in params if p.grad is not None]
    total = torch.linalg.vector_norm(torch.stack(torch._foreach_norm(grads, norm_type)), norm_type)
    coef = max_norm / (total.item() + 1e-6)
    if coef < 1.0:
        torch._foreach_mul_(grads, torch.scalar_tensor(coef))
    return total


FUNCTIONS = {"torch": torch.nn.utils.clip_grad_norm_, "gradclip": gradclip.clip_grad_norm_,
             "minimal": minimal_clip}  # fmt: skip
PAIRS = (("minimal", "torch"), ("gradclip", "minimal"), ("gradclip", "torch"))
"""(numerator, denominator) of each ratio."""


def run(models: list[str], cfg: harness.BenchConfig, progress: harness.Progress) -> list[list[str]]:
    """One table row per model and pair: times and the ratio, median [min-max]."""
    rows = []
    for name in models:
        model = next(m for m in LADDER if m.name == name)
        gs = make_grad_set(model.name, model.shapes, torch.float32)
        for a, b in PAIRS:
            (r,), _ = harness.run_grad_set(gs, cfg, lambda line, a=a, b=b: progress(f"{line} {a}/{b}"),
                                           ours=FUNCTIONS[a], theirs=FUNCTIONS[b])  # fmt: skip
            rows.append([name, f"{r.numel:,}", f"{a}/{b}", f"{r.ours_ms * 1e3:,.1f}",
                         f"{r.torch_ms * 1e3:,.1f}", f"{r.ratio:.3f} [{r.ratio_min:.2f}-{r.ratio_max:.2f}]",
                         f"{r.reps_used}/{r.reps_run}" + ("" if r.quiet else " noisy")])  # fmt: skip
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", choices=[m.name for m in LADDER],
                        default=["gpt-128x2", "gpt-256x4", "gpt2"], metavar="M")  # fmt: skip
    parser.add_argument("--reps", type=int, default=12, help="quiet repetitions per row (>= 1)")
    parser.add_argument("--out", type=Path, metavar="DIR", help="also write DIR/minimal-<date>.txt")
    args = parser.parse_args(argv)
    if args.reps < 1:
        parser.error(f"--reps must be >= 1, got {args.reps}")
    if args.out is not None and not args.out.is_dir():
        parser.error(f"--out {args.out}: not a folder; create it or pass another")
    torch.set_num_threads(1)
    cfg = harness.BenchConfig(cases=(), norm_types=(2.0,), modes=("clip",), reps=args.reps,
                              min_rep_seconds=0.1, max_calls_per_rep=5000)  # fmt: skip
    start = time.perf_counter()
    rows = run(args.models, cfg, lambda line: print(line, file=sys.stderr, flush=True))
    env = harness.env()
    text = "\n".join([
        "the smallest clip (minimal), torch's and gradclip's clip_grad_norm_: p=2, every call clips",
        f"gradclip {env['gradclip']} ({harness.commit()}), torch {env['torch']}, 1 thread, "
        f"{env['cpus']} CPUs ({env['cpu']}), wall {time.perf_counter() - start:.0f} s",
        "",
        *table(["model", "params", "ratio", "first us", "second us", "ratio [min-max]", "reps"], rows),
    ])  # fmt: skip
    print(text)
    if args.out is not None:
        prefix = free_prefix(args.out, f"minimal-{datetime.date.today().isoformat()}")
        Path(f"{prefix}.txt").write_text(text + "\n")
        print(f"wrote {prefix}.txt", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
