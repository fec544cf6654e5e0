"""Sinks: a log is appended to or refused, never truncated; several writers never clobber
each other's lines; paths that are directories, FIFOs or links out of their folder are
refused; CSV logs keep every writer's rows readable.

Every check reads the files back byte for byte or with the standard ``json``/``csv``
modules, never only through gradclip's own reader.
"""

from __future__ import annotations

import csv
import io
import itertools
import json
import math
import os
import subprocess
import sys
import time
import warnings
from pathlib import Path

import pytest
import torch

import gradclip
from gradclip.readlog import read_log
from gradclip.sinks import CSVSink, JSONLSink

sys.path.insert(0, str(Path(__file__).parent / "distributed"))
import dist_launcher

pytestmark = pytest.mark.usefixtures("one_thread")

POSIX = pytest.mark.skipif(sys.platform == "win32", reason="POSIX files: FIFOs, links, flock")


def record(step, **extra):
    return {
        "schema": 1, "step": step, "time": 0.0, "norm_type": 2.0, "norm": 2.0,
        "post_norm": 1.0, "threshold": 1.0, "coef": 0.5, "clipped": True, "finite": True,
        "skipped": False, "layers": {"a": 0.5}, "extra": extra,
    }  # fmt: skip


def monitor_run(path, steps, start=0):
    """A job that records ``steps`` total norms into ``path`` and exits."""
    with gradclip.GradMonitor(log=path, every=3) as mon:
        for i in range(start, start + steps):
            mon.record(torch.tensor(float(i)), max_norm=1.0, step=i)


@pytest.mark.parametrize("suffix", [".jsonl", ".csv"])
def test_a_restarted_job_appends_and_never_truncates(tmp_path, suffix):
    path = tmp_path / f"run{suffix}"
    monitor_run(path, 5)
    first = path.read_bytes()
    gradclip.GradMonitor(log=path).close()  # built and closed: the log is untouched
    assert path.read_bytes() == first
    monitor_run(path, 4, start=5)  # the restarted job
    assert path.read_bytes().startswith(first)  # nothing rewritten
    h = read_log(path)
    assert h.problems == () and h.steps.tolist() == list(range(9))
    assert h.norm.tolist() == [float(i) for i in range(9)]
    if suffix == ".csv":  # one header: the restarted writer found its columns already there
        assert path.read_text().count("schema,") == 1


def test_mode_x_refuses_an_existing_log_and_w_is_not_offered(tmp_path):
    path = tmp_path / "run.jsonl"
    path.write_text("precious\n")
    for sink in (JSONLSink, CSVSink):
        with pytest.raises(ValueError, match="mode='x' only creates a new log"):
            sink(path, mode="x")
        with pytest.raises(ValueError, match="never truncates"):
            sink(path, mode="w")
    assert path.read_text() == "precious\n"
    JSONLSink(tmp_path / "new.jsonl", mode="x").close()


def test_a_directory_is_refused_with_a_clear_error(tmp_path):
    with pytest.raises(ValueError, match=r"is a directory; pass a file path such as .*grads\.jsonl"):
        gradclip.GradMonitor(log=tmp_path)
    with pytest.raises(ValueError, match="does not exist"):
        gradclip.GradMonitor(log=tmp_path / "no" / "such" / "run.jsonl")
    with pytest.raises(TypeError, match="`log` must be a path"):
        gradclip.GradMonitor(log=3)  # type: ignore[arg-type]


@POSIX
def test_a_fifo_is_refused_without_hanging(tmp_path):
    fifo = tmp_path / "pipe.jsonl"
    os.mkfifo(fifo)
    with pytest.raises(ValueError, match="not a regular file"):
        JSONLSink(fifo)  # no reader: opening for writing would block forever
    reader = os.open(fifo, os.O_RDONLY | os.O_NONBLOCK)
    try:
        with pytest.raises(ValueError, match="not a regular file"):
            CSVSink(fifo)  # with a reader the open succeeds; the kind is still refused
    finally:
        os.close(reader)


@POSIX
def test_links_out_of_the_folder_are_never_followed(tmp_path):
    logs, elsewhere = tmp_path / "logs", tmp_path / "home"
    logs.mkdir()
    elsewhere.mkdir()
    victim = elsewhere / "thesis.txt"
    victim.write_text("years of work\n")
    (logs / "run.jsonl").symlink_to(victim)
    (logs / "dangling.jsonl").symlink_to(elsewhere / "new.txt")
    for name in ("run.jsonl", "dangling.jsonl"):
        with pytest.raises(ValueError, match=r"symbolic link .* outside its folder"):
            gradclip.GradMonitor(log=logs / name)
    assert victim.read_text() == "years of work\n"
    assert not (elsewhere / "new.txt").exists()
    # a link that stays in its folder is an ordinary name for its target
    (logs / "latest.jsonl").symlink_to("run-7.jsonl")
    monitor_run(logs / "latest.jsonl", 2)
    assert read_log(logs / "run-7.jsonl").steps.tolist() == [0, 1]


