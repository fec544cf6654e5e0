"""Destinations a command that writes a folder must refuse, shared by the tests of
``gradclip demo --out`` and ``gradclip report -o``; a snapshot of a tree to prove a refusal
changed nothing; a read-only folder (also for root); and the real command in a subprocess."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import pytest

from gradclip._files import OutputFolder


def snapshot(root: Path) -> dict[str, object]:
    """Every entry under ``root``: a link's target, a file's bytes, a folder's mode bits."""
    out: dict[str, object] = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            path = Path(dirpath) / name
            rel = path.relative_to(root).as_posix()
            if path.is_symlink():
                out[rel] = ("link", os.readlink(path))
            elif path.is_dir():
                out[rel] = ("dir", path.stat().st_mode)
            elif path.is_file():
                out[rel] = ("file", path.read_bytes())
            else:  # a FIFO: reading it would block
                out[rel] = ("other", path.stat().st_mode)
    return out


def earlier_output(dest: Path, producer: str) -> Path:
    """A folder as ``producer`` leaves it: a page, a log in runs/, and the manifest."""
    with OutputFolder(dest, producer=producer) as out:
        (out.stage / "index.html").write_text("<html></html>")
        (out.stage / "runs").mkdir()
        (out.stage / "runs" / "a.jsonl").write_text("{}\n")
        return out.commit()


@dataclass(frozen=True)
class Case:
    """A destination of the class: ``build(root, producer)`` makes it under ``root`` and
    returns the path to pass; the refusal must contain ``words`` (``{producer}`` filled in)."""

    name: str
    build: Callable[[Path, str], Path]
    words: tuple[str, ...]


def _foreign(root: Path, producer: str) -> Path:
    dest = root / "work"
    (dest / "projects").mkdir(parents=True)
    (dest / "projects" / "plan.md").write_text("plans")
    (dest / "thesis.txt").write_text("three years of work")
    return dest


def _forged_demo_json(root: Path, producer: str) -> Path:
    dest = _foreign(root, producer)
    (dest / "demo.json").write_text('{"version": 1}')  # the name the demo used to trust
    return dest


def _link_inside(root: Path, producer: str) -> Path:
    outside = root / "elsewhere"
    outside.mkdir()
    (outside / "data.bin").write_text("not the output's")
    dest = earlier_output(root / "out", producer)
    shutil.rmtree(dest / "runs")
    (dest / "runs").symlink_to(outside, target_is_directory=True)
    return dest


def _dest_is_link(root: Path, producer: str) -> Path:
    (root / "real").mkdir()
    (root / "out").symlink_to(root / "real", target_is_directory=True)
    return root / "out"


def _a_file(root: Path, producer: str) -> Path:
    (root / "out").write_text("mine")
    return root / "out"


def _other_command(root: Path, producer: str) -> Path:
    other = "gradclip report" if producer == "gradclip demo" else "gradclip demo"
    return earlier_output(root / "out", other)


CASES = (
    Case("foreign-files", _foreign, ("is not a {producer} folder", "thesis.txt", "projects/")),
    Case("forged-demo-json", _forged_demo_json, ("is not a {producer} folder", "demo.json")),
    Case("link-inside", _link_inside, ("symbolic link", "runs")),
    Case("dest-is-link", _dest_is_link, ("is a symbolic link",)),
    Case("a-file", _a_file, ("is a file, not a directory",)),
    Case("other-command", _other_command, ("holds the output of gradclip",)),
)
"""The destinations refused with exit status 2 before any work."""


@contextmanager
def read_only_folder(path: Path) -> Iterator[Path]:
    """``path`` (a new folder) made read-only for this process, even as root (which ignores
    permission bits: then the immutable attribute, ``chattr +i``, is set as well)."""
    path.mkdir()
    path.chmod(0o555)
    immutable = False
    try:
        if os.geteuid() == 0:
            done = subprocess.run(["chattr", "+i", str(path)], capture_output=True, text=True)
            if done.returncode != 0:
                pytest.skip(f"running as root on a filesystem without chattr +i "
                            f"({done.stderr.strip()}): no folder is read-only for root here")  # fmt: skip
            immutable = True
        yield path
    finally:
        if immutable:
            subprocess.run(["chattr", "-i", str(path)], check=True)
        path.chmod(0o755)


def run_gradclip(args: list[str]) -> subprocess.CompletedProcess[str]:
    """``python -m gradclip ARGS`` in a subprocess (the installed command's code path)."""
    return subprocess.run([sys.executable, "-m", "gradclip", *args], capture_output=True,
                          text=True, timeout=300)  # fmt: skip
