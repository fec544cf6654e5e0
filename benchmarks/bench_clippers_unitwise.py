"""Benchmark AGC and AdaGC against gradclip.clip_grad_norm_ and their peer implementations.

Per-step time of each clipper on the same gradients, interleaved in one process:

* ``clip_grad_norm_``: :func:`gradclip.clip_grad_norm_` (the baseline of every ratio);
* ``AGC``: :class:`gradclip.clippers.agc.AGC` (unit-wise, λ=0.01 in "clip" mode);
* ``timm AGC``: ``timm.utils.agc.adaptive_clip_grad``, loaded from its file (``import
  timm.utils`` needs torchvision; the AGC module itself only needs torch); skipped if timm
  is not installed (``pip install timm --no-deps``);
* ``AdaGC``: :class:`gradclip.clippers.adagc.AdaGC`, after its warm-up (per-tensor clipping).

Gradient sets: GPT-2 small and ResNet-50 shapes from :mod:`gradclip.bench` (random
gradients N(0, 1e-3²)); the weights, which AGC reads, are N(0, 0.02²).

Modes: ``clip``: before every timed call the gradients are restored (untimed) from a copy,
and every implementation clips them: AGC λ=0.01 (weight rows of norm ≈ 0.55, gradient rows
≈ 0.03: every unit), ``max_norm`` half the total norm, AdaGC warmed up with
``warmup_max_norm`` half the total norm (γ = half of each tensor's norm, so every tensor is
above 1.05·γ). ``noclip``: thresholds that nothing reaches (AGC λ=1e9, ``max_norm`` 1e9,
AdaGC warmed up without clipping, so γ = each tensor's norm).

Optimizer step (``--optimizer``, default on ResNet-50 only): ``pytorch_optimizer.AdaGC`` is
an AdamW with AdaGC inside, so its whole step is compared with ``AdamW(foreach=True)`` +
our AdaGC (both after warm-up, both clipping every tensor as in ``clip`` mode, each on its
own copy of the weights and gradients); skipped if pytorch_optimizer is not installed.

Each repetition runs every variant once, in a rotating order; the ratio to
``clip_grad_norm_`` is computed per repetition and reported as median [min-max]. The
"load" column is the median CPU (in cores) used by other processes during the
repetitions (``/proc/stat``): numbers taken under load are noisy.

Example:
    python benchmarks/bench_clippers_unitwise.py                 # gpt2 + resnet50, ~2 min
    python benchmarks/bench_clippers_unitwise.py --cases resnet50 --reps 15 --json out.json
"""

from __future__ import annotations

import argparse
import gc
import importlib.util
import json
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from types import ModuleType

import torch

import gradclip
from gradclip import bench
from gradclip.clippers.adagc import AdaGC
from gradclip.clippers.agc import AGC

BASELINE = "clip_grad_norm_"
WEIGHT_STD = 0.02


@dataclass(frozen=True)
class Record:
    """One variant on one case and mode: median ms per call, median ratio to the baseline."""

    case: str
    mode: str
    variant: str
    ms: float
    ratio: float
    ratio_min: float
    ratio_max: float
    baseline: str
    reps: int
    load: float


def load_timm_agc() -> ModuleType | None:
    """timm's ``timm/utils/agc.py`` as a module, or None when timm is not installed."""
    spec = importlib.util.find_spec("timm")
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(next(iter(spec.submodule_search_locations))) / "utils" / "agc.py"
    module_spec = importlib.util.spec_from_file_location("_timm_utils_agc", path)
    if not path.exists() or module_spec is None or module_spec.loader is None:
        return None
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    return module


def grad_set(case: str) -> bench.GradSet:
    """The case's gradients, with initialised weights (AGC reads them)."""
    gs = bench.make_grad_set(case)
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in gs.params:
            p.normal_(0.0, WEIGHT_STD, generator=generator)
    return gs


Variant = Callable[[], object]


def clip_variants(gs: bench.GradSet, mode: str, timm_agc: ModuleType | None) -> dict[str, Variant]:
    params = gs.params
    named = {f"p{i}": p for i, p in enumerate(params)}
    grads = [p.grad for p in params if p.grad is not None]
    clip = mode == "clip"
    max_norm = 0.5 * float(gradclip.get_total_norm(grads)) if clip else 1e9
    clipping = 0.01 if clip else 1e9
    agc = AGC(clipping, exclude=None)
    adagc = AdaGC(warmup_steps=1, warmup_max_norm=max_norm)
    variants: dict[str, Variant] = {
        BASELINE: lambda: gradclip.clip_grad_norm_(params, max_norm),
        "AGC": lambda: agc(named),
        "AdaGC": lambda: adagc(named),
    }
    if timm_agc is not None:
        variants["timm AGC"] = lambda: timm_agc.adaptive_clip_grad(params, clip_factor=clipping)
    return variants


