"""The step record on disk: its fields, and how one record is written as a JSON line or a
CSV row, and checked when it is read back.

A *step record* is a plain dict, one per recorded step, with the fields of
:data:`RECORD_FIELDS` (the step schema of :mod:`gradclip.stats` plus where and when), then
``layers`` and ``extra``. A JSON lines log holds one record per line (schema version
:data:`SCHEMA_VERSION`)::

    {"schema": 1,             # version of this layout; readers refuse newer ones
     "step": 120,             # the training step (int)
     "time": 1732350000.5,    # wall-clock time of record(), seconds since the epoch
                              # ("NaN" for steps recorded inside torch.compile)
     "norm_type": 2.0,        # p of every norm in the record
     "norm": 3.1,             # total gradient norm before clipping
     "post_norm": 1.0,        # total norm after clipping
     "threshold": 1.0,        # the clipper's threshold this step ("NaN": none)
     "coef": 0.32,            # post_norm / norm: the factor applied (1: not clipped)
     "spike_bound": 40.2,     # the spike detector's bound ("Infinity": no detector)
     "spike_score": 0.001,    # the detector's SpikeScore (0: no detector)
     "clipped": true, "finite": true, "skipped": false,
     "spike": false,          # the detector called the step a spike
     "layers": {"h.0.attn": 0.8, ...},   # pre-clip norm per module with a gradient
     "extra": {"loss": 2.3, "lr": 3e-4}, # caller-attached scalars (may be empty)
     "forensics": {...}}      # on a spike step only, when they were read: below

Fields added after a log was written (``spike_bound``, ``spike_score``, ``spike``) read as
their default (:data:`gradclip.stats.STEP_FIELDS`): inf, 0, false. Two optional fields
(:data:`RUN_FIELDS`) say which optimizer the run stepped after the clip, where the monitor
was told (``GradMonitor.step``, or its ``optimizer=``), so that a recommendation read from the
log follows it; a log without them reads as "not said"::

     "optimizer": "AdamW",    # its class name; several: joined by "+" ("Muon+AdamW")
     "normalising": true,     # whether all of them normalise their update (Adam and its kin:
                              # gradclip.clippers.adaptive.normalises)

A spike step's record may end with a ``"forensics"`` object (:class:`gradclip.SpikeReport`)::

    "forensics": {"layers": {"h.3.mlp.weight": 812.0, ...},  # norm / its running median
                  "max_abs": {"h.3.mlp.weight": 14.2, ...},  # their largest |gradient|
                  "nonfinite": ["h.3.mlp.weight", ...],      # NaN/inf norms, backward order
                  "rank": 0}                                 # who wrote it (distributed only)

Non-finite numbers are written as the strings ``"NaN"``, ``"Infinity"`` and
``"-Infinity"`` so that every line is strict JSON. A CSV row holds the same fields, then
``layer:<name>`` and ``extra:<name>`` columns, and the forensics as one JSON cell
(:func:`flat_record`).

Reading is strict, because a log may come from anywhere: :func:`decode_line` and
:func:`decode_csv_row` raise ``ValueError`` naming what is wrong with a record (a number out
of float64's range or beyond :data:`MAX_ABS`, a step outside int64, a name that is not
valid Unicode, a newer schema), so that a reader can leave that line out and name it.
"""

from __future__ import annotations

import json
import math
import reprlib
from collections.abc import Mapping, Sequence
from typing import Any

from gradclip.stats import FLAG_FIELDS, SCALAR_FIELDS, STEP_FIELDS

__all__ = [
    "MAX_ABS",
    "MAX_STEP",
    "RECORD_FIELDS",
    "RUN_FIELDS",
    "SCHEMA_VERSION",
    "LogError",
    "Record",
    "csv_cell",
    "decode_csv_row",
    "decode_line",
    "decode_record",
    "encode_record",
    "flat_record",
]

SCHEMA_VERSION = 1
"""Version of the step-record layout written by this gradclip (see the module doc)."""

RECORD_FIELDS: tuple[str, ...] = ("schema", "step", "time", "norm_type", *SCALAR_FIELDS, *FLAG_FIELDS)
"""The top-level fields of a step record, in order (then ``layers`` and ``extra``); also the
first columns of a CSV log."""

