"""Seeing what clipping does: :class:`GradMonitor`, the :class:`History` of a run, its summary.

The monitor reads the :class:`~gradclip.ClipStats` of each step, per-tensor norms included
(the clip pass already computed them: no second pass over the gradients). It combines
them into per-module norms on the device, keeps every step in preallocated device buffers,
and every ``every`` steps copies the buffers to the host in one read and hands the step
records to its sinks (:mod:`gradclip.sinks`). Other steps never read a device value.

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

import json
import math
import os
import time
from array import array
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from gradclip.clippers import Clipper, Parameters
from gradclip.sinks import (
    SCHEMA_VERSION,
    LogError,
    Record,
    Sink,
    SinkLike,
    as_sinks,
    decode_record,
)
from gradclip.stats import ClipStats

__all__ = [
    "GradMonitor",
    "History",
    "LayerStat",
    "MonitorSummary",
    "NonFiniteEvent",
    "layer_name",
    "read_log",
]

_EPS = 1e-6  # torch's clip_coef = max_norm / (total + 1e-6)
_MAX_PROBLEMS = 20  # problems listed one by one; the rest are counted


def layer_name(param_name: str, depth: int | None = None) -> str:
    """The module a parameter belongs to, cut to its first ``depth`` components.

    A parameter directly on the root module (no dot in its name) is its own layer.

    Example:
        >>> layer_name("h.0.attn.c_attn.weight"), layer_name("h.0.attn.c_attn.weight", 2)
        ('h.0.attn.c_attn', 'h.0')
        >>> layer_name("bias")
        'bias'
    """
    parts = param_name.split(".")[:-1]
    if depth is not None:
        parts = parts[:depth]
    return ".".join(parts) or param_name


# ---------------------------------------------------------------------------------------
# summary


@dataclass(frozen=True)
class LayerStat:
    """One layer's pre-clip norms over the run: the largest finite one, and their mean."""

    name: str
    max: float
    mean: float


@dataclass(frozen=True)
class NonFiniteEvent:
    """A step whose gradients held NaN/inf, and the layers whose norm was non-finite."""

    step: int
    layers: tuple[str, ...]
    skipped: bool


@dataclass(frozen=True)
class MonitorSummary:
    """What clipping did over a run.

    Attributes:
        steps: recorded steps.
        clipped_steps, nonfinite_steps, skipped_steps: steps that clipped / had NaN-inf
            gradients / were skipped.
        clip_rate: ``clipped_steps / steps`` (0 when nothing was recorded).
        norm_percentiles: ``{"p50", "p90", "p99", "max"}`` of the finite pre-clip norms.
        threshold: the last finite threshold recorded (None: none).
        top_layers: the layers with the largest finite pre-clip norm, largest first.
        first_nonfinite: the first step with non-finite gradients and its layers (None: none).
        nonfinite_layers: each layer that was ever non-finite -> the first step it was.
    """

    steps: int
    clipped_steps: int
    nonfinite_steps: int
    skipped_steps: int
    clip_rate: float
    norm_percentiles: dict[str, float]
    threshold: float | None
    top_layers: tuple[LayerStat, ...]
    first_nonfinite: NonFiniteEvent | None
    nonfinite_layers: dict[str, int] = field(default_factory=dict)

    def to_text(self) -> str:
        """A few plain lines for a terminal."""
        pct = ", ".join(f"{k} {v:.4g}" for k, v in self.norm_percentiles.items())
        lines = [
            f"{self.steps} steps; clipped {self.clipped_steps} ({self.clip_rate:.1%}); "
            f"non-finite {self.nonfinite_steps} (skipped {self.skipped_steps})",
            f"pre-clip norm: {pct or 'no finite value'}; threshold: {self.threshold}",
        ]
        if self.top_layers:
            tops = ", ".join(f"{t.name} (max {t.max:.3g})" for t in self.top_layers)
            lines.append(f"top layers: {tops}")
        if self.first_nonfinite is not None:
            e = self.first_nonfinite
            lines.append(f"first non-finite at step {e.step}: {', '.join(e.layers) or '?'}")
        return "\n".join(lines)


def _percentiles(values: Tensor) -> dict[str, float]:
    finite = values[torch.isfinite(values)]
    if finite.numel() == 0:
        return {}
    q = torch.quantile(finite, torch.tensor([0.5, 0.9, 0.99], dtype=finite.dtype)).tolist()
    return {"p50": q[0], "p90": q[1], "p99": q[2], "max": finite.max().item()}