def optimizer_variants(gs: bench.GradSet) -> dict[str, Variant] | None:
    try:
        import pytorch_optimizer
    except ImportError:
        return None
    params = gs.params
    named = {f"p{i}": p for i, p in enumerate(params)}
    # Each optimizer updates its own copy of the weights and reads its own gradients.
    theirs = [torch.nn.Parameter(p.detach().clone()) for p in params]
    for p, q in zip(params, theirs, strict=True):
        q.grad = p.grad.clone()
    max_norm = 0.5 * float(gradclip.get_total_norm([p.grad for p in params]))
    lr, wd = 1e-6, 0.1
    adamw = torch.optim.AdamW(params, lr=lr, weight_decay=wd, foreach=True)
    ours = AdaGC(warmup_steps=1, warmup_max_norm=max_norm)
    peer = pytorch_optimizer.AdaGC(
        theirs, lr=lr, weight_decay=wd, warmup_steps=1, lambda_abs=max_norm
    )

    def ours_step() -> None:
        ours(named)
        adamw.step()

    return {"AdamW(foreach)": adamw.step, "AdamW(foreach) + AdaGC": ours_step,
            "pytorch_optimizer.AdaGC": peer.step}


def _restorer(grads: list[torch.Tensor]) -> Callable[[], None]:
    """A function that puts ``grads`` back to their current values (a copy is kept)."""
    saved = [g.clone() for g in grads]

    def restore() -> None:
        with torch.no_grad():
            for g, s in zip(grads, saved, strict=True):
                g.copy_(s)

    return restore


def measure(
    variants: dict[str, Variant], reps: int, before: Callable[[], None] | None
) -> tuple[dict[str, list[float]], float]:
    """Seconds per call of every variant over ``reps`` interleaved repetitions; foreign load."""
    names = list(variants)

    def call(name: str) -> float:
        if before is not None:
            before()
        start = time.perf_counter()
        variants[name]()
        return time.perf_counter() - start

    for _ in range(3):  # warm-up: plans, caches, the clippers' warm-up steps
        for name in names:
            call(name)
    times: dict[str, list[float]] = {name: [] for name in names}
    loads = []
    load = bench._ForeignLoad()
    for rep in range(reps):
        order = names[rep % len(names):] + names[: rep % len(names)]
        load.start()
        for name in order:
            times[name].append(call(name))
        loads.append(load.stop())
    return times, statistics.median(loads)


def records(case: str, mode: str, times: dict[str, list[float]], baseline: str, load: float) -> list[Record]:
    out = []
    for name, values in times.items():
        ratios = [v / b for v, b in zip(values, times[baseline], strict=True)]
        out.append(Record(case, mode, name, 1e3 * statistics.median(values), statistics.median(ratios),
                          min(ratios), max(ratios), baseline, len(values), load))
    return out


def render(rows: list[Record]) -> str:
    header = f"{'case':9} {'mode':9} {'variant':26} {'ms':>9} {'ratio [min-max]':>20}  vs {'':16} load"
    lines = [header, "-" * len(header)]
    for r in rows:
        spread = f"{r.ratio:.2f} [{r.ratio_min:.2f}-{r.ratio_max:.2f}]"
        lines.append(f"{r.case:9} {r.mode:9} {r.variant:26} {r.ms:9.2f} {spread:>20}  vs "
                     f"{r.baseline:16} {r.load:.2f}")
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cases", nargs="+", default=["gpt2", "resnet50"], choices=["gpt2", "resnet50"])
    parser.add_argument("--modes", nargs="+", default=["clip", "noclip"], choices=["clip", "noclip"])
    parser.add_argument("--reps", type=int, default=9, help="interleaved repetitions (>= 1)")
    parser.add_argument("--optimizer", nargs="*", default=["resnet50"], metavar="CASE",
                        help="cases for the optimizer-step comparison (default: resnet50)")
    parser.add_argument("--threads", type=int, help="torch.set_num_threads")
    parser.add_argument("--json", type=Path, help="also write the records as JSON")
    args = parser.parse_args()
    if args.reps < 1:
        parser.error(f"--reps must be >= 1, got {args.reps}")
    if args.threads:
        torch.set_num_threads(args.threads)
    timm_agc = load_timm_agc()
    if timm_agc is None:
        print("timm not installed: no timm AGC column (pip install timm --no-deps)", file=sys.stderr)
    rows: list[Record] = []
    for case in args.cases:
        gs = grad_set(case)
        grads = [p.grad for p in gs.params if p.grad is not None]
        for mode in args.modes:
            print(f"{case} {mode} ...", file=sys.stderr)
            restore = _restorer(grads)
            variants = clip_variants(gs, mode, timm_agc)
            times, load = measure(variants, args.reps, restore if mode == "clip" else None)
            rows += records(case, mode, times, BASELINE, load)
            restore()
            del variants
        if case in args.optimizer:
            variants = optimizer_variants(gs)
            if variants is None:
                print("pytorch_optimizer not installed: no optimizer comparison", file=sys.stderr)
            else:
                print(f"{case} optimizer step ...", file=sys.stderr)
                times, load = measure(variants, args.reps, _restorer(grads))
                rows += records(case, "opt-step", times, "AdamW(foreach) + AdaGC", load)
            del variants
        del gs, grads, restore
        gc.collect()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {args.reps} reps")
    print(render(rows))
    if args.json is not None:
        args.json.write_text(json.dumps([asdict(r) for r in rows], indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
