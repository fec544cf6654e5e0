"""Rendering of a :class:`~gradclip.demo.compare.Comparison`: the terminal table, the plain
verdicts, and the output folder (plots, a self-contained HTML page, the data as JSON).

The folder is assembled in a hidden staging folder next to its destination and moved into
place only when complete (:func:`staging` / :func:`publish`), so an interrupted demo never
leaves a half-written folder that looks finished.

Example:
    >>> from gradclip.demo.compare import compare
    >>> from gradclip.demo.render import table
    >>> print(table(compare("sgd-heavy-tail", ["none", "fixed-good"], steps=20)))  # doctest: +SKIP
"""

from __future__ import annotations

import json
import math
import os
import shutil
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path

from gradclip.demo.compare import Comparison, Row
from gradclip.demo.runner import RunResult

__all__ = ["MARKER", "publish", "staging", "table", "verdicts", "write"]

MARKER = "demo.json"
"""The data file every demo folder holds; a folder without it is never replaced."""


def _number(value: float) -> str:
    if math.isnan(value):
        return "-"
    if math.isinf(value):
        return "inf"
    return f"{value:.3g}"


def _ratio(row: Row) -> str:
    if math.isnan(row.ratio_to_best):
        return "-"
    if row.ratio_to_best > 1000:
        return ">1000x"
    return f"{row.ratio_to_best:.2f}x"


def table(result: Comparison) -> str:
    """The summary table: one line per strategy, as the terminal shows it."""
    task = result.task
    header = ["strategy", task.metric_name, "vs best fixed", "diverged", "clip rate",
              "median update", "max update", "update spikes"]  # fmt: skip
    rows = [
        [r.label, _number(r.metric), _ratio(r), "yes" if r.diverged else "no",
         f"{r.clip_rate:.0%}", _number(r.median_update), _number(r.max_update), str(r.spikes)]
        for r in result.rows
    ]  # fmt: skip
    widths = [max(len(line[i]) for line in [header, *rows]) for i in range(len(header))]

    def line(cells: Sequence[str]) -> str:
        return "  ".join(c.ljust(w) if i == 0 else c.rjust(w)
                         for i, (c, w) in enumerate(zip(cells, widths, strict=True)))  # fmt: skip

    rule = "-" * len(line(header))
    title = f"{task.key}: {task.description}; seed {result.seed}, {result.steps} steps"
    return "\n".join([title, rule, line(header), rule, *map(line, rows), rule])


def verdicts(result: Comparison) -> list[str]:
    """What the table says, in plain words: one sentence per notable strategy."""
    out = []
    best = result.best_fixed
    for r in result.rows:
        if r.strategy == "none":
            if r.diverged:
                where = f" (weights non-finite after {r.steps} steps)" if r.steps < result.steps else ""
                out.append(f"Without clipping the run diverged{where}.")
            elif r.spikes:
                out.append(f"Without clipping {r.spikes} updates were over 10x the median update.")
            else:
                out.append("Without clipping this run did not diverge or spike.")
        elif r.strategy == "fixed-high" and (r.diverged or (best and r.ratio_to_best > 1.5)):
            what = "diverged" if r.diverged else f"ended {_ratio(r)} worse than the best fixed"
            largest = f" (the best fixed: {_number(best.max_update)})" if best else ""
            out.append(f"A threshold that is too high ({r.label}) {what}: it let through updates "
                       f"of up to {_number(r.max_update)}{largest}.")  # fmt: skip
        elif r.strategy == "fixed-low" and best and r.ratio_to_best > 1.5:
            out.append(f"A threshold that is too low ({r.label}) ended {_ratio(r)} worse: "
                       f"it clipped {r.clip_rate:.0%} of steps and shrank every update.")  # fmt: skip
        elif r.strategy == "adaptive" and best is not None:
            out.append(f"AdaptiveClip, untuned, ended at {_ratio(r)} the best fixed threshold "
                       f"({best.label}), clipping {r.clip_rate:.0%} of steps.")  # fmt: skip
    return out


