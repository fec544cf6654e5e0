"""The ``gradclip`` command line: parse, call the library, print or write.

Each subcommand is one entry of :data:`COMMANDS` (name, help, how to add its arguments,
what to run); adding ``demo``, ``report`` or ``recommend`` means adding an entry.

Exit status: 0 on success; 2 for a usage mistake, a log that cannot be used (missing,
empty, nothing valid) or an output folder that is refused (see :mod:`gradclip._files`); 1
when ``recommend`` / ``report`` worked on part of a log (the bad lines are named on stderr),
or when the output folder changed while ``demo`` / ``report`` / ``tune`` ran (the finished
output is kept in the staging folder the message names).

Example:
    $ gradclip recommend run.jsonl
    $ gradclip recommend run.jsonl --optimizer AdamW
    $ gradclip report run.jsonl               # into run-report/, beside the log
    $ gradclip report run.jsonl -o report/
    $ gradclip demo --quick
    $ gradclip tune --task adam-spikes --out tune/
    $ gradclip bench --quick
    $ gradclip bench --cases mnist gpt2 --norm-types 2 --modes clip --reps 9 --json out.json
    $ python -m gradclip --help
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import gradclip

if TYPE_CHECKING:
    from gradclip._files import OutputFolder

__all__ = ["COMMANDS", "Command", "build_parser", "main"]


@dataclass(frozen=True)
class Command:
    """A subcommand: its name, one-line help, arguments and the function that runs it."""

    name: str
    help: str
    add_arguments: Callable[[argparse.ArgumentParser], None]
    run: Callable[[argparse.Namespace], int]


def _int_at_least(minimum: int, what: str) -> Callable[[str], int]:
    """An argparse type: an int >= ``minimum``, else a message saying what was expected."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"expected {what}, got {value}")
        return value

    return parse


_positive_int = _int_at_least(1, "a positive integer")
_natural_int = _int_at_least(0, "an integer >= 0")


def _norm_type(text: str) -> float:
    try:
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected 2 or inf, got {text!r}") from None


def _bench_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--quick", action="store_true", help="fewer, shorter repetitions")
    parser.add_argument("--cases", nargs="+", metavar="CASE",
                        help="gradient sets, any of tiny mnist many gpt2 (default: all)")
    parser.add_argument("--norm-types", nargs="+", type=_norm_type, choices=[2.0, math.inf],
                        metavar="P", help="norm types: 2 and/or inf (default: both)")
    parser.add_argument("--modes", nargs="+", choices=["noclip", "clip"],
                        help="noclip: max_norm = 10x the norm; clip: 0.98x, every call clips "
                        "(default: both)")
    parser.add_argument("--reps", type=_positive_int, metavar="N",
                        help="repetitions per row (default 11, 5 with --quick)")
    parser.add_argument("--json", type=Path, metavar="PATH",
                        help="also write the results as JSON (a new file, or one that "
                        "gradclip bench wrote before)")  # fmt: skip


def _run_bench(args: argparse.Namespace) -> int:
    from gradclip import _bench  # the only command that needs it

    unknown = [c for c in args.cases or () if c not in _bench.CASES]
    if unknown:
        return _error("bench", f"--cases: unknown {unknown[0]!r}; choose from "
                      f"{', '.join(_bench.CASES)}")  # fmt: skip
    if args.json is not None:
        try:
            _bench.check_json_path(args.json)
        except ValueError as exc:
            return _error("bench", f"--json: {exc}")
    chosen = {"cases": args.cases, "norm_types": args.norm_types, "modes": args.modes}
    try:
        result = _bench.run(
            **{name: value for name, value in chosen.items() if value is not None},
            reps=args.reps or (5 if args.quick else 11),
            rep_seconds=0.02 if args.quick else 0.05,
            progress=lambda line: print(line, file=sys.stderr, flush=True),
        )
    except MemoryError as exc:
        print(f"gradclip bench: error: {exc}; leave it out with --cases", file=sys.stderr)
        return 1
    print(_bench.render(result))
    if args.json is not None:
        try:
            _bench.write_json(result, args.json)
        except (OSError, ValueError) as exc:
            print(f"gradclip bench: error: --json: {exc}", file=sys.stderr)
            return 1
    return 0


