"""Where :class:`~gradclip.GradMonitor` writes its step records (the record and its JSON
line / CSV row: :mod:`gradclip.records`).

**What a log file guarantees.** A log is appended to, or refused (``mode="x"`` on an
existing file); it is never truncated. Each flush is one ``os.write`` of whole lines to a
file opened with ``O_APPEND``, under an advisory lock (``flock``, where the platform has
it), so several writers on one path -- DDP ranks, other processes, an ``echo >> log`` --
interleave whole flushes and never clobber or split each other's lines (on a local POSIX
file system; NFS does not honour ``O_APPEND`` between machines). A crash leaves complete
lines; if a file does not end with a newline (another writer died mid-line), the next
flush starts on a new line, so only that partial line is lost. A path that is a directory,
a FIFO or another non-regular file, or a symbolic link leading out of its folder, is
refused with an error saying why.

**CSV logs** (:class:`CSVSink`) are a sequence of sections, each a header line followed by
rows. A sink starts a section (writes a header) on its first flush, when a new layer or
extra column appears, and when another writer wrote to the file since its last flush; so a
file with one writer and stable columns is a plain CSV with one header, and no line is ever
rewritten. :func:`gradclip.read_log` reads every section of every writer.

Sinks: :class:`JSONLSink` (default), :class:`CSVSink`, :class:`TensorBoardSink`, and any
callable (wrapped in :class:`CallableSink`, called once per record).
"""

from __future__ import annotations

import contextlib
import csv
import errno
import io
import math
import os
import re
import stat
import time
import warnings
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

import torch

from gradclip.records import (  # the first four were defined here in gradclip 0.1
    SCHEMA_VERSION,
    LogError,
    Record,
    csv_cell,
    decode_record,
    encode_record,
    flat_record,
)
from gradclip.stats import FLAG_FIELDS, SCALAR_FIELDS

try:
    import fcntl
except ImportError:  # Windows: no advisory locks; O_APPEND alone keeps writes whole
    fcntl = None  # type: ignore[assignment]

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

_HEADER_SCAN = 1 << 22  # bytes looked back for a CSV file's last header (else: write one)
# a file ending mid-line is watched this long for a live writer to finish (rare path only)
_SETTLE_POLLS, _SETTLE_SECONDS = 5, 0.002


# ---------------------------------------------------------------------------------------
# log files: append-only, whole lines, several writers


def _warn_if_every_rank_writes(path: Path) -> None:
    """Under an initialised process group, a rank other than 0 writing a path that does not
    name its rank is most likely one of many ranks writing the same log."""
    dist = torch.distributed
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() < 2:
        return
    rank = dist.get_rank()
    if rank != 0 and not re.search(rf"(?<!\d){rank}(?!\d)", str(path)):
        warnings.warn(
            f"rank {rank} of {dist.get_world_size()} writes the gradclip log {str(path)!r}, "
            "a path without its rank: if every rank writes it, each step is logged once per "
            "rank in one file (lines stay whole, steps repeat). Write one log per rank, e.g. "
            "log=f'grads-rank{rank}.jsonl', or create the monitor on rank 0 only",
            stacklevel=4,
        )


