"""A recorded run: :class:`History` (columns of step records) and its :class:`MonitorSummary`.

Every column is built in compact arrays (8 bytes a number) by :class:`HistoryBuilder`, one
record at a time (the monitor's kept steps, or :func:`gradclip.readlog.read_log` reading a
log line by line), so a run takes memory in proportion to its numbers, not to its text.

Example:
    >>> h = History.from_norms([1.0, 2.0, 50.0], threshold=4.0)
    >>> h.summary().clipped_steps, h.summary().norm_percentiles["max"]
    (1, 50.0)
"""

from __future__ import annotations

import math
from array import array
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from gradclip.scale import clip_coefficient
from gradclip.stalls import STALL_FLOOR, STALL_STEPS, Stall, StallDetector
from gradclip.stats import FLAG_FIELDS, GROUP_PREFIX, SCALAR_FIELDS, STEP_FIELDS, UPDATE_PREFIX

__all__ = [
    "History",
    "HistoryBuilder",
    "LayerStat",
    "MonitorSummary",
    "NonFiniteEvent",
    "SpikeEvent",
]

_DEFAULTS = {f.name: f.default for f in STEP_FIELDS if f.default is not None}
"""What a record without a field means (spike fields: logs written without a detector)."""
MAX_NAMES = 1 << 16
"""Most distinct layer (and extra) names kept from one log; more are named and left out."""
MAX_CELLS = 1 << 27
"""Most steps x layers held as a dense matrix (1 GiB of float64); past it, the first layers
are kept and the rest named in ``History.problems``."""


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
class SpikeEvent:
    """A step the spike detector called a spike, with its forensics where the log has them.

    Attributes:
        step: the training step.
        norm: the total gradient norm; bound: the detector's bound (the largest norm that is
            not a spike; ``inf`` in its warm-up).
        skipped: whether the optimizer step was skipped.
        loss: the step's ``loss`` extra, if one was logged (else NaN).
        layers: parameter name -> its norm over its running median, largest first.
        max_abs: parameter name -> its largest absolute gradient value (where measured).
        nonfinite: parameters with a NaN/inf norm, in backward order.
        rank: the rank that wrote the forensics (None: not distributed, or not known).
    """

    step: int
    norm: float
    bound: float
    skipped: bool
    loss: float
    layers: dict[str, float]
    max_abs: dict[str, float]
    nonfinite: tuple[str, ...]
    rank: int | None


def _percentiles(values: Tensor) -> dict[str, float]:
    finite = values[torch.isfinite(values)]
    if finite.numel() == 0:
        return {}
    q = torch.quantile(finite, torch.tensor([0.5, 0.9, 0.99], dtype=finite.dtype)).tolist()
    return {"p50": q[0], "p90": q[1], "p99": q[2], "max": finite.max().item()}


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
        spike_steps: steps a spike detector called spikes.
        spike_score: the SpikeScore of the last step (0 without a detector).
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
    spike_steps: int = 0
    spike_score: float = 0.0

    @classmethod
    def of(
        cls,
        history: History,
        layers: Sequence[LayerStat],
        nonfinite_layers: dict[str, int],
        first_nonfinite: NonFiniteEvent | None,
        top: int = 5,
    ) -> MonitorSummary:
        """The summary of ``history``'s totals, with per-layer figures computed elsewhere
        (from its layer matrix, or from a monitor's running aggregates)."""
        n = len(history)
        thresholds = history.threshold[torch.isfinite(history.threshold)]
        ranked = sorted((s for s in layers if math.isfinite(s.max)), key=lambda s: -s.max)
        return cls(
            steps=n,
            clipped_steps=int(history.clipped.sum()),
            nonfinite_steps=int((~history.finite).sum()),
            skipped_steps=int(history.skipped.sum()),
            clip_rate=float(history.clipped.double().mean()) if n else 0.0,
            norm_percentiles=_percentiles(history.norm),
            threshold=float(thresholds[-1]) if thresholds.numel() else None,
            top_layers=tuple(ranked[:top]),
            first_nonfinite=first_nonfinite,
            nonfinite_layers=nonfinite_layers,
            spike_steps=int(history.spike.sum()),
            spike_score=float(history.spike_score[-1]) if n else 0.0,
        )

    def to_text(self) -> str:
        """A few plain lines for a terminal."""
        pct = ", ".join(f"{k} {v:.4g}" for k, v in self.norm_percentiles.items())
        lines = [
            f"{self.steps} steps; clipped {self.clipped_steps} ({self.clip_rate:.1%}); "
            f"non-finite {self.nonfinite_steps}; skipped {self.skipped_steps}",
            f"pre-clip norm: {pct or 'no finite value'}; threshold: {self.threshold}",
        ]
        if self.top_layers:
            tops = ", ".join(f"{t.name} (max {t.max:.3g})" for t in self.top_layers)
            lines.append(f"top layers: {tops}")
        if self.first_nonfinite is not None:
            e = self.first_nonfinite
            lines.append(f"first non-finite at step {e.step}: {', '.join(e.layers) or '?'}")
        if self.spike_steps:
            lines.append(f"spikes: {self.spike_steps}; SpikeScore at the end {self.spike_score:.3g}")
        return "\n".join(lines)


