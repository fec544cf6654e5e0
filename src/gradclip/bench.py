"""Benchmark :func:`gradclip.clip_grad_norm_` against ``torch.nn.utils.clip_grad_norm_``.

Three separate steps (data, rendering and command line stay apart):

1. **Gradient sets** from real model shapes, built without downloads: GPT-2 small (fp32 and
   bf16), ResNet-50, 2,000 tiny tensors, one 100M-element tensor (:data:`CASES`,
   :func:`make_grad_set`). Gradients are random normal, std 1e-3, on ``nn.Parameter``\\ s.
2. **Measurement** (:func:`run`, :func:`run_grad_set`) returns a :class:`BenchResult` of
   plain records. Both implementations run on the *same* gradients, interleaved in one
   process: every repetition runs ours, torch's and the read floor (one ``torch.sum`` over a
   flat buffer of the same bytes and dtype) in an order that alternates which goes first.
   Times are per-repetition pairs: the ratio ours/torch is reported as median [min-max].
   A repetition during which other processes used more than ``max_foreign_cores`` of CPU
   (``/proc/stat`` busy time minus our own CPU time) is not quiet; repetitions run until
   ``reps`` quiet ones are collected (at most ``max_reps``), and only the quiet ones are
   used, unless fewer than half of ``reps`` were quiet: then all are used and the record
   says ``quiet=False``. Modes: ``noclip`` (``max_norm`` = 10x the current norm) and ``clip``
   (``max_norm`` = 0.98x the current norm, re-anchored after every call, so every call
   really clips). The returned norms are also compared with a float64 reference.
3. **Rendering**: :func:`render` (plain text table), :func:`to_json`.

Example:
    >>> from gradclip import bench
    >>> gs = bench.make_grad_set("demo", [("w", (64, 64)), ("b", (64,))])
    >>> cfg = bench.BenchConfig(norm_types=(2.0,), modes=("noclip",), reps=2)
    >>> records, accuracy = bench.run_grad_set(gs, cfg)
    >>> records[0].mode, records[0].reps_run >= 2
    ('noclip', True)
"""

from __future__ import annotations

import gc
import json
import math
import os
import platform
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field, replace

import torch
from torch import Tensor

import gradclip

__all__ = [
    "CASES",
    "MODES",
    "QUICK_CASES",
    "TARGETS",
    "AccuracyRecord",
    "BenchConfig",
    "BenchRecord",
    "BenchResult",
    "Case",
    "GradSet",
    "Target",
    "TargetCheck",
    "check_targets",
    "config",
    "gpt2_shapes",
    "make_grad_set",
    "reference_norm",
    "render",
    "resnet50_shapes",
    "run",
    "run_grad_set",
    "to_dict",
    "to_json",
]

Shape = tuple[int, ...]
NamedShapes = list[tuple[str, Shape]]
ClipFn = Callable[..., Tensor]
Progress = Callable[[str], None]

MODES = ("noclip", "clip")
_MAX_NORM_FACTOR = {"noclip": 10.0, "clip": 0.98}
_EPS = 1e-6  # torch's clip_coef = max_norm / (total + 1e-6)


# ---------------------------------------------------------------------------------------
# gradient sets


def gpt2_shapes(
    vocab_size: int = 50257, n_positions: int = 1024, n_embd: int = 768, n_layer: int = 12
) -> NamedShapes:
    """Parameter names and shapes of GPT-2 (defaults: GPT-2 small), in module order.

    The layout of Hugging Face's ``GPT2Model``: the attention and MLP projections are
    ``Conv1D`` layers, whose weights are stored ``(in, out)``. The LM head is tied to
    ``wte`` and is not a separate tensor. GPT-2 small: 148 tensors, 124,439,808 elements.

    References:
        Radford et al., "Language Models are Unsupervised Multitask Learners", 2019.

    Example:
        >>> from gradclip import bench
        >>> len(bench.gpt2_shapes()), bench.gpt2_shapes()[0]
        (148, ('wte.weight', (50257, 768)))
    """
    d = n_embd
    shapes: NamedShapes = [("wte.weight", (vocab_size, d)), ("wpe.weight", (n_positions, d))]
    for i in range(n_layer):
        h = f"h.{i}."
        shapes += [
            (h + "ln_1.weight", (d,)),
            (h + "ln_1.bias", (d,)),
            (h + "attn.c_attn.weight", (d, 3 * d)),
            (h + "attn.c_attn.bias", (3 * d,)),
            (h + "attn.c_proj.weight", (d, d)),
            (h + "attn.c_proj.bias", (d,)),
            (h + "ln_2.weight", (d,)),
            (h + "ln_2.bias", (d,)),
            (h + "mlp.c_fc.weight", (d, 4 * d)),
            (h + "mlp.c_fc.bias", (4 * d,)),
            (h + "mlp.c_proj.weight", (4 * d, d)),
            (h + "mlp.c_proj.bias", (d,)),
        ]
    return [*shapes, ("ln_f.weight", (d,)), ("ln_f.bias", (d,))]


