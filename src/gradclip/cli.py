"""The ``gradclip`` command line: parse, call the library, print or write.

Each subcommand is one entry of :data:`COMMANDS` (name, help, how to add its arguments,
what to run); adding ``demo``, ``report`` or ``recommend`` means adding an entry.

Example:
    $ gradclip bench --quick
    $ gradclip bench --cases gpt2 resnet50 --norm-types 2 --modes clip --reps 9 --json out.json
    $ python -m gradclip --help
"""

from __future__ import annotations

import argparse
import math
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import gradclip
from gradclip import bench

__all__ = ["COMMANDS", "Command", "build_parser", "main"]


@dataclass(frozen=True)
class Command:
    """A subcommand: its name, one-line help, arguments and the function that runs it."""

    name: str
    help: str
    add_arguments: Callable[[argparse.ArgumentParser], None]
    run: Callable[[argparse.Namespace], int]


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {value}")
    return value


def _norm_type(text: str) -> float:
    try:
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected 2 or inf, got {text!r}") from None


def _bench_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--quick",
        action="store_true",
        help=f"under a minute: cases {' '.join(bench.QUICK_CASES)}, fewer repetitions",
    )
    parser.add_argument(
        "--cases",
        nargs="+",
        choices=list(bench.CASES),
        metavar="CASE",
        help=f"gradient sets to run (choose from {', '.join(bench.CASES)}; default: all, "
        "or the quick ones with --quick)",
    )
    parser.add_argument(
        "--norm-types",
        nargs="+",
        type=_norm_type,
        choices=[2.0, math.inf],
        metavar="P",
        help="norm types: 2 and/or inf (default: both)",
    )
    parser.add_argument(
        "--modes",
        nargs="+",
        choices=list(bench.MODES),
        help="noclip: max_norm = 10x the norm; clip: 0.98x, every call clips (default: both)",
    )
    parser.add_argument(
        "--reps", type=_positive_int, metavar="N", help="quiet repetitions per measurement"
    )
    parser.add_argument("--json", type=Path, metavar="PATH", help="also write the results as JSON")


def _run_bench(args: argparse.Namespace) -> int:
    cfg = bench.config(
        quick=args.quick,
        cases=args.cases,
        norm_types=args.norm_types,
        modes=args.modes,
        reps=args.reps,
    )
    result = bench.run(cfg, progress=lambda line: print(line, file=sys.stderr, flush=True))
    print(bench.render(result))
    if args.json is not None:
        args.json.write_text(bench.to_json(result) + "\n")
    return 0


COMMANDS: tuple[Command, ...] = (
    Command(
        "bench",
        "time gradclip.clip_grad_norm_ against torch.nn.utils.clip_grad_norm_",
        _bench_arguments,
        _run_bench,
    ),
)
"""The subcommands, in the order ``--help`` lists them."""


def build_parser() -> argparse.ArgumentParser:
    """The ``gradclip`` argument parser, one subparser per entry of :data:`COMMANDS`.

    Example:
        >>> from gradclip.cli import build_parser
        >>> build_parser().parse_args(["bench", "--quick"]).quick
        True
    """
    parser = argparse.ArgumentParser(
        prog="gradclip", description="Gradient clipping for PyTorch: tools."
    )
    parser.add_argument("--version", action="version", version=f"gradclip {gradclip.__version__}")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for command in COMMANDS:
        sub = subparsers.add_parser(command.name, help=command.help, description=command.help)
        command.add_arguments(sub)
        sub.set_defaults(run=command.run)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; returns the exit status (argparse exits with 2 on bad arguments).

    Example:
        >>> from gradclip.cli import main
        >>> main(["bench", "--quick"])  # doctest: +SKIP
    """
    args = build_parser().parse_args(argv)
    return args.run(args)
