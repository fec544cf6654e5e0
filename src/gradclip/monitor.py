"""Seeing what clipping does: :class:`GradMonitor` records every step, per layer, on the device.

The monitor reads the :class:`~gradclip.ClipStats` of each step, per-tensor norms included
(the clip pass already computed them: no second pass over the gradients). It combines them
into per-module norms on the device and keeps every step in preallocated device buffers;
every ``every`` steps it copies the buffers to the host in one read and hands the step
records (:mod:`gradclip.sinks`) to its sinks. Other steps never read a device value.

Layers have stable columns: a parameter name seen for the first time adds a column (the
buffers grow on the device), so a parameter set that changes from step to step (a
mixture-of-experts model routes each batch to a few experts) costs no flush and no host
read; a layer absent from a step is absent from that step's record.

**Inside torch.compile.** ``record()`` traces with ``torch.compile(fullgraph=True)``: its
write position and step counter are device tensors, so a compiled step compiles once. A
compiled call cannot count steps on the host, so the flush stays outside: call
``monitor.flush()`` from your (eager) training loop at least every ``every`` steps, e.g.
``if (step + 1) % monitor.every == 0: monitor.flush()``. Should more than ``every`` steps
arrive between flushes, the oldest are overwritten and the flush warns how many were lost.
Steps recorded while compiling have no wall-clock time (``"time": NaN``); scalars passed
to a compiled ``record()`` should be tensors (a changing Python number recompiles).

Example:
    >>> import torch, gradclip
    >>> model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.Linear(4, 1))
    >>> records = []
    >>> with gradclip.GradMonitor(gradclip.NormClip(0.1), model, sinks=records.append) as mon:
    ...     for _ in range(3):
    ...         model(torch.randn(8, 4)).pow(2).mean().backward()
    ...         stats = mon(loss=1.0)
    ...         model.zero_grad()
    >>> len(records), sorted(records[0]["layers"])
    (3, ['0', '1'])
"""

from __future__ import annotations

import math
import numbers
import os
import time
import warnings
from collections.abc import Iterable

import torch
from torch import Tensor

from gradclip._cache import LRU
from gradclip._checks import ArgumentTypeError, check_count, check_real
from gradclip.clippers import Clipper, Parameters, Snapshot, SpikeReport, UpdateNorms
from gradclip.clippers.adaptive import OptimizerKinds, known_optimizers, optimizer_kind
from gradclip.history import History, HistoryBuilder, LayerStat, MonitorSummary, NonFiniteEvent
from gradclip.recorder import Scalar, StepRecorder, layer_name
from gradclip.records import Record
from gradclip.scale import clip_coefficient
from gradclip.sinks import Sink, SinkLike, as_sinks
from gradclip.stalls import STALL_FLOOR, STALL_STEPS, Stall, StallDetector
from gradclip.stats import FLAG_FIELDS, GROUP_PREFIX, SCALAR_FIELDS, UPDATE_PREFIX, ClipStats

__all__ = ["GradMonitor", "layer_name"]

MAX_STEP = 2**53
"""Steps travel to the host as float64, exact below this."""

# -- argument checks: everything is checked (and converted) before a buffer is written --


def _check_scalar(name: str, value: object) -> Scalar:
    if isinstance(value, Tensor):
        if value.numel() != 1 or value.is_complex():
            raise ValueError(
                f"scalar `{name}` must be one real number, got a {value.dtype} tensor of shape "
                f"{tuple(value.shape)}; pass e.g. `{name}=loss.detach()` for a 0-dim loss"
            )
        return value.detach().reshape(())
    if isinstance(value, numbers.Real):
        return float(value)
    raise ArgumentTypeError(
        f"scalar `{name}` must be a real number or a one-element tensor, got "
        f"{type(value).__name__} {value!r:.60}; pass e.g. `{name}=0.5`"
    )


def _check_step(step: object) -> int | Tensor | None:
    if step is None:
        return None
    if isinstance(step, Tensor):
        if step.numel() != 1 or step.is_floating_point() or step.is_complex() or step.dtype == torch.bool:
            raise ValueError(
                f"`step` must be an int or a one-element integer tensor, got a {step.dtype} "
                f"tensor of shape {tuple(step.shape)}"
            )
        return step.detach().reshape(()).to(torch.int64)
    number = check_count(step, "step", 0, "step=100")
    if number >= MAX_STEP:  # type: ignore[operator]
        raise ValueError(f"`step` must be < 2**53, got {number}; pass the training step, e.g. `step=100`")
    return number