def test_a_partial_last_line_of_another_writer_stays_alone(tmp_path):
    path = tmp_path / "run.jsonl"
    whole = json.dumps(record(0)) + "\n"
    path.write_text(whole + json.dumps(record(1))[:30])  # a writer died mid-line
    sink = JSONLSink(path)
    sink.write([record(2), record(3)])
    sink.close()
    lines = path.read_text().splitlines()
    assert lines[0] == whole.strip() and len(lines) == 4
    assert [json.loads(line)["step"] for line in (lines[0], lines[2], lines[3])] == [0, 2, 3]
    h = read_log(path)
    assert h.steps.tolist() == [0, 2, 3] and len(h.problems) == 1 and ":2:" in h.problems[0]


def test_a_line_still_being_written_gets_no_blank_line(tmp_path, monkeypatch):
    """A writer without the lock (``echo >>``) seen mid-write: its line ends while the sink
    waits, so no newline is added before ours (CI once caught echo's line half published)."""
    path = tmp_path / "run.jsonl"
    rest = json.dumps(record(1))
    path.write_text(json.dumps(record(0)) + "\n" + rest[:30])
    sink = JSONLSink(path)
    sleeps = []

    def finish_the_line(seconds):
        if not sleeps:
            with open(path, "a") as f:
                f.write(rest[30:] + "\n")
        sleeps.append(seconds)

    monkeypatch.setattr(gradclip.sinks.time, "sleep", finish_the_line)
    sink.write([record(2)])
    sink.close()
    assert [json.loads(line)["step"] for line in path.read_text().splitlines()] == [0, 1, 2]
    assert 1 <= len(sleeps) <= 2

def csv_sections(path):
    """Every data row as a dict under the header of its section (plain csv module)."""
    rows, header = [], None
    for cells in csv.reader(io.StringIO(path.read_text())):
        if cells[:1] in (["schema"], ["step"]):
            header = cells
        else:
            rows.append(dict(zip(header, cells, strict=True)))
    return rows


def test_csv_sink_keeps_columns_that_appear_later(tmp_path):
    path = tmp_path / "run.csv"
    sink = gradclip.sinks.CSVSink(path)
    base = {"step": 0, "norm": 1.0, "layers": {"a": 0.5}, "extra": {}}
    sink.write([base, {**base, "step": 1, "extra": {"loss": 2.0}}])  # new key inside a batch
    before = path.read_bytes()
    sink.write([{**base, "step": 2, "layers": {"a": 0.25, "b": 3.0}}])  # new key later
    sink.write([{**base, "step": 3}])
    sink.close()
    assert path.read_bytes().startswith(before)  # append-only: nothing was rewritten
    rows = csv_sections(path)
    assert list(rows[-1]) == ["step", "norm", "layer:a", "extra:loss", "layer:b"]
    assert [r["step"] for r in rows] == ["0", "1", "2", "3"]
    assert [r["extra:loss"] for r in rows] == ["", "2.0", "", ""]
    assert [r.get("layer:b", "") for r in rows] == ["", "", "3.0", ""]
    assert [r["layer:a"] for r in rows] == ["0.5", "0.5", "0.25", "0.5"]
    assert not (tmp_path / "run.csv.tmp").exists()
    assert path.read_text().count("step,") == 2  # one header per set of columns


WRITER = """
import os, sys, time, torch, gradclip
w, jsonl, csvp, go, steps = sys.argv[1], sys.argv[2], sys.argv[3], sys.argv[4], int(sys.argv[5])
open(go + "." + w, "w").close()
while not os.path.exists(go):
    time.sleep(0.001)
with gradclip.GradMonitor(log=jsonl, sinks=[csvp], every=1) as mon:
    for i in range(steps):
        mon.record(torch.tensor(float(i)), step=i, **{"w" + w: float(i)})
"""

ECHO = """
while [ ! -e "$2" ]; do sleep 0.001; done
for i in $(seq 0 $(($3 - 1))); do
  echo '{"schema": 1, "step": '$i', "norm": 1, "post_norm": 1, "threshold": 1, "coef": 1, "clipped": false, "finite": true, "skipped": false, "extra": {"echo": '$i'}}' >> "$1"
done
"""


