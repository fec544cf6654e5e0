"""The device side of :class:`~gradclip.GradMonitor`: recorded steps as rows of preallocated
device buffers, one stable column per layer, and the one read that turns rows into records.

Writing a step never reads a device value: the write position and the step counter are
device tensors (so that a compiled step writes the same way as an eager one), the row is a
ring (more steps than rows overwrite the oldest; :meth:`StepRecorder.read` says how many
were written), and a layer or scalar seen for the first time takes a new column (the
buffers have room for twice the columns they hold, and grow on the device past that).

Example:
    >>> import torch
    >>> steps, names = StepRecorder(rows=4), ("h.0.weight", "h.1.weight")
    >>> steps.setup(names, torch.device("cpu"), 2.0, ("loss",))
    ((0, 1), (0,))
    >>> total, coef, yes, no = torch.tensor(5.0), torch.tensor(0.2), torch.tensor(True), torch.tensor(False)
    >>> inf, zero = torch.tensor(float("inf")), torch.tensor(0.0)   # no spike detector
    >>> steps.write(steps.index_of(names, (0, 1)), [total, total * coef, total, coef, inf, zero],
    ...             [yes, yes, no, no], torch.tensor([3.0, 4.0]), None, {0: 0.5}, 0.0)
    >>> written, records, layers, _ = steps.read()
    >>> written, records[0]["layers"], records[0]["extra"]
    (1, {'h.0': 3.0, 'h.1': 4.0}, {'loss': 0.5})
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from gradclip._cache import LRU
from gradclip.records import RECORD_FIELDS, SCHEMA_VERSION, Record
from gradclip.stats import FLAG_FIELDS, SCALAR_FIELDS

__all__ = ["TOP", "Scalar", "StepRecorder", "layer_name"]

Scalar = float | Tensor
"""A scalar attached to a step: a Python number or a one-element tensor."""

TOP = 8
"""Layers kept per step from a spike detector's forensics (its ``top_k`` largest ratios)."""


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


def _room(n: int) -> int:
    """Columns allocated for ``n``: at least twice as many, and 16."""
    return max(16, 1 << (2 * n).bit_length())


