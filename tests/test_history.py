"""Reading logs back: both formats the monitor writes, crafted lines of every kind, files that
are not logs, and memory that follows the numbers, not the text.

A crafted line must never crash ``read_log``, ``recommend`` or ``report``: it is left out and
named as ``file:line``, and the commands exit with status 1 (2 when nothing is usable),
without a traceback. Expected values come from the records as written (json/csv modules).
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import textwrap

import pytest
import torch

import gradclip
from gradclip import cli, history, readlog
from gradclip.history import History, HistoryBuilder
from gradclip.readlog import read_log
from gradclip.records import LogError, decode_line
from gradclip.stats import FLAG_FIELDS, SCALAR_FIELDS, STEP_FIELDS

pytestmark = pytest.mark.usefixtures("one_thread")

POSIX = pytest.mark.skipif(sys.platform == "win32", reason="FIFOs")


def record(step, norm=1.0, **changes):
    r = {
        "schema": 1, "step": step, "time": 0.0, "norm_type": 2.0, "norm": norm,
        "post_norm": min(norm, 1.0), "threshold": 1.0, "coef": min(1.0, 1.0 / norm),
        "clipped": norm > 1, "finite": True, "skipped": False,
        "layers": {"h.0": norm / 2, "h.1": norm / 3}, "extra": {"loss": 1.0 / (step + 1)},
    }  # fmt: skip
    r.update(changes)
    return r


def good_lines(n=60):
    return [json.dumps(record(i, 1.0 + (i % 7) / 10)) for i in range(n)]


def base(**changes):
    """A record line with the JSON text of ``changes`` spliced in (so that they can be any
    text, not only what json.dumps writes)."""
    r = record(1000)
    text = json.dumps({k: v for k, v in r.items() if k not in changes})[:-1]
    return text + "".join(f', "{k}": {v}' for k, v in changes.items()) + "}"


# name: (the crafted line, words of the problem named for it)
CRAFTED = {
    "400-digit norm": (base(norm="9" * 400), "out of float64's range"),
    "1e400 literal": (base(norm="1e400"), "out of float64's range"),
    "norm near float64's max": (base(norm="1.79e308"), "beyond the +-1e+300"),
    "negative huge layer": (base(layers='{"h.0": -1.7e308}'), "beyond the +-1e+300"),
    "5000-digit int": (base(post_norm="1" * 5000), "digits"),
    "step 2**70": (base(step=str(2**70)), "'step' should be an integer in [0, 2**63)"),
    "step -1": (base(step="-1"), "'step' should be an integer"),
    "step 1.5": (base(step="1.5"), "'step' should be an integer"),
    "step true": (base(step="true"), "'step' should be an integer"),
    "lone surrogate layer": (base(layers='{"h.\\ud800": 1.0}'), "not valid Unicode"),
    "lone surrogate extra": (base(extra='{"\\udfff": 1.0}'), "not valid Unicode"),
    "invalid UTF-8": (base(layers='{"h.0": 1.0}').encode()[:-1] + b"\xff}", "UTF-8"),
    "nan spelled in lower case": (base(norm='"nan"'), "should be a number"),
    "inf spelled as a string": (base(norm='"inf"'), "should be a number"),
    "deep nesting": ("[" * 100_000 + "]" * 100_000, "nested too deeply"),
    "deep value": (base(layers='{"h.0": ' + "[" * 5000 + "]" * 5000 + "}"), "nested too deeply"),
    "nested object value": (base(extra='{"loss": {"a": {"b": {"c": 1}}}}'), "should be a number"),
    "a JSON array": ("[1, 2, 3]", "a JSON object"),
    "layers as a list": (base(layers="[1, 2]"), "'layers' should be an object"),
    "flag as 1": (base(clipped="1"), "'clipped' should be true or false"),
    "schema as a string": (base(schema='"1"'), "not a gradclip monitor record"),
    "norm_type NaN": (base(norm_type="NaN"), "'norm_type' should be >= 0"),
    "optimizer as a number": (base(optimizer="3"), "'optimizer' should be a class name"),
    "optimizer too long": (base(optimizer=json.dumps("A" * 201)), "'optimizer' should be a class name"),
    "lone surrogate optimizer": (base(optimizer='"\\ud800"'), "not valid Unicode"),
    "normalising as 1": (base(normalising="1"), "'normalising' should be true or false"),
}
AT = 31  # the crafted line's number in its log


def crafted_log(tmp_path, name):
    line, _ = CRAFTED[name]
    lines = [g.encode() for g in good_lines()]
    lines.insert(AT - 1, line if isinstance(line, bytes) else line.encode())
    path = tmp_path / "crafted.jsonl"
    path.write_bytes(b"\n".join(lines) + b"\n")
    return path


@pytest.mark.parametrize("name", list(CRAFTED))
def test_a_crafted_line_is_named_and_left_out(tmp_path, name, capsys):
    path = crafted_log(tmp_path, name)
    h = read_log(path)
    assert len(h) == 60 and h.steps.tolist() == list(range(60))
    (problem,) = h.problems
    assert problem.startswith(f"{path}:{AT}: ") and CRAFTED[name][1] in problem, problem
    assert cli.main(["recommend", str(path)]) == 1
    out, err = capsys.readouterr()
    assert out.startswith("recommended max_norm") and f"{path}:{AT}:" in err


def test_crafted_lines_in_the_real_commands_exit_1_without_traceback(tmp_path):
    """Every crafted line in one log, through ``python -m gradclip`` recommend and report."""
    lines = [g.encode() for g in good_lines(80)]
    numbers = []
    for i, (line, _) in enumerate(CRAFTED.values()):
        at = 3 * i + 2
        lines.insert(at - 1, line if isinstance(line, bytes) else line.encode())
        numbers.append(at)
    path = tmp_path / "crafted.jsonl"
    path.write_bytes(b"\n".join(lines) + b"\n")
    commands = [["recommend", str(path)]]
    if _has_matplotlib():
        commands.append(["report", str(path), "-o", str(tmp_path / "report")])
    for argv in commands:
        done = subprocess.run([sys.executable, "-m", "gradclip", *argv], capture_output=True,
                              text=True, timeout=300)  # fmt: skip
        assert done.returncode == 1, done.stderr
        assert "Traceback" not in done.stderr + done.stdout
        for at in numbers[: readlog._MAX_PROBLEMS]:
            assert f"{path}:{at}:" in done.stderr, (argv[0], at)
        assert f"{len(numbers) - readlog._MAX_PROBLEMS} more bad lines" in done.stderr
    if _has_matplotlib():
        assert (tmp_path / "report" / "report.html").exists()


def _has_matplotlib():
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return False
    return True


def test_every_line_crafted_gives_no_result_and_status_2(tmp_path, capsys):
    path = tmp_path / "all-bad.jsonl"
    path.write_text("\n".join(line for line, _ in CRAFTED.values() if isinstance(line, str)) + "\n")
    with pytest.raises(LogError, match=r":1: .*no valid step record"):
        read_log(path)
    assert cli.main(["recommend", str(path)]) == 2
    assert "no valid step record" in capsys.readouterr().err


def test_nonfinite_spellings_that_writers_use_are_read():
    spellings = {
        "json.dumps(allow_nan=True)": ("NaN", "Infinity", "-Infinity"),
        "gradclip's strict JSON": ('"NaN"', '"Infinity"', '"-Infinity"'),
    }
    for texts in spellings.values():
        records = [decode_line(base(norm=t, layers=f'{{"h.0": {t}}}')) for t in texts]
        got = [r["norm"] for r in records]
        assert math.isnan(got[0]) and got[1:] == [math.inf, -math.inf]
        assert [r["layers"]["h.0"] for r in records][1:] == [math.inf, -math.inf]


def test_a_line_longer_than_the_limit_is_named_not_read(tmp_path, monkeypatch):
    monkeypatch.setattr(readlog, "MAX_LINE", 4096)
    long = json.dumps(record(1000, layers={f"h.{i}": 1.0 for i in range(2000)}))
    lines = good_lines(10)
    lines.insert(4, long)
    path = tmp_path / "long.jsonl"
    path.write_text("\n".join(lines) + "\n")
    h = read_log(path)
    assert h.steps.tolist() == list(range(10))
    assert h.problems == (f"{path}:5: longer than 4096 bytes: not a step record",)


def test_names_and_cells_beyond_the_limits_are_named(monkeypatch):
    monkeypatch.setattr(history, "MAX_NAMES", 3)
    b = HistoryBuilder()
    for i in range(4):
        b.add(record(i, layers={f"l{j}": float(j) for j in range(i + 1)}))
    h = b.build()
    assert h.layer_names == ("l0", "l1", "l2")
    assert any("more than 3 distinct layers names: 1 values" in p for p in h.problems)
    monkeypatch.setattr(history, "MAX_CELLS", 8)  # 4 steps x 2 layers
    h = b.build()
    assert h.layer_names == ("l0", "l1")
    assert h.layers[:, 1].tolist()[1:] == [1.0, 1.0, 1.0]
    assert any("only the first 2 layers are kept" in p for p in h.problems)


@POSIX
def test_a_fifo_is_refused_at_once(tmp_path):
    fifo = tmp_path / "grads.jsonl"
    os.mkfifo(fifo)
    with pytest.raises(LogError, match="not a regular file"):
        read_log(fifo)  # no writer: reading would block forever
    done = subprocess.run([sys.executable, "-m", "gradclip", "recommend", str(fifo)],
                          capture_output=True, text=True, timeout=120)  # fmt: skip
    assert done.returncode == 2 and "not a regular file" in done.stderr
    assert "Traceback" not in done.stderr


def test_a_directory_is_refused(tmp_path):
    with pytest.raises(LogError, match="a directory"):
        read_log(tmp_path)


def net_run(tmp_path):
    """A monitor writing a JSON lines and a CSV log of the same run (a layer added mid-run,
    NaN/inf steps, a scalar on some steps only)."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Tanh(), torch.nn.Linear(8, 2))
    extra = torch.nn.Linear(2, 1)
    jsonl, csvp = tmp_path / "run.jsonl", tmp_path / "run.csv"
    with gradclip.GradMonitor(gradclip.NormClip(0.3), log=jsonl, sinks=[csvp], every=4) as mon:
        for step in range(11):
            model.zero_grad()
            extra.zero_grad()
            out = model(torch.randn(8, 4))
            out = extra(out) if step >= 5 else out
            out.pow(2).mean().backward()
            if step == 7:
                model[2].weight.grad[0, 0] = math.nan
            params = list(model.named_parameters())
            if step >= 5:
                params += [("extra." + n, p) for n, p in extra.named_parameters()]
            scalars = {"loss": float(step)} if step % 2 else {}
            mon(params, **scalars)
    return jsonl, csvp