def _batch_norm(name: str, channels: int) -> NamedShapes:
    return [(name + ".weight", (channels,)), (name + ".bias", (channels,))]


def resnet50_shapes(layers: Sequence[int] = (3, 4, 6, 3), num_classes: int = 1000) -> NamedShapes:
    """Parameter names and shapes of a bottleneck ResNet (defaults: ResNet-50), in module order.

    The layout of torchvision's ``resnet50``: a 7x7 stem, four stages of bottleneck blocks
    (1x1, 3x3, 1x1 convolutions without bias, each followed by batch norm; expansion 4), a
    1x1 projection shortcut in each stage's first block, and a ``fc`` head. ResNet-50:
    161 tensors, 25,557,032 elements. ``layers=(3, 4, 23, 3)`` gives ResNet-101.

    References:
        He et al., "Deep Residual Learning for Image Recognition", CVPR 2016.

    Example:
        >>> from gradclip import bench
        >>> len(bench.resnet50_shapes()), bench.resnet50_shapes()[-2]
        (161, ('fc.weight', (1000, 2048)))
    """
    expansion = 4
    shapes: NamedShapes = [("conv1.weight", (64, 3, 7, 7)), *_batch_norm("bn1", 64)]
    inplanes = 64
    for stage, (planes, blocks) in enumerate(zip((64, 128, 256, 512), layers, strict=True), 1):
        width = planes * expansion
        for b in range(blocks):
            pre = f"layer{stage}.{b}."
            shapes += [
                (pre + "conv1.weight", (planes, inplanes, 1, 1)),
                *_batch_norm(pre + "bn1", planes),
                (pre + "conv2.weight", (planes, planes, 3, 3)),
                *_batch_norm(pre + "bn2", planes),
                (pre + "conv3.weight", (width, planes, 1, 1)),
                *_batch_norm(pre + "bn3", width),
            ]
            if b == 0:  # the channel count (and the stride) changes: projection shortcut
                shapes += [
                    (pre + "downsample.0.weight", (width, inplanes, 1, 1)),
                    *_batch_norm(pre + "downsample.1", width),
                ]
            inplanes = width
    return [*shapes, ("fc.weight", (num_classes, inplanes)), ("fc.bias", (num_classes,))]


def _tiny2000_shapes() -> NamedShapes:
    return [(f"t{i}", (1000,)) for i in range(2000)]


def _huge100m_shapes() -> NamedShapes:
    return [("huge", (100_000_000,))]


@dataclass(frozen=True)
class Case:
    """A standard gradient set: how to get its shapes, its dtype and a one-line description."""

    name: str
    shapes: Callable[[], NamedShapes]
    dtype: torch.dtype
    description: str


CASES: dict[str, Case] = {
    c.name: c
    for c in (
        Case("gpt2", gpt2_shapes, torch.float32, "GPT-2 small, 148 tensors, 124.4M fp32"),
        Case("gpt2-bf16", gpt2_shapes, torch.bfloat16, "GPT-2 small, 148 tensors, 124.4M bf16"),
        Case("resnet50", resnet50_shapes, torch.float32, "ResNet-50, 161 tensors, 25.6M fp32"),
        Case("tiny2000", _tiny2000_shapes, torch.float32, "2,000 tensors of 1,000 fp32"),
        Case("huge100M", _huge100m_shapes, torch.float32, "one tensor of 100M fp32"),
    )
}
"""The standard gradient sets, by name."""

QUICK_CASES = ("gpt2", "resnet50", "tiny2000")
"""The cases ``gradclip bench --quick`` runs."""


