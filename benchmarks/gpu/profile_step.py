"""Where the time of one clip + fused AdamW step goes: torch eager against gradclip's fold.

    python benchmarks/gpu/profile_step.py [--set gpt2] [--out FILE]

torch's profiler over a few warmed-up steps of each variant: device time per kernel name
(the sum over the steps, divided by their number), the host time of the step's Python and
launches, and the wall time per step with and without a synchronize after each step (a
variant whose host side outlasts its device side shows it there). bench_gpu.py measures the
speed; this says why. Without CUDA it profiles the CPU smoke set (not a GPU figure).
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.utils as tnu
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import gradclip
from gpu import sets

STEPS = 10


def _variants(params: list[torch.nn.Parameter]) -> dict[str, Callable[[], None]]:
    def adamw() -> torch.optim.Optimizer:
        return torch.optim.AdamW(params, lr=1e-6, fused=True)

    opt_t, opt_g, opt_a = adamw(), adamw(), adamw()
    clipper, named = gradclip.NormClip(1.0), {f"p{i}": p for i, p in enumerate(params)}

    def torch_eager() -> None:
        tnu.clip_grad_norm_(params, 1.0)
        opt_t.step()

    return {"torch eager (clip + AdamW)": torch_eager,
            "gradclip fold (NormClip.step)": lambda: clipper.step(named, opt_g),
            "AdamW alone": opt_a.step}


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def _wall_ms(fn: Callable[[], None], device: torch.device, sync_each: bool) -> float:
    _sync(device)
    start = time.perf_counter()
    for _ in range(STEPS):
        fn()
        if sync_each:
            _sync(device)
    _sync(device)
    return (time.perf_counter() - start) / STEPS * 1e3


def profile_variant(name: str, fn: Callable[[], None], device: torch.device) -> list[str]:
    for _ in range(3):
        fn()
    lines = [f"== {name}",
             f"wall per step: {_wall_ms(fn, device, False):.3f} ms queued, "
             f"{_wall_ms(fn, device, True):.3f} ms with a sync after each step"]
    host_start = time.perf_counter()
    for _ in range(STEPS):  # the host side alone: how long the Python and the launches take
        fn()
    host = (time.perf_counter() - host_start) / STEPS * 1e3
    _sync(device)
    lines.append(f"host time per step (launches queued, no sync): {host:.3f} ms")
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=activities) as prof:
        for _ in range(STEPS):
            fn()
        _sync(device)
    on_device = device.type == "cuda"
    key = "device_time_total" if on_device else "cpu_time_total"
    rows = sorted(prof.key_averages(), key=lambda e: getattr(e, key, 0.0), reverse=True)
    lines.append(f"{'op / kernel':70s} {'calls':>6s} {'device us':>10s} {'cpu us':>10s}  (per step)")
    for event in rows[:18]:
        dev = getattr(event, "device_time_total", 0.0) if on_device else 0.0
        lines.append(f"{event.key[:70]:70s} {event.count // STEPS:6d} {dev / STEPS:10.1f} "
                     f"{event.cpu_time_total / STEPS:10.1f}")
    return lines


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--set", default="gpt2")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args(argv)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    spec = sets.set_specs(smoke=device.type != "cuda")[args.set]
    lines = [f"profile of one step on {spec.description} ({device.type}, torch {torch.__version__})"
             + ("" if device.type == "cuda" else ": CPU smoke run, not a GPU figure")]
    for name, fn in _variants(sets.make_params(spec, device, seed=0)).items():
        lines += [*profile_variant(name, fn, device), ""]
    text = "\n".join(lines)
    print(text)
    if args.out:
        args.out.write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
