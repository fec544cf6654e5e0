"""The gradclip command line: parsing, bad arguments (exit 2), ``python -m gradclip``."""

from __future__ import annotations

import json
import math
import subprocess
import sys

import pytest

from gradclip import bench, cli


def test_bench_arguments_parse():
    args = cli.build_parser().parse_args(
        ["bench", "--quick", "--cases", "gpt2", "resnet50", "--norm-types", "2", "inf",
         "--modes", "clip", "--reps", "3", "--json", "out.json"]
    )  # fmt: skip
    assert args.command == "bench" and args.quick
    assert args.cases == ["gpt2", "resnet50"]
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
        (["bench", "--cases", "gpt3"], ["gpt2", "resnet50", "tiny2000", "huge100M"]),
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


def test_bench_end_to_end(tmp_path, capsys, monkeypatch):
    small = bench.Case("tiny2000", lambda: [("t", (100,))] * 4, bench.CASES["tiny2000"].dtype, "")
    monkeypatch.setitem(bench.CASES, "tiny2000", small)
    out = tmp_path / "bench.json"
    argv = ["bench", "--cases", "tiny2000", "--norm-types", "2", "--modes", "noclip", "clip",
            "--reps", "1", "--json", str(out)]  # fmt: skip
    assert cli.main(argv) == 0
    captured = capsys.readouterr()
    assert "tiny2000" in captured.out and "ours/torch" in captured.out
    assert "building tiny2000" in captured.err  # progress goes to stderr
    data = json.loads(out.read_text())
    assert [(r["case"], r["mode"]) for r in data["records"]] == [
        ("tiny2000", "noclip"),
        ("tiny2000", "clip"),
    ]


@pytest.mark.parametrize("argv", [["--help"], ["bench", "--help"]])
def test_python_dash_m_help(argv):
    proc = subprocess.run(
        [sys.executable, "-m", "gradclip", *argv], capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 0, proc.stderr
    assert "bench" in proc.stdout
    if argv[0] == "bench":
        assert "--quick" in proc.stdout and "huge100M" in proc.stdout


def test_python_dash_m_bad_argument_exits_2():
    proc = subprocess.run(
        [sys.executable, "-m", "gradclip", "bench", "--cases", "nope"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 2
    assert "invalid choice" in proc.stderr and "resnet50" in proc.stderr
