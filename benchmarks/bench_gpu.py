"""The GPU benchmark (issue 14): gradclip against torch on large gradient sets, on one CUDA device.

Gradient sets (``gpu/sets.py``): GPT-2 small fp32, Llama-3.2-1B bf16 and fp32, a Llama-3-8B
layer stack bf16 and fp32, 10,000 small MoE-like tensors. Ops and their variants:

* ``norm``: the norm pass alone (``get_total_norm``): torch eager, gradclip;
* ``clip``: ``clip_grad_norm_``: torch eager, ``torch.compile`` of it, gradclip;
* ``step``: clip + ``AdamW(fused=True)`` (GPT-2 and the 1B bf16 set): torch eager,
  ``torch-compile`` (the clip and ``optimizer.step`` compiled apart, as torch advises: its
  step breaks any enclosing graph on purpose), ``torch-compile-one`` (one compiled function
  around both: does it work, and how many graphs), gradclip's fold
  (``NormClip(...).step(params, opt)``: the coefficient handed to the fused kernel), and
  ``gradclip-compile`` (the README recipe: the clipper and the step compiled apart).

Each (op, mode) runs its variants interleaved, the order rotating every repetition; each call
is timed alone (CUDA events around it, the device idle before), so launch-bound calls count
their host time. Rows give the median time, the paired ratio to torch eager (median
[min-max]), the bytes a call must move (norm: read the gradients once; clip: 3x; step: clip
+ AdamW's read of grad/param/moments and write of param/moments) over the time, against a
measured device-to-device copy (bytes read + written). Sets smaller than 4x the L2 cache are
rotated through copies. Modes: ``noclip`` (max_norm = 10x the norm) and ``clip`` (0.999x:
every call clips). Kernel launches per call are counted with torch.profiler. The issue's
targets are checked at the end, measured figures beside them.

Without CUDA (or with ``--smoke``) it runs the same code on the CPU on toy sets: a smoke test
of the script, not a figure (the output says so). ``--budget-s`` stops starting new sets
once spent; results are written after every set.

Run: ``python benchmarks/bench_gpu.py [--quick] [--out DIR]`` (``benchmarks/gpu/run.sh`` runs it
with the CUDA tests on a GPU machine).
"""

from __future__ import annotations

import argparse
import gc
import math
import statistics
import sys
import time
import traceback
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.nn.utils as tnu

import gradclip
from gpu import report, sets

__all__ = ["Row", "main", "measure_copy_bandwidth", "run"]

MODES = {"noclip": 10.0, "clip": 0.999}
"""max_norm as a multiple of the set's initial norm."""


@dataclass
class Row:
    """One (set, op, mode, variant): times in ms, bandwidth in GB/s, launches per call."""

    set: str
    op: str
    mode: str
    variant: str
    median_ms: float = math.nan
    min_ms: float = math.nan
    max_ms: float = math.nan
    reps: int = 0
    ratio: float = math.nan  # paired median, variant / torch eager
    ratio_min: float = math.nan
    ratio_max: float = math.nan
    bytes: int = 0
    gbps: float = math.nan
    of_copy: float = math.nan  # gbps / copy bandwidth
    kernels: int | None = None  # device kernels (+ copies/fills) per call; CPU: aten ops
    launches: int | None = None  # host launch calls per call (cudaLaunchKernel...); CPU: aten ops
    first_call_s: float = math.nan  # the first call (compilation included)
    graphs: int | None = None  # compiled graphs (torch.compile variants)
    error: str = ""
    notes: list[str] = field(default_factory=list)