def test_the_csv_log_reads_back_as_the_json_log(tmp_path, capsys):
    jsonl, csvp = net_run(tmp_path)
    from_json, from_csv = read_log(jsonl), read_log(csvp)
    assert from_csv.problems == () and from_json.problems == ()
    assert len(from_json) == 11 and from_json.finite.tolist() == [i != 7 for i in range(11)]
    for name in ("steps", *SCALAR_FIELDS, *FLAG_FIELDS, "layers"):
        torch.testing.assert_close(getattr(from_csv, name), getattr(from_json, name),
                                   rtol=0, atol=0, equal_nan=True)  # fmt: skip
    assert from_csv.layer_names == from_json.layer_names == ("0", "2", "extra")
    assert set(from_csv.extras) == set(from_json.extras) == {"loss"}
    torch.testing.assert_close(from_csv.extras["loss"], from_json.extras["loss"], equal_nan=True)
    # the values are those of the JSON text itself
    written = [json.loads(line) for line in jsonl.read_text().splitlines()]
    assert from_json.layers[:, 2].isnan().tolist() == [i < 5 for i in range(11)]
    assert [r.get("extra", {}).get("loss") for r in written] == [
        float(i) if i % 2 else None for i in range(11)
    ]
    assert cli.main(["recommend", str(csvp)]) == 0
    assert capsys.readouterr().out.startswith("recommended max_norm")


