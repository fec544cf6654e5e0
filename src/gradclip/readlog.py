"""Reading a monitor's log (JSON lines or CSV) into a :class:`~gradclip.History`, streamed.

A line that cannot be trusted is left out and named in ``History.problems``; a file that is
not a regular file (a FIFO, a directory) is refused instead of read.
"""

from __future__ import annotations

import csv
import json
import os
import stat
from collections.abc import Iterator
from pathlib import Path
from typing import IO

from gradclip.history import History, HistoryBuilder
from gradclip.records import LogError, Record, decode_csv_row, decode_line

__all__ = ["MAX_LINE", "read_log"]

MAX_LINE = 1 << 24
"""Longest log line read (16 MiB, ~400,000 layers); longer lines are named and left out."""
_MAX_PROBLEMS = 20  # problems listed one by one; the rest are counted



def _open(path: Path) -> IO[bytes]:
    """``path`` opened for reading, if it is a regular file (a FIFO would block forever)."""
    flags = os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_CLOEXEC", 0)
    try:
        fd = os.open(path, flags)
    except FileNotFoundError:
        raise LogError(f"{path}: no such file") from None
    except OSError as exc:
        raise LogError(f"{path}: cannot read it ({exc.strerror or exc})") from None
    mode = os.fstat(fd).st_mode
    if not stat.S_ISREG(mode):
        os.close(fd)
        kind = "a directory" if stat.S_ISDIR(mode) else "a FIFO, socket or device"
        raise LogError(f"{path}: not a regular file ({kind}); pass the log file a GradMonitor wrote")
    return os.fdopen(fd, "rb")


def _lines(file: IO[bytes]) -> Iterator[tuple[int, bytes | None]]:
    """(line number, line) pairs; the line is None when it is longer than MAX_LINE."""
    number = 0
    while line := file.readline(MAX_LINE + 1):
        number += 1
        if len(line) > MAX_LINE and not line.endswith(b"\n"):
            while line and not line.endswith(b"\n"):  # skip the rest of it, in bounded reads
                line = file.readline(1 << 20)
            yield number, None
        else:
            yield number, line


class _Problems:
    """The first _MAX_PROBLEMS problems as "file:line: what", and a count of the rest."""

    def __init__(self, path: Path):
        self.path, self.listed, self.count = path, [], 0

    def add(self, number: int, what: str) -> None:
        self.count += 1
        if len(self.listed) < _MAX_PROBLEMS:
            self.listed.append(f"{self.path}:{number}: {what}")

    def all(self) -> list[str]:
        more = self.count - len(self.listed)
        return self.listed + ([f"{self.path}: {more} more bad lines not listed"] if more else [])


def _why(exc: Exception) -> str:
    if isinstance(exc, json.JSONDecodeError):
        return f"not a JSON record ({exc.msg}, column {exc.colno})"
    if isinstance(exc, UnicodeDecodeError):
        return f"not valid UTF-8 (byte {exc.start + 1})"
    if isinstance(exc, RecursionError):
        return "nested too deeply to be a step record"
    if isinstance(exc, csv.Error):
        return f"not a CSV row ({exc})"
    return str(exc)


def _csv_cells(line: bytes, lines: Iterator[tuple[int, bytes | None]]) -> list[str]:
    """One CSV row; a quoted field may hold line breaks, so an odd number of quotes means
    the row goes on in the next line(s), up to MAX_LINE in all."""
    while line.count(b'"') % 2 and len(line) <= MAX_LINE:
        nxt = next(lines, None)
        if nxt is None or nxt[1] is None:
            break
        line += nxt[1]
    return next(csv.reader([line.decode("utf-8")], strict=True), [])


def read_log(path: str | os.PathLike[str], *, layers: bool = True) -> History:
    """Read a log written by :class:`~gradclip.GradMonitor` (JSON lines or CSV) into a
    :class:`History`, streaming it line by line.

    Lines that cannot be trusted (not JSON, truncated, missing fields, numbers out of
    float64's range, names that are not valid Unicode, a newer schema) are left out, each
    named in ``History.problems`` as ``"file:line: what"``; the rest is still read, since
    every line is a self-contained record. The format is recognised from the content: a
    first line that is not a JSON object but has commas is CSV (every section of it, see
    :mod:`gradclip.sinks`); anything else is read as JSON lines.

    Args:
        path: the log file.
        layers: read the per-layer norms (False: totals, flags and extras only; less memory).

    Raises:
        LogError: the file is missing, unreadable, not a regular file (a FIFO, a
            directory) or empty, or no line is a valid record.

    Example:
        >>> read_log("no/such/file.jsonl")
        Traceback (most recent call last):
        ...
        gradclip.records.LogError: no/such/file.jsonl: no such file
    """
    if not isinstance(path, str | os.PathLike):
        raise TypeError(f"`path` must be a str or os.PathLike, got {type(path).__name__}")
    path = Path(path)
    builder = HistoryBuilder(layers=layers)
    problems = _Problems(path)
    csv_columns: list[str] | None = None
    is_csv: bool | None = None
    blank = True
    with _open(path) as file:
        lines = _lines(file)
        for number, line in lines:
            if line is None:
                blank = False
                problems.add(number, f"longer than {MAX_LINE} bytes: not a step record")
                continue
            if not line.strip():
                continue
            blank = False
            if is_csv is None:  # the first line decides: JSON objects, or comma-separated
                is_csv = line.lstrip()[:1] not in (b"{", b"[") and b"," in line
            record: Record | None = None
            try:
                if not is_csv:
                    record = decode_line(line)
                else:
                    cells = _csv_cells(line, lines)
                    if cells[:1] == ["schema"]:
                        if "step" not in cells:
                            raise ValueError("a CSV header without a 'step' column")
                        csv_columns = cells
                    elif csv_columns is None:
                        raise ValueError("a CSV row before any header")
                    else:
                        record = decode_csv_row(csv_columns, cells)
            except (ValueError, RecursionError, csv.Error) as exc:  # JSON/Unicode errors too
                last = not line.endswith(b"\n")
                problems.add(
                    number,
                    "truncated last line (the run was probably interrupted)" if last else _why(exc),
                )
            if record is not None:
                builder.add(record)
    if not len(builder):
        if blank:
            raise LogError(f"{path}: empty log (no step was recorded)")
        listed = problems.all()
        first = listed[0] if listed else f"{path}: no step records"
        raise LogError(f"{first}; no valid step record in the file")
    return builder.build(source=str(path), problems=problems.all())