class Clock:
    """Times one call: CUDA events around it with the device idle before; perf_counter on CPU."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"
        if self.cuda:
            self.start, self.end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)

    def sync(self) -> None:
        if self.cuda:
            torch.cuda.synchronize()

    def __call__(self, fn: Callable[[], object]) -> float:
        self.sync()
        if self.cuda:
            self.start.record()
            fn()
            self.end.record()
            self.end.synchronize()
            return self.start.elapsed_time(self.end)
        t0 = time.perf_counter()
        fn()
        return (time.perf_counter() - t0) * 1e3


def measure_copy_bandwidth(device: torch.device, nbytes: int, reps: int) -> dict[str, float]:
    """Median GB/s of ``dst.copy_(src)`` over ``nbytes`` (bytes read + written per copy)."""
    src = torch.empty(nbytes // 4, dtype=torch.float32, device=device).uniform_()
    dst = torch.empty_like(src)
    clock = Clock(device)
    for _ in range(3):
        dst.copy_(src)
    times = [clock(lambda: dst.copy_(src)) for _ in range(reps)]
    ms = statistics.median(times)
    return {"bytes": 2 * src.numel() * 4, "median_ms": ms, "gbps": 2 * src.numel() * 4 / ms / 1e6}


LAUNCH_CALLS = ("cudaLaunchKernel", "cuLaunchKernel", "cudaLaunchCooperativeKernel",
                "cudaGraphLaunch", "cudaMemcpyAsync", "cudaMemsetAsync")


def count_kernels(fn: Callable[[], object], device: torch.device) -> tuple[int, int]:
    """``(device work items, host launch calls)`` of one call: on CUDA the kernels, copies and
    fills the device ran and the runtime calls that launched them (``cudaLaunchKernel``...);
    on the CPU, the aten ops it ran, twice (a stand-in: the CPU launches nothing)."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    Clock(device).sync()
    with profile(activities=activities) as prof:
        fn()
        Clock(device).sync()
    events = prof.events()
    if device.type == "cuda":
        kernels = sum(1 for e in events if e.device_type == torch.autograd.DeviceType.CUDA)
        launches = sum(1 for e in events if e.name.startswith(LAUNCH_CALLS))
        return kernels, launches
    ops = sum(1 for e in events if e.name.startswith("aten::"))
    return ops, ops


class _Counter:
    """A torch.compile backend that counts the graphs it is given, then compiles with ``backend``."""

    def __init__(self, backend: str):
        from torch._dynamo.backends.registry import lookup_backend

        self.graphs, self._backend = 0, lookup_backend(backend)

    def __call__(self, gm: torch.fx.GraphModule, example_inputs: list) -> Callable:
        self.graphs += 1
        return self._backend(gm, example_inputs)