@dataclass(frozen=True)
class GradSet:
    """Parameters with random ``.grad``: the input of one benchmark case.

    Attributes:
        name: the case name.
        params: the parameters; ``p.grad`` is random normal, ``p``'s own data is
            uninitialised (clipping never reads it, and untouched memory costs no RAM).
        dtype: dtype of every gradient.

    Example:
        >>> from gradclip import bench
        >>> gs = bench.make_grad_set("demo", [("w", (3, 4))])
        >>> gs.numel, gs.n_tensors, gs.params[0].grad.shape
        (12, 1, torch.Size([3, 4]))
    """

    name: str
    params: list[torch.nn.Parameter]
    dtype: torch.dtype

    @property
    def n_tensors(self) -> int:
        """Number of gradient tensors."""
        return len(self.params)

    @property
    def numel(self) -> int:
        """Total number of gradient elements."""
        return sum(p.numel() for p in self.params)


def make_grad_set(
    name: str,
    shapes: NamedShapes | None = None,
    dtype: torch.dtype | None = None,
    *,
    std: float = 1e-3,
    seed: int = 0,
) -> GradSet:
    """Build a :class:`GradSet`: one ``nn.Parameter`` per shape, ``.grad`` ~ N(0, std²).

    Args:
        name: a key of :data:`CASES`, or any label when ``shapes`` is given.
        shapes: ``(name, shape)`` pairs; default: the case's own shapes.
        dtype: gradient dtype; default: the case's dtype, else float32.
        std: standard deviation of the gradients.
        seed: seed of the generator, so a case is the same in every run.

    Example:
        >>> from gradclip import bench
        >>> bench.make_grad_set("resnet50").n_tensors
        161
    """
    case = CASES.get(name)
    if shapes is None:
        if case is None:
            raise ValueError(f"unknown case {name!r}; pass one of {sorted(CASES)} or give `shapes`")
        shapes = case.shapes()
    if dtype is None:
        dtype = case.dtype if case is not None else torch.float32
    generator = torch.Generator().manual_seed(seed)
    params = []
    for _, shape in shapes:
        param = torch.nn.Parameter(torch.empty(shape, dtype=dtype))
        param.grad = torch.empty(shape, dtype=dtype).normal_(0.0, std, generator=generator)
        params.append(param)
    return GradSet(name, params, dtype)


# ---------------------------------------------------------------------------------------
# reference norm


def reference_norm(tensors: Sequence[Tensor], norm_type: float, chunk: int = 1 << 20) -> float:
    """The ``norm_type``-norm of all elements of ``tensors``, accumulated in float64.

    Each tensor is read in chunks of ``chunk`` elements, so no full-size float64 copy is
    made. For ``p > 0`` the norm of the per-tensor norms (torch's total) equals the norm of
    all elements, which is what this computes.

    Example:
        >>> import torch
        >>> from gradclip import bench
        >>> bench.reference_norm([torch.tensor([3.0]), torch.tensor([4.0])], 2.0)
        5.0
    """
    if not norm_type > 0:
        raise ValueError(f"`norm_type` must be > 0 for a reference norm, got {norm_type}")
    total = 0.0
    for t in tensors:
        flat = t.detach().reshape(-1)
        for start in range(0, flat.numel(), chunk):
            part = flat[start : start + chunk].to(torch.float64).abs()
            if math.isinf(norm_type):
                total = max(total, part.max().item())
            else:
                total += part.pow(norm_type).sum().item()
    return total if math.isinf(norm_type) else total ** (1.0 / norm_type)


# ---------------------------------------------------------------------------------------
# configuration and records


@dataclass(frozen=True)
class BenchConfig:
    """What to run and how carefully.

    Attributes:
        cases: names from :data:`CASES`.
        norm_types: values of ``norm_type`` (``math.inf`` for the max norm).
        modes: ``"noclip"`` and/or ``"clip"``.
        reps: quiet repetitions wanted per (case, norm type, mode).
        max_reps: repetitions allowed in all while waiting for quiet ones (default 2x reps).
        max_seconds: per measurement, start no repetition after this many seconds once
            ``min(3, reps)`` have run (a time budget for loaded machines); None: no limit.
        min_rep_seconds: a repetition repeats every variant until it lasts this long, so the
            CPU-load accounting (10 ms ticks) can see foreign load.
        max_foreign_cores: a repetition is quiet when other processes used at most this many
            cores during it.
        seed: seed of the gradient sets.

    Example:
        >>> from gradclip import bench
        >>> bench.BenchConfig(reps=5).max_reps
        10
    """

    cases: tuple[str, ...] = tuple(CASES)
    norm_types: tuple[float, ...] = (2.0, math.inf)
    modes: tuple[str, ...] = MODES
    reps: int = 15
    max_reps: int | None = None
    max_seconds: float | None = None
    min_rep_seconds: float = 0.1
    max_foreign_cores: float = 0.25
    seed: int = 0

    def __post_init__(self) -> None:
        unknown = [c for c in self.cases if c not in CASES]
        if unknown:
            raise ValueError(f"unknown case(s) {unknown}; valid cases: {list(CASES)}")
        bad_modes = [m for m in self.modes if m not in MODES]
        if bad_modes:
            raise ValueError(f"unknown mode(s) {bad_modes}; valid modes: {list(MODES)}")
        if self.reps < 1:
            raise ValueError(f"`reps` must be >= 1, got {self.reps}")
        if self.max_reps is None:
            object.__setattr__(self, "max_reps", 2 * self.reps)
        elif self.max_reps < self.reps:
            raise ValueError(f"`max_reps` must be >= reps ({self.reps}), got {self.max_reps}")