def _summarize(
    steps: Tensor,
    norm: Tensor,
    threshold: Tensor,
    clipped: Tensor,
    finite: Tensor,
    skipped: Tensor,
    layers: list[LayerStat],
    nonfinite_layers: dict[str, int],
    first_nonfinite: NonFiniteEvent | None,
    top: int,
) -> MonitorSummary:
    n = int(norm.numel())
    thresholds = threshold[torch.isfinite(threshold)]
    ranked = sorted((s for s in layers if math.isfinite(s.max)), key=lambda s: -s.max)
    return MonitorSummary(
        steps=n,
        clipped_steps=int(clipped.sum()),
        nonfinite_steps=int((~finite).sum()),
        skipped_steps=int(skipped.sum()),
        clip_rate=float(clipped.double().mean()) if n else 0.0,
        norm_percentiles=_percentiles(norm),
        threshold=float(thresholds[-1]) if thresholds.numel() else None,
        top_layers=tuple(ranked[:top]),
        first_nonfinite=first_nonfinite,
        nonfinite_layers=nonfinite_layers,
    )


# ---------------------------------------------------------------------------------------
# history


@dataclass(frozen=True)
class History:
    """A recorded run as columns: one entry per step, oldest first (CPU tensors).

    Attributes:
        steps: (N,) int64 training steps.
        norm, post_norm, threshold, coef: (N,) float64 (see the record schema in
            :mod:`gradclip.sinks`).
        clipped, finite, skipped: (N,) bool.
        layer_names: the G layers, in order of first appearance.
        layers: (N, G) float64 pre-clip layer norms; NaN where a step did not record one.
        extras: name -> (N,) float64 caller-attached scalars (NaN where absent).
        norm_type: p of the norms.
        source: the log file it was read from, if any.
        problems: what was wrong with the log ("file:line: ..."), empty when nothing was.

    Example:
        >>> h = History.from_norms([1.0, 2.0, 50.0], threshold=4.0)
        >>> h.clipped.tolist()
        [False, False, True]
    """

    steps: Tensor
    norm: Tensor
    post_norm: Tensor
    threshold: Tensor
    coef: Tensor
    clipped: Tensor
    finite: Tensor
    skipped: Tensor
    layer_names: tuple[str, ...] = ()
    layers: Tensor = field(default_factory=lambda: torch.zeros(0, 0, dtype=torch.float64))
    extras: dict[str, Tensor] = field(default_factory=dict)
    norm_type: float = 2.0
    source: str | None = None
    problems: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if self.layers.numel() == 0 and self.layers.shape != (len(self), 0):
            # no layers recorded: (N, 0), so that row-wise code needs no special case
            object.__setattr__(self, "layers", self.layers.new_zeros(len(self), 0))

    def __len__(self) -> int:
        return int(self.steps.numel())

    @classmethod
    def from_norms(
        cls, norms: Sequence[float] | Tensor, threshold: float | None = None
    ) -> History:
        """A history of bare pre-clip norms, clipped at ``threshold`` (torch's rule) if given."""
        norm = torch.as_tensor(norms, dtype=torch.float64).reshape(-1).cpu()
        thr = torch.full_like(norm, math.nan if threshold is None else float(threshold))
        coef = (thr / (norm + _EPS)).clamp(max=1.0).nan_to_num(nan=1.0)
        return cls(
            steps=torch.arange(norm.numel()),
            norm=norm,
            post_norm=norm * coef,
            threshold=thr,
            coef=coef,
            clipped=coef < 1,
            finite=torch.isfinite(norm),
            skipped=torch.zeros(norm.numel(), dtype=torch.bool),
        )

    @classmethod
    def from_records(
        cls,
        records: Sequence[Mapping[str, Any]],
        *,
        source: str | None = None,
        problems: Sequence[str] = (),
    ) -> History:
        """Columns from step records (the dicts a monitor writes, or :func:`decode_record`'s)."""
        names: dict[str, int] = {}
        extra_names: dict[str, int] = {}
        for r in records:
            for k in r.get("layers", {}):
                names.setdefault(k, len(names))
            for k in r.get("extra", {}):
                extra_names.setdefault(k, len(extra_names))
        n = len(records)
        layers = torch.full((n, len(names)), math.nan, dtype=torch.float64)
        extras = torch.full((n, len(extra_names)), math.nan, dtype=torch.float64)
        # Rows are filled through Python lists: one tensor conversion instead of N*G writes.
        if names:
            layers = _matrix(records, "layers", names)
        if extra_names:
            extras = _matrix(records, "extra", extra_names)

        def col(name: str, dtype: torch.dtype = torch.float64) -> Tensor:
            return torch.tensor([r[name] for r in records], dtype=dtype)

        norm_types = {float(r.get("norm_type", 2.0)) for r in records}
        return cls(
            steps=col("step", torch.int64),
            norm=col("norm"),
            post_norm=col("post_norm"),
            threshold=col("threshold"),
            coef=col("coef"),
            clipped=col("clipped", torch.bool),
            finite=col("finite", torch.bool),
            skipped=col("skipped", torch.bool),
            layer_names=tuple(names),
            layers=layers,
            extras={k: extras[:, i] for k, i in extra_names.items()},
            norm_type=norm_types.pop() if len(norm_types) == 1 else math.nan,
            source=source,
            problems=tuple(problems),
        )

    def nonfinite_events(self) -> list[NonFiniteEvent]:
        """Every step with non-finite gradients, with the layers whose norm was non-finite."""
        bad = (~self.finite).nonzero().flatten().tolist()
        out = []
        for i in bad:
            row = self.layers[i] if self.layers.numel() else self.layers.new_zeros(0)
            which = ~torch.isfinite(row)
            present = [self.layer_names[j] for j in which.nonzero().flatten().tolist()]
            out.append(NonFiniteEvent(int(self.steps[i]), tuple(present), bool(self.skipped[i])))
        return out

    def summary(self, top: int = 5) -> MonitorSummary:
        """Clip rate, norm percentiles, top layers and first non-finite layers of the run."""
        stats = []
        nonfinite_layers: dict[str, int] = {}
        for j, name in enumerate(self.layer_names):
            col = self.layers[:, j]
            ok = col[torch.isfinite(col)]
            stats.append(
                LayerStat(
                    name,
                    float(ok.max()) if ok.numel() else math.nan,
                    float(ok.mean()) if ok.numel() else math.nan,
                )
            )
            bad = (torch.isinf(col) | (col.isnan() & ~self.finite)).nonzero().flatten()
            if bad.numel():
                nonfinite_layers[name] = int(self.steps[bad[0]])
        events = self.nonfinite_events()
        return _summarize(
            self.steps,
            self.norm,
            self.threshold,
            self.clipped,
            self.finite,
            self.skipped,
            stats,
            nonfinite_layers,
            events[0] if events else None,
            top,
        )


