"""Per-step cost of every gradclip clipper over ``gradclip.clip_grad_norm_``, and of the peers.

One process, the same gradients, interleaved: GPT-2 small and ResNet-50 gradient sets from
:mod:`cases` (gradients N(0, 1e-3²), weights N(0, 0.02²), which AGC reads), held
by an ``nn.Module`` whose parameter names are the architecture's, and every clipper is
called on that module (so the name walk is timed too).

A clipper that clips multiplies every gradient: the same read+write that
``clip_grad_norm_`` does when it clips, and that it skips on the CPU when it does not. So
each variant is compared with the baseline that did the same work, measured in the same
repetition: ``clip_grad_norm_(max_norm=norm / 2)`` for a variant that clipped,
``clip_grad_norm_(max_norm=1e9)`` for one that did not. What each variant decided is in the
``clipped`` column (it is checked to be the same on every timed call).

Variants: ``NormClip`` clipping and not; ``AutoClip()`` (its p10 threshold is the steady
norm itself: clips); ``ZClip()`` (steady norms: does not clip); ``AdaptiveClip()``;
``AGC`` at λ=0.01 (rows of weights ≈ 0.55, of gradients ≈ 0.03: clips every unit) and at
λ=1e9 (reads the weights, clips nothing); the *AGC floor*, the memory traffic any AGC
causes (``get_total_norm`` of the gradients and of the weights, then a ``_foreach_mul_``
of the gradients when it clips; no per-unit work), against which each AGC
row is also reported; ``AdaGC`` warmed up with thresholds below or
above every tensor's norm. Peers where installed (``requirements-peers.txt``):
``autoclip.torch.QuantileClip(global, q=0.1)``, ``zclip.ZClip(max_grad_norm=None)``, timm's
``adaptive_clip_grad``, and ``pytorch_optimizer.AdaGC`` (an AdamW with AdaGC inside, so it
is compared with ``AdamW(foreach=True)`` + our AdaGC, each on its own copy of the weights).

Before every timed call the gradients are restored from a copy (untimed). Each repetition
runs every variant once, in a rotating order; ratios are computed per repetition and
reported as median [min-max]. "load" is the CPU (in cores) used by other processes during
the repetitions: numbers taken under load are noisy.

Example:
    python benchmarks/bench_clippers.py                          # ~2 min
    python benchmarks/bench_clippers.py --cases resnet50 --reps 15 --json out.json
"""

from __future__ import annotations

import argparse
import gc
import importlib.util
import json
import statistics
import sys
import time
import warnings
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from types import ModuleType

import torch

import gradclip
from cases import CASES, GradSet, NamedShapes, make_grad_set
from harness import ForeignLoad

WEIGHT_STD = 0.02
CLIP, NOCLIP = "clip_grad_norm_ (clips)", "clip_grad_norm_ (no clip)"
AGC_FLOOR_CLIP, AGC_FLOOR_NOCLIP = "AGC floor (clips)", "AGC floor (no clip)"

Variant = Callable[[], bool]
"""A timed call; it returns whether it clipped."""


@dataclass(frozen=True)
class Record:
    """One variant on one case: median ms per call, median ratio to its baseline."""

    case: str
    variant: str
    clipped: bool
    ms: float
    ratio: float
    ratio_min: float
    ratio_max: float
    baseline: str
    reps: int
    load: float


def named_module(gs: GradSet, shapes: NamedShapes) -> torch.nn.Module:
    """A module holding ``gs.params`` under their architecture names (``h.0.attn.c_attn.weight``)."""
    root = torch.nn.Module()
    for (name, _), param in zip(shapes, gs.params, strict=True):
        *path, leaf = name.split(".")
        owner = root
        for part in path:
            if not hasattr(owner, part):
                owner.add_module(part, torch.nn.Module())
            owner = getattr(owner, part)
        owner.register_parameter(leaf, param)
    return root


def load_timm_agc() -> ModuleType | None:
    """timm's ``timm/utils/agc.py`` as a module (``import timm`` needs torchvision), or None."""
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


def _clipper(clipper: gradclip.Clipper, model: torch.nn.Module) -> Variant:
    return lambda: bool(clipper(model).clipped)


