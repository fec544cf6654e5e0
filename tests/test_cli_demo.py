"""``gradclip demo``: the command a newcomer runs first (``make demo``)."""

from __future__ import annotations

import json

import pytest
import torch

from gradclip import cli
from gradclip.demo import compare
from gradclip.demo.compare import STRATEGIES
from gradclip.demo.tasks import TASKS
from output_cases import CASES, read_only_folder, run_gradclip, snapshot

pytest.importorskip("matplotlib")
pytest.importorskip("tqdm")


@pytest.fixture(autouse=True)
def _restore_threads():
    before = torch.get_num_threads()  # the demo sets one thread, as its numbers are defined
    yield
    torch.set_num_threads(before)


def _demo(*args: str) -> int:
    return cli.main(["demo", *args])


def test_quick_demo_writes_the_whole_report(tmp_path, capsys):
    out = tmp_path / "demo"
    assert _demo("--quick", "--out", str(out)) == 0
    printed = capsys.readouterr().out
    data = json.loads((out / "demo.json").read_text())
    assert [r["strategy"] for r in data["rows"]] == list(STRATEGIES)
    assert data["task"] == "rnn-addition/violent" and data["steps"] == TASKS[data["task"]].quick_steps
    for row in data["rows"]:
        assert row["label"] in printed
    none = data["rows"][0]
    assert none["diverged"] and "Without clipping the run diverged" in printed
    for name in ("index.html", "loss.png", "norms.png", "updates.png",
                 "adaptive-report/report.html"):  # fmt: skip
        assert (out / name).stat().st_size > 0, name
    logs = sorted(p.stem for p in (out / "runs").glob("*.jsonl"))
    assert logs == sorted(set(STRATEGIES) - {"none"})
    adaptive = [json.loads(line) for line in (out / "runs" / "adaptive.jsonl").read_text().splitlines()]
    assert [r["norm"] for r in adaptive] == pytest.approx(data["runs"]["adaptive"]["pre_norms"])
    assert f"report written to {out / 'index.html'}" in printed
    assert not list(tmp_path.glob(".demo.partial-*"))


def test_same_seed_same_table(tmp_path, capsys):
    args = ["--strategies", "none", "fixed-good", "adaptive", "--steps", "40", "--seed", "7"]
    tables = []
    for run in ("a", "b"):
        assert _demo(*args, "--out", str(tmp_path / run)) == 0
        tables.append(capsys.readouterr().out.split("report written")[0])
    assert tables[0] == tables[1]
    assert "seed 7, 40 steps" in tables[0]


def test_an_earlier_demo_folder_is_replaced(tmp_path, capsys):
    out = tmp_path / "demo"
    assert _demo("--strategies", "none", "--steps", "5", "--out", str(out)) == 0
    assert _demo("--strategies", "fixed-good", "--steps", "6", "--out", str(out)) == 0
    data = json.loads((out / "demo.json").read_text())
    assert [r["strategy"] for r in data["rows"]] == ["fixed-good"] and data["steps"] == 6


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--task", "rnn"], "invalid choice: 'rnn' (choose from 'rnn-addition/violent'"),
        (["--strategies", "fixed"], "invalid choice: 'fixed' (choose from 'none', 'fixed-low'"),
        (["--steps", "0"], "expected a positive integer, got 0"),
        (["--seed", "-1"], "expected an integer >= 0, got -1"),
    ],
)
def test_bad_arguments_exit_2_with_the_choices(args, message, tmp_path, capsys):
    with pytest.raises(SystemExit) as exc:
        _demo(*args, "--out", str(tmp_path / "x"))
    assert exc.value.code == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "x").exists()


def test_an_output_folder_that_cannot_be_used_exits_2_untouched(tmp_path, capsys):
    afile = tmp_path / "file"
    afile.write_text("keep")
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("keep")
    cases = [(afile, "is a file"), (mine, "not a gradclip demo folder"),
             (afile / "sub", "cannot write --out")]  # fmt: skip
    for out, message in cases:
        assert _demo("--strategies", "none", "--steps", "3", "--out", str(out)) == 2
        err = capsys.readouterr().err
        assert message in err and "gradclip demo: error:" in err
    assert afile.read_text() == "keep" and (mine / "notes.txt").read_text() == "keep"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file", "mine"]


def test_devices(tmp_path, capsys):
    assert _demo("--device", "warp9", "--out", str(tmp_path / "x")) == 2
    assert "is not a device" in capsys.readouterr().err
    if not torch.cuda.is_available():
        assert _demo("--device", "cuda", "--out", str(tmp_path / "x")) == 2
        assert "CUDA is not available" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()


def test_an_interrupted_demo_leaves_nothing_that_looks_complete(tmp_path, monkeypatch):
    calls = []

    def interrupted(*args, progress, **kwargs):
        calls.append(1)
        progress("none", 1, 10)
        raise KeyboardInterrupt

    monkeypatch.setattr(compare, "compare", interrupted)
    with pytest.raises(KeyboardInterrupt):
        _demo("--strategies", "none", "--out", str(tmp_path / "demo"))
    assert calls and list(tmp_path.iterdir()) == []


