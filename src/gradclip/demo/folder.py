"""The demo's output folder: run every strategy with a log, then the diagnostics and the page.

:func:`write_demo` is what ``gradclip demo`` does between parsing its arguments and
publishing its folder: it trains the task under each strategy with a
:class:`gradclip.GradMonitor` logging every clipper's steps to ``runs/NAME.jsonl``, renders
the diagnostics report of the AdaptiveClip run into ``adaptive-report/`` and writes the
page (:func:`gradclip.demo.render.write`). It writes into a folder the caller owns (the
staging folder of a :class:`gradclip._files.OutputFolder`), so it never decides what may be
replaced.

Example:
    >>> import tempfile
    >>> from pathlib import Path
    >>> from gradclip.demo.folder import write_demo
    >>> folder = Path(tempfile.mkdtemp())
    >>> result = write_demo(folder, "sgd-heavy-tail", ["none", "adaptive"], steps=30)
    >>> sorted(p.relative_to(folder).as_posix() for p in folder.glob("*"))
    ['adaptive-report', 'demo.json', 'index.html', 'loss.png', 'norms.png', 'runs', 'updates.png']
    >>> sorted(p.name for p in (folder / "runs").iterdir())  # no clipper, no log
    ['adaptive.jsonl']
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable, Sequence
from pathlib import Path

import gradclip
from gradclip.demo import compare, render
from gradclip.demo.compare import STRATEGIES, Comparison
from gradclip.demo.problems import optimizer_of
from gradclip.demo.tasks import Task, resolve

__all__ = ["DIAGNOSTICS", "PRODUCER", "RUNS", "write_demo"]

PRODUCER = "gradclip demo"
"""The name a demo folder's manifest records: only a folder of this name is replaced."""

RUNS = "runs"
"""The subfolder of every clipper's log (``runs/NAME.jsonl``)."""

DIAGNOSTICS = "adaptive-report"
"""The subfolder of the AdaptiveClip run's diagnostics report."""


def write_demo(
    folder: str | os.PathLike[str],
    task: str | Task,
    strategies: Sequence[str] = tuple(STRATEGIES),
    *,
    seed: int = 0,
    steps: int | None = None,
    quick: bool = False,
    device: str = "cpu",
    progress: Callable[[str, int, int], None] | None = None,
) -> Comparison:
    """Train ``task`` under each strategy and write the demo's files into ``folder``.

    Args:
        folder: an existing, empty folder the caller owns.
        task, strategies, seed, steps, quick, device, progress: as
            :func:`gradclip.demo.compare.compare`.

    Returns:
        The :class:`Comparison`, as :func:`~gradclip.demo.compare.compare` returns it.

    Needs matplotlib (``pip install 'gradclip[plot]'``) for the plots.
    """
    from gradclip.report import build_report, write_report

    out = Path(folder)
    monitors: dict[str, gradclip.GradMonitor] = {}
    # the logs name the task's optimizer: `gradclip recommend` on one follows its kind
    optimizer = optimizer_of(resolve(task).config)

    def record(name: str, clipper: gradclip.Clipper | None) -> Callable[[object], object]:
        if clipper is None:
            return lambda stats: stats
        (out / RUNS).mkdir(exist_ok=True)
        monitor = monitors[name] = gradclip.GradMonitor(log=out / RUNS / f"{name}.jsonl",
                                                        optimizer=optimizer)  # fmt: skip

        def keep(stats: object) -> object:
            monitor.record(stats)  # type: ignore[arg-type]
            return stats

        return keep

    try:
        # compare.compare, looked up at call time: tests replace it to interrupt a run
        result = compare.compare(task, strategies, seed=seed, steps=steps, quick=quick,
                                 device=device, progress=progress, record=record)  # fmt: skip
    finally:
        for monitor in monitors.values():
            monitor.close()
    diagnostics = None
    if "adaptive" in monitors:
        log = out / RUNS / "adaptive.jsonl"
        history = gradclip.read_log(log)
        # the page names the log as it will be found in the published folder
        history = dataclasses.replace(history, source=f"{RUNS}/adaptive.jsonl")
        # the recommendation follows the optimizer the log names
        report = build_report(history, title="gradclip demo: diagnostics of the AdaptiveClip run")
        (out / DIAGNOSTICS).mkdir()
        write_report(report, out / DIAGNOSTICS)
        diagnostics = DIAGNOSTICS
    render.write(result, out, diagnostics=diagnostics)
    return result