def config(
    *,
    quick: bool = False,
    cases: Sequence[str] | None = None,
    norm_types: Sequence[float] | None = None,
    modes: Sequence[str] | None = None,
    reps: int | None = None,
) -> BenchConfig:
    """The full (default) or quick configuration, with the given fields overridden.

    Quick: :data:`QUICK_CASES` (no gpt2-bf16, no huge100M), 7 repetitions, but none
    started after 2 s per measurement once 3 have run: about 20 s on 2 quiet cores (more
    when other processes load them: every call slows down). Full: every case, 15
    repetitions, a few minutes.

    Example:
        >>> from gradclip import bench
        >>> bench.config(quick=True).cases
        ('gpt2', 'resnet50', 'tiny2000')
    """
    base = BenchConfig(cases=QUICK_CASES, reps=7, max_seconds=2.0) if quick else BenchConfig()
    overrides: dict[str, object] = {}
    if cases is not None:
        overrides["cases"] = tuple(cases)
    if norm_types is not None:
        overrides["norm_types"] = tuple(float(p) for p in norm_types)
    if modes is not None:
        overrides["modes"] = tuple(modes)
    if reps is not None:
        overrides["reps"] = reps
        overrides["max_reps"] = None
    return replace(base, **overrides) if overrides else base


@dataclass(frozen=True)
class BenchRecord:
    """Timing of one (case, norm type, mode): ours vs torch on the same gradients.

    Times are medians over the repetitions used, in milliseconds per call; ratios are
    medians of per-repetition paired ratios (lower is faster for us).

    Attributes:
        case, dtype, n_tensors, numel, norm_type, mode: what was measured.
        ours_ms, torch_ms, floor_ms: median time of one call; the floor is one
            ``torch.sum`` over a flat buffer with the same number of bytes and dtype.
        ratio, ratio_min, ratio_max: ours/torch, median and range over repetitions.
        ours_x_floor, torch_x_floor: time as a multiple of the floor (paired median).
        reps_used, reps_run: repetitions kept / run; calls_per_rep: calls of each
            implementation per repetition.
        quiet: True if the repetitions used were all quiet (little foreign CPU load).
        clipped: fraction of timed calls that clipped (1 in ``clip`` mode, 0 in ``noclip``).
    """

    case: str
    dtype: str
    n_tensors: int
    numel: int
    norm_type: float
    mode: str
    ours_ms: float
    torch_ms: float
    floor_ms: float
    ratio: float
    ratio_min: float
    ratio_max: float
    ours_x_floor: float
    torch_x_floor: float
    reps_used: int
    reps_run: int
    calls_per_rep: int
    quiet: bool
    clipped: float


@dataclass(frozen=True)
class AccuracyRecord:
    """Returned total norms of one (case, norm type) vs a float64 reference.

    Attributes:
        reference: the float64 norm (:func:`reference_norm`).
        ours, torch: the norms returned by each implementation, as Python floats.
        ours_rel_err, torch_rel_err: ``|norm - reference| / reference``.
    """

    case: str
    dtype: str
    norm_type: float
    reference: float
    ours: float
    torch: float
    ours_rel_err: float
    torch_rel_err: float


@dataclass(frozen=True)
class Target:
    """A goal: ``metric`` of (case, norm type[, mode]) must be at most ``limit``.

    ``metric`` is ``"ratio"`` (median ours/torch time) or ``"rel_err"`` (relative error of
    our returned norm vs float64; ``mode`` is then None).
    """

    case: str
    norm_type: float
    mode: str | None
    metric: str
    limit: float


