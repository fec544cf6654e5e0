"""`gradclip recommend` and `gradclip report`: output, and bad logs (missing, empty,
truncated, corrupt, newer schema): a message naming the file and line, partial results where
they can be trusted, a non-zero exit status, never a traceback."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

import gradclip
from gradclip import cli
from output_cases import CASES, read_only_folder, run_gradclip, snapshot
from test_report import synthetic_records, write_log

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture
def log(tmp_path):
    return write_log(tmp_path / "run.jsonl", synthetic_records(n=120, nonfinite=()))


def run(argv, capsys):
    status = cli.main([str(a) for a in argv])
    out, err = capsys.readouterr()
    assert "Traceback" not in out + err
    return status, out, err


def test_recommend_prints_the_threshold_and_warnings(log, capsys):
    status, out, err = run(["recommend", log], capsys)
    assert status == 0 and err == ""
    assert out.startswith("recommended max_norm: ")
    assert "warning: clipping fired on 100% of steps" in out


def test_recommend_json(log, capsys):
    status, out, _ = run(["recommend", log, "--json"], capsys)
    data = json.loads(out)
    assert status == 0 and data["max_norm"] == pytest.approx(0.3) and data["steps"] == 120
    assert any("cannot tell" in w for w in data["warnings"])  # the norms asked for ~10x


def test_recommend_for_an_optimizer(log, capsys):
    status, out, _ = run(["recommend", log, "--json", "--optimizer", "adamw"], capsys)
    data = json.loads(out)
    assert status == 0 and data["normalising"] is True and "every typical step" in data["rule"]
    # the norms are the ones the Python API reads from the same log
    want = gradclip.recommend_max_norm(gradclip.read_log(log), optimizer="AdamW")
    assert data["max_norm"] == want.max_norm < data["quantiles"]["p10"]
    pytest.importorskip("matplotlib")
    page = log.parent / "page"
    assert run(["report", log, "-o", page, "--optimizer", "AdamW"], capsys)[0] == 0
    assert "every typical step" in (page / "report.html").read_text()
    for command in (["recommend", log], ["report", log, "-o", log.parent / "out"]):
        with pytest.raises(SystemExit) as exit_:  # a usage mistake: argparse's exit, before any work
            cli.main([str(a) for a in [*command, "--optimizer", "Lion"]])
        err = capsys.readouterr().err
        assert exit_.value.code == 2 and "argument --optimizer: `optimizer`='Lion' names no" in err
    assert not (log.parent / "out").exists()


def test_recommend_follows_the_optimizer_the_log_names(tmp_path, capsys):
    # a log recorded by GradMonitor.step under Adam: `gradclip recommend` needs no --optimizer
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.Tanh(), torch.nn.Linear(16, 1))
    adam = torch.optim.Adam(model.parameters(), lr=1e-3)
    path = tmp_path / "adam.jsonl"
    with gradclip.GradMonitor(gradclip.NormClip(10.0), model, log=path) as monitor:
        for _ in range(120):
            adam.zero_grad()
            model(torch.randn(32, 8)).pow(2).mean().backward()
            monitor.step(adam)
    status, out, _ = run(["recommend", path, "--json"], capsys)
    data = json.loads(out)
    want = gradclip.recommend_max_norm(gradclip.read_log(path), optimizer="Adam")
    assert status == 0 and (data["normalising"], data["optimizer"]) == (True, "Adam")
    assert data["max_norm"] == want.max_norm and "as the log names it" in data["rule"]
    # --optimizer still wins
    data = json.loads(run(["recommend", path, "--json", "--optimizer", "SGD"], capsys)[1])
    assert (data["normalising"], data["optimizer"]) == (False, "SGD")


def test_report_writes_the_page(log, tmp_path, capsys):
    pytest.importorskip("matplotlib")
    status, out, err = run(["report", log, "-o", tmp_path / "out"], capsys)
    assert status == 0 and err == ""
    assert out.strip() == str(tmp_path / "out" / "report.html")
    assert (tmp_path / "out" / "norms.png").exists()


def lines_of(records):
    return [json.dumps(r) for r in records]


BAD_LOGS = {
    # name: (file content, exit status, words expected on stderr)
    "missing": (None, 2, ["no such file"]),
    "empty": ("", 2, ["empty log"]),
    "garbage": ("hello\nworld\n", 2, [":1:", "not a JSON record", "no valid step record"]),
    "newer": ('{"schema": 99, "step": 0}\n', 2, [":1:", "newer gradclip", "upgrade gradclip"]),
    "truncated": (None, 1, [":41:", "truncated last line", "40 valid records"]),
    "corrupt-middle": (None, 1, [":7:", "not a JSON record", "39 valid records"]),
    "missing-field": (None, 1, [":3:", "missing field 'norm'"]),
}


def bad_log(tmp_path, name):
    path = tmp_path / f"{name}.jsonl"
    content = BAD_LOGS[name][0]
    lines = lines_of(synthetic_records(n=40, nonfinite=()))
    if name == "truncated":
        content = "\n".join(lines) + "\n" + lines[0][:25]
    elif name == "corrupt-middle":
        lines[6] = lines[6][:-10] + "\x00garbage"
        content = "\n".join(lines) + "\n"
    elif name == "missing-field":
        record = json.loads(lines[2])
        del record["norm"]
        lines[2] = json.dumps(record)
        content = "\n".join(lines) + "\n"
    if content is not None:
        path.write_text(content)
    return path


@pytest.mark.parametrize("command", ["recommend", "report"])
@pytest.mark.parametrize("name", list(BAD_LOGS))
def test_bad_logs(name, command, tmp_path, capsys):
    if command == "report":
        pytest.importorskip("matplotlib")
    path = bad_log(tmp_path, name)
    argv = [command, path] + (["-o", tmp_path / "out"] if command == "report" else [])
    status, out, err = run(argv, capsys)
    assert status == BAD_LOGS[name][1]
    assert str(path) in err
    for word in BAD_LOGS[name][2]:
        assert word in err, (word, err)
    if status == 1:  # partial results were still produced
        assert "recommended max_norm" in out or (tmp_path / "out" / "report.html").exists()
    else:
        assert out == "" and not (tmp_path / "out").exists()


def test_output_dir_that_is_a_file(log, tmp_path, capsys):
    target = tmp_path / "file"
    target.write_text("")
    status, _, err = run(["report", log, "-o", target], capsys)
    assert status == 2 and "not a directory" in err


def test_report_writes_beside_the_log_by_default(log, tmp_path, capsys):
    pytest.importorskip("matplotlib")
    status, out, err = run(["report", log], capsys)
    assert status == 0 and err == ""
    assert out.strip() == str(tmp_path / "run-report" / "report.html")
    assert (tmp_path / "run-report" / "norms.png").exists()
    status, out, _ = run(["report", log], capsys)  # again: its own earlier report is replaced
    assert status == 0 and out.strip() == str(tmp_path / "run-report" / "report.html")


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.name)
def test_a_folder_it_did_not_write_is_refused_untouched(case, log, tmp_path, capsys):
    """-o DIR, or the default folder beside the log: exit 2, the reason, nothing changed."""
    pytest.importorskip("matplotlib")
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    dest = case.build(tmp_path / "a", "gradclip report")
    default = log.with_name("run-report")
    os.rename(case.build(tmp_path / "b", "gradclip report"), default)
    for argv, target in ((["report", log, "-o", dest], dest), (["report", log], default)):
        before = snapshot(tmp_path)
        status, out, err = run(argv, capsys)
        assert status == 2 and out == ""
        assert err.startswith("gradclip report: error: ") and str(target) in err
        for word in case.words:
            assert word.format(producer="gradclip report") in err, (word, err)
        assert snapshot(tmp_path) == before


def test_a_read_only_parent_exits_2_and_writes_nothing(log, tmp_path, capsys):
    pytest.importorskip("matplotlib")
    with read_only_folder(tmp_path / "ro") as parent:
        before = snapshot(tmp_path)
        status, out, err = run(["report", log, "-o", parent / "report"], capsys)
        assert status == 2 and out == ""
        assert f"gradclip report: error: cannot write to {parent / 'report'}" in err
        assert snapshot(tmp_path) == before


def test_a_folder_that_changes_while_rendering_exits_1(log, tmp_path, capsys, monkeypatch):
    pytest.importorskip("matplotlib")
    from gradclip import report

    real = report.write_report
    dest = tmp_path / "out"

    def meanwhile(data, out):  # someone writes into the destination during the render
        dest.mkdir()
        (dest / "notes.txt").write_text("mine")
        return real(data, out)

    monkeypatch.setattr(report, "write_report", meanwhile)
    status, out, err = run(["report", log, "-o", dest], capsys)
    assert status == 1 and out == ""
    assert "gradclip report: error:" in err and "changed while gradclip ran" in err
    assert sorted(p.name for p in dest.iterdir()) == ["notes.txt"]


def test_refusals_from_the_real_command(log, tmp_path):
    """The installed command's path: exit 2, a message, no traceback, nothing changed."""
    pytest.importorskip("matplotlib")
    for case in (CASES[1], CASES[3]):  # a forged demo.json, a destination that is a link
        root = tmp_path / case.name
        root.mkdir()
        dest = case.build(root, "gradclip report")
        before = snapshot(tmp_path)
        done = run_gradclip(["report", str(log), "-o", str(dest)])
        assert done.returncode == 2 and done.stdout == "", done.stderr
        assert "Traceback" not in done.stderr and done.stderr.startswith("gradclip report: error:")
        assert snapshot(tmp_path) == before
    with read_only_folder(tmp_path / "ro") as parent:
        before = snapshot(tmp_path)
        done = run_gradclip(["report", str(log), "-o", str(parent / "report")])
        assert done.returncode == 2 and "Traceback" not in done.stderr
        assert "cannot write to" in done.stderr and snapshot(tmp_path) == before


def test_no_traceback_from_the_real_command(tmp_path):
    path = bad_log(tmp_path, "truncated")
    done = subprocess.run([sys.executable, "-m", "gradclip", "recommend", str(path)],
                          capture_output=True, text=True, timeout=120)  # fmt: skip
    assert done.returncode == 1 and "Traceback" not in done.stderr
    assert f"{path}:41: truncated last line" in done.stderr