def test_csv_problems_are_named_by_line(tmp_path):
    path = tmp_path / "run.csv"
    sink = gradclip.CSVSink(path)
    sink.write([record(i) for i in range(3)])
    sink.close()
    text = path.read_text().splitlines()
    bad = [
        "1,oops,0.0,2.0,1,1,1,1,false,true,false,0.5,0.3,1.0",  # step is not an integer
        "1,7,0.0",  # too few fields
        '1,8,"unterminated',
    ]
    path.write_text("\n".join(["1,0,0,2,1,1,1,1,false,true,false", *text, *bad]) + "\n")
    h = read_log(path)
    assert h.steps.tolist() == [0, 1, 2]
    assert [p.split(": ", 1)[0] for p in h.problems] == [f"{path}:{i}" for i in (1, 6, 7, 8)]
    assert "a CSV row before any header" in h.problems[0]
    assert "'step' should be an integer" in h.problems[1]
    assert "3 fields, and the section's header has" in h.problems[2]


def test_history_columns_follow_the_schema():
    fields = {f.name for f in STEP_FIELDS}
    assert fields <= set(History.__dataclass_fields__)
    h = History.from_records([record(0, 2.0), record(1, 0.5)])
    for f in STEP_FIELDS:
        column = getattr(h, f.name)
        assert column.dtype == (torch.bool if f.kind is bool else torch.float64)
    assert h.norm.tolist() == [2.0, 0.5] and h.clipped.tolist() == [True, False]


