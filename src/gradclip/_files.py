"""Output folders that never destroy a user's files: staged beside, published whole.

The rule every command that writes a folder follows (``gradclip demo --out``,
``gradclip report -o``):

* it only ever replaces what it provably wrote itself: a folder it wrote holds a manifest
  (:data:`MANIFEST`) naming the command and every file with its SHA-256; a file is replaced
  only while its content is still exactly what gradclip wrote (a gradclip output nested in
  it, such as ``gradclip report`` of one of a demo's logs, proves itself the same way);
* it never follows a symbolic link, neither the destination nor anything inside it (it
  never writes one, so a link is always someone else's);
* it never deletes a folder it did not create: an existing folder is kept and only its
  gradclip entries are swapped;
* anything else (a file, a link, a folder holding anything it did not write, a manifest it
  did not write or one of another command) is refused with an :class:`OutputError` that
  names the path, what is in the way and the fix, before any work starts.

The output is written into a fresh staging folder beside the destination and published only
when complete (:meth:`OutputFolder.commit`): an interrupted command leaves the destination
as it was. While a replacement is published, the manifest in the destination always covers
every gradclip file in it (old or new), so even a crash at that moment loses nothing and
leaves nothing the next run refuses.

Example:
    >>> import tempfile
    >>> from pathlib import Path
    >>> from gradclip._files import OutputError, OutputFolder
    >>> root = Path(tempfile.mkdtemp())
    >>> with OutputFolder(root / "out", producer="gradclip report") as out:
    ...     _ = (out.stage / "report.html").write_text("<html></html>")
    ...     final = out.commit()
    >>> sorted(p.name for p in final.iterdir())
    ['.gradclip-output.json', 'report.html']
    >>> _ = (root / "notes").mkdir(); _ = (root / "notes" / "thesis.txt").write_text("mine")
    >>> OutputFolder(root / "notes", producer="gradclip report")
    Traceback (most recent call last):
    ...
    gradclip._files.OutputError: ... is not a gradclip report folder: it holds thesis.txt, ...
"""

from __future__ import annotations

import hashlib
import json
import os
import secrets
import shutil
import stat
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType

__all__ = ["MANIFEST", "OutputError", "OutputFolder", "check_output", "default_report_folder"]

MANIFEST = ".gradclip-output.json"
"""The manifest's name inside every folder gradclip writes."""

_FORMAT = 1
_MAX_MANIFEST_BYTES = 16 * 2**20  # a manifest lists a few dozen files; a bigger one is not ours
_SHOWN = 4  # foreign entries named in a refusal


class OutputError(ValueError):
    """An output path gradclip refuses to write: the message names it, what is in the way,
    and the fix. Nothing was changed."""


@dataclass
class _Manifest:
    producer: str
    files: dict[str, list[str]] = field(default_factory=dict)  # relative path -> SHA-256s
    dirs: set[str] = field(default_factory=set)

    def to_json(self) -> str:
        return json.dumps({"written_by": "gradclip", "format": _FORMAT, "producer": self.producer,
                           "files": self.files, "dirs": sorted(self.dirs)}, indent=1) + "\n"  # fmt: skip

    @classmethod
    def parse(cls, text: str) -> _Manifest | None:
        """The manifest in ``text``, or None when it is not one gradclip wrote."""
        try:
            data = json.loads(text)
        except ValueError:
            return None
        if not (isinstance(data, dict) and data.get("written_by") == "gradclip"
                and data.get("format") == _FORMAT and isinstance(data.get("producer"), str)
                and isinstance(data.get("files"), dict) and isinstance(data.get("dirs"), list)):  # fmt: skip
            return None
        files = data["files"]
        if not all(isinstance(k, str) and isinstance(v, list) and all(isinstance(h, str) for h in v)
                   for k, v in files.items()):  # fmt: skip
            return None
        if not all(isinstance(d, str) for d in data["dirs"]):
            return None
        return cls(data["producer"], {k: list(v) for k, v in files.items()}, set(data["dirs"]))


@dataclass(frozen=True)
class _Entry:
    rel: str  # relative path with "/" separators
    kind: str  # "file", "dir", "link" or "other"


