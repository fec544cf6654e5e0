"""Output folders (gradclip._files): a command replaces only what it provably wrote itself,
never follows a link, never deletes a folder it did not create, and refuses everything else
with a clear message, before any work and without changing anything.

Each test builds a destination of the class, snapshots the whole tree around it (names,
types, bytes, link targets) and checks that a refusal leaves the snapshot identical.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import pytest

from gradclip import _files
from gradclip._files import (
    MANIFEST,
    OutputError,
    OutputFolder,
    check_output,
    default_report_folder,
)
from output_cases import read_only_folder, snapshot

P = "gradclip demo"


def publish(dest: Path, files: dict[str, str], producer: str = P) -> Path:
    with OutputFolder(dest, producer=producer) as out:
        for rel, text in files.items():
            (out.stage / rel).parent.mkdir(parents=True, exist_ok=True)
            (out.stage / rel).write_text(text)
        return out.commit()


def listing(folder: Path) -> dict[str, str]:
    return {p.relative_to(folder).as_posix(): p.read_text() for p in folder.rglob("*")
            if p.is_file() and p.name != MANIFEST}  # fmt: skip


# -- what may be written ------------------------------------------------------------------


def test_a_new_path_is_created_with_its_parents_and_a_manifest_of_every_file(tmp_path):
    dest = tmp_path / "a" / "b" / "out"
    assert publish(dest, {"index.html": "page", "runs/x.jsonl": "log"}) == dest
    assert listing(dest) == {"index.html": "page", "runs/x.jsonl": "log"}
    manifest = json.loads((dest / MANIFEST).read_text())
    assert manifest["producer"] == P and manifest["dirs"] == ["runs"]
    assert set(manifest["files"]) == {"index.html", "runs/x.jsonl"}
    assert sorted(p.name for p in tmp_path.rglob("*")) == sorted(
        ["a", "b", "out", MANIFEST, "index.html", "runs", "x.jsonl"])  # no staging left


def test_an_empty_folder_is_filled_and_kept(tmp_path):
    dest = tmp_path / "out"
    dest.mkdir()
    inode = dest.stat().st_ino
    publish(dest, {"index.html": "page"})
    assert dest.stat().st_ino == inode  # the user's folder, not a new one in its place
    assert listing(dest) == {"index.html": "page"}


def test_a_previous_output_is_replaced_file_by_file(tmp_path):
    dest = tmp_path / "out"
    publish(dest, {"index.html": "old", "runs/a.jsonl": "a", "report/r.html": "r"})
    inode = dest.stat().st_ino
    publish(dest, {"index.html": "new", "runs/b.jsonl": "b"})
    assert listing(dest) == {"index.html": "new", "runs/b.jsonl": "b"}  # nothing stale
    assert dest.stat().st_ino == inode
    assert set(json.loads((dest / MANIFEST).read_text())["files"]) == {"index.html", "runs/b.jsonl"}
    publish(dest, {"index.html": "third"})  # and again, from the new manifest
    assert listing(dest) == {"index.html": "third"}


def test_a_previous_output_whose_files_were_deleted_is_still_replaced(tmp_path):
    dest = tmp_path / "out"
    publish(dest, {"index.html": "old", "runs/a.jsonl": "a"})
    (dest / "runs" / "a.jsonl").unlink()
    publish(dest, {"index.html": "new"})
    assert listing(dest) == {"index.html": "new"} and not (dest / "runs").exists()


# -- what is refused, untouched --------------------------------------------------------------


def refused(dest: Path, around: Path, *words: str, producer: str = P) -> None:
    before = snapshot(around)
    with pytest.raises(OutputError) as exc:
        OutputFolder(dest, producer=producer)
    for word in words:
        assert word in str(exc.value), (word, str(exc.value))
    assert str(dest) in str(exc.value)
    assert snapshot(around) == before


def test_a_folder_with_foreign_files_is_refused(tmp_path):
    dest = tmp_path / "work"
    (dest / "projects" / "p1").mkdir(parents=True)
    (dest / "thesis.txt").write_text("three years")
    (dest / "projects" / "p1" / "main.py").write_text("code")
    refused(dest, tmp_path, "not a gradclip demo folder", "projects/", "thesis.txt",
            "pass a new or empty folder")


def test_a_forged_demo_json_is_not_a_proof(tmp_path):
    # the file name the demo used to trust: any folder holding one was wiped
    dest = tmp_path / "work"
    dest.mkdir()
    (dest / "demo.json").write_text("{}")
    (dest / "thesis.txt").write_text("three years")
    refused(dest, tmp_path, "not a gradclip demo folder", "demo.json", "thesis.txt")


@pytest.mark.parametrize("content", [
    "not json", "[]", '{"written_by": "someone"}', "\x00\x01",
    '{"written_by": "gradclip", "format": 1, "producer": "gradclip demo", "files": [], "dirs": []}',
    '{"written_by": "gradclip", "format": 99, "producer": "gradclip demo", "files": {}, "dirs": []}',
])  # fmt: skip
def test_a_manifest_gradclip_did_not_write_is_refused(tmp_path, content):
    dest = tmp_path / "out"
    dest.mkdir()
    (dest / MANIFEST).write_text(content)
    (dest / "thesis.txt").write_text("mine")
    refused(dest, tmp_path, f"its {MANIFEST} was not written by gradclip")


def test_a_forged_manifest_cannot_claim_a_file_it_does_not_hash(tmp_path):
    dest = tmp_path / "out"
    publish(dest, {"index.html": "page"})
    manifest = json.loads((dest / MANIFEST).read_text())
    manifest["files"]["thesis.txt"] = ["0" * 64]  # listed, but not with its content
    (dest / MANIFEST).write_text(json.dumps(manifest))
    (dest / "thesis.txt").write_text("three years")
    refused(dest, tmp_path, "thesis.txt changed since gradclip demo wrote it")


def test_a_file_added_or_edited_in_a_previous_output_is_refused(tmp_path):
    dest = tmp_path / "out"
    publish(dest, {"index.html": "page", "runs/a.jsonl": "log"})
    (dest / "runs" / "notes.txt").write_text("my notes")
    refused(dest, tmp_path, "runs/notes.txt", "which gradclip did not write")
    (dest / "runs" / "notes.txt").unlink()
    (dest / "index.html").write_text("page, annotated by hand")
    refused(dest, tmp_path, "index.html changed since gradclip demo wrote it")
    (dest / "index.html").write_text("page")  # restored: ours again
    publish(dest, {"index.html": "new"})
    assert listing(dest) == {"index.html": "new"}


def test_a_gradclip_output_nested_in_a_previous_one_is_replaced_with_it(tmp_path):
    dest = tmp_path / "demo"
    publish(dest, {"index.html": "page", "runs/a.jsonl": "log"})
    publish(dest / "runs" / "a-report", {"report.html": "r"}, producer="gradclip report")
    publish(dest, {"index.html": "new"})
    assert listing(dest) == {"index.html": "new"} and not (dest / "runs").exists()


def test_a_nested_manifest_speaks_only_for_its_own_folder(tmp_path):
    dest = tmp_path / "demo"
    publish(dest, {"index.html": "page", "runs/a.jsonl": "log"})
    (dest / "thesis.txt").write_text("three years")
    nested = tmp_path / "elsewhere" / "x"
    publish(nested, {"report.html": "r"}, producer="gradclip report")
    manifest = json.loads((nested / MANIFEST).read_text())
    digest = hashlib.sha256(b"three years").hexdigest()
    manifest["files"]["../../thesis.txt"] = [digest]  # a claim outside its folder
    (dest / "runs" / "x").mkdir()
    (dest / "runs" / "x" / MANIFEST).write_text(json.dumps(manifest))
    refused(dest, tmp_path, "thesis.txt", "which gradclip did not write")


def test_another_commands_output_is_refused(tmp_path):
    dest = tmp_path / "out"
    publish(dest, {"report.html": "r"}, producer="gradclip report")
    refused(dest, tmp_path, "holds the output of gradclip report")


def test_a_link_inside_pointing_out_is_never_followed(tmp_path):
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "a.jsonl").write_text("someone else's log")  # what the link would expose
    dest = tmp_path / "out"
    publish(dest, {"index.html": "page", "runs/a.jsonl": "log"})
    (dest / "runs" / "a.jsonl").unlink()
    (dest / "runs").rmdir()
    (dest / "runs").symlink_to(outside, target_is_directory=True)
    refused(dest, tmp_path, "symbolic link", "runs")
    (dest / "runs").unlink()
    (dest / "page-copy.html").symlink_to(tmp_path / "nowhere")  # dangling, pointing out
    refused(dest, tmp_path, "symbolic link", "page-copy.html")


@pytest.mark.parametrize("target", ["empty", "ours", "missing"])
def test_a_destination_that_is_a_link_is_refused(tmp_path, target):
    real = tmp_path / "real"
    if target == "empty":
        real.mkdir()
    elif target == "ours":
        publish(real, {"index.html": "page"})
    link = tmp_path / "out"
    link.symlink_to(real, target_is_directory=True)
    refused(link, tmp_path, "is a symbolic link", "pass the folder it points to")


def test_a_file_or_a_fifo_is_not_a_folder(tmp_path):
    afile = tmp_path / "out.html"
    afile.write_text("mine")
    refused(afile, tmp_path, "is a file, not a directory")
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    refused(fifo, tmp_path, "is not a directory")


def test_a_fifo_inside_a_previous_output_is_refused_without_being_opened(tmp_path):
    dest = tmp_path / "out"
    publish(dest, {"index.html": "page"})
    os.mkfifo(dest / "pipe")  # opening it to hash it would hang
    refused(dest, tmp_path, "pipe", "which gradclip did not write")


def test_a_path_below_a_file_is_an_os_error_and_creates_nothing(tmp_path):
    afile = tmp_path / "file"
    afile.write_text("mine")
    before = snapshot(tmp_path)
    with pytest.raises(OSError):
        OutputFolder(afile / "sub", producer=P)
    assert snapshot(tmp_path) == before


def test_a_filesystem_root_and_bad_arguments(tmp_path):
    with pytest.raises(OutputError, match="filesystem root"):
        check_output("/", producer=P)
    with pytest.raises(TypeError, match="`producer` must be a non-empty str"):
        check_output(tmp_path / "x", producer="")


def test_a_read_only_parent_fails_before_anything_is_written(tmp_path):
    with read_only_folder(tmp_path / "ro") as parent:
        before = snapshot(tmp_path)
        with pytest.raises(PermissionError):
            OutputFolder(parent / "out", producer=P)
        with pytest.raises(PermissionError):
            OutputFolder(parent / "new" / "out", producer=P)
        assert snapshot(tmp_path) == before


def test_parents_it_created_are_removed_when_staging_fails(tmp_path, monkeypatch):
    def denied(parent, prefix):
        raise PermissionError(13, "Permission denied", str(parent))

    monkeypatch.setattr(_files, "_fresh_folder", denied)
    with pytest.raises(PermissionError):
        OutputFolder(tmp_path / "new" / "deeper" / "out", producer=P)
    assert list(tmp_path.iterdir()) == []


# -- interrupted runs --------------------------------------------------------------------------


def test_an_interrupted_run_leaves_the_destination_as_it_was(tmp_path):
    dest = tmp_path / "out"
    for existing in (False, True):
        if existing:
            publish(dest, {"index.html": "old"})
        before = snapshot(tmp_path)
        with pytest.raises(KeyboardInterrupt), OutputFolder(dest, producer=P) as out:
            (out.stage / "index.html").write_text("half")
            raise KeyboardInterrupt
        assert snapshot(tmp_path) == before  # no staging folder either


def test_a_destination_that_changed_during_the_run_keeps_the_finished_output(tmp_path):
    dest = tmp_path / "out"
    out = OutputFolder(dest, producer=P)
    (out.stage / "index.html").write_text("finished")
    dest.mkdir()
    (dest / "thesis.txt").write_text("written meanwhile")
    with pytest.raises(OutputError, match="changed while gradclip ran; the finished output was "
                                          "left in"):  # fmt: skip
        out.commit()
    assert listing(dest) == {"thesis.txt": "written meanwhile"}
    assert (out.stage / "index.html").read_text() == "finished"


def test_a_crash_while_publishing_leaves_a_folder_the_next_run_replaces(tmp_path, monkeypatch):
    """Between the old files' removal and the new files' arrival the manifest covers both,
    so whatever a crash leaves is provably gradclip's."""
    dest = tmp_path / "out"
    publish(dest, {"index.html": "old", "a.png": "a", "runs/x.jsonl": "x"})
    real_rename, calls = os.rename, []

    def crash_on_second(src, dst, *args, **kwargs):
        calls.append(dst)
        if len(calls) == 2:
            raise OSError(5, "Input/output error")
        return real_rename(src, dst, *args, **kwargs)

    monkeypatch.setattr(os, "rename", crash_on_second)
    with pytest.raises(OSError, match="the finished output is in"):
        publish(dest, {"index.html": "new", "b.png": "b", "runs/y.jsonl": "y"})
    monkeypatch.setattr(os, "rename", real_rename)
    check_output(dest, producer=P)  # not refused: every file there is gradclip's
    publish(dest, {"index.html": "third"})
    assert listing(dest) == {"index.html": "third"}


def test_default_report_folder_is_beside_the_log():
    assert default_report_folder("runs/grads.jsonl") == Path("runs/grads-report")
    assert default_report_folder("log") == Path("log-report")
    assert default_report_folder("/x/a.b.csv") == Path("/x/a.b-report")