def _variants(op: str, params_sets: list[list[torch.nn.Parameter]], max_norm: list[float],
              backend: str, compile_ok: bool, lr: float = 1e-6
              ) -> dict[str, tuple[Callable[[int], object], _Counter | None]]:
    """``{variant: (call(copy_index), graph counter)}``; ``max_norm[0]`` is read at call time.

    torch's compiled clip is given the threshold as a Python number, as users call it (a
    tensor ``max_norm`` makes torch 2.11's clip read it with ``float()``: a sync and a graph
    break); dynamo makes the number a graph input after its first change (one recompile).
    """
    out: dict[str, tuple[Callable[[int], object], _Counter | None]] = {}
    if op == "norm":
        grads = [[p.grad for p in ps] for ps in params_sets]
        out["torch"] = (lambda k: tnu.get_total_norm(grads[k]), None)
        out["gradclip"] = (lambda k: gradclip.get_total_norm(grads[k]), None)
        return out
    if op == "clip":
        out["torch"] = (lambda k: tnu.clip_grad_norm_(params_sets[k], max_norm[0]), None)
        if compile_ok:
            counter = _Counter(backend)
            fn = torch.compile(lambda ps, mn: tnu.clip_grad_norm_(ps, mn), backend=counter)
            out["torch-compile"] = (lambda k: fn(params_sets[k], max_norm[0]), counter)
        out["gradclip"] = (lambda k: gradclip.clip_grad_norm_(params_sets[k], max_norm[0]), None)
        return out
    params = params_sets[0]
    named = {f"p{i}": p for i, p in enumerate(params)}

    def adamw() -> torch.optim.Optimizer:
        return torch.optim.AdamW(params, lr=lr, fused=True)

    opt_e = adamw()

    def eager(_k: int) -> None:
        tnu.clip_grad_norm_(params, max_norm[0])
        opt_e.step()

    out["torch"] = (eager, None)
    if compile_ok:  # torch's recipe: the clip and the step compiled apart
        opt_c, counter = adamw(), _Counter(backend)
        clip_c = torch.compile(lambda mn: tnu.clip_grad_norm_(params, mn), backend=counter)

        @torch.compile(backend=counter)
        def step_c() -> None:
            opt_c.step()

        def compiled(_k: int) -> None:
            clip_c(max_norm[0])
            step_c()

        out["torch-compile"] = (compiled, counter)
        opt_1, one_counter = adamw(), _Counter(backend)

        @torch.compile(backend=one_counter)
        def one(mn: float) -> None:
            tnu.clip_grad_norm_(params, mn)
            opt_1.step()

        out["torch-compile-one"] = (lambda _k: one(max_norm[0]), one_counter)
    clipper, opt_g = gradclip.NormClip(max_norm[0]), adamw()

    def fold(_k: int) -> None:
        if clipper.max_norm != max_norm[0]:  # a fill of its device tensor: only when changed
            clipper.max_norm = max_norm[0]
        clipper.step(named, opt_g)

    out["gradclip"] = (fold, None)
    if compile_ok:
        gclip, opt_gc, gcount = gradclip.NormClip(max_norm[0]), adamw(), _Counter(backend)
        gclip(named)  # the README recipe: one eager call puts its state on the device
        clip_g = torch.compile(lambda: gclip(named), backend=gcount, fullgraph=True)

        @torch.compile(backend=gcount)
        def step_g() -> None:
            opt_gc.step()

        def gcompiled(_k: int) -> None:
            if gclip.max_norm != max_norm[0]:
                gclip.max_norm = max_norm[0]
            clip_g()
            step_g()

        out["gradclip-compile"] = (gcompiled, gcount)
    return out


def _bytes(op: str, params: list[torch.nn.Parameter], variant: str) -> int:
    grad = sum(p.grad.numel() * p.grad.element_size() for p in params)
    if op == "norm":
        return grad
    if op == "clip":
        return 3 * grad
    param = sum(p.numel() * p.element_size() for p in params)  # m and v: the param's dtype
    adam = grad + 6 * param  # read grad, param, m, v; write param, m, v
    return adam + (grad if variant == "gradclip" else 3 * grad)  # the fold: no multiply pass


def run_set(spec: sets.SetSpec, args: argparse.Namespace, device: torch.device, copy_gbps: float,
            l2_bytes: int) -> list[Row]:
    """Every op, mode and variant of one gradient set."""
    torch._dynamo.reset()
    first = sets.make_params(spec, device, seed=0)
    set_bytes = sum(p.grad.numel() * p.grad.element_size() for p in first)
    copies = 1 if device.type != "cuda" else min(8, max(1, math.ceil(4 * l2_bytes / set_bytes)))
    params_sets = [first] + [sets.make_params(spec, device, seed=k) for k in range(1, copies)]
    norm0 = float(tnu.get_total_norm([p.grad for p in first]))
    compile_ok = args.compile and (spec.name != "moe10k" or args.compile_moe)
    ops = [op for op in ("norm", "clip", "step") if op in args.ops and (op != "step" or spec.step)]
    rows: list[Row] = []
    for op in ops:
        max_norm = [norm0]
        variants: dict = {}
        variants = _variants(op, params_sets, max_norm, args.compile_backend, compile_ok)
        reps = args.step_reps if op == "step" else args.reps
        for mode in (["-"] if op == "norm" else [m for m in MODES if m in args.modes]):
            if mode != "-":
                max_norm[0] = MODES[mode] * norm0
            rows += _measure(spec, op, mode, variants, params_sets, reps, device, copy_gbps)
            print(report.progress(rows[-len(variants):]), file=sys.stderr, flush=True)
    for row in rows:
        if copies > 1:
            row.notes.append(f"rotated over {copies} copies (> 4x L2)")
    del params_sets, first, variants  # and the compiled code that holds the parameters:
    torch._dynamo.reset()
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return rows


