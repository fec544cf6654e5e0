"""Per-step time of gradclip's AutoClip / ZClip against the peer packages and plain clipping.

Model: ``blocks`` × (Linear(width, width) + LayerNorm(width)), i.e. 4 tensors per block
(200 tensors with the default 50 blocks; 0.21M parameters at width 64). A few gradient sets
with different norms (steady, and an occasional ×10 spike) are rotated, so the adaptive
clippers clip some steps and not others; before each call the gradients are restored from
the set (untimed). Every method is warmed up past the clippers' warm-up first.

Timing: in each repetition every method runs ``calls`` timed calls, the methods in a
rotating order; per repetition, each method's mean time is divided by that of
``gradclip.clip_grad_norm_`` (and of ``torch.nn.utils.clip_grad_norm_``), and the table
shows the median of those paired ratios with their range. Needs ``pip install autoclip==0.2.1
zclip==1.0.0`` for the peer rows (missing packages are left out).

Example:
    python benchmarks/bench_clippers_peers.py
    python benchmarks/bench_clippers_peers.py --width 256 --reps 9
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import torch

import gradclip
from gradclip.clippers.autoclip import AutoClip
from gradclip.clippers.zclip import ZClip


def build(blocks: int, width: int) -> torch.nn.Module:
    layers: list[torch.nn.Module] = []
    for _ in range(blocks):
        layers += [torch.nn.Linear(width, width), torch.nn.LayerNorm(width)]
    return torch.nn.Sequential(*layers)


def gradient_sets(model: torch.nn.Module, count: int, seed: int = 0) -> list[list[torch.Tensor]]:
    gen = torch.Generator().manual_seed(seed)
    sets = []
    for i in range(count):
        scale = (
            1e-3 * (1 + 0.2 * torch.rand((), generator=gen).item()) * (10 if i == count - 1 else 1)
        )
        sets.append([torch.randn(p.shape, generator=gen) * scale for p in model.parameters()])
    return sets


def methods(model: torch.nn.Module) -> dict[str, Callable[[], object]]:
    params = list(model.parameters())
    out: dict[str, Callable[[], object]] = {
        "torch.nn.utils.clip_grad_norm_(1.0)": lambda: torch.nn.utils.clip_grad_norm_(params, 1.0),
        "gradclip.clip_grad_norm_(1.0)": lambda: gradclip.clip_grad_norm_(params, 1.0),
    }
    fixed, auto, z = gradclip.NormClip(1.0), AutoClip(), ZClip()
    out["gradclip NormClip(1.0) (Clipper overhead)"] = lambda: fixed(model)
    out["gradclip AutoClip()"] = lambda: auto(model)
    out["gradclip ZClip()"] = lambda: z(model)
    try:
        from autoclip.torch import QuantileClip
    except ImportError:
        pass
    else:
        global_clip = QuantileClip(params, quantile=0.1, history_length=1024, global_threshold=True)
        local_clip = QuantileClip(params)  # its defaults: per-parameter, q=0.9, 1000 steps
        out["autoclip QuantileClip(global, q=0.1)"] = global_clip.step
        out["autoclip QuantileClip() per-param default"] = local_clip.step
    try:
        import zclip
    except ImportError:
        pass
    else:
        peer = zclip.ZClip(max_grad_norm=None)
        out["zclip ZClip(max_grad_norm=None)"] = lambda: peer.step(model)
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--blocks", type=int, default=50, help="Linear+LayerNorm blocks (4 tensors each)"
    )
    parser.add_argument("--width", type=int, default=64)
    parser.add_argument("--reps", type=int, default=15, help="interleaved repetitions")
    parser.add_argument(
        "--calls", type=int, default=20, help="timed calls per method per repetition"
    )
    parser.add_argument("--threads", type=int, help="torch.set_num_threads (default: torch's)")
    args = parser.parse_args()
    for name in ("blocks", "width", "reps", "calls", "threads"):
        value = getattr(args, name)
        if value is not None and value < 1:
            parser.error(f"--{name} must be >= 1, got {value}")
    if args.threads is not None:
        torch.set_num_threads(args.threads)

    model = build(args.blocks, args.width)
    params = list(model.parameters())
    for p in params:
        p.grad = torch.zeros_like(p)
    grads = [p.grad for p in params]
    sets = gradient_sets(model, 8)
    fns = methods(model)
    names = list(fns)
    step = 0

    def restore() -> None:
        nonlocal step
        torch._foreach_copy_(grads, sets[step % len(sets)])
        step += 1

    with torch.no_grad():
        for fn in fns.values():  # past ZClip's 25-step warm-up, caches and plans built
            for _ in range(40):
                restore()
                fn()
        times: dict[str, list[float]] = {n: [] for n in names}
        for rep in range(args.reps):
            order = names[rep % len(names) :] + names[: rep % len(names)]
            if rep % 2:
                order.reverse()
            for name in order:
                total = 0.0
                for _ in range(args.calls):
                    restore()
                    start = time.perf_counter()
                    fns[name]()
                    total += time.perf_counter() - start
                times[name].append(total / args.calls)

    numel = sum(p.numel() for p in params)
    print(
        f"{len(params)} tensors, {numel:,} parameters; torch {torch.__version__}, "
        f"{torch.get_num_threads()} threads; {args.reps} reps x {args.calls} calls"
    )
    base, torch_name = "gradclip.clip_grad_norm_(1.0)", "torch.nn.utils.clip_grad_norm_(1.0)"
    header = f"{'method':<44} {'ms/step':>8}  {'/gradclip.clip_grad_norm_':>26}  {'/torch clip_grad_norm_':>24}"
    print(header)
    print("-" * len(header))
    for name in names:
        cells = []
        for ref in (base, torch_name):
            ratios = [a / b for a, b in zip(times[name], times[ref], strict=True)]
            cells.append(f"{statistics.median(ratios):.2f}x [{min(ratios):.2f}-{max(ratios):.2f}]")
        ms = statistics.median(times[name]) * 1e3
        print(f"{name:<44} {ms:>8.3f}  {cells[0]:>26}  {cells[1]:>24}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