@dataclass(frozen=True)
class TargetCheck:
    """A :class:`Target` against a measurement; ``value`` is None when it was not measured."""

    target: Target
    value: float | None

    @property
    def met(self) -> bool | None:
        """True / False, or None when not measured."""
        return None if self.value is None else self.value <= self.target.limit


TARGETS: tuple[Target, ...] = (
    *(Target(c, 2.0, "noclip", "ratio", 0.5) for c in ("gpt2", "resnet50", "tiny2000")),
    *(Target(c, 2.0, "clip", "ratio", 0.9) for c in ("gpt2", "resnet50")),
    *(Target(c, math.inf, "noclip", "ratio", 0.2) for c in ("gpt2", "resnet50")),
    *(Target(c, math.inf, "clip", "ratio", 0.3) for c in ("gpt2", "resnet50")),
    Target("gpt2", 2.0, None, "rel_err", 1e-5),
)
"""The performance and accuracy goals of the engine (CPU, torch 2.13)."""


@dataclass(frozen=True)
class BenchResult:
    """Everything one benchmark run measured.

    Attributes:
        records: one :class:`BenchRecord` per (case, norm type, mode).
        accuracy: one :class:`AccuracyRecord` per (case, norm type).
        config: the configuration that ran.
        env: versions, threads and machine, as strings.
        wall_seconds: duration of the whole run, building the gradient sets included.
    """

    records: list[BenchRecord]
    accuracy: list[AccuracyRecord]
    config: BenchConfig
    env: dict[str, str] = field(default_factory=dict)
    wall_seconds: float = 0.0


def check_targets(result: BenchResult, targets: Sequence[Target] = TARGETS) -> list[TargetCheck]:
    """Each target against ``result`` (value None where the run did not measure it).

    Example:
        >>> from gradclip import bench
        >>> empty = bench.BenchResult([], [], bench.BenchConfig())
        >>> bench.check_targets(empty)[0].met is None
        True
    """
    checks = []
    for t in targets:
        value: float | None = None
        if t.metric == "ratio":
            value = next(
                (
                    r.ratio
                    for r in result.records
                    if (r.case, r.norm_type, r.mode) == (t.case, t.norm_type, t.mode)
                ),
                None,
            )
        else:
            value = next(
                (
                    a.ours_rel_err
                    for a in result.accuracy
                    if (a.case, a.norm_type) == (t.case, t.norm_type)
                ),
                None,
            )
        checks.append(TargetCheck(t, value))
    return checks


# ---------------------------------------------------------------------------------------
# measurement


class _ForeignLoad:
    """CPU used by other processes during a time window, in cores (Linux ``/proc/stat``).

    Busy time of all CPUs (steal included) minus our own CPU time, less one tick of
    rounding slack, divided by the wall time. 0 where ``/proc/stat`` is unavailable.
    """

    def __init__(self) -> None:
        self.tick = 1.0 / os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 0.01
        self._start = self._sample()

    @staticmethod
    def _busy_ticks() -> int | None:
        try:
            with open("/proc/stat") as f:
                fields = f.readline().split()[1:]
        except OSError:
            return None
        values = [int(v) for v in fields[:8]]
        return sum(values) - values[3] - values[4]  # all but idle and iowait

    def _sample(self) -> tuple[int | None, float, float]:
        return self._busy_ticks(), time.process_time(), time.perf_counter()

    def start(self) -> None:
        self._start = self._sample()

    def stop(self) -> float:
        busy0, own0, wall0 = self._start
        busy1, own1, wall1 = self._sample()
        if busy0 is None or busy1 is None or wall1 <= wall0:
            return 0.0
        foreign = (busy1 - busy0) * self.tick - (own1 - own0) - self.tick
        return max(0.0, foreign) / (wall1 - wall0)


class _Anchor:
    """Keeps ``max_norm`` at a fixed factor of the gradients' current norm.

    After a call that returned the pre-clip norm ``n`` with ``max_norm`` ``m``, the current
    norm is ``n * min(1, m / (n + 1e-6))``. In ``clip`` mode every call shrinks the
    gradients by ~2%; when they fall below a quarter of their initial norm they are scaled
    back up, outside the timed region.
    """

    def __init__(self, grads: list[Tensor], norm: float, factor: float) -> None:
        self.grads, self.norm, self.initial, self.factor = grads, norm, norm, factor

    def max_norm(self) -> float:
        return self.factor * self.norm

    def update(self, returned: float, max_norm: float) -> bool:
        """Record a call's result; True if that call clipped."""
        coef = min(1.0, max_norm / (returned + _EPS))
        self.norm = returned * coef
        if self.norm < self.initial / 4:
            scale = self.initial / self.norm
            with torch.no_grad():
                torch._foreach_mul_(self.grads, scale)
            self.norm *= scale
        return coef < 1.0