class _LogFile:
    """An append-only log file: safe to open, whole-lines writes, several writers."""

    def __init__(self, path: str | os.PathLike[str], mode: str, what: str):
        if not isinstance(path, str | os.PathLike):
            raise TypeError(f"`{what}` must be a path (str or os.PathLike), got {type(path).__name__}")
        if mode not in ("a", "x"):
            raise ValueError(
                f"`mode` must be 'a' (append, creating the file if needed) or 'x' (a new file "
                f"only), got {mode!r}; gradclip never truncates a log: delete it first to start over"
            )
        self.path = Path(path)
        self.fd = -1
        folder = os.path.realpath(self.path.parent)
        target = os.path.realpath(self.path)
        if os.path.dirname(target) != folder:
            raise ValueError(
                f"`{what}` {str(self.path)!r} is a symbolic link to {target!r}, outside its folder "
                f"{folder!r}: gradclip does not write through links that leave the folder; pass "
                "the target path itself"
            )
        flags = os.O_RDWR | os.O_APPEND | os.O_CREAT | (os.O_EXCL if mode == "x" else 0)
        for name in ("O_CLOEXEC", "O_NOFOLLOW", "O_NONBLOCK"):  # NONBLOCK: a FIFO must not hang
            flags |= getattr(os, name, 0)
        try:
            self.fd = os.open(target, flags, 0o666)
        except IsADirectoryError:
            raise ValueError(
                f"`{what}` {str(self.path)!r} is a directory; pass a file path such as "
                f"{str(self.path / 'grads.jsonl')!r}"
            ) from None
        except FileExistsError:
            raise ValueError(
                f"`{what}` {str(self.path)!r} exists, and mode='x' only creates a new log: pass "
                "mode='a' to append to it, or another path"
            ) from None
        except FileNotFoundError:
            raise ValueError(
                f"the folder of `{what}` {str(self.path)!r} does not exist ({folder!r}); create it first"
            ) from None
        except OSError as exc:
            if exc.errno not in (errno.ENXIO, errno.ELOOP):
                raise
            raise ValueError(
                f"`{what}` {str(self.path)!r} is not a regular file (a FIFO, a device or a link "
                "that changed); pass the path of a log file"
            ) from None
        if not stat.S_ISREG(os.fstat(self.fd).st_mode):
            self.close()
            raise ValueError(
                f"`{what}` {str(self.path)!r} is not a regular file (a FIFO, socket or device); "
                "pass the path of a log file"
            )
        self.end = -1  # the file's size after our last write; -1 before the first
        self._header: bytes | None = None  # the header our last rows were written under
        _warn_if_every_rank_writes(self.path)

    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        if fcntl is None:
            yield
            return
        fcntl.flock(self.fd, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(self.fd, fcntl.LOCK_UN)

    def _read(self, offset: int, size: int) -> bytes | None:
        try:
            return os.pread(self.fd, size, offset)
        except (OSError, AttributeError):  # no pread (Windows), or a write-only file
            return None

    def _last_header(self, start: int, end: int, prefix: bytes) -> bytes | None:
        """The last line beginning with ``prefix`` among the lines in [start, end): None when
        there is none, ``b""`` when unknown (not found in the last _HEADER_SCAN bytes, or
        the file cannot be read back)."""
        begin = max(start, end - _HEADER_SCAN)
        data = self._read(begin, end - begin)
        if data is None:
            return b""
        at = data.rfind(b"\n" + prefix) + 1
        if at == 0 and not (begin == start and data.startswith(prefix)):
            return None if begin == start else b""
        stop = data.find(b"\n", at)
        return data[at : stop if stop >= 0 else len(data)]

    def _ends_mid_line(self, size: int) -> bool:
        """Whether the file (``size`` bytes) ends inside a line that nobody is still writing.

        A writer that does not take the lock (``echo >> log``) can be caught mid-write: the
        kernel publishes the new size page by page. Its line is complete a moment later, so
        the size is polled until it stops changing; only a line still unfinished then is a
        dead writer's (treating a live one as dead would add a blank line).
        """
        for _ in range(_SETTLE_POLLS):
            if self._read(size - 1, 1) in (b"\n", None):
                return False
            time.sleep(_SETTLE_SECONDS)
            now = os.fstat(self.fd).st_size
            if now == size:
                return True
            size = now
        return True

    def append(self, body: bytes, header: bytes | None = None) -> None:
        """Append ``body`` (whole lines) in one write. With a ``header`` line (CSV), the
        header goes first unless it is already the file's last header (the one the rows
        above were written under: ours, or another writer's with the same columns)."""
        with self._locked():
            size = os.fstat(self.fd).st_size
            data = body
            if header is not None:
                if size == self.end:  # nobody else wrote since our last write
                    current = self._header
                else:  # a first write, or others wrote: their last header, if any
                    start = self.end if 0 <= self.end < size else 0
                    found = self._last_header(start, size, header.partition(b",")[0] + b",")
                    current = self._header if found is None and start > 0 else found
                if current != header.rstrip(b"\n"):
                    data = header + body
                self._header = header.rstrip(b"\n")
            if size and size != self.end and self._ends_mid_line(size):
                data = b"\n" + data  # another writer died mid-line: start on a new line
            view = memoryview(data)
            while view:  # a write can be partial (a signal, a full disk): finish it
                view = view[os.write(self.fd, view) :]
            self.end = os.lseek(self.fd, 0, os.SEEK_CUR)

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


# ---------------------------------------------------------------------------------------
# sinks


class Sink:
    """Receives step records in batches, one batch per monitor flush.

    Subclasses implement :meth:`write`; :meth:`close` releases files or writers.
    """

    def write(self, records: Sequence[Record]) -> None:
        """Store ``records`` (step records, oldest first)."""
        raise NotImplementedError

    def close(self) -> None:
        """Release what the sink holds; it is not used after this."""


class JSONLSink(Sink):
    """The default log: one JSON line per step record (format and guarantees: module doc).

    Args:
        path: the log file. It is created if missing and appended to if it exists (a
            resumed run continues its log); it is never truncated.
        mode: ``"a"`` (default) appends; ``"x"`` creates a new file and refuses an existing one.

    Example:
        >>> import tempfile, os
        >>> path = os.path.join(tempfile.mkdtemp(), "run.jsonl")
        >>> sink = JSONLSink(path); sink.write([{"schema": 1, "step": 0}]); sink.close()
        >>> open(path).read()
        '{"schema": 1, "step": 0}\\n'
    """

    def __init__(self, path: str | os.PathLike[str], mode: str = "a"):
        self._file = _LogFile(path, mode, "log")
        self.path = self._file.path

    def write(self, records: Sequence[Record]) -> None:
        if records:
            self._file.append("".join(encode_record(r) for r in records).encode())

    def close(self) -> None:
        self._file.close()


class CSVSink(Sink):
    """One CSV row per step (:func:`gradclip.records.flat_record`): the record's fields, then
    ``layer:<name>`` and ``extra:<name>``.

    The columns are those of every record written so far, in order of first appearance;
    a missing value is an empty field. A column that appears mid-run (a module added, a
    scalar attached on some steps only) starts a new section with a wider header instead of
    rewriting the file (see the module doc): nothing written, by this sink or another writer,
    is ever rewritten. Flags are ``true``/``false``; non-finite numbers ``nan``/``inf``.

    Args:
        path: the log file, created or appended to (never truncated).
        mode: ``"a"`` (default) appends; ``"x"`` creates a new file and refuses an existing one.

    Example:
        >>> import tempfile, os
        >>> path = os.path.join(tempfile.mkdtemp(), "run.csv")
        >>> sink = CSVSink(path); sink.write([{"schema": 1, "step": 0, "layers": {"a": 0.5}}])
        >>> sink.close(); open(path).read().splitlines()
        ['schema,step,layer:a', '1,0,0.5']
    """

    def __init__(self, path: str | os.PathLike[str], mode: str = "a"):
        self._file = _LogFile(path, mode, "log")
        self.path = self._file.path
        self._columns: list[str] = []

    def write(self, records: Sequence[Record]) -> None:
        rows = [flat_record(r) for r in records]
        if not rows:
            return
        known = set(self._columns)
        new = [k for k in dict.fromkeys(k for row in rows for k in row) if k not in known]
        self._columns += new
        text = io.StringIO()
        writer = csv.writer(text, lineterminator="\n")
        writer.writerow(self._columns)
        header = text.getvalue().encode()
        text.seek(0)
        text.truncate()
        writer.writerows([csv_cell(row[k]) if k in row else "" for k in self._columns] for row in rows)
        self._file.append(text.getvalue().encode(), header=header)

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
            # the spike detector's fields once a detector has a bound (none: no series)
            detector = r.get("spike") or math.isfinite(r.get("spike_bound", math.inf))
            for name in (*SCALAR_FIELDS, *FLAG_FIELDS):
                if name.startswith("spike") and not detector:
                    continue
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
    """Normalise sink arguments: a path (``.csv``: CSV, else JSON lines), a Sink, a callable.

    Every item is checked before any file is opened; if opening one fails, those already
    opened are closed.
    """
    if sinks is None:
        return []
    items = [sinks] if isinstance(sinks, Sink | str | os.PathLike) or callable(sinks) else sinks
    items = list(items)  # type: ignore[arg-type]
    for s in items:
        if not isinstance(s, Sink | str | os.PathLike) and not callable(s):
            raise TypeError(
                f"a sink must be a path, a gradclip.sinks.Sink or a callable, got {type(s).__name__}"
            )
    out: list[Sink] = []
    try:
        for s in items:
            if isinstance(s, Sink):
                out.append(s)
            elif isinstance(s, str | os.PathLike):
                out.append(CSVSink(s) if str(s).lower().endswith(".csv") else JSONLSink(s))
            else:
                out.append(CallableSink(s))
    except BaseException:
        for sink in out:
            if isinstance(sink, JSONLSink | CSVSink):
                sink.close()
        raise
    return out