class StepRecorder:
    """Rows of step records on one device, for one norm type.

    Args:
        rows: steps held between two reads (more are a ring: the oldest are overwritten).
        depth: layers are modules cut to this many name components (see :func:`layer_name`).
    """

    def __init__(self, rows: int, depth: int | None = None):
        self.rows, self.depth = rows, depth
        self.device: torch.device | None = None
        self.p = math.nan
        self._slots: dict[str, int] = {}  # layer name -> column, stable for the recorder's life
        self._extra_columns: dict[str, int] = {}  # scalar name -> column, likewise
        self._columns: LRU[tuple[str, ...], tuple[int, ...]] = LRU(64)  # names -> their columns
        self._index: LRU[tuple[str, ...], Tensor] = LRU(64)  # the same, as device tensors
        self._next_step = torch.zeros((), dtype=torch.int64)  # moves to the buffers' device

    @property
    def layer_names(self) -> list[str]:
        """The layers, in column order."""
        return list(self._slots)

    def matches(self, device: torch.device | None, p: float) -> bool:
        """Whether the buffers are for ``device`` and ``p`` (else :meth:`setup` rebuilds them,
        losing what they hold: read them first)."""
        return device == self.device and (p == self.p or (math.isnan(p) and math.isnan(self.p)))

    def setup(
        self, names: tuple[str, ...], device: torch.device, p: float, extra_names: tuple[str, ...],
        *, tracing: bool = False,
    ) -> tuple[tuple[int, ...], tuple[int, ...]]:
        """Buffers for ``device`` and ``p``, a column for each new layer and scalar; returns
        the columns of ``names`` and of ``extra_names``. Idempotent.

        Buffers have room for twice the columns they need, so that new layers and scalars
        rarely reallocate them; ``tracing``: a reallocation would go unseen by the code
        being traced (it may hold the old buffers), so it raises instead.
        """
        columns = self._columns.get(names)
        if columns is None:
            slots = self._slots
            columns = tuple(slots.setdefault(layer_name(n, self.depth), len(slots)) for n in names)
            self._columns.put(names, columns)
        extras = self._extra_columns
        extra_columns = tuple(extras.setdefault(n, len(extras)) for n in extra_names)
        if not self.matches(device, p):
            self._allocate(device, p)
        elif len(self._slots) > self._layers.shape[1] or len(extras) > self._extra_values.shape[1]:
            if tracing:
                raise RuntimeError(
                    f"a compiled step brings {len(self._slots)} layers and {len(extras)} scalars, "
                    f"more than the monitor's buffers have room for ({self._layers.shape[1]} and "
                    f"{self._extra_values.shape[1]}): record one step of this model eagerly first, "
                    "so that the buffers are sized outside the compiled code"
                )
            self._grow()
        return columns, extra_columns

    def index_of(self, names: tuple[str, ...], columns: tuple[int, ...]) -> Tensor | None:
        """``columns`` (those of ``names``) as a device tensor, built once per parameter set:
        a host-to-device copy then, never a read."""
        if not names:
            return None
        index = self._index.get(names)
        if index is None:
            index = self._index.put(names, torch.tensor(columns, dtype=torch.long, device=self.device))
        return index

    def _allocate(self, device: torch.device, p: float) -> None:
        n, g, e = self.rows, _room(len(self._slots)), _room(len(self._extra_columns))
        self.device, self.p = device, p
        self._index.clear()
        self._cursor = torch.zeros((), dtype=torch.int64, device=device)
        self._next_step = self._next_step.to(device)  # the step count goes on
        self._steps = torch.zeros(n, dtype=torch.int64, device=device)
        self._times = torch.full((n,), math.nan, dtype=torch.float64, device=device)
        # the schema's fields, flags as 0/1: one write per step
        self._fields = torch.zeros(n, len(SCALAR_FIELDS) + len(FLAG_FIELDS), dtype=torch.float64, device=device)
        self._layers = torch.zeros(n, g, dtype=torch.float64, device=device)
        self._present = torch.zeros(n, g, dtype=torch.bool, device=device)
        self._extra_values = torch.full((n, e), math.nan, dtype=torch.float64, device=device)
        self._extra_present = torch.zeros(n, e, dtype=torch.bool, device=device)
        # a spike detector's top layers: their columns (-1: none) and ratios to their median
        self._top_columns = torch.full((n, TOP), -1, dtype=torch.int64, device=device)
        self._top_ratios = torch.zeros(n, TOP, dtype=torch.float64, device=device)

    def _grow(self) -> None:
        """More layers or scalars than room: larger buffers, the recorded columns copied over
        (on the device)."""
        for name, size in (("_layers", len(self._slots)), ("_present", len(self._slots)),
                           ("_extra_values", len(self._extra_columns)),
                           ("_extra_present", len(self._extra_columns))):  # fmt: skip
            old = getattr(self, name)
            if size > old.shape[1]:
                new = old.new_zeros(self.rows, _room(size))
                if name == "_extra_values":
                    new.fill_(math.nan)
                new[:, : old.shape[1]] = old
                setattr(self, name, new)

    # -- writing ------------------------------------------------------------------------------

    def write(
        self,
        index: Tensor | None,
        fields: list[Tensor],
        flags: list[Tensor],
        per_tensor: Tensor | None,
        step: int | Tensor | None,
        extras: dict[int, Scalar],
        time: float,
        top: tuple[Tensor, Tensor] | None = None,
    ) -> None:
        """Store one step in the next row: the scalar ``fields`` and ``flags`` of the schema
        (0-dim tensors), the per-tensor norms of the layer columns ``index``, the step (None:
        one more than the last), scalars by column, the wall-clock time, and a spike
        detector's top tensors (indices into the per-tensor norms, and their ratios)."""
        device, f64 = self.device, torch.float64
        # everything this step writes, computed before the first write
        row = torch.remainder(self._cursor, self.rows).reshape(1)
        field_row = torch.cat([f.reshape(1) for f in (*fields, *flags)]).to(device, f64)[None]
        layer_row, present_row = self._layer_row(per_tensor, index)
        top_columns, top_ratios = self._top_row(top, index)
        extra_rows = {k: v.to(device, f64).reshape(1) if isinstance(v, Tensor) else v
                      for k, v in extras.items()}  # fmt: skip

        self._fields.index_copy_(0, row, field_row)
        self._layers.index_copy_(0, row, layer_row)
        self._present.index_copy_(0, row, present_row)
        self._top_columns.index_copy_(0, row, top_columns)
        self._top_ratios.index_copy_(0, row, top_ratios)
        self._extra_present.index_fill_(0, row, False)  # a reused row shows no older scalar
        self._put_extras(row, extra_rows)
        if isinstance(step, Tensor):
            self._next_step.copy_(step)
        elif step is not None:
            self._next_step.fill_(step)
        self._steps.index_copy_(0, row, self._next_step.reshape(1))
        self._next_step.add_(1)
        self._times.index_fill_(0, row, time)
        self._cursor.add_(1)

    def attach(self, extras: dict[int, Scalar]) -> None:
        """Add scalars (by column) to the last written step; nothing if none was written
        since the last read (decided on the device: no read)."""
        last = torch.remainder(self._cursor - 1, self.rows).reshape(1)
        written = self._cursor > 0
        rows = {}
        for column, value in extras.items():
            new = value.to(self.device, torch.float64).reshape(1) if isinstance(value, Tensor) else value
            rows[column] = torch.where(written, new, self._extra_values[:, column].index_select(0, last))
        self._put_extras(last, rows, gate=written)

    def _layer_row(self, per_tensor: Tensor | None, index: Tensor | None) -> tuple[Tensor, Tensor]:
        """This step's per-layer values (sums of p-th powers, finished when read) and which
        layers it has, as (1, G) rows."""
        g = self._layers.shape[1]
        present = torch.zeros(1, g, dtype=torch.bool, device=self.device)
        values = torch.zeros(1, g, dtype=torch.float64, device=self.device)
        if index is None or per_tensor is None:
            return values, present
        norms = per_tensor.to(self.device, torch.float64)
        p = self.p
        if math.isinf(p):
            values[0].scatter_reduce_(0, index, norms, "amax")
        elif p in (0.0, 1.0):  # p=0: counts add up; p=1: norms add up
            values[0].index_add_(0, index, norms)
        else:  # a p-norm of a union is the p-th root of the sum of p-th powers
            values[0].index_add_(0, index, norms.pow(p))
        present[0].index_fill_(0, index, True)
        return values, present

    def _top_row(self, top: tuple[Tensor, Tensor] | None, index: Tensor | None) -> tuple[Tensor, Tensor]:
        """The layer columns of a detector's top tensors and their ratios, as (1, TOP) rows."""
        columns = torch.full((1, TOP), -1, dtype=torch.int64, device=self.device)
        ratios = torch.zeros(1, TOP, dtype=torch.float64, device=self.device)
        if top is None or index is None:
            return columns, ratios
        indices, values = top
        k = min(TOP, indices.numel())
        columns[0, :k] = index.index_select(0, indices[:k].to(index.device))
        ratios[0, :k] = values[:k].to(self.device, torch.float64)
        return columns, ratios

    def _put_extras(self, row: Tensor, values: dict[int, Scalar], gate: Tensor | None = None) -> None:
        for column, value in values.items():
            target, present = self._extra_values[:, column], self._extra_present[:, column]
            if isinstance(value, Tensor):
                target.index_copy_(0, row, value)
            else:
                target.index_fill_(0, row, value)
            if gate is None:
                present.index_fill_(0, row, True)
            else:
                present.index_copy_(0, row, present.index_select(0, row) | gate.reshape(1))

    # -- reading ------------------------------------------------------------------------------

    def read(self) -> tuple[int, list[Record], list[str], list[float]]:
        """Copy the rows to the host (one read) and start over.

        Returns ``(steps written since the last read, their records oldest first -- the
        last ``rows`` of them --, the layer names, per-layer aggregates)``; the aggregates
        are four runs of G numbers: the largest finite norm, the sum and the count of finite
        norms, and the index in the records of the first non-finite one (-1: none).
        """
        n_rows, g, e = self.rows, len(self._slots), len(self._extra_columns)
        extra_names = list(self._extra_columns)
        cursor = self._cursor
        ar = torch.arange(n_rows, device=cursor.device)
        start = torch.where(cursor > n_rows, torch.remainder(cursor, n_rows), 0)
        order = torch.remainder(start + ar, n_rows)  # oldest first, also after a wrap-around
        valid = (ar < cursor.clamp(max=n_rows))[:, None]
        layers = self._layers[:, :g].index_select(0, order)
        if not (math.isinf(self.p) or self.p in (0.0, 1.0)):
            layers = layers.pow(1.0 / self.p)
        present = self._present[:, :g].index_select(0, order) & valid
        # Per-layer aggregates for a summary, computed here on the device: a Python loop
        # over steps x layers would cost more than the recorded steps themselves.
        ok = present & torch.isfinite(layers)
        bad = present & ~torch.isfinite(layers)
        aggregates = torch.stack([
            torch.where(ok, layers, -math.inf).amax(0),
            torch.where(ok, layers, 0.0).sum(0),
            ok.sum(0).double(),
            torch.where(bad.any(0), bad.double().argmax(0).double(), -1.0),
        ]) if g else layers.new_zeros(4, 0)  # fmt: skip
        columns = [
            self._steps.index_select(0, order).double()[:, None],
            self._times.index_select(0, order)[:, None],
            self._fields.index_select(0, order),
            layers,
            present.double(),
        ]
        columns += [
            self._extra_values[:, :e].index_select(0, order),
            self._extra_present[:, :e].index_select(0, order).double(),
            self._top_columns.index_select(0, order).double(),
            self._top_ratios.index_select(0, order),
        ]
        table = torch.cat(columns, dim=1)
        flat = torch.cat([cursor.double().reshape(1), table.flatten(), aggregates.flatten()])
        flat = flat.cpu().tolist()  # the one host read
        written = int(flat[0])
        width = table.shape[1]
        layer_names = self.layer_names
        records = [
            self._record(flat[1 + j * width : 1 + (j + 1) * width], layer_names, extra_names)
            for j in range(min(written, n_rows))
        ]
        self._cursor.zero_()
        self._present.zero_()
        self._extra_present.zero_()
        return written, records, layer_names, flat[1 + n_rows * width :]

    def _record(self, row: list[float], layer_names: list[str], extra_names: list[str]) -> Record:
        """One step record from one row of the read table (columns as in :meth:`read`)."""
        s, f, g = len(SCALAR_FIELDS), len(FLAG_FIELDS), len(layer_names)
        head = [SCHEMA_VERSION, int(row[0]), row[1], self.p, *row[2 : 2 + s]]
        flags = [bool(v) for v in row[2 + s : 2 + s + f]]
        record: Record = dict(zip(RECORD_FIELDS, head + flags, strict=True))
        at = 2 + s + f
        values, present = row[at : at + g], row[at + g : at + 2 * g]
        record["layers"] = {k: v for k, v, here in zip(layer_names, values, present, strict=True) if here}
        e = len(extra_names)
        at += 2 * g
        values, present = row[at : at + e], row[at + e : at + 2 * e]
        record["extra"] = {k: v for k, v, here in zip(extra_names, values, present, strict=True) if here}
        if record.get("spike"):  # a spike detector's top layers (the largest ratio of each)
            at += 2 * e
            top: dict[str, float] = {}
            for column, ratio in zip(row[at : at + TOP], row[at + TOP : at + 2 * TOP], strict=True):
                if column >= 0:
                    name = layer_names[int(column)]
                    top[name] = max(ratio, top.get(name, -math.inf))
            record["forensics"] = {"layers": top, "max_abs": {}, "nonfinite": []}
        return record
