"""gradclip.demo.folder: the files of a demo folder, the links between them, and the page in
a real headless Chromium (images load, no console error)."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

import gradclip
from browser import chromium_or_skip, load_in_chromium
from gradclip.demo.folder import DIAGNOSTICS, RUNS, write_demo

pytest.importorskip("matplotlib")


@pytest.fixture(scope="module")
def chromium():
    return chromium_or_skip()


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo")
    result = write_demo(out, "sgd-heavy-tail", ["none", "fixed-good", "adaptive"], steps=40)
    return out, result


def test_every_clipper_has_a_log_of_its_steps(folder):
    out, result = folder
    assert sorted(p.name for p in (out / RUNS).iterdir()) == ["adaptive.jsonl", "fixed-good.jsonl"]
    for name in ("fixed-good", "adaptive"):
        lines = (out / RUNS / f"{name}.jsonl").read_text().splitlines()
        norms = [json.loads(line)["norm"] for line in lines]
        assert norms == pytest.approx(result.runs[name].pre_norms)


def test_every_link_on_the_page_leads_to_a_file_of_the_folder(folder):
    out, _ = folder
    html = (out / "index.html").read_text()
    hrefs = set(re.findall(r'<a href="([^"]+)"', html))
    assert hrefs == {f"{DIAGNOSTICS}/report.html", "demo.json", f"{RUNS}/"}
    for href in hrefs:
        assert (out / href).exists(), href


def test_the_diagnostics_name_the_log_where_it_will_be(folder):
    out, _ = folder
    page = (out / DIAGNOSTICS / "report.html").read_text()
    assert f"source: {RUNS}/adaptive.jsonl;" in page  # not the staging folder's path
    assert str(out) not in page


@pytest.mark.parametrize(("task", "named"), [("adam-spikes", "Adam"), ("muon-adamw", "Muon+AdamW")])
def test_the_diagnostics_recommend_for_the_tasks_optimizer(folder, tmp_path, task, named):
    # Adam (and Muon with AdamW) normalise their update: the logs name the optimizer, and the
    # recommendation's rule, read from the log, says so; SGD's (the heavy-tailed task) does not
    write_demo(tmp_path, task, ["adaptive"], steps=120)
    history = gradclip.read_log(tmp_path / RUNS / "adaptive.jsonl")
    assert (history.optimizer, history.normalising) == (named, True)
    page = (tmp_path / DIAGNOSTICS / "report.html").read_text()
    assert f"the optimizer ({named}, as the log names it) normalises its update" in page
    assert f"; optimizer: {named}</p>" in page  # the summary says which the log names
    assert gradclip.read_log(folder[0] / RUNS / "adaptive.jsonl").normalising is False
    assert "normalises" not in (folder[0] / DIAGNOSTICS / "report.html").read_text()


def test_the_demo_page_loads_in_headless_chromium(folder, chromium, tmp_path):
    out, _ = folder
    for page in (out / "index.html", out / DIAGNOSTICS / "report.html"):
        result, console = load_in_chromium(chromium, page, tmp_path / "profile")
        assert result["images"] >= 3 and result["loaded"] == result["images"], result
        assert result["errors"] == [] and console == []
        Path(page.with_name("probe-" + page.name)).unlink()