def _measure(spec: sets.SetSpec, op: str, mode: str, variants: dict, params_sets: list,
             reps: int, device: torch.device, copy_gbps: float) -> list[Row]:
    clock = Clock(device)
    copies = len(params_sets)
    rows = {name: Row(spec.name, op, mode, name) for name in variants}
    live = {}
    for name, (call, counter) in variants.items():
        row = rows[name]
        try:
            t0 = time.perf_counter()
            call(0)
            clock.sync()
            row.first_call_s = time.perf_counter() - t0
            for k in range(3):
                call(k % copies)
            row.kernels, row.launches = count_kernels(lambda call=call: call(0), device)
            row.graphs = counter.graphs if counter is not None else None
            live[name] = call
        except Exception as err:  # a variant that does not run is a result, not a crash
            row.error = f"{type(err).__name__}: {str(err).splitlines()[0][:200]}"
            traceback.print_exc(limit=2, file=sys.stderr)
    times: dict[str, list[float]] = {name: [] for name in live}
    order = list(live)
    for rep in range(reps):
        shift = rep % max(1, len(order))
        for name in order[shift:] + order[:shift]:
            times[name].append(clock(lambda name=name, rep=rep: live[name](rep % copies)))
    base = times.get("torch")
    for name, ts in times.items():
        row = rows[name]
        row.reps = len(ts)
        row.median_ms, row.min_ms, row.max_ms = statistics.median(ts), min(ts), max(ts)
        row.bytes = _bytes(op, params_sets[0], name)
        row.gbps = row.bytes / row.median_ms / 1e6
        row.of_copy = row.gbps / copy_gbps
        if base is not None:
            ratios = [t / b for t, b in zip(ts, base, strict=True)]
            row.ratio, row.ratio_min, row.ratio_max = statistics.median(ratios), min(ratios), max(ratios)
        counter = variants[name][1]
        if counter is not None and row.graphs is not None and counter.graphs > row.graphs:
            row.notes.append(f"recompiled while timed ({counter.graphs} graphs)")
    return list(rows.values())


def environment(device: torch.device) -> dict[str, object]:
    env: dict[str, object] = {
        "torch": torch.__version__, "cuda": torch.version.cuda, "python": sys.version.split()[0],
        "gradclip": gradclip.__file__, "device": str(device),
        "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
    }
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        env.update(name=props.name, sms=props.multi_processor_count,
                   memory_gib=round(props.total_memory / 2**30, 1),
                   l2_bytes=getattr(props, "L2_cache_size", 0), capability=f"{props.major}.{props.minor}")
    else:
        env.update(name="CPU", threads=torch.get_num_threads())
    return env