@POSIX
def test_concurrent_writers_never_clobber_lines(tmp_path):
    """Two processes write a JSON lines and a CSV log (a flush per step, started at the same
    instant) while a shell appends to the JSON one with ``echo >>``: every line survives."""
    jsonl, csvp, go, steps = tmp_path / "run.jsonl", tmp_path / "run.csv", tmp_path / "go", 300
    procs = [
        subprocess.Popen([sys.executable, "-c", WRITER, *map(str, (w, jsonl, csvp, go, steps))])
        for w in range(2)
    ]
    procs.append(subprocess.Popen(["bash", "-c", ECHO, "echo", str(jsonl), str(go), str(steps)]))
    deadline = time.monotonic() + 120
    while not all(Path(f"{go}.{w}").exists() for w in range(2)) and time.monotonic() < deadline:
        time.sleep(0.01)
    go.touch()
    for proc in procs:
        assert proc.wait(timeout=120) == 0

    lines = jsonl.read_text().splitlines()
    parsed = [json.loads(line) for line in lines]  # raises on any clobbered line
    assert len(parsed) == 3 * steps
    writers = [next(iter(r["extra"])) for r in parsed]
    assert sum(a != b for a, b in itertools.pairwise(writers)) >= 3  # they did interleave
    for key in ("w0", "w1", "echo"):
        mine = [r for r in parsed if key in r["extra"]]
        assert [r["step"] for r in mine] == list(range(steps)), key
        assert all(r["extra"][key] in (r["step"], float(r["step"])) for r in mine)
    for h in (read_log(jsonl), read_log(csvp)):
        assert h.problems == ()
        for key in ("w0", "w1"):
            mine = ~h.extras[key].isnan()
            assert h.steps[mine].tolist() == list(range(steps))
            assert torch.equal(h.extras[key][mine], h.norm[mine])
        assert (h.extras["w0"].isnan() ^ h.extras["w1"].isnan()).sum() == 2 * steps


def _ranks_share_a_log(rank, world, records, folder):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        shared = gradclip.GradMonitor(log=Path(folder) / "grads.jsonl", every=2)
        own = gradclip.GradMonitor(log=Path(folder) / f"grads-rank{rank}.jsonl", every=2)
    for i in range(10):
        shared.record(torch.tensor(float(rank)), step=i)
        own.record(torch.tensor(float(rank)), step=i)
    shared.close()
    own.close()
    records.append({"warnings": [str(w.message) for w in caught]})


@POSIX
def test_every_rank_writing_one_log_is_warned(tmp_path):
    ranks = dist_launcher.launch(_ranks_share_a_log, 2, str(tmp_path), deadline=120)
    assert ranks[0][0]["warnings"] == []  # rank 0 alone logging is the recommended set-up
    (message,) = ranks[1][0]["warnings"]
    assert "rank 1 of 2" in message and "grads.jsonl" in message
    assert "log=f'grads-rank{rank}.jsonl'" in message and "rank 0 only" in message
    h = read_log(tmp_path / "grads.jsonl")  # both ranks' lines, whole
    assert h.problems == () and sorted(h.norm.tolist()) == [0.0] * 10 + [1.0] * 10
    for r in range(2):
        assert read_log(tmp_path / f"grads-rank{r}.jsonl").norm.tolist() == [float(r)] * 10


def test_a_failing_sink_does_not_starve_the_others(tmp_path):
    got = []

    class Broken(gradclip.Sink):
        def write(self, records):
            raise OSError("disk full")

    mon = gradclip.GradMonitor(sinks=[Broken(), got.append], every=5)
    for i in range(3):
        mon.record(torch.tensor(1.0), step=i)
    with pytest.raises(OSError, match="disk full"):
        mon.flush()
    assert [r["step"] for r in got] == [0, 1, 2]


def test_nonfinite_numbers_are_strict_json_and_csv_reads_back(tmp_path):
    values = [math.nan, math.inf, -math.inf, 1e300, -1e300, 5e-324]
    for suffix in (".jsonl", ".csv"):
        path = tmp_path / f"v{suffix}"
        sink = JSONLSink(path) if suffix == ".jsonl" else CSVSink(path)
        sink.write([{**record(i), "norm": v, "layers": {"a": v}} for i, v in enumerate(values)])
        sink.close()
        h = read_log(path)
        assert h.problems == ()
        torch.testing.assert_close(h.norm, torch.tensor(values, dtype=torch.float64), equal_nan=True)
        torch.testing.assert_close(h.layers[:, 0], h.norm, equal_nan=True)


def test_every_schema_field_is_documented_written_and_read():
    from gradclip.records import RECORD_FIELDS
    from gradclip.stats import STEP_FIELDS

    for f in STEP_FIELDS:
        assert f'"{f.name}"' in gradclip.records.__doc__, f.name
        assert f.name in RECORD_FIELDS
    records = []
    with gradclip.GradMonitor(gradclip.NormClip(1.0), torch.nn.Linear(2, 1), sinks=records.append) as mon:
        mon.module(torch.ones(1, 2)).sum().backward()
        stats = mon()
    assert list(records[0]) == [*RECORD_FIELDS, "layers", "extra"]
    assert {k: records[0][k] for k in stats.to_dict()} == stats.to_dict()