# Orders of (ours, torch, floor) within a repetition: every permutation, ours and torch
# alternating which runs first.
_ORDERS = (
    ("ours", "torch", "floor"),
    ("torch", "ours", "floor"),
    ("floor", "ours", "torch"),
    ("floor", "torch", "ours"),
    ("ours", "floor", "torch"),
    ("torch", "floor", "ours"),
)


def _measure(
    gs: GradSet,
    p: float,
    mode: str,
    norm: float,
    floor_buf: Tensor,
    cfg: BenchConfig,
    ours: ClipFn,
    theirs: ClipFn,
) -> tuple[BenchRecord, float]:
    """Time one (norm type, mode); also return the gradients' norm afterwards."""
    grads = [param.grad for param in gs.params if param.grad is not None]
    anchor = _Anchor(grads, norm, _MAX_NORM_FACTOR[mode])
    fns = {"ours": ours, "torch": theirs}
    clipped = [0, 0]  # clipping calls, timed calls

    def call(variant: str, count: bool) -> float:
        if variant == "floor":
            start = time.perf_counter()
            torch.sum(floor_buf)
            return time.perf_counter() - start
        max_norm = anchor.max_norm()
        start = time.perf_counter()
        returned = fns[variant](gs.params, max_norm, p)
        elapsed = time.perf_counter() - start
        did_clip = anchor.update(float(returned), max_norm)
        if count:
            clipped[0] += did_clip
            clipped[1] += 1
        return elapsed

    # Warm-up (caches, allocator, lazy initialisation); its duration sets the calls per rep.
    for order in _ORDERS[:2]:
        warm = sum(call(v, count=False) for v in order)
    calls = max(1, min(20, math.ceil(cfg.min_rep_seconds / max(warm, 1e-9))))

    load = _ForeignLoad()
    reps: list[tuple[dict[str, float], bool]] = []
    quiet_count = 0
    max_reps = cfg.max_reps or 2 * cfg.reps
    deadline = math.inf if cfg.max_seconds is None else time.perf_counter() + cfg.max_seconds
    while quiet_count < cfg.reps and len(reps) < max_reps:
        if len(reps) >= min(3, cfg.reps) and time.perf_counter() > deadline:
            break
        order = _ORDERS[len(reps) % len(_ORDERS)]
        totals = dict.fromkeys(order, 0.0)
        load.start()
        for _ in range(calls):
            for variant in order:
                totals[variant] += call(variant, count=True)
        quiet = load.stop() <= cfg.max_foreign_cores
        quiet_count += quiet
        reps.append(({k: v / calls for k, v in totals.items()}, quiet))

    quiet_reps = [t for t, q in reps if q]
    enough = len(quiet_reps) >= math.ceil(cfg.reps / 2)  # else the load was not occasional
    used = quiet_reps if enough else [t for t, _ in reps]
    ratios = [t["ours"] / t["torch"] for t in used]
    record = BenchRecord(
        case=gs.name,
        dtype=str(gs.dtype).removeprefix("torch."),
        n_tensors=gs.n_tensors,
        numel=gs.numel,
        norm_type=p,
        mode=mode,
        ours_ms=1e3 * statistics.median(t["ours"] for t in used),
        torch_ms=1e3 * statistics.median(t["torch"] for t in used),
        floor_ms=1e3 * statistics.median(t["floor"] for t in used),
        ratio=statistics.median(ratios),
        ratio_min=min(ratios),
        ratio_max=max(ratios),
        ours_x_floor=statistics.median(t["ours"] / t["floor"] for t in used),
        torch_x_floor=statistics.median(t["torch"] / t["floor"] for t in used),
        reps_used=len(used),
        reps_run=len(reps),
        calls_per_rep=calls,
        quiet=enough,
        clipped=clipped[0] / max(1, clipped[1]),
    )
    return record, anchor.norm