RUN_FIELDS: tuple[str, ...] = ("optimizer", "normalising")
"""The optional fields about the run rather than the step (see the module doc): a string and
a flag, written after :data:`RECORD_FIELDS` where the monitor knew the optimizer."""
MAX_OPTIMIZER = 200
"""Longest ``optimizer`` string a record may hold (class names, "+"-joined)."""

MAX_STEP = 2**63
"""Steps are int64: a record's step must be in ``[0, MAX_STEP)``."""

MAX_ABS = 1e300
"""Largest finite magnitude a record may hold. No gradient norm comes near it (a norm that
overflows is ``inf``), and summing, squaring or plotting numbers near float64's limit
(1.8e308) overflows: a line holding one is refused instead of breaking every reader."""

Record = dict[str, Any]
"""A step record: field name -> value (see the module doc)."""
_DEFAULTS = {f.name: f.default for f in STEP_FIELDS if f.default is not None}
_NONFINITE = {"NaN": math.nan, "Infinity": math.inf, "-Infinity": -math.inf}
_INF_SPELLINGS = {"inf", "infinity"}
_repr = reprlib.Repr()
_repr.maxlevel, _repr.maxstring, _repr.maxother = 2, 40, 40
_short = _repr.repr  # a short repr that never recurses deeply


class LogError(ValueError):
    """A log that cannot be used at all (missing, empty, nothing valid); names the file."""


# ---------------------------------------------------------------------------------------
# the format: encoding and decoding one record


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


class _Constant(float):
    """A bare ``NaN``/``Infinity``/``-Infinity`` of the JSON text (Python's json writes them),
    told apart from a literal such as ``1e400`` that json silently turns into inf."""


_CONSTANTS = {k: _Constant(v) for k, v in _NONFINITE.items()}


def _as_float(value: Any, name: str) -> float:
    if type(value) is float and -MAX_ABS <= value <= MAX_ABS:  # the common case, at once
        return value
    if isinstance(value, str) and value in _NONFINITE:
        return _NONFINITE[value]
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ValueError(f"field {name!r} should be a number, got {_short(value)}")
    try:
        number = float(value)
    except OverflowError:  # an integer of hundreds of digits
        raise ValueError(f"field {name!r} is out of float64's range ({len(str(value))} digits)") from None
    if math.isinf(number) and type(value) is float:  # not a _Constant: an overflowed literal
        raise ValueError(f"field {name!r} is out of float64's range")
    if math.isfinite(number) and abs(number) > MAX_ABS:
        raise ValueError(f"field {name!r} is {number:.4g}, beyond the +-{MAX_ABS:g} a log may hold")
    return number


def _check_name(name: str, group: str) -> str:
    try:
        name.encode("utf-8")
    except UnicodeEncodeError:
        raise ValueError(
            f"a name in {group!r} is not valid Unicode (a lone surrogate): {_short(name)}"
        ) from None
    return name