def _agc_floor(params: list[torch.nn.Parameter], clips: bool) -> Variant:
    """The traffic any AGC must cause, with the baseline's own kernels: the norm pass of
    ``clip_grad_norm_`` over the gradients and over the weights (no per-unit work), and its
    multiply of the gradients when it clips."""
    grads = [p.grad for p in params]
    weights = [p.detach() for p in params]

    def call() -> bool:
        gradclip.get_total_norm(grads)
        gradclip.get_total_norm(weights)
        if clips:
            torch._foreach_mul_(grads, 0.5)
        return clips

    return call


def _peer(step: Callable[[], object], clipped: bool) -> Variant:
    """A peer's step, which does not say whether it clipped: ``clipped`` is what it does here."""

    def call() -> bool:
        step()
        return clipped

    return call


def clip_variants(model: torch.nn.Module, norm: float) -> dict[str, Variant]:
    params = list(model.parameters())
    low = norm / 2
    variants: dict[str, Variant] = {
        CLIP: lambda: bool(gradclip.clip_grad_norm_(params, low) > low),
        NOCLIP: lambda: bool(gradclip.clip_grad_norm_(params, 1e9) > 1e9),
        "NormClip (clips)": _clipper(gradclip.NormClip(low), model),
        "NormClip (no clip)": _clipper(gradclip.NormClip(1e9), model),
        "AutoClip()": _clipper(gradclip.AutoClip(), model),
        "ZClip()": _clipper(gradclip.ZClip(), model),
        "AdaptiveClip()": _clipper(gradclip.AdaptiveClip(), model),
        "AGC(0.01)": _clipper(gradclip.AGC(0.01, exclude=None), model),
        "AGC(1e9)": _clipper(gradclip.AGC(1e9, exclude=None), model),
        AGC_FLOOR_CLIP: _agc_floor(params, clips=True),
        AGC_FLOOR_NOCLIP: _agc_floor(params, clips=False),
        # warmup_max_norm: γ starts at half (clips) or at 100x (does not) each tensor's norm
        "AdaGC (clips)": _clipper(gradclip.AdaGC(warmup_steps=1, warmup_max_norm=low), model),
        "AdaGC (no clip)": _clipper(gradclip.AdaGC(warmup_steps=1, warmup_max_norm=1e9), model),
    }
    try:
        from autoclip.torch import QuantileClip
    except ImportError:
        print("autoclip not installed: no autoclip row", file=sys.stderr)
    else:
        quantile = QuantileClip(params, quantile=0.1, history_length=1024, global_threshold=True)
        variants["autoclip QuantileClip(q=0.1)"] = _peer(quantile.step, True)
    try:
        import zclip
    except ImportError:
        print("zclip not installed: no zclip row", file=sys.stderr)
    else:
        peer = zclip.ZClip(max_grad_norm=None)
        variants["zclip ZClip()"] = _peer(lambda: peer.step(model), False)
    timm_agc = load_timm_agc()
    if timm_agc is None:
        print("timm not installed: no timm AGC row", file=sys.stderr)
    else:
        variants["timm AGC(0.01)"] = _peer(
            lambda: timm_agc.adaptive_clip_grad(params, 0.01), True)
        variants["timm AGC(1e9)"] = _peer(
            lambda: timm_agc.adaptive_clip_grad(params, 1e9), False)
    return variants


def optimizer_variants(model: torch.nn.Module, norm: float) -> dict[str, Variant] | None:
    try:
        import pytorch_optimizer
    except ImportError:
        print("pytorch_optimizer not installed: no optimizer-step rows", file=sys.stderr)
        return None
    params = list(model.parameters())
    theirs = [torch.nn.Parameter(p.detach().clone()) for p in params]
    for p, q in zip(params, theirs, strict=True):
        q.grad = p.grad.clone()
    lr, wd = 1e-6, 0.1
    adamw = torch.optim.AdamW(params, lr=lr, weight_decay=wd, foreach=True)
    ours = gradclip.AdaGC(warmup_steps=1, warmup_max_norm=norm / 2)
    peer = pytorch_optimizer.AdaGC(theirs, lr=lr, weight_decay=wd, warmup_steps=1, lambda_abs=norm / 2)

    def ours_step() -> bool:
        clipped = bool(ours(model).clipped)
        adamw.step()
        return clipped

    return {"AdamW(foreach) + AdaGC": ours_step, "pytorch_optimizer.AdaGC": _peer(peer.step, True)}