def _accuracy(gs: GradSet, p: float, ours: ClipFn, theirs: ClipFn) -> AccuracyRecord:
    """Both implementations' returned norm vs float64, on unchanged gradients (no clipping)."""
    reference = reference_norm([param.grad for param in gs.params if param.grad is not None], p)
    max_norm = 10 * reference
    norm_ours = float(ours(gs.params, max_norm, p))
    norm_torch = float(theirs(gs.params, max_norm, p))

    def rel(x: float) -> float:
        return abs(x - reference) / reference if reference else abs(x)

    return AccuracyRecord(
        case=gs.name,
        dtype=str(gs.dtype).removeprefix("torch."),
        norm_type=p,
        reference=reference,
        ours=norm_ours,
        torch=norm_torch,
        ours_rel_err=rel(norm_ours),
        torch_rel_err=rel(norm_torch),
    )


def run_grad_set(
    gs: GradSet,
    cfg: BenchConfig,
    progress: Progress | None = None,
    *,
    ours: ClipFn = gradclip.clip_grad_norm_,
    theirs: ClipFn = torch.nn.utils.clip_grad_norm_,
) -> tuple[list[BenchRecord], list[AccuracyRecord]]:
    """Benchmark one gradient set for every norm type and mode of ``cfg`` (``cfg.cases`` unused).

    ``ours`` and ``theirs`` are called as ``fn(params, max_norm, norm_type)`` on the same
    gradients; pass another ``ours`` to compare an engine variant.

    Example:
        >>> from gradclip import bench
        >>> gs = bench.make_grad_set("demo", [("w", (8, 8))])
        >>> records, acc = bench.run_grad_set(gs, bench.BenchConfig(modes=("clip",), reps=1))
        >>> [(r.norm_type, r.clipped) for r in records]
        [(2.0, 1.0), (inf, 1.0)]
    """
    floor_buf = torch.empty(gs.numel, dtype=gs.dtype).fill_(1e-3)  # written: no zero pages
    records: list[BenchRecord] = []
    accuracy: list[AccuracyRecord] = []
    for p in cfg.norm_types:
        acc = _accuracy(gs, p, ours, theirs)
        accuracy.append(acc)
        norm = acc.reference
        for mode in cfg.modes:
            if progress is not None:
                progress(f"{gs.name} p={_fmt_p(p)} {mode}")
            # clip mode shrinks the gradients: the next mode starts from their current norm
            record, norm = _measure(gs, p, mode, norm, floor_buf, cfg, ours, theirs)
            records.append(record)
    return records, accuracy


def _env() -> dict[str, str]:
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(
                (line.split(":", 1)[1].strip() for line in f if line.startswith("model name")),
                cpu,
            )
    except OSError:
        pass
    return {
        "gradclip": gradclip.__version__,
        "torch": torch.__version__,
        "python": platform.python_version(),
        "threads": str(torch.get_num_threads()),
        "cpus": str(os.cpu_count()),
        "cpu": cpu,
        "platform": platform.platform(),
    }


def run(cfg: BenchConfig | None = None, progress: Progress | None = None) -> BenchResult:
    """Run the benchmark: build each case once, measure it, free it before the next.

    Args:
        cfg: what to run; default: the full benchmark (:func:`config`).
        progress: called with a short line before each measurement (e.g. print to stderr).

    Returns:
        A :class:`BenchResult`; render it with :func:`render` or :func:`to_json`.

    Example:
        >>> from gradclip import bench
        >>> result = bench.run(bench.config(quick=True))  # doctest: +SKIP
        >>> print(bench.render(result))  # doctest: +SKIP
    """
    cfg = cfg if cfg is not None else config()
    start = time.perf_counter()
    records: list[BenchRecord] = []
    accuracy: list[AccuracyRecord] = []
    for name in cfg.cases:
        if progress is not None:
            progress(f"building {name}: {CASES[name].description}")
        gs = make_grad_set(name, seed=cfg.seed)
        case_records, case_accuracy = run_grad_set(gs, cfg, progress)
        records += case_records
        accuracy += case_accuracy
        del gs
        gc.collect()  # free this case's gradients before building the next
    return BenchResult(records, accuracy, cfg, _env(), time.perf_counter() - start)


# ---------------------------------------------------------------------------------------
# rendering


def _fmt_p(p: float) -> str:
    return "inf" if math.isinf(p) else f"{p:g}"


def _jsonable(value: object) -> object:
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)  # "inf" / "nan": JSON has no literal for them
    if isinstance(value, dict):
        return {k: _jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_jsonable(v) for v in value]
    return value