def decode_record(obj: Any, *, check_names: bool = True) -> Record:
    """Check one parsed record against the schema; returns it with Python floats.

    Raises ``ValueError`` saying what is wrong (a newer schema included). ``check_names``:
    refuse layer and extra names that are not valid Unicode (lone surrogates).

    Example:
        >>> r = decode_record({"schema": 1, "step": 0, "norm": "NaN", "post_norm": 1,
        ...     "threshold": 1, "coef": 1, "clipped": False, "finite": False, "skipped": False})
        >>> r["norm"], r["layers"]
        (nan, {})
    """
    if not isinstance(obj, dict):
        raise ValueError(f"a step record is a JSON object, got {type(obj).__name__}")
    schema = obj.get("schema")
    if isinstance(schema, bool) or not isinstance(schema, int) or schema < 1:
        raise ValueError("no 'schema' field >= 1: not a gradclip monitor record")
    if schema > SCHEMA_VERSION:
        raise ValueError(
            f"schema {schema} was written by a newer gradclip (this one reads up to "
            f"{SCHEMA_VERSION}): upgrade gradclip"
        )
    step = obj.get("step")
    if isinstance(step, bool) or not isinstance(step, int) or not 0 <= step < MAX_STEP:
        raise ValueError(f"field 'step' should be an integer in [0, 2**63), got {_short(step)}")
    out: Record = {"schema": schema, "step": step}
    out["time"] = _as_float(obj.get("time", math.nan), "time")
    norm_type = out["norm_type"] = _as_float(obj.get("norm_type", 2.0), "norm_type")
    if not norm_type >= 0:
        raise ValueError(f"field 'norm_type' should be >= 0 or inf, got {norm_type}")
    for name in SCALAR_FIELDS:
        if name in obj:
            out[name] = _as_float(obj[name], name)
        elif name in _DEFAULTS:  # written before the field existed
            out[name] = float(_DEFAULTS[name])
        else:
            raise ValueError(f"missing field {name!r}")
    for name in FLAG_FIELDS:
        value = obj.get(name, _DEFAULTS.get(name))
        if not isinstance(value, bool):
            raise ValueError(f"field {name!r} should be true or false, got {_short(value)}")
        out[name] = value
    for group in ("layers", "extra"):
        out[group] = _names_to_floats(obj.get(group, {}), group, check_names)
    if "optimizer" in obj:
        name = obj["optimizer"]
        if not isinstance(name, str) or not 0 < len(name) <= MAX_OPTIMIZER:
            raise ValueError(
                f"field 'optimizer' should be a class name of 1-{MAX_OPTIMIZER} characters, got {_short(name)}"
            )
        out["optimizer"] = _check_name(name, "optimizer") if check_names else name
    if "normalising" in obj:
        if not isinstance(obj["normalising"], bool):
            raise ValueError(f"field 'normalising' should be true or false, got {_short(obj['normalising'])}")
        out["normalising"] = obj["normalising"]
    if "forensics" in obj:
        out["forensics"] = _forensics(obj["forensics"], check_names)
    return out


def _names_to_floats(values: Any, group: str, check_names: bool) -> dict[str, float]:
    if not isinstance(values, dict):
        raise ValueError(f"field {group!r} should be an object, got {_short(values)}")
    if check_names:
        for k in values:
            _check_name(k, group)
    return {k: _as_float(v, f"{group}.{k}") for k, v in values.items()}


def _forensics(obj: Any, check_names: bool) -> dict[str, Any]:
    """A record's ``"forensics"`` object, checked (see the module doc)."""
    if not isinstance(obj, dict):
        raise ValueError(f"field 'forensics' should be an object, got {_short(obj)}")
    out: dict[str, Any] = {
        key: _names_to_floats(obj.get(key, {}), f"forensics.{key}", check_names)
        for key in ("layers", "max_abs")
    }
    nonfinite = obj.get("nonfinite", [])
    if not isinstance(nonfinite, list) or not all(isinstance(n, str) for n in nonfinite):
        raise ValueError(f"field 'forensics.nonfinite' should be a list of names, got {_short(nonfinite)}")
    if check_names:
        for name in nonfinite:
            _check_name(name, "forensics.nonfinite")
    out["nonfinite"] = list(nonfinite)
    if "rank" in obj:
        rank = obj["rank"]
        if isinstance(rank, bool) or not isinstance(rank, int) or not 0 <= rank < MAX_STEP:
            raise ValueError(f"field 'forensics.rank' should be an integer >= 0, got {_short(rank)}")
        out["rank"] = rank
    return out


def decode_line(line: bytes | str) -> Record:
    """One JSON lines log line -> a checked step record (see :func:`decode_record`).

    Raises ``ValueError`` (``RecursionError`` for absurd nesting) saying what is wrong.

    Example:
        >>> decode_line(b'{"schema": 1, "step": 3, "norm": 2, "post_norm": 1, "threshold": 1,'
        ...             b' "coef": 0.5, "clipped": true, "finite": true, "skipped": false}')["coef"]
        0.5
    """
    # A lone surrogate can only come from a \uD800-\uDFFF escape: names are checked then.
    data = line if isinstance(line, bytes) else line.encode("utf-8", "surrogatepass")
    escaped = b"\\ud" in data or b"\\uD" in data
    return decode_record(json.loads(line, parse_constant=_CONSTANTS.__getitem__), check_names=escaped)


