"""The gradclip command line: parsing, bad arguments (exit 2), ``python -m gradclip``; the
``bench`` command (gradclip._bench) end to end, its errors, and its lazy import."""

from __future__ import annotations

import json
import math
import subprocess
import sys

import pytest

from gradclip import _bench, cli


def test_bench_arguments_parse():
    args = cli.build_parser().parse_args(
        ["bench", "--quick", "--cases", "gpt2", "mnist", "--norm-types", "2", "inf",
         "--modes", "clip", "--reps", "3", "--json", "out.json"]
    )  # fmt: skip
    assert args.command == "bench" and args.quick
    assert args.cases == ["gpt2", "mnist"]
    assert args.norm_types == [2.0, math.inf]
    assert (args.modes, args.reps, str(args.json)) == (["clip"], 3, "out.json")


def test_bench_defaults_leave_the_choice_to_the_library():
    args = cli.build_parser().parse_args(["bench"])
    assert (args.quick, args.cases, args.norm_types, args.modes, args.reps, args.json) == (
        False, None, None, None, None, None,
    )  # fmt: skip


@pytest.mark.parametrize(
    ("argv", "expected"),
    [
        (["bench", "--norm-types", "3"], ["inf"]),
        (["bench", "--norm-types", "two"], ["2 or inf"]),
        (["bench", "--modes", "always"], ["noclip", "clip"]),
        (["bench", "--reps", "0"], ["positive integer"]),
        (["bench", "--reps", "many"], ["positive integer"]),
        (["bench", "--bogus"], ["unrecognized arguments"]),
        (["frobnicate"], ["bench"]),
        ([], ["COMMAND"]),
    ],
)
def test_bad_arguments_exit_2_with_the_valid_choices(argv, expected, capsys):
    with pytest.raises(SystemExit) as exc:
        cli.main(argv)
    assert exc.value.code == 2
    err = capsys.readouterr().err
    for word in expected:
        assert word in err


def test_bench_unknown_case_exits_2_with_the_valid_choices(capsys):
    assert cli.main(["bench", "--cases", "tiny", "gpt3"]) == 2
    out, err = capsys.readouterr()
    assert out == ""
    assert err.startswith("gradclip bench: error: --cases: unknown 'gpt3'; choose from ")
    for name in _bench.CASES:
        assert name in err


def test_bench_end_to_end(tmp_path, capsys):
    out = tmp_path / "bench.json"
    argv = ["bench", "--cases", "tiny", "--norm-types", "2", "--modes", "noclip", "clip",
            "--reps", "1", "--quick", "--json", str(out)]  # fmt: skip
    assert cli.main(argv) == 0
    captured = capsys.readouterr()
    assert "tiny" in captured.out and "gradclip/torch" in captured.out
    assert "Reading: gradclip took" in captured.out
    for word in ("MISS", "target", "Traceback"):  # times and ratios, no development verdicts
        assert word not in captured.out + captured.err
    assert "building tiny" in captured.err  # progress goes to stderr
    data = json.loads(out.read_text())
    assert [(r["case"], r["mode"]) for r in data["rows"]] == [("tiny", "noclip"), ("tiny", "clip")]
    assert cli.main(argv) == 0  # its own file is replaced
    assert json.loads(out.read_text())["kind"] == "gradclip bench"


def test_bench_out_of_memory_exits_1_with_a_message(monkeypatch, capsys):
    monkeypatch.setitem(_bench.CASES, "huge", _bench.Case("huge", "4 PB", lambda: [(10**15,)]))
    assert cli.main(["bench", "--cases", "huge"]) == 1
    err = capsys.readouterr().err
    assert "gradclip bench: error: not enough memory for the gradients of case 'huge'" in err
    assert "--cases" in err and "Traceback" not in err


@pytest.mark.parametrize("argv", [["--help"], ["bench", "--help"]])
def test_python_dash_m_help(argv):
    proc = subprocess.run(
        [sys.executable, "-m", "gradclip", *argv], capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 0, proc.stderr
    assert "bench" in proc.stdout
    if argv[0] == "bench":
        assert "--quick" in proc.stdout
        assert f"any of {' '.join(_bench.CASES)} " in " ".join(proc.stdout.split())


def gradclip_bench(*args, timeout=120):
    return subprocess.run([sys.executable, "-m", "gradclip", "bench", *map(str, args)],
                          capture_output=True, text=True, timeout=timeout)  # fmt: skip


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--cases", "nope"], "--cases: unknown 'nope'; choose from tiny, mnist"),
        (["--reps", "0"], "expected a positive integer, got 0"),
        (["--norm-types", "1"], "invalid choice"),
        (["--json", "no-such-folder/out.json"], "folder no-such-folder does not exist"),
    ],
)
def test_python_dash_m_bad_argument_exits_2(args, message):
    proc = gradclip_bench(*args)
    assert proc.returncode == 2
    assert message in proc.stderr and "Traceback" not in proc.stderr
    assert proc.stdout == ""


def test_python_dash_m_json_never_overwrites_a_file_it_did_not_write(tmp_path):
    precious = tmp_path / "notes.json"
    precious.write_text('{"my": "results"}\n')
    link = tmp_path / "link.json"
    link.symlink_to(precious)
    for path in (precious, link, tmp_path):
        proc = gradclip_bench("--cases", "tiny", "--reps", "1", "--json", path)
        assert proc.returncode == 2, proc.stderr
        assert "gradclip bench: error: --json: " in proc.stderr
        assert "Traceback" not in proc.stderr and proc.stdout == ""  # refused before running
    assert precious.read_text() == '{"my": "results"}\n'
    assert sorted(p.name for p in tmp_path.iterdir()) == ["link.json", "notes.json"]


def test_the_cli_imports_the_bench_module_only_for_the_bench_command():
    code = ("import sys, gradclip.cli; gradclip.cli.build_parser(); "
            "print('gradclip._bench' in sys.modules)")  # fmt: skip
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "False"