def to_dict(result: BenchResult) -> dict[str, object]:
    """``result`` as plain JSON-ready data (non-finite floats as strings), with target checks.

    Example:
        >>> from gradclip import bench
        >>> sorted(bench.to_dict(bench.BenchResult([], [], bench.BenchConfig())))
        ['accuracy', 'config', 'env', 'records', 'targets', 'wall_seconds']
    """
    checks = [{**asdict(c.target), "value": c.value, "met": c.met} for c in check_targets(result)]
    data = {**asdict(result), "targets": checks}
    return _jsonable(data)  # type: ignore[return-value]


def to_json(result: BenchResult) -> str:
    """``result`` as an indented JSON document (see :func:`to_dict`)."""
    return json.dumps(to_dict(result), indent=2)


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]

    def line(cells: list[str]) -> str:
        return "  ".join(
            c.ljust(w) if i < 3 else c.rjust(w)
            for i, (c, w) in enumerate(zip(cells, widths, strict=True))
        ).rstrip()

    return [line(header), line(["-" * w for w in widths]), *map(line, rows)]


def render(result: BenchResult) -> str:
    """A plain-text report: timings, accuracy and targets.

    Example:
        >>> from gradclip import bench
        >>> print(bench.render(bench.BenchResult([], [], bench.BenchConfig())).splitlines()[0])
        gradclip.clip_grad_norm_ vs torch.nn.utils.clip_grad_norm_ (same gradients, interleaved)
    """
    env = result.env
    out = [
        "gradclip.clip_grad_norm_ vs torch.nn.utils.clip_grad_norm_ (same gradients, interleaved)",
    ]
    if env:
        out.append(
            f"gradclip {env.get('gradclip')}, torch {env.get('torch')}, "
            f"{env.get('threads')} threads, {env.get('cpus')} CPUs ({env.get('cpu')}), "
            f"wall {result.wall_seconds:.1f} s"
        )
    out.append("")
    targets = {(t.case, t.norm_type, t.mode): t.limit for t in TARGETS if t.metric == "ratio"}
    rows = []
    for r in result.records:
        limit = targets.get((r.case, r.norm_type, r.mode))
        verdict = "" if limit is None else f"<={limit:g} " + ("ok" if r.ratio <= limit else "MISS")
        rows.append(
            [
                r.case,
                _fmt_p(r.norm_type),
                r.mode,
                f"{r.ours_ms:.2f}",
                f"{r.torch_ms:.2f}",
                f"{r.floor_ms:.2f}",
                f"{r.ratio:.2f} [{r.ratio_min:.2f}-{r.ratio_max:.2f}]",
                f"{r.ours_x_floor:.1f}x",
                f"{r.torch_x_floor:.1f}x",
                f"{r.reps_used}/{r.reps_run}" + ("" if r.quiet else " noisy"),
                verdict,
            ]
        )
    out += _table(
        [
            "case",
            "p",
            "mode",
            "ours ms",
            "torch ms",
            "floor ms",
            "ours/torch [min-max]",
            "ours/floor",
            "torch/floor",
            "reps",
            "target",
        ],
        rows,
    )
    if result.accuracy:
        out += ["", "Returned norm, relative error vs float64:"]
        out += _table(
            ["case", "p", "dtype", "ours", "torch"],
            [
                [
                    a.case,
                    _fmt_p(a.norm_type),
                    a.dtype,
                    f"{a.ours_rel_err:.1e}",
                    f"{a.torch_rel_err:.1e}",
                ]
                for a in result.accuracy
            ],
        )
    checks = check_targets(result)
    measured = [c for c in checks if c.value is not None]
    if measured:
        missed = [c for c in measured if not c.met]
        out += ["", f"Targets: {len(measured) - len(missed)}/{len(measured)} met."]
        for c in missed:
            t = c.target
            what = f"{t.mode} ours/torch" if t.metric == "ratio" else "norm rel. error"
            out.append(
                f"  MISS {t.case} p={_fmt_p(t.norm_type)} {what}: {c.value:.3g} > {t.limit:g}"
            )
    out += [
        "",
        "Times: median ms per call; ratios: median [min-max] of per-repetition pairs; "
        "floor: one torch.sum over the same bytes.",
        "reps: used/run (repetitions with foreign CPU load dropped; 'noisy': too few quiet "
        "ones, all used).",
    ]
    return "\n".join(out)