def _csv_float(cell: str, name: str) -> float:
    try:
        value = float(cell)
    except ValueError:
        raise ValueError(f"field {name!r} should be a number, got {_short(cell)}") from None
    if math.isinf(value):
        if cell.strip().lstrip("+-").lower() not in _INF_SPELLINGS:
            raise ValueError(f"field {name!r} is out of float64's range: {_short(cell)}")
        return _Constant(value)  # an inf spelled out, not an overflowed literal
    return value


def _csv_int(cell: str, name: str) -> int:
    try:
        return int(cell)
    except ValueError:
        raise ValueError(f"field {name!r} should be an integer, got {_short(cell)}") from None


_CSV_FLAGS = {"true": True, "false": False, "1": True, "0": False}


def csv_cell(value: Any) -> str:
    """One CSV cell: flags ``true``/``false``, floats exactly (``repr``: ``nan``, ``inf``).

    Example:
        >>> csv_cell(True), csv_cell(0.1), csv_cell(float("-inf"))
        ('true', '0.1', '-inf')
    """
    if isinstance(value, bool):
        return "true" if value else "false"
    return repr(value) if isinstance(value, float) else str(value)


def decode_csv_row(columns: Sequence[str], cells: Sequence[str]) -> Record:
    """One CSV log row under its section's header -> a checked step record.

    Empty cells are absent values; columns this gradclip does not know are ignored.

    Example:
        >>> cols = ["schema", "step", "norm", "post_norm", "threshold", "coef", "clipped",
        ...         "finite", "skipped", "layer:h.0"]
        >>> decode_csv_row(cols, ["1", "7", "2.0", "1.0", "1.0", "0.5", "true", "true",
        ...                       "false", "0.25"])["layers"]
        {'h.0': 0.25}
    """
    if len(cells) != len(columns):
        raise ValueError(f"{len(cells)} fields, and the section's header has {len(columns)}")
    obj: dict[str, Any] = {"layers": {}, "extra": {}}
    for column, cell in zip(columns, cells, strict=True):
        if cell == "":
            continue
        if column.startswith("layer:"):
            obj["layers"][column[6:]] = _csv_float(cell, column)
        elif column.startswith("extra:"):
            obj["extra"][column[6:]] = _csv_float(cell, column)
        elif column == "forensics":
            try:
                obj["forensics"] = json.loads(cell, parse_constant=_CONSTANTS.__getitem__)
            except json.JSONDecodeError as exc:
                raise ValueError(f"field 'forensics' is not a JSON object ({exc.msg})") from None
        elif column in ("schema", "step"):
            obj[column] = _csv_int(cell, column)
        elif column == "optimizer":
            obj[column] = cell
        elif column in FLAG_FIELDS or column == "normalising":
            if cell.lower() not in _CSV_FLAGS:
                raise ValueError(f"field {column!r} should be true or false, got {_short(cell)}")
            obj[column] = _CSV_FLAGS[cell.lower()]
        elif column in RECORD_FIELDS:
            obj[column] = _csv_float(cell, column)
    return decode_record(obj)


def flat_record(record: Mapping[str, Any]) -> dict[str, Any]:
    """A record as one CSV row: its fields, then ``layer:<name>`` and ``extra:<name>``.

    Example:
        >>> flat_record({"step": 3, "layers": {"h.0": 0.5}, "extra": {"loss": 2.0}})
        {'step': 3, 'layer:h.0': 0.5, 'extra:loss': 2.0}
    """
    row = {k: v for k, v in record.items() if k not in ("layers", "extra", "forensics")}
    row.update({f"layer:{k}": v for k, v in record.get("layers", {}).items()})
    row.update({f"extra:{k}": v for k, v in record.get("extra", {}).items()})
    if "forensics" in record:  # one cell of JSON: its names vary from spike to spike
        row["forensics"] = encode_record(record["forensics"]).rstrip("\n")
    return row