def staging(out: str | os.PathLike[str]) -> Path:
    """A fresh, empty staging folder beside ``out``; raises ``ValueError`` when ``out`` cannot
    be (re)written: it is a file, or a non-empty folder that is not a demo folder."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise ValueError(f"--out {out} is a file; pass a folder path")
    if out.is_dir() and any(out.iterdir()) and not (out / MARKER).is_file():
        raise ValueError(
            f"--out {out} is a non-empty folder that is not a gradclip demo folder (no "
            f"{MARKER}); pass a new or empty folder"
        )
    stage = out.parent / f".{out.name}.partial-{os.getpid()}"
    if stage.exists():
        shutil.rmtree(stage)
    stage.mkdir(parents=True)
    return stage


def publish(stage: Path, out: str | os.PathLike[str]) -> Path:
    """Move the complete ``stage`` folder to ``out`` (replacing a previous demo folder)."""
    out = Path(out)
    if out.exists():
        shutil.rmtree(out)
    stage.rename(out)
    return out


def _series(run: RunResult) -> dict[str, object]:
    keep = ("losses", "pre_norms", "post_norms", "thresholds", "update_norms", "clipped")
    return {k: [v if not isinstance(v, float) or math.isfinite(v) else str(v) for v in getattr(run, k)]
            for k in keep}  # fmt: skip


def _data(result: Comparison) -> dict[str, object]:
    rows = [{k: v if not isinstance(v, float) or math.isfinite(v) else str(v)
             for k, v in asdict(r).items()} for r in result.rows]  # fmt: skip
    return {
        "version": 1,
        "task": result.task.key,
        "description": result.task.description,
        "metric": result.task.metric_name,
        "seed": result.seed,
        "steps": result.steps,
        "device": result.device,
        "wall_time_s": result.wall_time_s,
        "rows": rows,
        "runs": {name: _series(run) for name, run in result.runs.items()},
    }


def _smooth(values: Sequence[float], window: int) -> list[float]:
    """Running median over ``window`` steps (a loss curve without batch noise; NaN stays)."""
    out, half = [], window // 2
    for i in range(len(values)):
        part = sorted(v for v in values[max(0, i - half): i + half + 1] if math.isfinite(v))
        out.append(part[len(part) // 2] if part else math.nan)
    return out


def _plots(result: Comparison, out: Path) -> dict[str, bytes]:
    from gradclip.report import plots

    labels = {r.strategy: r.label for r in result.rows}
    runs = result.runs
    window = max(1, result.steps // 100)
    images: dict[str, bytes] = {}

    fig, ax = plots.new_figure(1, 1, height=4.5)
    first = [r.losses[0] for r in runs.values() if r.losses and math.isfinite(r.losses[0])]
    for name, run in runs.items():
        plots.plot_series(ax, range(len(run.losses)), _smooth(run.losses, window), label=labels[name],
                          logy=True, ylabel="training loss (running median)")  # fmt: skip
    if first:
        ax.set_ylim(top=100 * max(first))  # a diverging run would flatten the others
    ax.set_title(f"training loss: {result.task.key}", fontsize=10)
    images["loss"] = plots.save_png(fig, out / "loss.png")

    cols = 3
    rows = math.ceil(len(runs) / cols)
    for key, title in (("norms", "gradient norm (blue), threshold (dashed), clipped steps (red)"),
                       ("updates", "update size ||θ_after - θ_before||")):  # fmt: skip
        fig, axes = plots.new_figure(rows, cols, width=4.2, height=2.6, sharex=True)
        for ax, (name, run) in zip(axes.flat, runs.items(), strict=False):
            steps = range(len(run.pre_norms))
            if key == "norms":
                clipper = not all(math.isnan(t) for t in run.thresholds)
                plots.plot_norms(ax, steps, run.pre_norms, title=labels[name],
                                 threshold=run.thresholds if clipper else None,
                                 clipped=run.clipped if clipper else None)  # fmt: skip
            else:
                plots.plot_series(ax, steps, run.update_norms, logy=True, title=labels[name])
        for ax in list(axes.flat)[len(runs):]:
            ax.set_visible(False)
        fig.suptitle(title, fontsize=11)
        images[key] = plots.save_png(fig, out / f"{key}.png")
    return images


def write(result: Comparison, out: Path, *, diagnostics: str | None = None) -> Path:
    """Write the demo folder's content into ``out``: ``demo.json`` (every number), the plots
    ``loss.png``, ``norms.png``, ``updates.png`` and ``index.html`` (table, verdicts, plots,
    and a link to ``diagnostics``, a report folder inside ``out``, when given). Returns the
    HTML path. Needs matplotlib (``pip install 'gradclip[plot]'``)."""
    from gradclip.report.html import Section, page

    images = _plots(result, out)
    header = ["strategy", result.task.metric_name, "vs best fixed", "diverged", "clip rate",
              "median update", "max update", "update spikes"]  # fmt: skip
    cells = [[r.label, _number(r.metric), _ratio(r), "yes" if r.diverged else "no",
              f"{r.clip_rate:.0%}", _number(r.median_update), _number(r.max_update), r.spikes]
             for r in result.rows]  # fmt: skip
    sections = [
        Section("What ran", paragraphs=[
            f"{result.task.description}. Every strategy trained the same model from the same "
            f"initialisation on the same batches (seed {result.seed}, {result.steps} steps, "
            f"{result.device}). Lower {result.task.metric_name} is better.",
        ]),
        Section("Results", paragraphs=verdicts(result), table=[header, *cells]),
        Section("Training loss", images=[("training loss per strategy", images["loss"])]),
        Section("Gradient norm against the threshold", images=[
            ("gradient norm and threshold per strategy", images["norms"])],
            paragraphs=["Clipping scales every gradient by min(1, threshold / norm): steps "
                        "above the dashed line (red marks) are scaled down to it."]),
        Section("Update size", images=[("update size per strategy", images["updates"])],
                paragraphs=["Clipping bounds the size of each update; without it an exploding "
                            "gradient becomes an exploding step."]),
    ]  # fmt: skip
    if diagnostics is not None:
        sections.append(Section("Diagnostics", paragraphs=[
            f"Per-layer norms, clip rate and a max_norm recommendation of the AdaptiveClip run: "
            f"{diagnostics}/report.html. Every clipper's log is in runs/; render one with "
            f"`gradclip report runs/NAME.jsonl -o DIR`."]))  # fmt: skip
    (out / MARKER).write_text(json.dumps(_data(result)) + "\n")
    html = out / "index.html"
    html.write_text(page(f"gradclip demo: {result.task.key}", sections))
    return html