def _matrix(records: Sequence[Mapping[str, Any]], key: str, names: dict[str, int]) -> Tensor:
    nan = math.nan
    order = list(names)
    rows = [[r.get(key, {}).get(k, nan) for k in order] for r in records]
    return torch.tensor(rows, dtype=torch.float64).reshape(len(records), len(order))


def read_log(path: str | os.PathLike[str]) -> History:
    """Read a JSON lines log written by :class:`GradMonitor` into a :class:`History`.

    Lines that cannot be trusted (not JSON, truncated, missing fields, a newer schema) are
    left out, each named in ``History.problems`` as ``"file:line: what"``; the rest of the
    log is still read, since every line is a self-contained record.

    Raises:
        LogError: the file is missing, unreadable or empty, or no line is a valid record.

    Example:
        >>> read_log("no/such/file.jsonl")
        Traceback (most recent call last):
        ...
        gradclip.sinks.LogError: no/such/file.jsonl: no such file
    """
    path = Path(path)
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        raise LogError(f"{path}: no such file") from None
    except OSError as exc:
        raise LogError(f"{path}: cannot read it ({exc.strerror or exc})") from None
    lines = raw.split(b"\n")
    truncated = bool(lines) and lines[-1] != b""
    if not truncated:
        lines = lines[:-1]
    records: list[Record] = []
    problems: list[str] = []
    bad = 0
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            records.append(decode_record(json.loads(line)))
            continue
        except (ValueError, RecursionError) as exc:  # JSONDecodeError, UnicodeDecodeError too
            last = number == len(lines) and truncated
            what = "truncated last line (the run was probably interrupted)" if last else str(exc)
            if isinstance(exc, json.JSONDecodeError) and not last:
                what = f"not a JSON record ({exc.msg}, column {exc.colno})"
        bad += 1
        if len(problems) < _MAX_PROBLEMS:
            problems.append(f"{path}:{number}: {what}")
    if bad > len(problems):
        problems.append(f"{path}: {bad - len(problems)} more bad lines not listed")
    if not records:
        if not raw.strip():
            raise LogError(f"{path}: empty log (no step was recorded)")
        first = problems[0] if problems else f"{path}: no step records"
        raise LogError(f"{first}; no valid step record in the file")
    return History.from_records(records, source=str(path), problems=problems)


