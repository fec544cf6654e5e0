"""``gradclip tune``: the finder on an embedded task, its page, and refused input."""

from __future__ import annotations

import json

import pytest
import torch

from gradclip import cli

pytest.importorskip("matplotlib")


@pytest.fixture(autouse=True)
def _restore_threads():
    before = torch.get_num_threads()  # tune sets one thread, as the tasks are calibrated
    yield
    torch.set_num_threads(before)


FAST = ["--task", "sgd-heavy-tail", "--horizon", "6", "--candidates", "0.1", "1"]


def test_tune_prints_the_decision_and_writes_its_page(tmp_path, capsys):
    out = tmp_path / "tune"
    assert cli.main(["tune", *FAST, "--out", str(out)]) == 0
    captured = capsys.readouterr()
    assert captured.out.startswith("use: ") and "round 1: 6 steps" in captured.out
    assert "round 1: adaptive:" in captured.err  # progress, one line per trial
    html = (out / "search.html").read_text()
    assert "max_norm search" in html and "data:image/png;base64," in html
    assert (out / "search.png").stat().st_size > 0
    # run again into the same folder: an earlier search is replaced
    assert cli.main(["tune", *FAST, "--out", str(out)]) == 0


def test_tune_json(capsys):
    assert cli.main(["tune", *FAST, "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["cost"]["run_steps"] == 4000
    assert [t["candidate"]["max_norm"] for t in data["rounds"][0]["trials"]][1:3] == [0.1, 1.0]


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--candidates", "0"], "expected a positive number"),
        (["--candidates", "-1"], "expected a positive number"),
        (["--budget", "2"], "expected a fraction in (0, 1]"),
        (["--horizon", "0"], "expected a positive integer"),
        (["--task", "nope"], "invalid choice"),
    ],
)
def test_bad_arguments_exit_2(args, message, capsys):
    with pytest.raises(SystemExit) as info:
        cli.main(["tune", *args])
    assert info.value.code == 2
    assert message in capsys.readouterr().err


def test_an_output_folder_of_someone_else_is_refused_before_running(tmp_path, capsys):
    mine = tmp_path / "notes"
    mine.mkdir()
    (mine / "todo.txt").write_text("keep me")
    assert cli.main(["tune", *FAST, "--out", str(mine)]) == 2
    captured = capsys.readouterr()
    assert "gradclip tune: error:" in captured.err and captured.out == ""
    assert [p.name for p in mine.iterdir()] == ["todo.txt"]


def test_an_interrupted_search_leaves_no_folder_behind(tmp_path, monkeypatch):
    import gradclip.demo.search

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(gradclip.demo.search, "search_task", interrupted)
    with pytest.raises(KeyboardInterrupt):
        cli.main(["tune", *FAST, "--out", str(tmp_path / "tune")])
    assert list(tmp_path.iterdir()) == []
