"""Where :class:`~gradclip.GradMonitor` writes its step records, and how a log is read back.

A *step record* is a plain dict, one per recorded step. The JSON lines log (the default
sink) holds one record per line, in this schema (version :data:`SCHEMA_VERSION`)::

    {"schema": 1,             # version of this layout; readers refuse newer ones
     "step": 120,             # the training step (int)
     "time": 1732350000.5,    # wall-clock time of record(), seconds since the epoch
     "norm_type": 2.0,        # p of every norm in the record
     "norm": 3.1,             # total gradient norm before clipping
     "post_norm": 1.0,        # total norm after clipping
     "threshold": 1.0,        # the clipper's threshold this step ("NaN": none)
     "coef": 0.32,            # post_norm / norm: the factor applied (1: not clipped)
     "clipped": true, "finite": true, "skipped": false,
     "layers": {"h.0.attn": 0.8, ...},   # pre-clip norm per module (may be empty)
     "extra": {"loss": 2.3, "lr": 3e-4}} # caller-attached scalars (may be empty)

Non-finite numbers are written as the strings ``"NaN"``, ``"Infinity"`` and
``"-Infinity"`` so that every line is strict JSON. Each flush is one ``write()`` of whole
lines to an unbuffered file, so a crash leaves a log whose lines are all complete.

Sinks: :class:`JSONLSink` (default), :class:`CSVSink`, :class:`TensorBoardSink`, and any
callable (wrapped in :class:`CallableSink`, called once per record).
"""

from __future__ import annotations

import csv
import io
import json
import math
import os
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

__all__ = [
    "SCHEMA_VERSION",
    "CSVSink",
    "CallableSink",
    "JSONLSink",
    "LogError",
    "Record",
    "Sink",
    "SinkLike",
    "TensorBoardSink",
    "as_sinks",
    "decode_record",
    "encode_record",
]

SCHEMA_VERSION = 1
"""Version of the step-record layout written by this gradclip (see the module doc)."""

Record = dict[str, Any]
SCALAR_FIELDS = ("norm", "post_norm", "threshold", "coef")
FLAG_FIELDS = ("clipped", "finite", "skipped")
_NONFINITE = {"NaN": math.nan, "Infinity": math.inf, "-Infinity": -math.inf}


class LogError(ValueError):
    """A log that cannot be used at all (missing, empty, nothing valid); names the file."""


class Sink:
    """Receives step records in batches, one batch per monitor flush.

    Subclasses implement :meth:`write`; :meth:`close` releases files or writers.
    """

    def write(self, records: Sequence[Record]) -> None:
        """Store ``records`` (step records, oldest first)."""
        raise NotImplementedError

    def close(self) -> None:
        """Release what the sink holds; it is not used after this."""


def _number(value: float) -> float | str:
    if math.isfinite(value):
        return value
    return "NaN" if math.isnan(value) else ("Infinity" if value > 0 else "-Infinity")


def encode_record(record: Mapping[str, Any]) -> str:
    """One step record as one line of strict JSON (non-finite floats as strings), with ``\\n``.

    Example:
        >>> encode_record({"schema": 1, "norm": float("inf")})
        '{"schema": 1, "norm": "Infinity"}\\n'
    """

    try:  # the common case, all numbers finite: json's C encoder alone
        return json.dumps(record, allow_nan=False) + "\n"
    except ValueError:
        pass

    def fix(value: Any) -> Any:
        if isinstance(value, float):
            return _number(value)
        if isinstance(value, Mapping):
            return {k: fix(v) for k, v in value.items()}
        return value

    return json.dumps({k: fix(v) for k, v in record.items()}, allow_nan=False) + "\n"


def _as_float(value: Any, name: str) -> float:
    if isinstance(value, str) and value in _NONFINITE:
        return _NONFINITE[value]
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ValueError(f"field {name!r} should be a number, got {value!r:.40}")
    return float(value)