def test_the_optimizer_the_records_name():
    # absent: not said; one: the history's; several (two runs in one log): a problem, and
    # the normalisation only where they share it
    assert (History.from_records([record(0)]).optimizer, History.from_records([record(0)]).normalising) == (None, None)
    adam = [record(i, optimizer="Adam", normalising=True) for i in range(3)]
    h = History.from_records([record(0), *adam])
    assert (h.optimizer, h.normalising, h.problems) == ("Adam", True, ())
    kin = History.from_records([*adam, record(3, optimizer="AdamW", normalising=True)])
    assert (kin.optimizer, kin.normalising) == (None, True)
    (problem,) = kin.problems
    assert "the records name 2 optimizers (Adam, AdamW)" in problem and "what they share" in problem
    mixed = History.from_records([*adam, record(3, optimizer="SGD", normalising=False)])
    assert (mixed.optimizer, mixed.normalising) == (None, None)
    assert "none of them: pass the one to judge (optimizer=)" in mixed.problems[0]


def test_history_builder_refuses_a_bad_record_without_a_partial_row():
    b = HistoryBuilder()
    b.add(record(0))
    for bad in ({**record(1), "layers": {"h.0": "x"}}, {k: v for k, v in record(2).items() if k != "coef"}):
        with pytest.raises((ValueError, KeyError)):
            b.add(bad)
    b.add(record(3))
    h = b.build()
    assert h.steps.tolist() == [0, 3] and h.layers.shape == (2, 2)


MEMORY = textwrap.dedent("""
    import json, math, random, resource, sys
    import gradclip
    from gradclip.report import build_report

    random.seed(0)
    names = [f"transformer.h.{i}.{k}" for i in range(8) for k in ("attn", "mlp")]
    with open(sys.argv[1], "w") as f:
        step, size = 0, 0
        while size < 50 * 2**20:
            norm = math.exp(random.gauss(0, 0.3))
            line = json.dumps({
                "schema": 1, "step": step, "time": 1.7e9 + step, "norm_type": 2.0,
                "norm": norm, "post_norm": min(norm, 1.0), "threshold": 1.0,
                "coef": min(1.0, 1 / (norm + 1e-6)), "clipped": norm > 1, "finite": True,
                "skipped": False, "layers": {n: norm * random.random() for n in names},
                "extra": {"loss": 1 / (step + 1), "lr": 3e-4}}) + "\\n"
            f.write(line)
            step, size = step + 1, size + len(line)
    kib = lambda: resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    before = kib()
    h = gradclip.read_log(sys.argv[1])
    rec = gradclip.recommend_max_norm(h)
    build_report(h)
    print(json.dumps({"steps": len(h), "expected": step, "bytes": size,
                      "mib": (kib() - before) / 1024, "max_norm": rec.max_norm}))
""")


@pytest.mark.skipif(sys.platform != "linux", reason="ru_maxrss in KiB is Linux's")
def test_a_50_mb_log_is_read_in_bounded_memory(tmp_path):
    done = subprocess.run([sys.executable, "-c", MEMORY, str(tmp_path / "big.jsonl")],
                          capture_output=True, text=True, timeout=600)  # fmt: skip
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout)
    assert result["bytes"] >= 50 * 2**20 and result["steps"] == result["expected"]
    # 16 layers + 8 other numbers a step at 8 bytes: ~10 MiB of columns; the text is 50 MiB
    assert result["mib"] < 250, result