# ---------------------------------------------------------------------------------------
# history


@dataclass(frozen=True)
class History:
    """A recorded run as columns: one entry per step, oldest first (CPU tensors).

    Attributes:
        steps: (N,) int64 training steps.
        norm, post_norm, threshold, coef: (N,) float64, the numeric fields of the step
            record (:data:`gradclip.stats.STEP_FIELDS`).
        spike_bound, spike_score: (N,) float64, the spike detector's fields (``inf`` and 0
            without one).
        clipped, finite, skipped, spike: (N,) bool, its flags.
        layer_names: the G layers, in order of first appearance.
        layers: (N, G) float64 pre-clip layer norms; NaN where a step did not record one.
        extras: name -> (N,) float64 caller-attached scalars (NaN where absent).
        norm_type: p of the norms (NaN if the records disagree).
        source: the log file it was read from, if any.
        problems: what was wrong with the log ("file:line: ..."), empty when nothing was.
        forensics: row -> the ``"forensics"`` object of that step's record (spike steps).
        optimizer: the optimizer the records name (``"AdamW"``; several: ``"Muon+AdamW"``),
            None where none is named, or the records name different ones (a problem then).
        normalising: whether that optimizer normalises its update (None: not said, or the
            records disagree).

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
    spike_bound: Tensor
    spike_score: Tensor
    spike: Tensor
    layer_names: tuple[str, ...] = ()
    layers: Tensor = field(default_factory=lambda: torch.zeros(0, 0, dtype=torch.float64))
    extras: dict[str, Tensor] = field(default_factory=dict)
    norm_type: float = 2.0
    source: str | None = None
    problems: tuple[str, ...] = ()
    forensics: dict[int, dict[str, Any]] = field(default_factory=dict)
    optimizer: str | None = None
    normalising: bool | None = None

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
        coef = clip_coefficient(thr, norm).nan_to_num(nan=1.0)
        scalars = {"norm": norm, "post_norm": norm * coef, "threshold": thr, "coef": coef}
        flags = {"clipped": coef < 1, "finite": torch.isfinite(norm)}
        flags["skipped"] = flags["spike"] = torch.zeros(norm.numel(), dtype=torch.bool)
        scalars["spike_bound"] = torch.full_like(norm, math.inf)
        scalars["spike_score"] = torch.zeros_like(norm)
        return cls(steps=torch.arange(norm.numel()), **scalars, **flags)

    @classmethod
    def from_records(
        cls,
        records: Sequence[Mapping[str, Any]],
        *,
        source: str | None = None,
        problems: Sequence[str] = (),
    ) -> History:
        """Columns from step records (the dicts a monitor writes, or those of
        :func:`gradclip.records.decode_record`)."""
        builder = HistoryBuilder()
        for r in records:
            builder.add(r)
        return builder.build(source=source, problems=problems)

    def nonfinite_events(self) -> list[NonFiniteEvent]:
        """Every step with non-finite gradients, with the layers whose norm was non-finite."""
        bad = (~self.finite).nonzero().flatten().tolist()
        out = []
        for i in bad:
            which = ~torch.isfinite(self.layers[i])
            present = [self.layer_names[j] for j in which.nonzero().flatten().tolist()]
            out.append(NonFiniteEvent(int(self.steps[i]), tuple(present), bool(self.skipped[i])))
        return out

    def group_columns(self, field: str) -> dict[str, Tensor]:
        """Per parameter group, its ``field`` (``"norm"``, ``"coef"`` or ``"threshold"``)
        over the steps (from the extras :data:`GROUP_PREFIX`); empty when the run had no
        groups."""
        suffix = f"/{field}"
        return {k[len(GROUP_PREFIX) : -len(suffix)]: v for k, v in self.extras.items()
                if k.startswith(GROUP_PREFIX) and k.endswith(suffix)}

    def clipped_norm(self) -> tuple[Tensor, tuple[str, ...]]:
        """The norm the threshold was compared with at each step, and the groups left out of it.

        That is :attr:`norm`, the total, unless the clip left groups out: a group whose
        ``threshold`` column is NaN on every step (``Clipper.step`` leaves an orthogonalising
        optimizer's groups, Muon's, out of the norm and the clip). Then it is the
        ``norm_type``-norm of the other groups' norms (NaN where one of them is unknown).
        Muon's matrices can dominate the total by orders of magnitude: a threshold read
        from the total would be on their scale, not on the one it is applied to.

        Example:
            >>> import math, torch
            >>> nan = math.nan
            >>> h = History.from_norms([50.0, 50.0])
            >>> h.extras.update({"group/muon/norm": torch.tensor([50.0, 50.0]),
            ...                  "group/muon/threshold": torch.tensor([nan, nan]),
            ...                  "group/adamw/norm": torch.tensor([3.0, 4.0]),
            ...                  "group/adamw/threshold": torch.tensor([1.0, 1.0])})
            >>> h.clipped_norm()
            (tensor([3., 4.], dtype=torch.float64), ('muon',))
        """
        norms, thresholds = self.group_columns("norm"), self.group_columns("threshold")
        out = tuple(g for g, t in thresholds.items() if g in norms and bool(t.isnan().all()))
        kept = [v for g, v in norms.items() if g not in out]
        if not out or not kept:
            return self.norm, ()
        combined = torch.linalg.vector_norm(torch.stack(kept).double(), self.norm_type, dim=0)
        return combined.to(self.norm.dtype), out

    def update_ratios(self) -> dict[str, Tensor]:
        """Per layer (and ``"total"``), ``‖Δθ‖ / ‖θ‖`` over the steps (from the extras
        :data:`UPDATE_PREFIX`; NaN on steps not measured); empty when none was recorded."""
        return {k[len(UPDATE_PREFIX) :]: v for k, v in self.extras.items()
                if k.startswith(UPDATE_PREFIX)}

    def stalls(self, floor: float = STALL_FLOOR, steps: int = STALL_STEPS) -> list[Stall]:
        """The :class:`~gradclip.stalls.Stall` runs of the total and of every group (see
        :class:`~gradclip.stalls.StallDetector`)."""
        detector = StallDetector(floor, steps)
        series = [("all", self.norm, self.coef)]
        norms = self.group_columns("norm")
        series += [(g, norms.get(g, torch.full_like(c, math.nan)), c)
                   for g, c in self.group_columns("coef").items()]
        found = []
        for group, norm, coef in series:
            for step, n, c in zip(self.steps.tolist(), norm.tolist(), coef.tolist(), strict=True):
                stall = detector.feed(step, group, n, c)
                if stall is not None:
                    found.append(stall)
        return found
    def spike_events(self) -> list[SpikeEvent]:
        """Every step the spike detector called a spike, oldest first, with its forensics."""
        loss = self.extras.get("loss")
        out = []
        for i in self.spike.nonzero().flatten().tolist():
            found = self.forensics.get(i, {})
            rank = found.get("rank")
            out.append(SpikeEvent(
                step=int(self.steps[i]), norm=float(self.norm[i]), bound=float(self.spike_bound[i]),
                skipped=bool(self.skipped[i]), loss=math.nan if loss is None else float(loss[i]),
                layers=dict(sorted(found.get("layers", {}).items(), key=lambda kv: -kv[1])),
                max_abs=dict(found.get("max_abs", {})), nonfinite=tuple(found.get("nonfinite", ())),
                rank=rank,
            ))  # fmt: skip
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
        return MonitorSummary.of(self, stats, nonfinite_layers, events[0] if events else None, top)


def _column(values: array, dtype: torch.dtype) -> Tensor:
    if not len(values):
        return torch.zeros(0, dtype=dtype)
    return torch.frombuffer(values, dtype=dtype).clone()  # a copy: the array may grow later


class HistoryBuilder:
    """Step records -> a :class:`History`, kept in compact arrays (8 bytes a number).

    Layer and extra values are kept sparse (row, value) until :meth:`build`, so steps that
    record different layers (mixture-of-experts routing) cost only what they hold.

    Args:
        layers: keep per-layer norms (False: only totals, flags and extras).

    Example:
        >>> b = HistoryBuilder()
        >>> b.add({"step": 0, "norm": 2.0, "post_norm": 1.0, "threshold": 1.0, "coef": 0.5,
        ...        "clipped": True, "finite": True, "skipped": False, "layers": {"h": 2.0}})
        >>> b.build().layers.tolist()
        [[2.0]]
    """

    def __init__(self, *, layers: bool = True):
        self._steps = array("q")
        self._scalars = {k: array("d") for k in SCALAR_FIELDS}
        self._flags = {k: array("b") for k in FLAG_FIELDS}
        self._groups: dict[str, dict[str, tuple[array, array]]] = {"extra": {}}
        if layers:
            self._groups["layers"] = {}
        self._dropped = {"layers": 0, "extra": 0}
        self._forensics: dict[int, dict[str, Any]] = {}
        self._norm_type: float | None = None
        self._mixed = False
        self._optimizers: dict[str, bool | None] = {}  # named optimizer -> normalising

    def __len__(self) -> int:
        return len(self._steps)

    def add(self, record: Mapping[str, Any]) -> None:
        """Append one step record (a checked one: see :func:`gradclip.records.decode_record`)."""
        # every value read before anything is appended: a bad record changes nothing
        step = int(record["step"])
        scalars = [float(record[k] if k in record else _DEFAULTS[k]) for k in self._scalars]
        flags = [bool(record[k] if k in record else _DEFAULTS[k]) for k in self._flags]
        groups = {g: {str(k): float(v) for k, v in record.get(g, {}).items()} for g in self._groups}
        p = float(record.get("norm_type", 2.0))
        forensics = record.get("forensics")
        if "optimizer" in record:
            self._optimizers[str(record["optimizer"])] = record.get("normalising")
        row = len(self._steps)
        if isinstance(forensics, Mapping):
            self._forensics[row] = dict(forensics)
        self._steps.append(step)
        for values, value in zip(self._scalars.values(), scalars, strict=True):
            values.append(value)
        for values, flag in zip(self._flags.values(), flags, strict=True):
            values.append(flag)
        if self._norm_type is None:
            self._norm_type = p
        elif p != self._norm_type and not (math.isnan(p) and math.isnan(self._norm_type)):
            self._mixed = True
        for group, columns in self._groups.items():
            for name, value in groups[group].items():
                column = columns.get(name)
                if column is None:
                    if len(columns) >= MAX_NAMES:
                        self._dropped[group] += 1
                        continue
                    column = columns[name] = (array("q"), array("d"))
                column[0].append(row)
                column[1].append(value)

    def _dense(self, group: str, notes: list[str]) -> tuple[tuple[str, ...], Tensor]:
        columns = self._groups.get(group, {})
        n = len(self)
        names = list(columns)
        if n and len(names) > MAX_CELLS // n:
            keep = MAX_CELLS // n
            notes.append(
                f"{n} steps x {len(names)} {group} is more than {MAX_CELLS} values: only the "
                f"first {keep} {group} are kept"
            )
            names = names[:keep]
        if self._dropped[group]:
            notes.append(
                f"more than {MAX_NAMES} distinct {group} names: {self._dropped[group]} values "
                "of later names are left out"
            )
        dense = torch.full((n, len(names)), math.nan, dtype=torch.float64)
        for j, name in enumerate(names):
            rows, values = columns[name]
            dense[_column(rows, torch.int64), j] = _column(values, torch.float64)
        return tuple(names), dense

    def build(self, *, source: str | None = None, problems: Sequence[str] = ()) -> History:
        """The :class:`History` of the records added so far."""
        notes = list(problems)
        layer_names, layers = self._dense("layers", notes)
        extra_names, extras = self._dense("extra", notes)
        norm_type = 2.0 if self._norm_type is None else self._norm_type
        named = self._optimizers
        kinds = set(named.values())
        if len(named) > 1:
            notes.append(
                f"the records name {len(named)} optimizers ({', '.join(named)}): more than one "
                "run in one log? The recommendation follows "
                + ("none of them: pass the one to judge (optimizer=)" if len(kinds) > 1 else
                   "what they share")
            )
        return History(
            steps=_column(self._steps, torch.int64),
            **{k: _column(v, torch.float64) for k, v in self._scalars.items()},
            **{k: _column(v, torch.int8).bool() for k, v in self._flags.items()},
            layer_names=layer_names,
            layers=layers,
            extras={k: extras[:, i] for i, k in enumerate(extra_names)},
            norm_type=math.nan if self._mixed else norm_type,
            source=source,
            problems=tuple(notes),
            forensics=dict(self._forensics),
            optimizer=next(iter(named)) if len(named) == 1 else None,
            normalising=next(iter(kinds)) if len(kinds) == 1 else None,
        )