def _walk(root: Path, prefix: str = "") -> Iterator[_Entry]:
    """Every entry under ``root``, parents before children; links are reported, not followed."""
    with os.scandir(root) as it:
        entries = sorted(it, key=lambda e: e.name)
    for entry in entries:
        rel = f"{prefix}{entry.name}"
        mode = entry.stat(follow_symlinks=False).st_mode
        if stat.S_ISLNK(mode):
            yield _Entry(rel, "link")
        elif stat.S_ISDIR(mode):
            yield _Entry(rel, "dir")
            yield from _walk(root / entry.name, rel + "/")
        elif stat.S_ISREG(mode):
            yield _Entry(rel, "file")
        else:
            yield _Entry(rel, "other")


def _sha256(path: Path) -> str:
    # O_NOFOLLOW: the entry was a regular file when listed; never read through a link that
    # replaced it since
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0))
    digest = hashlib.sha256()
    with os.fdopen(fd, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _fresh_folder(parent: Path, prefix: str) -> Path:
    """A new, empty folder ``parent/prefix<random>``: made with ``mkdir`` (not ``mkdtemp``,
    whose mode 0700 the published folder would keep) and never one that existed."""
    for _ in range(100):
        path = parent / f"{prefix}{secrets.token_hex(4)}"
        try:
            path.mkdir()
        except FileExistsError:
            continue
        return path
    raise FileExistsError(f"no free staging folder name {prefix}* in {parent}")


def _names(rels: list[str]) -> str:
    shown = ", ".join(rels[:_SHOWN])
    return shown + (f" and {len(rels) - _SHOWN} more" if len(rels) > _SHOWN else "")


@dataclass(frozen=True)
class _Plan:
    """What the destination holds: nothing (``manifest`` None, ``exists`` False), an empty
    folder, or a folder of this producer whose ``entries`` are all verified as its own."""

    exists: bool
    manifest: _Manifest | None
    entries: tuple[_Entry, ...] = ()


def _inspect(dest: Path, producer: str, shown: str) -> _Plan:
    """How ``dest`` may be written, or :class:`OutputError` saying why it may not."""
    try:
        mode = os.lstat(dest).st_mode
    except FileNotFoundError:
        return _Plan(exists=False, manifest=None)
    if stat.S_ISLNK(mode):
        raise OutputError(f"{shown} is a symbolic link; gradclip never writes through a link: "
                          "pass the folder it points to, or a new path")  # fmt: skip
    if stat.S_ISREG(mode):
        raise OutputError(f"{shown} is a file, not a directory; pass a new or empty folder")
    if not stat.S_ISDIR(mode):
        raise OutputError(f"{shown} is not a directory; pass a new or empty folder")
    entries = [e for e in _walk(dest) if e.rel != MANIFEST]
    manifest_path = dest / MANIFEST
    has_manifest = os.path.lexists(manifest_path)
    if not entries and not has_manifest:
        return _Plan(exists=True, manifest=None)
    fix = "pass a new or empty folder"
    not_ours = f"{shown} is not a {producer} folder"
    if not has_manifest:
        listed = [e.rel + ("/" if e.kind == "dir" else "") for e in entries if "/" not in e.rel]
        raise OutputError(f"{not_ours}: it holds {_names(listed)}, which gradclip did not "
                          f"write (no {MANIFEST}); {fix}")  # fmt: skip
    manifest = _read_manifest(manifest_path)
    if manifest is None:
        raise OutputError(f"{not_ours}: its {MANIFEST} was not written by gradclip; {fix}")
    if manifest.producer != producer:
        raise OutputError(f"{not_ours}: it holds the output of {manifest.producer}; {fix}")
    links = [e.rel for e in entries if e.kind == "link"]
    if links:
        raise OutputError(f"{not_ours}: it holds the symbolic link(s) {_names(links)}, which "
                          f"gradclip never writes; {fix}")  # fmt: skip
    claims = _claims(dest, entries, manifest)
    foreign = [e.rel for e in entries if
               (e.kind == "dir" and e.rel not in claims.dirs)
               or (e.kind == "file" and e.rel not in claims.files) or e.kind == "other"]  # fmt: skip
    if foreign:
        raise OutputError(f"{not_ours}: it holds {_names(foreign)}, which gradclip did not "
                          f"write; move them out, or {fix}")  # fmt: skip
    changed = [e.rel for e in entries
               if e.kind == "file" and _sha256(dest / e.rel) not in claims.files[e.rel]]  # fmt: skip
    if changed:
        raise OutputError(f"{shown}: {_names(changed)} changed since {producer} wrote "
                          f"{'it' if len(changed) == 1 else 'them'}; move "
                          f"{'it' if len(changed) == 1 else 'them'} out, or {fix}")  # fmt: skip
    return _Plan(exists=True, manifest=claims, entries=tuple(entries))


def _claims(dest: Path, entries: list[_Entry], manifest: _Manifest) -> _Manifest:
    """Everything under ``dest`` gradclip claims to have written: the files and folders of
    its manifest, and those of any gradclip output nested in it (a report written beside a
    demo's log: ``gradclip report runs/NAME.jsonl``), each claim relative to its own folder
    so that a nested manifest speaks only for what lies below it."""
    claims = _Manifest(manifest.producer, dict(manifest.files), set(manifest.dirs))
    for entry in entries:
        if entry.kind != "file" or not entry.rel.endswith("/" + MANIFEST):
            continue
        nested = _read_manifest(dest / entry.rel)
        if nested is None:
            continue
        prefix = entry.rel[: -len(MANIFEST)]
        claims.files[entry.rel] = [_sha256(dest / entry.rel)]
        claims.dirs.add(prefix.rstrip("/"))
        claims.dirs.update(prefix + d for d in nested.dirs)
        claims.files.update({prefix + rel: digests for rel, digests in nested.files.items()})
    return claims


def _read_manifest(path: Path) -> _Manifest | None:
    try:
        st = os.lstat(path)
        if not stat.S_ISREG(st.st_mode) or st.st_size > _MAX_MANIFEST_BYTES:
            return None
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0))
        with os.fdopen(fd, "rb") as f:
            text = f.read(_MAX_MANIFEST_BYTES + 1).decode("utf-8")
    except (OSError, UnicodeDecodeError):
        return None
    return _Manifest.parse(text)