# ---------------------------------------------------------------------------------------
# the monitor


class GradMonitor:
    """Records what a clipper does each step, per layer, without extra passes or host syncs.

    Attach it to a clipper and a module and call it instead of the clipper; or call
    :meth:`record` with the :class:`~gradclip.ClipStats` of a clipper you call yourself,
    or with the total norm returned by :func:`gradclip.clip_grad_norm_` (then no per-layer
    norms are known).

    Per step it stores on the device: pre-/post-clip total norm, threshold, coefficient,
    the clipped / finite / skipped flags, the pre-clip norm of every layer (per-tensor
    norms of one module combined as a p-norm, through a group index built once) and any
    scalars you attach (``loss=...``). Every ``every`` steps (and on :meth:`flush` /
    :meth:`close`) the buffers reach the host in one read and go to the sinks as step
    records (schema in :mod:`gradclip.sinks`). Use it as a context manager (or call
    :meth:`close`) so that the last steps reach the sinks even when training raises.

    Args:
        clipper: the clipper to run in :meth:`__call__` / :meth:`step` (None: only
            :meth:`record` is used).
        module: the module (or parameters) it clips; a module gives the layer names.
        log: path of a log to write: JSON lines (``.csv``: CSV). Same as adding it to sinks.
        sinks: more sinks: :class:`~gradclip.sinks.Sink` objects, callables (called with
            each record), paths.
        every: steps between flushes (the size of the device buffers).
        depth: layers are modules cut to this many name components (None: the module that
            owns each parameter); see :func:`layer_name`.

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
    ):
        if isinstance(every, bool) or not isinstance(every, int) or every < 1:
            raise ValueError(f"`every` must be a positive integer, got {every!r}; pass e.g. 100")
        if depth is not None and (isinstance(depth, bool) or not isinstance(depth, int) or depth < 1):
            raise ValueError(f"`depth` must be None or an integer >= 1, got {depth!r}")
        if clipper is not None and not isinstance(clipper, Clipper):
            raise TypeError(
                f"`clipper` must be a gradclip Clipper (e.g. gradclip.NormClip(1.0)), got "
                f"{type(clipper).__name__}"
            )
        self.clipper, self.module, self.every, self.depth = clipper, module, every, depth
        self.sinks: list[Sink] = as_sinks(sinks)
        if log is not None:
            self.sinks += as_sinks(log)
        self._step = 0
        self._count = 0  # steps in the device buffers
        self._names: tuple[str, ...] | None = None
        self._layer_names: tuple[str, ...] = ()
        self._index: Tensor | None = None
        self._device: torch.device | None = None
        self._p = math.nan
        self._host_steps: list[int] = []
        self._host_times: list[float] = []
        self._extras: dict[str, Tensor] = {}
        self._closed = False
        # what the summary needs, on the host, compact: 8 bytes per step per column
        self._columns = {k: array("d") for k in ("norm", "post_norm", "threshold", "coef")}
        self._flags = {k: array("b") for k in ("clipped", "finite", "skipped")}
        self._all_steps = array("q")
        self._layer_max: dict[str, float] = {}
        self._layer_sum: dict[str, tuple[float, int]] = {}
        self._nonfinite_layers: dict[str, int] = {}
        self._first_nonfinite: NonFiniteEvent | None = None

    # -- recording ------------------------------------------------------------------------

    def __call__(self, parameters: Parameters | None = None, **scalars: float | Tensor) -> ClipStats:
        """Clip with the clipper, record the step (and ``scalars``), return the ClipStats."""
        clipper, params = self._clipper_and_params(parameters)
        stats = clipper(params)
        self.record(stats, **scalars)
        return stats

    def step(
        self,
        optimizer: torch.optim.Optimizer,
        parameters: Parameters | None = None,
        **scalars: float | Tensor,
    ) -> ClipStats:
        """``clipper.step(parameters, optimizer)`` (clip, then step, honouring skips), recorded."""
        clipper, params = self._clipper_and_params(parameters)
        stats = clipper.step(params, optimizer)
        self.record(stats, **scalars)
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
        step: int | None = None,
        **scalars: float | Tensor,
    ) -> None:
        """Store one step: a :class:`~gradclip.ClipStats`, or a total norm from a drop-in.

        Args:
            stats: what the clipper returned; or the pre-clip total norm (0-dim tensor)
                returned by :func:`gradclip.clip_grad_norm_` (no per-layer norms then).
            max_norm: with a total norm, the ``max_norm`` it was clipped to (torch's rule
                gives the coefficient and post-clip norm); ignored with ClipStats.
            norm_type: with a total norm, its p (ignored with ClipStats).
            step: the training step (default: one more than the last recorded).
            scalars: numbers or 0-dim tensors to keep with the step (loss, lr, ...).

        No device value is read here except on the step that fills the buffers.
        """
        if self._closed:
            raise RuntimeError("this GradMonitor is closed; build a new one")
        if self._count == self.every:
            self.flush()
        if isinstance(stats, ClipStats):
            names = stats.names
            per_tensor = stats.norms.per_tensor
            p = stats.norms.norm_type
            fields = (stats.norm, stats.post_norm, stats.threshold, stats.coef)
            flags = (stats.clipped, stats.finite, stats.skipped)
        elif isinstance(stats, Tensor):
            names, per_tensor, p = (), None, float(norm_type)
            fields, flags = _from_total(stats.detach(), max_norm)
        else:
            raise TypeError(
                f"record() takes the ClipStats of a clipper or a total-norm tensor, got "
                f"{type(stats).__name__}"
            )
        device = fields[0].device
        if names != self._names or device != self._device or p != self._p:
            self._rebuild(names, device, p)
        i = self._count
        torch.stack(fields, out=self._scalars[i])
        torch.stack(flags, out=self._flag_buf[i])
        if per_tensor is not None and self._index is not None and self._index.numel():
            self._add_layers(self._layers[i], per_tensor)
        for name, value in scalars.items():
            self._put_extra(name, i, value)
        self._step = self._step if step is None else int(step)
        self._host_steps.append(self._step)
        self._host_times.append(time.time())
        self._step += 1
        self._count += 1

    def log(self, **scalars: float | Tensor) -> None:
        """Attach ``scalars`` to the last recorded step (e.g. the update size after step())."""
        if self._count == 0:
            raise RuntimeError("log() attaches scalars to the last recorded step: record one first")
        for name, value in scalars.items():
            self._put_extra(name, self._count - 1, value)

    def _put_extra(self, name: str, i: int, value: float | Tensor) -> None:
        buf = self._extras.get(name)
        if buf is None:
            buf = self._extras[name] = torch.full(
                (self.every,), math.nan, dtype=torch.float64, device=self._device
            )
        if isinstance(value, Tensor):
            buf[i].copy_(value.detach().reshape(()), non_blocking=True)
        else:
            buf[i] = float(value)

    def _rebuild(self, names: tuple[str, ...], device: torch.device, p: float) -> None:
        """New parameter set (or first step): flush, then the group index and buffers."""
        if self._count:
            self.flush()
        groups: dict[str, int] = {}
        index = [groups.setdefault(layer_name(n, self.depth), len(groups)) for n in names]
        self._names, self._device, self._p = names, device, p
        self._layer_names = tuple(groups)
        self._index = torch.tensor(index, dtype=torch.long, device=device)
        self._scalars = torch.zeros(self.every, 4, dtype=torch.float64, device=device)
        self._flag_buf = torch.zeros(self.every, 3, dtype=torch.bool, device=device)
        self._layers = torch.zeros(self.every, len(groups), dtype=torch.float64, device=device)
        self._extras = {}

    def _add_layers(self, row: Tensor, per_tensor: Tensor) -> None:
        """Accumulate this step's per-tensor norms into per-layer ones (finished at flush)."""
        p = self._p
        if math.isinf(p):
            row.scatter_reduce_(0, self._index, per_tensor.to(row.dtype), "amax")
        elif p in (0.0, 1.0):  # p=0: counts add up; p=1: norms add up
            row.index_add_(0, self._index, per_tensor.to(row.dtype))
        else:  # a p-norm of a union is the p-th root of the sum of p-th powers
            row.index_add_(0, self._index, per_tensor.to(row.dtype).pow(p))

    # -- flushing ---------------------------------------------------------------------------

    def flush(self) -> None:
        """Copy the buffered steps to the host (one read) and write them to every sink."""
        n = self._count
        if n == 0:
            return
        layers = self._layers[:n]
        if not (math.isinf(self._p) or self._p in (0.0, 1.0)):
            layers = layers.pow(1.0 / self._p)
        # Per-layer aggregates for the summary, computed here on the device: a Python loop
        # over steps x layers would cost more than the monitored steps themselves.
        ok = torch.isfinite(layers)
        bad = ~ok
        aggregates = torch.stack([
            torch.where(ok, layers, -math.inf).amax(0),
            torch.where(ok, layers, 0.0).sum(0),
            ok.sum(0).to(layers.dtype),
            torch.where(bad.any(0), bad.double().argmax(0).to(layers.dtype), -1.0),
        ])  # fmt: skip
        extra_names = list(self._extras)
        columns = [self._scalars[:n], self._flag_buf[:n], layers]
        columns += [self._extras[k][:n, None] for k in extra_names]
        table = torch.cat(columns, dim=1)
        flat = torch.cat([table.flatten(), aggregates.flatten()]).cpu().tolist()  # one host read
        width = table.shape[1]
        rows = [flat[j * width : (j + 1) * width] for j in range(n)]
        g = len(self._layer_names)
        records = []
        for j, row in enumerate(rows):
            records.append({
                "schema": SCHEMA_VERSION,
                "step": self._host_steps[j],
                "time": self._host_times[j],
                "norm_type": self._p,
                "norm": row[0],
                "post_norm": row[1],
                "threshold": row[2],
                "coef": row[3],
                "clipped": bool(row[4]),
                "finite": bool(row[5]),
                "skipped": bool(row[6]),
                "layers": dict(zip(self._layer_names, row[7 : 7 + g], strict=True)),
                "extra": {k: v for k, v in zip(extra_names, row[7 + g :], strict=True)
                          if not math.isnan(v)},
            })  # fmt: skip
        self._count = 0
        self._host_steps, self._host_times = [], []
        self._layers.zero_()
        for buf in self._extras.values():
            buf.fill_(math.nan)
        self._remember(records, flat[n * width :])
        for sink in self.sinks:
            sink.write(records)

    def _remember(self, records: list[Record], aggregates: list[float]) -> None:
        for r in records:
            self._all_steps.append(r["step"])
            for k, values in self._columns.items():
                values.append(r[k])
            for k, flags in self._flags.items():
                flags.append(r[k])
            if not r["finite"] and self._first_nonfinite is None:
                bad = tuple(k for k, v in r["layers"].items() if not math.isfinite(v))
                self._first_nonfinite = NonFiniteEvent(r["step"], bad, r["skipped"])
        g = len(self._layer_names)
        peak, total, count, first_bad = (aggregates[i * g : (i + 1) * g] for i in range(4))
        for j, name in enumerate(self._layer_names):
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
        """The flushed steps' totals and flags as a :class:`History` (no per-layer columns:
        the monitor keeps per-layer aggregates only; read the log for those)."""
        def t(values: array, dtype: torch.dtype) -> Tensor:
            return torch.tensor(values.tolist(), dtype=dtype)

        cols = {k: t(v, torch.float64) for k, v in self._columns.items()}
        return History(
            steps=t(self._all_steps, torch.int64),
            **cols,
            clipped=t(self._flags["clipped"], torch.bool),
            finite=t(self._flags["finite"], torch.bool),
            skipped=t(self._flags["skipped"], torch.bool),
            norm_type=self._p,
        )

    def summary(self, top: int = 5) -> MonitorSummary:
        """Clip rate, norm percentiles, top layers, first non-finite layers (flushes first)."""
        if not self._closed:
            self.flush()
        h = self.history()
        stats = [
            LayerStat(name, mx, self._layer_sum[name][0] / self._layer_sum[name][1])
            for name, mx in self._layer_max.items()
        ]
        return _summarize(
            h.steps, h.norm, h.threshold, h.clipped, h.finite, h.skipped, stats,
            dict(self._nonfinite_layers), self._first_nonfinite, top,
        )  # fmt: skip


def _from_total(total: Tensor, max_norm: float | None) -> tuple[tuple[Tensor, ...], tuple[Tensor, ...]]:
    """Step fields from a bare total norm, with torch's coefficient for ``max_norm``."""
    if max_norm is None:
        coef = torch.ones_like(total)
        threshold = torch.full_like(total, math.nan)
    else:
        threshold = torch.full_like(total, float(max_norm))
        coef = (threshold / (total + _EPS)).clamp(max=1.0)
    finite = torch.isfinite(total)
    return (total, total * coef, threshold, coef), (coef < 1, finite, torch.zeros_like(finite))