def decode_record(obj: Any) -> Record:
    """Check one parsed JSON line against the schema; returns it with Python floats.

    Raises ``ValueError`` saying what is wrong (a newer schema included).

    Example:
        >>> r = decode_record({"schema": 1, "step": 0, "norm": "NaN", "post_norm": 1,
        ...     "threshold": 1, "coef": 1, "clipped": False, "finite": False, "skipped": False})
        >>> r["norm"], r["layers"]
        (nan, {})
    """
    if not isinstance(obj, dict):
        raise ValueError(f"a step record is a JSON object, got {type(obj).__name__}")
    schema = obj.get("schema")
    if isinstance(schema, bool) or not isinstance(schema, int):
        raise ValueError("no integer 'schema' field: not a gradclip monitor record")
    if schema > SCHEMA_VERSION:
        raise ValueError(
            f"schema {schema} was written by a newer gradclip (this one reads up to "
            f"{SCHEMA_VERSION}): upgrade gradclip"
        )
    step = obj.get("step")
    if isinstance(step, bool) or not isinstance(step, int):
        raise ValueError(f"field 'step' should be an integer, got {step!r:.40}")
    out: Record = {"schema": schema, "step": step}
    for name in SCALAR_FIELDS:
        if name not in obj:
            raise ValueError(f"missing field {name!r}")
        out[name] = _as_float(obj[name], name)
    for name in FLAG_FIELDS:
        if not isinstance(obj.get(name), bool):
            raise ValueError(f"field {name!r} should be true or false, got {obj.get(name)!r:.40}")
        out[name] = obj[name]
    out["time"] = _as_float(obj.get("time", math.nan), "time")
    out["norm_type"] = _as_float(obj.get("norm_type", 2.0), "norm_type")
    for group in ("layers", "extra"):
        values = obj.get(group, {})
        if not isinstance(values, dict):
            raise ValueError(f"field {group!r} should be an object, got {values!r:.40}")
        out[group] = {str(k): _as_float(v, f"{group}.{k}") for k, v in values.items()}
    return out


class JSONLSink(Sink):
    """The default log: one JSON line per step record (schema in :mod:`gradclip.sinks`).

    Each :meth:`write` is a single ``write()`` of whole lines on an unbuffered file, so
    the lines on disk are complete whenever the process dies.

    Args:
        path: the file to write.
        mode: ``"w"`` starts a new log (default), ``"a"`` appends (resuming a run).

    Example:
        >>> import tempfile, os
        >>> path = os.path.join(tempfile.mkdtemp(), "run.jsonl")
        >>> sink = JSONLSink(path); sink.write([{"schema": 1, "step": 0}]); sink.close()
        >>> open(path).read()
        '{"schema": 1, "step": 0}\\n'
    """

    def __init__(self, path: str | os.PathLike[str], mode: str = "w"):
        if mode not in ("w", "a"):
            raise ValueError(f"`mode` must be 'w' or 'a', got {mode!r}")
        self.path = Path(path)
        self._file = open(self.path, mode + "b", buffering=0)  # noqa: SIM115 (held open)

    def write(self, records: Sequence[Record]) -> None:
        data = memoryview("".join(encode_record(r) for r in records).encode())
        while data:  # a raw write may be partial (signals, full pipes): finish it
            data = data[self._file.write(data) or 0 :]

    def close(self) -> None:
        self._file.close()


def _flat(record: Mapping[str, Any]) -> dict[str, Any]:
    row = {k: v for k, v in record.items() if k not in ("layers", "extra")}
    row.update({f"layer:{k}": v for k, v in record.get("layers", {}).items()})
    row.update({f"extra:{k}": v for k, v in record.get("extra", {}).items()})
    return row