def _error(command: str, message: str) -> int:
    print(f"gradclip {command}: error: {message}", file=sys.stderr)
    return 2


def _problems(command: str, history: gradclip.History) -> int:
    """Name the log's bad lines on stderr; the exit status: 1 if there were any."""
    for problem in history.problems:
        print(f"gradclip {command}: warning: {problem}", file=sys.stderr)
    if history.problems:
        print(
            f"gradclip {command}: warning: results use the {len(history)} valid records only",
            file=sys.stderr,
        )
    return 1 if history.problems else 0


def _recommend_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("log", type=Path, help="a log written by gradclip.GradMonitor (JSON lines or CSV)")
    parser.add_argument("--json", action="store_true", help="print the result as JSON")
    _optimizer_argument(parser)


def _optimizer_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--optimizer", metavar="NAME", type=_optimizer_name,
        help="the optimizer the run stepped, by its torch.optim class (AdamW, SGD, ...): under one "
        "that normalises its update (Adam's kin) and steady norms, the recommended threshold "
        "clips every typical step (default: the one the log names; a GradMonitor records the "
        "optimizer it steps)",
    )  # fmt: skip


def _optimizer_name(name: str) -> str:
    from gradclip.recommend import optimizer_class

    try:
        optimizer_class(name)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
    return name


def _run_recommend(args: argparse.Namespace) -> int:
    from gradclip.recommend import render_text

    try:
        history = gradclip.read_log(args.log, layers=False)  # the totals are all it needs
    except gradclip.LogError as exc:
        return _error("recommend", str(exc))
    rec = gradclip.recommend_max_norm(history, optimizer=args.optimizer)
    print(json.dumps(rec.to_dict(), indent=2) if args.json else render_text(rec))
    return _problems("recommend", history)


def _report_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("log", type=Path, help="a log written by gradclip.GradMonitor (JSON lines, or CSV)")
    parser.add_argument(
        "-o", "--out", type=Path, metavar="DIR",
        help="folder for report.html and the PNG plots (default: LOGNAME-report/ beside the "
        "log); created, or replaced if it holds an earlier report, never if it holds "
        "anything else",
    )  # fmt: skip
    parser.add_argument("--title", help="page title (default: from the log's name)")
    _optimizer_argument(parser)


def _failed(command: str, message: str) -> int:
    """A runtime failure after the work started: exit status 1."""
    print(f"gradclip {command}: error: {message}", file=sys.stderr)
    return 1


def _commit(folder: OutputFolder, command: str, where: str) -> int | None:
    """Put a finished output folder in place; the exit status 1 if that failed, else None."""
    from gradclip._files import OutputError

    try:
        folder.commit()
    except OutputError as exc:
        return _failed(command, str(exc))
    except OSError as exc:
        return _failed(command, f"cannot write {where}: {exc.strerror or exc}")
    return None


def _run_report(args: argparse.Namespace) -> int:
    from gradclip import report
    from gradclip._files import OutputError, OutputFolder, default_report_folder

    try:
        report.plots.require_matplotlib()
    except ImportError as exc:
        return _error("report", str(exc))
    out = args.out if args.out is not None else default_report_folder(args.log)
    try:  # the folder is refused before the log is read
        folder = OutputFolder(out, producer=report.PRODUCER)
    except OutputError as exc:
        return _error("report", str(exc))
    except OSError as exc:
        return _error("report", f"cannot write to {out}: {exc.strerror or exc}")
    with folder:  # an exception removes the unfinished folder
        try:
            data = report.build_report(args.log, title=args.title, optimizer=args.optimizer)
        except gradclip.LogError as exc:
            folder.discard()
            return _error("report", str(exc))
        report.write_report(data, folder.stage)
        failed = _commit(folder, "report", f"to {out}")
        if failed is not None:
            return failed
    print(out / "report.html")
    return _problems("report", data.history)