def _from_total(total: Tensor, max_norm: float | None) -> tuple[list[Tensor], list[Tensor]]:
    """Step fields from a bare total norm, with torch's coefficient for ``max_norm``."""
    if max_norm is None:
        coef = torch.ones_like(total)
        threshold = torch.full_like(total, math.nan)
    else:
        threshold = torch.full_like(total, max_norm)
        coef = clip_coefficient(threshold, total)
    finite = torch.isfinite(total)
    no = torch.zeros_like(finite)  # no spike detector: nothing is a spike
    bound, score = torch.full_like(total, math.inf), torch.zeros_like(total)
    return [total, total * coef, threshold, coef, bound, score], [coef < 1, finite, no, no]


def _run_fields(optimizer: object, fix: str) -> dict[str, str | bool]:
    """The records' :data:`~gradclip.records.RUN_FIELDS` naming ``optimizer``
    (:data:`~gradclip.clippers.adaptive.OptimizerKinds`; ``TypeError`` naming the argument
    with ``fix`` otherwise)."""
    name, normalising = optimizer_kind(optimizer, fix)
    return {"optimizer": name, "normalising": normalising}


def _add_report(record: Record, report: SpikeReport, depth: int | None) -> None:
    """A step record's forensics from a :class:`~gradclip.SpikeReport` read on the host, by
    layer (the record's own grouping): each layer's largest ratio and max-abs, the layers
    holding NaN/inf in backward order, and the rank."""
    layers: dict[str, float] = {}
    max_abs: dict[str, float] = {}
    for entry in report.layers:
        name = layer_name(entry.name, depth)
        layers[name] = max(entry.ratio, layers.get(name, -math.inf))
        if not math.isnan(entry.max_abs):
            max_abs[name] = max(entry.max_abs, max_abs.get(name, -math.inf))
    nonfinite = list(dict.fromkeys(layer_name(n, depth) for n in report.nonfinite))
    forensics = {"layers": layers, "max_abs": max_abs, "nonfinite": nonfinite}
    if report.rank is not None:
        forensics["rank"] = report.rank
    record["forensics"] = forensics


def _step_values(
    stats: object, max_norm: object, norm_type: object
) -> tuple[list[Tensor], list[Tensor], Tensor | None, tuple[str, ...], float]:
    """(scalar fields, flags, per-tensor norms, names, p) of one step, checked."""
    if isinstance(stats, ClipStats):
        names = tuple(stats.names)
        per_tensor = stats.norms.per_tensor
        if per_tensor.numel() != len(names):
            raise ValueError(
                f"the ClipStats has {len(names)} names for {per_tensor.numel()} per-tensor norms; "
                "pass the ClipStats a clipper returned, unchanged"
            )
        fields = [getattr(stats, k) for k in SCALAR_FIELDS]
        flags = [getattr(stats, k) for k in FLAG_FIELDS]
        p = float(stats.norms.norm_type)
    elif isinstance(stats, Tensor):
        if stats.numel() != 1 or stats.is_complex():
            raise ValueError(
                f"record() takes the total norm as one real number, got a {stats.dtype} tensor of "
                f"shape {tuple(stats.shape)}"
            )
        threshold = None if max_norm is None else check_real(
            max_norm, "max_norm", ">= 0", lambda v: v >= 0, "max_norm=1.0")
        p = check_real(norm_type, "norm_type", ">= 0 (or inf)", lambda v: v >= 0, "norm_type=2.0")
        names, per_tensor = (), None
        fields, flags = _from_total(stats.detach().reshape(()), threshold)
    else:
        raise TypeError(
            f"record() takes the ClipStats of a clipper or a total-norm tensor, got "
            f"{type(stats).__name__}"
        )
    for name, value in zip((*SCALAR_FIELDS, *FLAG_FIELDS), (*fields, *flags), strict=True):
        if not isinstance(value, Tensor) or value.numel() != 1:
            raise ValueError(f"ClipStats.{name} must be a one-element tensor, got {value!r:.60}")
    return fields, flags, per_tensor, names, p


@torch.compiler.assume_constant_result
def _setup_while_tracing(
    monitor: GradMonitor, names: tuple[str, ...], device: torch.device, p: float,
    extra_names: tuple[str, ...],
) -> tuple[tuple[int, ...], tuple[int, ...]]:
    # Dynamo runs this for real while it traces, and bakes the returned columns into the
    # graph as constants: the traced code never reads the name -> column tables, and the
    # buffers it reads are never reallocated while it traces (that raises instead), so the
    # next call sees no change and does not recompile. Idempotent: a trace may restart.
    return monitor._prepare(names, device, p, extra_names, tracing=True)