class CSVSink(Sink):
    """One CSV row per step: the record's fields, then ``layer:<name>`` and ``extra:<name>``.

    The columns are those of every record written so far, in order of first appearance. A
    layer or extra name that appears mid-run (a module added, a scalar attached on some
    steps only) adds a column: the file is rewritten once with the wider header, the earlier
    rows left empty there (atomically: a crash leaves the old file or the new one). A
    missing value is an empty field.

    Args:
        path: the file to write (a new file; any previous content is replaced).
    """

    def __init__(self, path: str | os.PathLike[str]):
        self.path = Path(path)
        self._file = open(self.path, "w", newline="")  # noqa: SIM115 (held open)
        self._columns: list[str] = []

    def write(self, records: Sequence[Record]) -> None:
        rows = [_flat(r) for r in records]
        if not rows:
            return
        known = set(self._columns)
        new = [k for k in dict.fromkeys(k for row in rows for k in row) if k not in known]
        text = io.StringIO()
        if new:
            self._columns += new
            if self._file.tell():
                self._widen()
            else:
                csv.writer(text).writerow(self._columns)
        csv.DictWriter(text, self._columns, restval="").writerows(rows)
        self._file.write(text.getvalue())
        self._file.flush()

    def _widen(self) -> None:
        """Rewrite the file with the current header; earlier rows get empty new fields."""
        self._file.close()
        with open(self.path, newline="") as old:
            written = list(csv.reader(old))[1:]
        width = len(self._columns)
        temporary = self.path.with_name(self.path.name + ".tmp")
        with open(temporary, "w", newline="") as out:
            writer = csv.writer(out)
            writer.writerow(self._columns)
            writer.writerows(row + [""] * (width - len(row)) for row in written)
        os.replace(temporary, self.path)
        self._file = open(self.path, "a", newline="")  # noqa: SIM115 (held open)

    def close(self) -> None:
        self._file.close()


class TensorBoardSink(Sink):
    """Scalars to TensorBoard: ``grad/<field>``, ``grad_layer/<name>``, ``extra/<name>``.

    Needs ``pip install 'gradclip[tensorboard]'``.

    Args:
        log_dir_or_writer: a directory for a new ``torch.utils.tensorboard.SummaryWriter``,
            or an existing writer (it is flushed, not closed, by :meth:`close`).
    """

    def __init__(self, log_dir_or_writer: Any):
        if isinstance(log_dir_or_writer, str | os.PathLike):
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError as exc:  # torch imports tensorboard lazily, here
                raise ImportError(
                    "TensorBoardSink needs tensorboard: pip install 'gradclip[tensorboard]'"
                ) from exc
            self.writer = SummaryWriter(str(log_dir_or_writer))
            self._owned = True
        else:
            self.writer = log_dir_or_writer
            self._owned = False

    def write(self, records: Sequence[Record]) -> None:
        for r in records:
            step = r["step"]
            for name in (*SCALAR_FIELDS, *FLAG_FIELDS):
                self.writer.add_scalar(f"grad/{name}", float(r[name]), step)
            for name, value in r.get("layers", {}).items():
                self.writer.add_scalar(f"grad_layer/{name}", value, step)
            for name, value in r.get("extra", {}).items():
                self.writer.add_scalar(f"extra/{name}", value, step)
        self.writer.flush()

    def close(self) -> None:
        if self._owned:
            self.writer.close()
        else:
            self.writer.flush()


class CallableSink(Sink):
    """Calls ``fn(record)`` for every step record (e.g. ``wandb.log``-style loggers)."""

    def __init__(self, fn: Callable[[Record], object]):
        self.fn = fn

    def write(self, records: Sequence[Record]) -> None:
        for r in records:
            self.fn(r)


SinkLike = Sink | Callable[[Record], object] | str | os.PathLike[str]


def as_sinks(sinks: SinkLike | Iterable[SinkLike] | None) -> list[Sink]:
    """Normalise sink arguments: a path (``.csv``: CSV, else JSON lines), a Sink, a callable."""
    if sinks is None:
        return []
    items = [sinks] if isinstance(sinks, Sink | str | os.PathLike) or callable(sinks) else sinks
    out: list[Sink] = []
    for s in items:  # type: ignore[union-attr]
        if isinstance(s, Sink):
            out.append(s)
        elif isinstance(s, str | os.PathLike):
            out.append(CSVSink(s) if str(s).lower().endswith(".csv") else JSONLSink(s))
        elif callable(s):
            out.append(CallableSink(s))
        else:
            raise TypeError(
                f"a sink must be a path, a gradclip.sinks.Sink or a callable, got {type(s).__name__}"
            )
    return out