def _demo_arguments(parser: argparse.ArgumentParser) -> None:
    from gradclip.demo.compare import STRATEGIES
    from gradclip.demo.tasks import TASKS

    parser.add_argument("--task", default="rnn-addition/violent", choices=list(TASKS),
                        metavar="TASK", help=f"one of {', '.join(TASKS)} (default: %(default)s)")
    parser.add_argument("--strategies", nargs="+", choices=list(STRATEGIES), metavar="NAME",
                        default=list(STRATEGIES),
                        help=f"any of {', '.join(STRATEGIES)} (default: all, in that order)")
    parser.add_argument("--steps", type=_positive_int, metavar="N",
                        help="steps per run (default: the task's; with --quick its quick count)")
    parser.add_argument("--seed", type=_natural_int, default=0, help="run seed (default 0)")
    parser.add_argument("--out", type=Path, default=Path("gradclip-demo"), metavar="DIR",
                        help="output folder (default: %(default)s): created, or replaced if it "
                        "holds an earlier demo, never if it holds anything else")
    parser.add_argument("--quick", action="store_true",
                        help="short runs (under 20 s in all): a smoke test, too short to rank "
                        "the clippers")
    parser.add_argument("--device", default="cpu", help="cpu (default) or cuda")  # fmt: skip


def _run_demo(args: argparse.Namespace) -> int:
    import torch

    from gradclip._files import OutputError, OutputFolder
    from gradclip.demo import compare, folder, render

    try:
        from tqdm import tqdm

        from gradclip.report import plots

        plots.require_matplotlib()
    except ImportError as exc:
        return _error("demo", f"{exc}; the demo needs pip install 'gradclip[demo]'")
    try:
        device = torch.device(args.device)
    except RuntimeError:
        return _error("demo", f"--device {args.device!r} is not a device; pass cpu or cuda")
    if device.type == "cuda" and not torch.cuda.is_available():
        return _error("demo", "--device cuda: CUDA is not available here; pass --device cpu")
    try:
        out = OutputFolder(args.out, producer=folder.PRODUCER)
    except OutputError as exc:
        return _error("demo", str(exc))
    except OSError as exc:
        return _error("demo", f"cannot write --out {args.out}: {exc.strerror or exc}")
    # One thread: the tasks' calibration, and the same numbers on every machine.
    torch.set_num_threads(1)
    torch.optim.SGD([torch.zeros(1, requires_grad=True)])  # the first optimizer imports for seconds
    bars: dict[str, Any] = {}

    def progress(name: str, done: int, total: int) -> None:
        bar = bars.get(name)
        if bar is None:
            for earlier in bars.values():
                earlier.close()  # a run that stopped early (non-finite weights) ends here
            label = compare.STRATEGIES[name].describe(compare.resolve(args.task))
            # disable=None: bars on a terminal only, not in logs
            bar = bars[name] = tqdm(total=total, desc=f"{label:24}", unit="step", leave=True,
                                    file=sys.stderr, disable=None)  # fmt: skip
        bar.update(done - bar.n)
        if done == total:
            bar.close()

    with out:  # an exception, ^C included, removes the unfinished folder
        result = folder.write_demo(out.stage, args.task, args.strategies, seed=args.seed,
                                   steps=args.steps, quick=args.quick, device=str(device),
                                   progress=progress)  # fmt: skip
        for bar in bars.values():
            bar.close()
        print(render.table(result))
        print()
        for line in render.verdicts(result):
            print(line)
        failed = _commit(out, "demo", f"--out {args.out}")
        if failed is not None:
            return failed
    print(f"\nreport written to {args.out / 'index.html'}")
    return 0


def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive number, got {text!r}") from None
    if not 0 < value < math.inf:
        raise argparse.ArgumentTypeError(f"expected a positive number, got {text!r}")
    return value


def _fraction(text: str) -> float:
    value = _positive_float(text)
    if value > 1:
        raise argparse.ArgumentTypeError(f"expected a fraction in (0, 1], got {text!r}")
    return value