def _restorer(grads: list[torch.Tensor]) -> Callable[[], None]:
    saved = [g.clone() for g in grads]
    return lambda: torch._foreach_copy_(grads, saved)


def measure(variants: dict[str, Variant], reps: int, restore: Callable[[], None]
            ) -> tuple[dict[str, list[float]], dict[str, bool], float]:
    """Seconds per call over ``reps`` interleaved repetitions, each variant's decision, load."""
    names = list(variants)
    decisions: dict[str, set[bool]] = {name: set() for name in names}

    def call(name: str) -> float:
        restore()
        start = time.perf_counter()
        decision = variants[name]()
        elapsed = time.perf_counter() - start
        decisions[name].add(decision)
        return elapsed

    with torch.no_grad():
        for _ in range(30):  # past every warm-up; plans and caches built
            for name in names:
                call(name)
        decisions = {name: set() for name in names}
        times: dict[str, list[float]] = {name: [] for name in names}
        loads = []
        load = ForeignLoad()
        for rep in range(reps):
            order = names[rep % len(names):] + names[: rep % len(names)]
            load.start()
            for name in order:
                times[name].append(call(name))
            loads.append(load.stop())
    changed = [name for name, seen in decisions.items() if len(seen) > 1]
    if changed:
        raise RuntimeError(f"these variants changed their clip decision while timed: {changed}")
    return times, {name: seen.pop() for name, seen in decisions.items()}, statistics.median(loads)


def records(case: str, times: dict[str, list[float]], decisions: dict[str, bool],
            load: float, baseline: str | None = None) -> list[Record]:
    out = []
    for name, values in times.items():
        base = baseline or (CLIP if decisions[name] else NOCLIP)
        ratios = [v / b for v, b in zip(values, times[base], strict=True)]
        out.append(Record(case, name, decisions[name], 1e3 * statistics.median(values),
                          statistics.median(ratios), min(ratios), max(ratios), base, len(values),
                          load))
    return out


def render(rows: list[Record]) -> str:
    header = (f"{'case':9} {'variant':30} {'clipped':>7} {'ms':>8} {'ratio [min-max]':>19}  "
              f"vs {'':26} load")
    lines = [header, "-" * len(header)]
    for r in rows:
        clipped = "yes" if r.clipped else "no"
        spread = f"{r.ratio:.2f} [{r.ratio_min:.2f}-{r.ratio_max:.2f}]"
        lines.append(f"{r.case:9} {r.variant:30} {clipped:>7} {r.ms:8.2f} {spread:>19}  vs "
                     f"{r.baseline:26} {r.load:.2f}")
    return "\n".join(lines)


def run_case(case: str, reps: int, optimizer: bool) -> list[Record]:
    gs = make_grad_set(case)
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in gs.params:
            p.normal_(0.0, WEIGHT_STD, generator=generator)
    model = named_module(gs, CASES[case].shapes())
    grads = [p.grad for p in gs.params]
    norm = float(gradclip.get_total_norm(grads))
    restore = _restorer(grads)
    print(f"{case} clippers ...", file=sys.stderr)
    times, decisions, load = measure(clip_variants(model, norm), reps, restore)
    rows = records(case, times, decisions, load)
    for agc, floor in (("AGC(0.01)", AGC_FLOOR_CLIP), ("AGC(1e9)", AGC_FLOOR_NOCLIP)):
        pair = {agc: times[agc], floor: times[floor]}
        rows += records(case, pair, decisions, load, baseline=floor)[:1]
    if optimizer and (variants := optimizer_variants(model, norm)) is not None:
        print(f"{case} optimizer step ...", file=sys.stderr)
        times, decisions, load = measure(variants, reps, restore)
        rows += records(case, times, decisions, load, baseline="AdamW(foreach) + AdaGC")
    return rows


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cases", nargs="+", default=["gpt2", "resnet50"], choices=["gpt2", "resnet50"])
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
    warnings.simplefilter("ignore", UserWarning)  # AGC on a module without nn.Linear: said above
    rows: list[Record] = []
    for case in args.cases:
        rows += run_case(case, args.reps, case in args.optimizer)
        gc.collect()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {args.reps} reps")
    print(render(rows))
    if args.json is not None:
        args.json.write_text(json.dumps([asdict(r) for r in rows], indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