class GradMonitor:
    """Records what a clipper does each step, per layer, without extra passes or host syncs.

    Attach it to a clipper and a module and call it instead of the clipper; or call
    :meth:`record` with the :class:`~gradclip.ClipStats` your clipper returned (or the total
    norm a drop-in returned). Use it as a context manager, or call :meth:`close`, so that
    the last steps reach the sinks.

    Args:
        clipper: the clipper to run (None: only :meth:`record` is used).
        module: the model (or parameters) to clip when called without arguments.
        log: a log file to append to: JSON lines (``.csv``: CSV). Never truncated; see
            :mod:`gradclip.sinks` for what several writers on one path get. Same as adding
            it to ``sinks``.
        sinks: more sinks: :class:`~gradclip.sinks.Sink` objects, callables (called with
            each record), paths.
        every: steps between flushes (the rows of the device buffers).
        depth: layers are modules cut to this many name components (None: the module that
            owns each parameter); see :func:`layer_name`.
        updates: measure the optimizer's update in :meth:`step`: per layer the ratio
            ``‖Δθ‖ / ‖θ‖`` (extras ``update/<layer>``, and ``update/total``), from a copy of
            the parameters taken before the step (:class:`gradclip.clippers.Snapshot`: one
            copy of the parameters in memory). ``True``: every step; an int ``n``: every
            ``n``-th step (the others record none); ``False`` (default): never.
        optimizer: the optimizer stepped after the clip, its class or ``torch.optim`` name
            (``"AdamW"``), or a list of them (``[muon, adamw]``): its kind is written to every
            record (``optimizer``, ``normalising``), so that
            :func:`gradclip.recommend_max_norm` and ``gradclip recommend`` read from the log
            the rule that fits it. :meth:`step` sets it from the optimizer it steps, and
            :meth:`record` takes one too; None (default): not said, unless they are used.
        stall_floor, stall_steps: the stall detector: when the clip coefficient of every
            gradient, or of a parameter group (the clipper's ``groups=``), stays below
            ``stall_floor`` for ``stall_steps`` consecutive steps while its norm grows, the
            flush warns once per group (:attr:`stalls` lists them). ``stall_steps=None``
            turns it off.

    Example:
        >>> import torch, gradclip
        >>> model = torch.nn.Linear(4, 1)
        >>> mon = gradclip.GradMonitor(gradclip.NormClip(1e-3), model)
        >>> model(torch.ones(2, 4)).sum().backward()
        >>> stats = mon(loss=0.5)
        >>> mon.summary().clip_rate
        1.0
    """

    def __init__(
        self,
        clipper: Clipper | None = None,
        module: Parameters | None = None,
        *,
        log: str | os.PathLike[str] | None = None,
        sinks: SinkLike | Iterable[SinkLike] | None = None,
        every: int = 100,
        depth: int | None = None,
        updates: bool | int = False,
        optimizer: OptimizerKinds | None = None,
        stall_floor: float = STALL_FLOOR,
        stall_steps: int | None = STALL_STEPS,
    ):
        self.every: int = check_count(every, "every", 1, "every=100")  # type: ignore[assignment]
        self.depth = check_count(depth, "depth", 1, "depth=2", none="the module owning each parameter")
        if isinstance(updates, bool):
            self.updates = int(updates)
        else:
            self.updates = check_count(updates, "updates", 0, "updates=10")  # type: ignore[assignment]
        floor = check_real(stall_floor, "stall_floor", "in (0, 1]", lambda v: 0 < v <= 1,
                           "stall_floor=1e-3")
        stall = check_count(stall_steps, "stall_steps", 1, "stall_steps=50", none="no detector")
        self._stall = None if stall is None else StallDetector(floor, stall)
        # what the records say of the optimizer (records.RUN_FIELDS); empty: not said
        self._run: dict[str, str | bool] = {} if optimizer is None else _run_fields(
            optimizer, "the one stepped after the clip, or None"
        )
        self.stalls: list[Stall] = []
        self._warned_stalls: set[str] = set()
        self._snapshot = Snapshot()
        self._update_calls = 0
        self._update_layers: LRU[tuple[str, ...], tuple[tuple[str, ...], Tensor]] = LRU(8)
        if clipper is not None and not isinstance(clipper, Clipper):
            raise TypeError(
                f"`clipper` must be a gradclip Clipper (e.g. gradclip.NormClip(1.0)), got "
                f"{type(clipper).__name__}"
            )
        if log is not None and not isinstance(log, str | os.PathLike):
            raise TypeError(f"`log` must be a path (str or os.PathLike) or None, got {type(log).__name__}")
        self.clipper, self.module = clipper, module
        self.sinks: list[Sink] = as_sinks(sinks)
        if log is not None:
            self.sinks += as_sinks(log)
        self._closed = False
        self._pending = 0  # eager records since the last flush (compiled ones are not counted)
        self._traced = False  # a compiled record() may have written: flushes always read
        self._steps = StepRecorder(self.every, self.depth)  # the device buffers
        # the flushed steps, on the host: compact columns and per-layer aggregates
        self._kept = HistoryBuilder(layers=False)
        self._layer_max: dict[str, float] = {}
        self._layer_sum: dict[str, tuple[float, int]] = {}
        self._nonfinite_layers: dict[str, int] = {}
        self._first_nonfinite: NonFiniteEvent | None = None
        self._reports: dict[int, SpikeReport] = {}  # eager record index since the flush -> report

    # -- recording ------------------------------------------------------------------------

    def __call__(self, parameters: Parameters | None = None, **scalars: float | Tensor) -> ClipStats:
        """Clip with the clipper, record the step (and ``scalars``), return the ClipStats.

        A ``loss`` among the scalars also goes to the clipper's spike detector."""
        clipper, params = self._clipper_and_params(parameters)
        stats = clipper(params, loss=scalars.get("loss"))
        self.record(stats, **scalars)
        return stats

    def step(
        self,
        optimizer: torch.optim.Optimizer,
        parameters: Parameters | None = None,
        **scalars: float | Tensor,
    ) -> ClipStats:
        """``clipper.step(parameters, optimizer)`` (clip, then step, honouring skips), recorded;
        with ``updates``, the update it made too.

        A ``loss`` among the scalars also goes to the clipper's spike detector (averaged over
        ranks under ``torch.distributed``; see :class:`~gradclip.SpikeDetector`)."""
        clipper, params = self._clipper_and_params(parameters)
        measure = self.updates > 0 and self._update_calls % self.updates == 0
        self._update_calls += 1
        if measure:
            self._snapshot.take(params)
        stats = clipper.step(params, optimizer, loss=scalars.get("loss"))
        # the log names it where it is torch.optim's kind (a wrapper's kind is not known)
        self.record(stats, update=self._snapshot.measure() if measure else None,
                    optimizer=known_optimizers(optimizer), **scalars)  # fmt: skip
        return stats

    def _clipper_and_params(self, parameters: Parameters | None) -> tuple[Clipper, Parameters]:
        params = parameters if parameters is not None else self.module
        if self.clipper is None or params is None:
            raise ValueError(
                "this GradMonitor has no clipper or no module: build it as "
                "GradMonitor(clipper, model), or call monitor.record(stats) after clipping"
            )
        return self.clipper, params

    def record(
        self,
        stats: ClipStats | Tensor,
        *,
        max_norm: float | None = None,
        norm_type: float = 2.0,
        step: int | Tensor | None = None,
        update: UpdateNorms | None = None,
        optimizer: OptimizerKinds | None = None,
        **scalars: float | Tensor,
    ) -> None:
        """Store one step: a :class:`~gradclip.ClipStats`, or a total norm from a drop-in.

        Args:
            stats: what the clipper returned; or the pre-clip total norm (0-dim tensor)
                returned by :func:`gradclip.clip_grad_norm_` (no per-layer norms then).
            max_norm: with a total norm, the ``max_norm`` it was clipped to (torch's rule
                gives the coefficient and post-clip norm); ignored with ClipStats.
            norm_type: with a total norm, its p (ignored with ClipStats).
            step: the training step, an int or an integer 0-dim tensor (default: one more
                than the last recorded).
            update: the optimizer's update of this step
                (:meth:`gradclip.clippers.Snapshot.measure`): its per-layer ratios
                ``‖Δθ‖ / ‖θ‖`` are kept as the scalars ``update/<layer>`` and
                ``update/total``.
            optimizer: the optimizer stepped after this clip (or a list): the records name
                its kind from the next flush on, as with the monitor's ``optimizer=``.
            scalars: numbers or one-element tensors to keep with the step (loss, lr, ...).
                A ClipStats of a clipper with groups adds ``group/<name>/norm``,
                ``group/<name>/coef`` and ``group/<name>/threshold`` (NaN for a group left
                out of the clip, as Muon's by default).

        Every argument is checked before anything is stored: a call that raises records
        nothing. No device value is read, except by the flush of a full buffer (eager
        calls only; see the module doc for ``torch.compile``).
        """
        if self._closed:
            raise RuntimeError("this GradMonitor is closed; build a new one")
        fields, flags, per_tensor, names, p = _step_values(stats, max_norm, norm_type)
        step = _check_step(step)
        if update is not None and not isinstance(update, UpdateNorms):
            raise TypeError(f"`update` must be the UpdateNorms of Snapshot.measure(), got "
                            f"{type(update).__name__}")
        run = None if optimizer is None else _run_fields(
            optimizer, "the one stepped after this clip, or None"
        )
        extras = {name: _check_scalar(name, value) for name, value in scalars.items()}
        groups = stats.groups if isinstance(stats, ClipStats) else None
        if groups is not None:
            for i, name in enumerate(groups.names):
                extras[f"{GROUP_PREFIX}{name}/norm"] = groups.norm[i]
                extras[f"{GROUP_PREFIX}{name}/coef"] = groups.coef[i]
                extras[f"{GROUP_PREFIX}{name}/threshold"] = groups.threshold[i]
        if update is not None:
            extras.update(self._update_scalars(update))
        device = fields[0].device
        tracing = torch.compiler.is_compiling()
        if tracing:
            columns, extra_columns = _setup_while_tracing(self, names, device, p, tuple(extras))
            index = torch.tensor(columns, dtype=torch.long, device=device) if columns else None
        else:
            if self._pending >= self.every:
                self.flush()
            columns, extra_columns = self._prepare(names, device, p, tuple(extras), tracing=False)
            index = self._steps.index_of(names, columns)
        by_column = dict(zip(extra_columns, extras.values(), strict=True))
        top = None
        if isinstance(stats, ClipStats) and stats.spike_top is not None and stats.spike_ratios is not None:
            top = (stats.spike_top, stats.spike_ratios)
        self._steps.write(index, fields, flags, per_tensor, step, by_column,
                          math.nan if tracing else time.time(), top)  # no clock in a graph
        if run is not None:
            self._run = run
        if not tracing:
            report = stats.spike_report if isinstance(stats, ClipStats) else None
            if report is not None:  # read on the host already: it joins the step's record
                self._reports[self._pending] = report
            self._pending += 1

    def _update_scalars(self, update: UpdateNorms) -> dict[str, Tensor]:
        """``update/<layer>`` and ``update/total`` ratios, on the device (no host read)."""
        cached = self._update_layers.get(update.names)
        if cached is None:
            layers = [layer_name(n, self.depth) for n in update.names]
            unique = tuple(dict.fromkeys(layers))
            index = torch.tensor([unique.index(n) for n in layers], dtype=torch.long,
                                 device=update.update.device)
            cached = self._update_layers.put(update.names, (unique, index))
        unique, index = cached
        squares = torch.stack([update.update.double().square(), update.param.double().square()])
        sums = squares.new_zeros(2, len(unique)).index_add_(1, index.to(squares.device), squares)
        ratios = torch.where(sums[0] == 0, 0.0, sums[0].sqrt() / sums[1].sqrt())
        out = {f"{UPDATE_PREFIX}{name}": ratios[i] for i, name in enumerate(unique)}
        total = update.total.double()
        out[f"{UPDATE_PREFIX}total"] = torch.where(total == 0, 0.0,
                                                   total / update.param_total.double())
        return out

    def log(self, **scalars: float | Tensor) -> None:
        """Attach ``scalars`` to the last recorded step (e.g. the update size after step())."""
        extras = {name: _check_scalar(name, value) for name, value in scalars.items()}
        tracing = torch.compiler.is_compiling()
        device, p = self._steps.device, self._steps.p
        if device is None or (not tracing and self._pending == 0 and not self._traced):
            raise RuntimeError("log() attaches scalars to the last recorded step: record one first")
        if tracing:
            _, columns = _setup_while_tracing(self, (), device, p, tuple(extras))
        else:
            _, columns = self._prepare((), device, p, tuple(extras), tracing=False)
        self._steps.attach(dict(zip(columns, extras.values(), strict=True)))

    def _prepare(
        self, names: tuple[str, ...], device: torch.device, p: float,
        extra_names: tuple[str, ...], *, tracing: bool,
    ) -> tuple[tuple[int, ...], tuple[int, ...]]:
        """Buffers for this step's device and p (flushing those of another first), columns
        for its layers and scalars; returns the columns of ``names`` and ``extra_names``."""
        traced_before, self._traced = self._traced, self._traced or tracing
        steps = self._steps
        if steps.device is not None and not steps.matches(device, p):
            if tracing:  # new buffers would go unseen by the code being traced
                raise RuntimeError(
                    f"a compiled record() on {device} with norm_type {p}, and this monitor's "
                    f"buffers are on {steps.device} with norm_type {steps.p}: inside compiled "
                    "code, use one monitor per device and norm type"
                )
            if self._pending or traced_before:
                self.flush()
        return steps.setup(names, device, p, extra_names, tracing=tracing)

    # -- flushing ---------------------------------------------------------------------------

    def flush(self) -> None:
        """Copy the buffered steps to the host (one read) and write them to every sink.

        Call it from eager code (not inside a compiled function); under ``torch.compile``
        call it at least every ``every`` steps (see the module doc).
        """
        if self._steps.device is None or (self._pending == 0 and not self._traced):
            return
        written, records, layer_names, aggregates = self._steps.read()
        self._pending = 0
        for r in records:  # the steps since the last flush: one run, one optimizer
            r.update(self._run)
        reports, self._reports = self._reports, {}
        if written <= self.every:  # (else the oldest were overwritten: positions moved)
            for position, report in reports.items():
                if position < len(records):
                    _add_report(records[position], report, self.depth)
        if written > self.every:
            warnings.warn(
                f"GradMonitor: {written} steps were recorded since the last flush, more than "
                f"every={self.every}: the oldest {written - self.every} were overwritten and are "
                f"not in the log. Inside torch.compile, call monitor.flush() at least every "
                f"{self.every} steps",
                stacklevel=2,
            )
        self._remember(records, aggregates, layer_names)
        errors = []
        for sink in self.sinks:  # every sink gets the records, even if one fails
            try:
                sink.write(records)
            except Exception as exc:  # re-raised below, after the other sinks
                errors.append(exc)
        if errors:
            raise errors[0]

    def _remember(self, records: list[Record], aggregates: list[float], layer_names: list[str]) -> None:
        for r in records:
            self._kept.add(r)
            if self._stall is not None:
                for stall in self._stall.feed_record(r):
                    self.stalls.append(stall)
                    if stall.group not in self._warned_stalls:
                        self._warned_stalls.add(stall.group)
                        warnings.warn(f"GradMonitor: {stall.describe()}", stacklevel=4)
            if not r["finite"] and self._first_nonfinite is None:
                bad = tuple(k for k, v in r["layers"].items() if not math.isfinite(v))
                self._first_nonfinite = NonFiniteEvent(r["step"], bad, r["skipped"])
        g = len(layer_names)
        peak, total, count, first_bad = (aggregates[i * g : (i + 1) * g] for i in range(4))
        for j, name in enumerate(layer_names):
            if count[j]:
                self._layer_max[name] = max(peak[j], self._layer_max.get(name, -math.inf))
                s, c = self._layer_sum.get(name, (0.0, 0))
                self._layer_sum[name] = (s + total[j], c + int(count[j]))
            if first_bad[j] >= 0:
                self._nonfinite_layers.setdefault(name, records[int(first_bad[j])]["step"])

    def close(self) -> None:
        """Flush the last steps and close the sinks. Safe to call twice."""
        if self._closed:
            return
        try:
            self.flush()
        finally:
            self._closed = True
            for sink in self.sinks:
                sink.close()

    def __enter__(self) -> GradMonitor:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- results ----------------------------------------------------------------------------

    def history(self) -> History:
        """The flushed steps' totals, flags and scalars as a :class:`History` (no per-layer
        columns: the monitor keeps per-layer aggregates only; read the log for those)."""
        return self._kept.build()

    def summary(self, top: int = 5) -> MonitorSummary:
        """Clip rate, norm percentiles, top layers, first non-finite layers (flushes first)."""
        if not self._closed:
            self.flush()
        stats = [
            LayerStat(name, mx, self._layer_sum[name][0] / self._layer_sum[name][1])
            for name, mx in self._layer_max.items()
        ]
        return MonitorSummary.of(
            self.history(), stats, dict(self._nonfinite_layers), self._first_nonfinite, top
        )