def _tune_arguments(parser: argparse.ArgumentParser) -> None:
    from gradclip.demo.tasks import TASKS

    parser.add_argument("--task", default="rnn-addition/violent", choices=list(TASKS),
                        metavar="TASK", help=f"one of {', '.join(TASKS)} (default: %(default)s)")
    parser.add_argument("--seed", type=_natural_int, default=0, help="run seed (default 0)")
    parser.add_argument("--budget", type=_fraction, default=0.2, metavar="F",
                        help="the search's cost, as a fraction of the task's training run "
                        "(default %(default)s)")
    parser.add_argument("--horizon", type=_positive_int, metavar="N",
                        help="steps per candidate (default: from --budget)")
    parser.add_argument("--candidates", nargs="+", type=_positive_float, metavar="C",
                        help="thresholds to try (default: a grid around the norms seen)")
    parser.add_argument("--out", type=Path, metavar="DIR",
                        help="also write search.html and search.png there: created, or replaced "
                        "if it holds an earlier search, never if it holds anything else")
    parser.add_argument("--json", action="store_true", help="print the result as JSON")  # fmt: skip


def _run_tune(args: argparse.Namespace) -> int:
    import torch

    from gradclip._files import OutputError, OutputFolder
    from gradclip.demo.search import search_task
    from gradclip.tune import render_text

    folder = None
    if args.out is not None:
        try:
            from gradclip.report import plots

            plots.require_matplotlib()
        except ImportError as exc:
            return _error("tune", f"--out: {exc}")
        try:
            folder = OutputFolder(args.out, producer="gradclip tune")
        except OutputError as exc:
            return _error("tune", str(exc))
        except OSError as exc:
            return _error("tune", f"cannot write --out {args.out}: {exc.strerror or exc}")
    torch.set_num_threads(1)  # the tasks' calibration, and the same numbers on every machine

    def search_and_print() -> Any:
        search = search_task(args.task, seed=args.seed, budget=args.budget, horizon=args.horizon,
                             candidates=args.candidates,
                             progress=lambda line: print(line, file=sys.stderr, flush=True))  # fmt: skip
        print(json.dumps(search.to_dict(), indent=1) if args.json else render_text(search))
        return search

    if folder is None:
        search_and_print()
        return 0
    from gradclip.report.search import render_search

    with folder:  # an exception, ^C included, removes the unfinished folder
        render_search(search_and_print(), folder.stage)
        failed = _commit(folder, "tune", f"--out {args.out}")
        if failed is not None:
            return failed
    print(f"search written to {args.out / 'search.html'}", file=sys.stderr)
    return 0


COMMANDS: tuple[Command, ...] = (
    Command(
        "demo",
        "train an embedded task where gradients explode, under each clipping strategy",
        _demo_arguments,
        _run_demo,
    ),
    Command(
        "tune",
        "find max_norm for an embedded task: short runs under candidate thresholds",
        _tune_arguments,
        _run_tune,
    ),
    Command(
        "bench",
        "time gradclip.clip_grad_norm_ against torch.nn.utils.clip_grad_norm_",
        _bench_arguments,
        _run_bench,
    ),
    Command(
        "recommend",
        "recommend a max_norm from a GradMonitor log, with the evidence",
        _recommend_arguments,
        _run_recommend,
    ),
    Command(
        "report",
        "write an HTML report with plots of what clipping did, from a GradMonitor log",
        _report_arguments,
        _run_report,
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
        >>> import tempfile, pathlib, torch, gradclip
        >>> from gradclip.cli import main
        >>> log = pathlib.Path(tempfile.mkdtemp()) / "grads.jsonl"
        >>> p = torch.nn.Parameter(torch.zeros(3))
        >>> with gradclip.GradMonitor(gradclip.NormClip(1.0), log=log, every=10) as monitor:
        ...     for step in range(60):
        ...         p.grad = torch.full((3,), 0.1 + 0.01 * (step % 7))
        ...         _ = monitor(p)
        >>> main(["recommend", str(log)])  # doctest: +ELLIPSIS
        recommended max_norm: 0.28 (norm_type 2)
        ...
        0
    """
    args = build_parser().parse_args(argv)
    return args.run(args)