def check_output(dest: str | os.PathLike[str], *, producer: str) -> None:
    """Raise :class:`OutputError` (or ``OSError``) when ``producer`` may not write ``dest``,
    without creating anything: the check :class:`OutputFolder` makes first, for commands that
    want to refuse a destination before reading their input.

    Example:
        >>> import tempfile
        >>> check_output(tempfile.mkdtemp(), producer="gradclip report")  # an empty folder: fine
    """
    if not isinstance(producer, str) or not producer:
        raise TypeError(f"`producer` must be a non-empty str, got {producer!r}")
    path = Path(os.path.abspath(dest))
    if not path.name:
        raise OutputError(f"{os.fspath(dest)} is a filesystem root; pass a folder below it")
    _inspect(path, producer, os.fspath(dest))


def default_report_folder(log: str | os.PathLike[str]) -> Path:
    """Where ``gradclip report LOG`` writes without ``-o``: ``<log name>-report`` beside the log.

    Example:
        >>> default_report_folder("runs/grads.jsonl").as_posix()
        'runs/grads-report'
    """
    log = Path(log)
    return log.with_name(f"{log.stem or log.name}-report")


class OutputFolder:
    """A folder written in full or not at all, that replaces only what ``producer`` wrote.

    Building one checks the destination (see the module's rule) and creates an empty
    staging folder beside it (:attr:`stage`; missing parent folders are created). Write
    everything into :attr:`stage`, then call :meth:`commit`. Used as a context manager, the
    staging folder is removed when the block raises before :meth:`commit`.

    Args:
        dest: the output folder: absent, an empty folder, or an earlier output of
            ``producer`` whose files are unchanged.
        producer: the command writing it (``"gradclip demo"``), recorded in the manifest;
            another command's output is refused.

    Raises:
        OutputError: the destination is refused (nothing was changed).
        OSError: the staging folder cannot be created (a read-only parent, a parent that is
            a file, ...).
    """

    def __init__(self, dest: str | os.PathLike[str], *, producer: str) -> None:
        check_output(dest, producer=producer)
        self.shown = os.fspath(dest)
        self.dest = Path(os.path.abspath(dest))  # normalised; links above it are the user's
        self.producer = producer
        self._created: list[Path] = []
        for parent in reversed(self.dest.parents):
            if not parent.exists():
                parent.mkdir()
                self._created.append(parent)
        try:
            self.stage = _fresh_folder(self.dest.parent, f".{self.dest.name}.partial-")
        except BaseException:
            self._remove_created_parents()
            raise
        self._done = False

    def __enter__(self) -> OutputFolder:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if exc_type is not None and not self._done:
            self.discard()

    def discard(self) -> None:
        """Remove the staging folder (and parent folders this object created, if empty)."""
        if self._done:
            return
        self._done = True
        shutil.rmtree(self.stage, ignore_errors=True)  # ours; rmtree does not follow links
        self._remove_created_parents()

    def _remove_created_parents(self) -> None:
        for parent in reversed(self._created):
            try:
                parent.rmdir()
            except OSError:
                break

    def commit(self) -> Path:
        """Publish the staging folder at the destination; returns the destination.

        The destination is checked again (it may have changed while the command ran); when
        it is now refused, the finished output stays in :attr:`stage` and the
        :class:`OutputError` says so.
        """
        if self._done:
            raise RuntimeError("this OutputFolder was already committed or discarded")
        new = _Manifest(self.producer)
        for entry in _walk(self.stage):
            if entry.kind == "dir":
                new.dirs.add(entry.rel)
            elif entry.kind == "file" and entry.rel != MANIFEST:
                new.files[entry.rel] = [_sha256(self.stage / entry.rel)]
            elif entry.kind != "file":
                self._done = True  # keep the stage: the message points to it
                raise OutputError(f"the output staged in {self.stage} holds {entry.rel}, which "
                                  "is not a plain file or folder; it was left there")  # fmt: skip
        try:
            plan = _inspect(self.dest, self.producer, self.shown)
        except OutputError as exc:
            self._done = True  # keep the stage: the message points to it
            raise OutputError(f"{exc} (it changed while gradclip ran; the finished output "
                              f"was left in {self.stage})") from None  # fmt: skip
        self._done = True
        try:
            if plan.exists:
                self._replace(plan, new)
            else:
                (self.stage / MANIFEST).write_text(new.to_json(), encoding="utf-8")
                os.rename(self.stage, self.dest)
        except OSError as exc:
            raise OSError(exc.errno, f"{exc.strerror or exc} (publishing {self.shown}; the "
                          f"finished output is in {self.stage})") from exc  # fmt: skip
        return self.dest

    def _replace(self, plan: _Plan, new: _Manifest) -> None:
        """Swap the verified old entries of an existing folder for the staged ones."""
        old = plan.manifest or _Manifest(self.producer)
        present = {e.rel for e in plan.entries}
        # 1. a manifest that covers old and new, so that a crash from here on leaves only
        #    files gradclip can prove it wrote
        both = _Manifest(self.producer, dirs={d for d in old.dirs if d in present} | new.dirs)
        for rel in present | set(new.files):
            both.files[rel] = [*(old.files.get(rel, []) if rel in present else []),
                               *new.files.get(rel, [])]  # fmt: skip
        both.files = {k: v for k, v in both.files.items() if v}
        self._write_manifest(both)
        # 2. the old entries, children first: files unlinked, folders removed once empty
        for entry in reversed(plan.entries):
            path = self.dest / entry.rel
            if entry.kind == "file":
                path.unlink()
            else:
                path.rmdir()  # fails, and stops, if something new appeared in it
        # 3. the new entries, top level only (their folders move with their content)
        for name in sorted(os.listdir(self.stage)):
            target = self.dest / name
            if os.path.lexists(target):
                raise FileExistsError(f"{target} appeared while gradclip was publishing")
            os.rename(self.stage / name, target)
        # 4. the manifest of the new content only
        self._write_manifest(new)
        self.stage.rmdir()

    def _write_manifest(self, manifest: _Manifest) -> None:
        # written in the (own, same-filesystem) staging folder, then renamed over the old
        # one: a reader sees the old manifest or the new one, never half of one
        tmp = self.stage / MANIFEST
        tmp.write_text(manifest.to_json(), encoding="utf-8")
        os.replace(tmp, self.dest / MANIFEST)