def run(args: argparse.Namespace) -> dict[str, object]:
    """Measure every selected set; write ``bench_gpu.json`` / ``.txt`` to ``args.out`` after each."""
    device = torch.device(args.device)
    smoke = device.type != "cuda"
    env = environment(device)
    l2 = int(env.get("l2_bytes") or 60 * 2**20)
    copy = measure_copy_bandwidth(device, args.copy_mib * 2**20, args.reps)
    specs = sets.set_specs(smoke=smoke, llama8b_layers=args.llama8b_layers,
                           moe_tensors=args.moe_tensors)
    names = [n for n in specs if n in args.sets]
    result: dict[str, object] = {
        "environment": env, "smoke": smoke, "copy": copy,
        "config": vars(args) | {"out": str(args.out)}, "rows": [], "skipped": {},
        "sets": {n: {"description": specs[n].description, "large": specs[n].large,
                     "step": specs[n].step} for n in names},
    }
    deadline = time.monotonic() + args.budget_s
    for name in names:
        if time.monotonic() > deadline:
            result["skipped"][name] = f"time budget of {args.budget_s:.0f} s spent"  # type: ignore[index]
            continue
        print(f"[bench_gpu] {name}: {specs[name].description}", file=sys.stderr, flush=True)
        try:
            rows = run_set(specs[name], args, device, copy["gbps"], l2)
        except Exception as err:  # e.g. out of memory: say so, go on with the next set
            traceback.print_exc(limit=3, file=sys.stderr)
            result["skipped"][name] = f"{type(err).__name__}: {str(err).splitlines()[0][:200]}"  # type: ignore[index]
            gc.collect()
            continue
        result["rows"] += [asdict(r) for r in rows]  # type: ignore[operator]
        if device.type == "cuda":
            result.setdefault("peak_gib", {})[name] = round(torch.cuda.max_memory_allocated() / 2**30, 2)  # type: ignore[index]
            torch.cuda.reset_peak_memory_stats()
        report.write(result, args.out)
    result["targets"] = report.check_targets(result)
    report.write(result, args.out)
    return result


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=None, help="folder for bench_gpu.json/.txt")
    parser.add_argument("--quick", action="store_true",
                        help="fewer repetitions, an 8-layer 8B stack, no compiled MoE (~2 min on an H200)")
    parser.add_argument("--smoke", action="store_true", help="toy sets on the CPU (default without CUDA)")
    parser.add_argument("--sets", nargs="+", default=list(sets.SETS), choices=list(sets.SETS))
    parser.add_argument("--reps", type=int, default=None, help="repetitions per norm/clip row")
    parser.add_argument("--step-reps", type=int, default=None, help="repetitions per step row")
    parser.add_argument("--llama8b-layers", type=int, default=None, help="decoder layers of the 8B stack")
    parser.add_argument("--moe-tensors", type=int, default=None)
    parser.add_argument("--no-compile", dest="compile", action="store_false")
    parser.add_argument("--compile-moe", action="store_true",
                        help="also compile torch's clip on the 10,000-tensor set (slow to compile)")
    parser.add_argument("--compile-backend", default=None, help="default: inductor (CPU: aot_eager)")
    parser.add_argument("--ops", nargs="+", default=["norm", "clip", "step"],
                        choices=["norm", "clip", "step"])
    parser.add_argument("--modes", nargs="+", default=list(MODES), choices=list(MODES))
    parser.add_argument("--budget-s", type=float, default=None, help="start no new set after this")
    parser.add_argument("--copy-mib", type=int, default=None, help="buffer of the copy bandwidth")
    args = parser.parse_args(argv)
    cuda = torch.cuda.is_available() and not args.smoke
    args.device = "cuda" if cuda else "cpu"
    quick = args.quick
    defaults = {
        "reps": 30 if cuda and not quick else 10 if cuda else 5,
        "step_reps": 20 if cuda and not quick else 10 if cuda else 3,
        "llama8b_layers": 8 if quick else 32,
        "moe_tensors": 10_000 if cuda else 400,
        "compile_backend": "inductor" if cuda else "aot_eager",
        "budget_s": 300.0 if not quick else 150.0,
        "copy_mib": 2048 if cuda else 64,
    }
    for key, value in defaults.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    config = torch._dynamo.config  # every set and mode compiles anew: room for all of them
    for name in ("cache_size_limit", "recompile_limit"):
        if hasattr(config, name):
            setattr(config, name, max(64, getattr(config, name)))
    if args.device == "cpu":  # the smoke run: one thread, steadier on a shared machine
        torch.set_num_threads(1)
    result = run(args)
    print(report.render(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