def test_a_rerun_replaces_its_own_files_and_leaves_none_stale(tmp_path, capsys):
    out = tmp_path / "demo"
    assert _demo("--strategies", "fixed-good", "adaptive", "--steps", "5", "--out", str(out)) == 0
    assert (out / "adaptive-report" / "report.html").exists()
    inode = out.stat().st_ino
    assert _demo("--strategies", "none", "--steps", "4", "--out", str(out)) == 0
    names = sorted(p.relative_to(out).as_posix() for p in out.rglob("*"))
    assert names == [".gradclip-output.json", "demo.json", "index.html", "loss.png", "norms.png",
                     "updates.png"]  # fmt: skip
    assert out.stat().st_ino == inode  # the folder itself is kept, never deleted
    assert sorted(p.name for p in tmp_path.iterdir()) == ["demo"]


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.name)
def test_a_folder_it_did_not_write_is_refused_untouched(case, tmp_path, capsys):
    """Exit 2 before any training, the reason on stderr, and not a byte changed around it."""
    dest = case.build(tmp_path, "gradclip demo")
    before = snapshot(tmp_path)
    assert _demo("--strategies", "none", "--steps", "3", "--out", str(dest)) == 2
    out, err = capsys.readouterr()
    assert out == "" and err.startswith("gradclip demo: error: ") and str(dest) in err
    for word in case.words:
        assert word.format(producer="gradclip demo") in err, (word, err)
    assert snapshot(tmp_path) == before


def test_a_read_only_parent_exits_2_and_writes_nothing(tmp_path, capsys):
    with read_only_folder(tmp_path / "ro") as parent:
        before = snapshot(tmp_path)
        assert _demo("--strategies", "none", "--steps", "3", "--out", str(parent / "d")) == 2
        assert f"cannot write --out {parent / 'd'}" in capsys.readouterr().err
        assert snapshot(tmp_path) == before


def test_a_folder_that_changes_during_the_run_exits_1_and_keeps_the_results(
    tmp_path, capsys, monkeypatch
):
    from gradclip.demo import folder

    real, out = folder.write_demo, tmp_path / "demo"

    def meanwhile(*args, **kwargs):
        result = real(*args, **kwargs)
        out.mkdir()
        (out / "notes.txt").write_text("written while the demo ran")
        return result

    monkeypatch.setattr(folder, "write_demo", meanwhile)
    assert _demo("--strategies", "none", "--steps", "3", "--out", str(out)) == 1
    err = capsys.readouterr().err
    assert "gradclip demo: error:" in err and "changed while gradclip ran" in err
    assert sorted(p.name for p in out.iterdir()) == ["notes.txt"]
    (kept,) = tmp_path.glob(".demo.partial-*")
    assert f"the finished output was left in {kept}" in err
    assert (kept / "index.html").exists()


def test_an_interrupted_demo_leaves_an_earlier_one_as_it_was(tmp_path, capsys, monkeypatch):
    out = tmp_path / "demo"
    assert _demo("--strategies", "none", "--steps", "3", "--out", str(out)) == 0
    before = snapshot(tmp_path)

    def interrupted(*args, progress, **kwargs):
        progress("none", 1, 10)
        raise KeyboardInterrupt

    monkeypatch.setattr(compare, "compare", interrupted)
    with pytest.raises(KeyboardInterrupt):
        _demo("--strategies", "none", "--out", str(out))
    assert snapshot(tmp_path) == before


def test_refusals_from_the_real_command(tmp_path):
    """The installed command's path: exit 2, a message, no traceback, nothing changed."""
    for case in (CASES[0], CASES[2]):  # foreign files; an earlier demo with a link inside
        root = tmp_path / case.name
        root.mkdir()
        dest = case.build(root, "gradclip demo")
        before = snapshot(tmp_path)
        done = run_gradclip(["demo", "--strategies", "none", "--steps", "3", "--out", str(dest)])
        assert done.returncode == 2 and done.stdout == "", done.stderr
        assert done.stderr.startswith("gradclip demo: error:") and "Traceback" not in done.stderr
        assert snapshot(tmp_path) == before
    with read_only_folder(tmp_path / "ro") as parent:
        before = snapshot(tmp_path)
        done = run_gradclip(["demo", "--steps", "3", "--out", str(parent / "demo")])
        assert done.returncode == 2 and "Traceback" not in done.stderr
        assert "cannot write --out" in done.stderr and snapshot(tmp_path) == before


def test_a_report_written_beside_a_demos_log_goes_with_the_demo(tmp_path, capsys):
    out = tmp_path / "demo"
    assert _demo("--strategies", "fixed-good", "--steps", "5", "--out", str(out)) == 0
    assert cli.main(["report", str(out / "runs" / "fixed-good.jsonl")]) == 0
    assert (out / "runs" / "fixed-good-report" / "report.html").exists()
    assert _demo("--strategies", "none", "--steps", "4", "--out", str(out)) == 0  # not refused
    assert not (out / "runs").exists()
