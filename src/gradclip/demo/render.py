"""Rendering of a :class:`~gradclip.demo.compare.Comparison`: the terminal table with what its
columns mean, the plain verdicts, and the page with its plots and data.

Example:
    >>> from gradclip.demo.compare import compare
    >>> from gradclip.demo.render import table, verdicts
    >>> result = compare("sgd-heavy-tail", ["none", "fixed-good", "adaptive"], steps=20)
    >>> print(table(result).splitlines()[2])  # doctest: +NORMALIZE_WHITESPACE
    strategy  mean ||w - w*|| over the last 12.5% of steps  vs best fixed  diverged  clip rate
    median update  max update  update spikes
    >>> verdicts(result)[-1].startswith("Caution: 20 steps are too few to judge")
    True
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

from gradclip.demo.compare import STRATEGIES, Comparison, Row
from gradclip.demo.runner import RunResult

__all__ = ["DATA", "SPIKE_FACTOR", "definitions", "figures", "table", "verdicts", "write"]

DATA = "demo.json"
"""The file of a demo folder holding every number of the run (rows and per-step series)."""

SPIKE_FACTOR = 10
"""An update counts as a spike above this many times the run's median update."""


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


def _header(result: Comparison) -> list[str]:
    return ["strategy", result.task.metric_name, "vs best fixed", "diverged", "clip rate",
            "median update", "max update", "update spikes"]  # fmt: skip


def _cells(r: Row) -> list[str]:
    return [r.label, _number(r.metric), _ratio(r), "yes" if r.diverged else "no",
            f"{r.clip_rate:.0%}", _number(r.median_update), _number(r.max_update), str(r.spikes)]  # fmt: skip


def definitions(result: Comparison) -> list[tuple[str, str]]:
    """What each column of the table means: ``(column, meaning)`` pairs, plain ASCII."""
    metric = result.task.metric_name
    return [
        (metric, "the task's score at the end of the run; lower is better "
                 "(inf: the weights became NaN/inf)"),
        ("vs best fixed", f"the strategy's {metric} divided by the best (lowest) one among "
                          "the fixed thresholds run here: 1.00x is as good as the best "
                          "hand-picked max_norm, 2.00x twice as bad"),
        ("diverged", f"the run ended with NaN/inf weights or a {metric} above "
                     f"{result.task.failure_level:g}"),
        ("clip rate", "the share of steps whose gradients were scaled down"),
        ("median / max update", "the size of the parameter update "
                                "||theta_after - theta_before|| over the run's finite steps"),
        ("update spikes", f"steps whose update was NaN/inf or over {SPIKE_FACTOR}x the run's "
                          "median update: what clipping is meant to prevent"),
    ]  # fmt: skip


def table(result: Comparison) -> str:
    """The summary table as the terminal shows it: one line per strategy, then what the
    columns mean."""
    header = _header(result)
    rows = [_cells(r) for r in result.rows]
    widths = [max(len(line[i]) for line in [header, *rows]) for i in range(len(header))]

    def line(cells: Sequence[str]) -> str:
        return "  ".join(c.ljust(w) if i == 0 else c.rjust(w)
                         for i, (c, w) in enumerate(zip(cells, widths, strict=True)))  # fmt: skip

    rule = "-" * len(line(header))
    task = result.task
    title = f"{task.key}: {task.description}; seed {result.seed}, {result.steps} steps"
    footer = [f"  {term}: {meaning}" for term, meaning in definitions(result)[1:]]
    return "\n".join([title, rule, line(header), rule, *map(line, rows), rule, *footer])


def _too_short(result: Comparison) -> str | None:
    """The caution printed with a run shorter than the task's full run, else None."""
    task = result.task
    if result.steps >= task.steps:
        return None
    return (f"Caution: {result.steps} steps are too few to judge the clippers (the full run "
            f"is {task.steps}): on this task one seed's short run can rank the strategies "
            "quite differently from a full one. Run `gradclip demo` without --quick, and see "
            "the README's quality tables (6 and 12 seeds, full length) before choosing.")  # fmt: skip


def verdicts(result: Comparison) -> list[str]:
    """What the table says, in plain words: one sentence per notable strategy, and a caution
    when the run is shorter than the task's full run (too short to rank clippers)."""
    out = []
    best = result.best_fixed
    for r in result.rows:
        if r.strategy == "none":
            if r.diverged:
                where = f" (weights non-finite after {r.steps} steps)" if r.steps < result.steps else ""
                out.append(f"Without clipping the run diverged{where}.")
            elif r.spikes:
                out.append(f"Without clipping {r.spikes} updates were over {SPIKE_FACTOR}x the "
                           "median update.")  # fmt: skip
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
                       f"({best.label}) on this seed after {r.steps} steps, clipping "
                       f"{r.clip_rate:.0%} of steps.")  # fmt: skip
    caution = _too_short(result)
    if caution is not None:
        out.append(caution)
    return out


def _finite(value: object) -> object:
    return value if not isinstance(value, float) or math.isfinite(value) else str(value)


def _series(run: RunResult) -> dict[str, object]:
    keep = ("losses", "pre_norms", "post_norms", "thresholds", "update_norms", "clipped")
    return {k: [_finite(v) for v in getattr(run, k)] for k in keep}


def _data(result: Comparison) -> dict[str, object]:
    rows = [{k: _finite(v) for k, v in asdict(r).items()} for r in result.rows]
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


def _panel_title(label: str, run: RunResult, ratio: bool) -> str:
    if ratio:
        return f"{label}: per-row ratio, no norm threshold"
    if all(math.isnan(t) for t in run.thresholds):
        return label
    return f"{label}: clipped {sum(run.clipped) / max(1, len(run.clipped)):.0%}"


def figures(result: Comparison) -> dict[str, Any]:
    """The page's matplotlib figures by name: ``loss`` (every strategy's training loss, the
    legend beside the axes), ``norms`` and ``updates`` (one small panel per strategy, one
    legend below them all; AGC's ratio threshold is not drawn on its norm axis)."""
    from gradclip.report import plots

    labels = {r.strategy: r.label for r in result.rows}
    runs = result.runs
    window = max(1, result.steps // 100)
    figs: dict[str, Any] = {}

    fig, ax = plots.new_figure(1, 1, height=4.5)
    first = [r.losses[0] for r in runs.values() if r.losses and math.isfinite(r.losses[0])]
    lowest = math.inf
    for name, run in runs.items():
        smooth = _smooth(run.losses, window)
        lowest = min([lowest, *(v for v in smooth if math.isfinite(v) and v > 0)])
        plots.plot_series(ax, range(len(run.losses)), smooth, label=labels[name], logy=True,
                          ylabel="training loss (running median)")  # fmt: skip
    if first:
        ax.set_ylim(top=100 * max(first))  # a diverging run would flatten the others
    if math.isfinite(lowest):
        ax.set_ylim(bottom=lowest / 2)  # nothing below the best curve but a margin
    ax.set_title(f"training loss: {result.task.key}", fontsize=10)
    figs["loss"] = fig

    cols = min(3, len(runs))
    rows = math.ceil(len(runs) / cols)
    for key, title in (("norms", "gradient norm before clipping and the clipper's threshold"),
                       ("updates", "update size ||θ_after - θ_before|| (log scale)")):  # fmt: skip
        fig, axes = plots.new_figure(rows, cols, width=4.2, height=2.6, sharex=True,
                                     squeeze=False)  # fmt: skip
        for ax, (name, run) in zip(axes.flat, runs.items(), strict=False):
            steps = range(len(run.pre_norms))
            if key == "norms":
                # AGC reports its ratio bound as its threshold: not a norm, not drawn on a norm axis
                ratio = STRATEGIES[name].threshold == "ratio"
                norm_threshold = not ratio and not all(math.isnan(t) for t in run.thresholds)
                plots.plot_norms(ax, steps, run.pre_norms, legend=None,
                                 title=_panel_title(labels[name], run, ratio),
                                 threshold=run.thresholds if norm_threshold else None,
                                 clipped=run.clipped if norm_threshold or ratio else None)  # fmt: skip
            else:
                plots.plot_series(ax, steps, run.update_norms, logy=True, title=labels[name],
                                  legend=None)  # fmt: skip
        for ax in list(axes.flat)[len(runs):]:
            ax.set_visible(False)
        for (row, col), ax in _panels(axes):
            # axis titles on the outer panels only (every panel keeps its own y scale)
            if row < rows - 1 and (row + 1) * cols + col < len(runs):
                ax.set_xlabel("")
            if col > 0:
                ax.set_ylabel("")
        fig.suptitle(title, fontsize=11)
        if key == "norms":  # one legend for every panel, below them: none covers the data
            handles = _norm_legend()
            fig.legend(handles=handles, loc="outside lower center", ncols=len(handles),
                       fontsize=9, frameon=False)  # fmt: skip
        figs[key] = fig
    return figs


def _panels(axes: object) -> list[tuple[tuple[int, int], object]]:
    """``((row, col), ax)`` for each panel of a 2-D array of axes."""
    return [((i, j), ax) for i, line in enumerate(axes) for j, ax in enumerate(line)]  # type: ignore[attr-defined]


def _norm_legend() -> list[object]:
    from matplotlib.lines import Line2D

    from gradclip.report.plots import COLORS as colors

    return [
        Line2D([], [], color=colors["norm"], lw=1.0, label="pre-clip gradient norm"),
        Line2D([], [], color=colors["threshold"], ls="--", lw=1.0, label="threshold"),
        Line2D([], [], color=colors["clipped"], marker="o", ls="", markersize=3,
               label="clipped step (scaled down)"),
    ]  # fmt: skip


def write(result: Comparison, out: Path, *, diagnostics: str | None = None) -> Path:
    """Write the demo folder's content into ``out``: :data:`DATA` (every number), the plots
    ``loss.png``, ``norms.png``, ``updates.png`` and ``index.html`` (table, what its columns
    mean, verdicts, plots, and links to the data and to ``diagnostics``, a report folder
    inside ``out``, when given). Returns the HTML path. Needs matplotlib
    (``pip install 'gradclip[plot]'``)."""
    from gradclip.report.html import Section, page
    from gradclip.report.plots import save_png

    images = {name: save_png(fig, out / f"{name}.png") for name, fig in figures(result).items()}
    cells = [_cells(r) for r in result.rows]
    verdict = verdicts(result)
    caution = _too_short(result)
    said = [v for v in verdict if v != caution]
    ratio = [r.label for r in result.rows if STRATEGIES[r.strategy].threshold == "ratio"]
    norms_note = ["Clipping scales every gradient by min(1, threshold / norm): steps above the "
                  "dashed line (red marks) are scaled down to it."]  # fmt: skip
    if ratio:
        norms_note.append(f"{', '.join(ratio)} clips each row of a weight whose gradient norm "
                          "exceeds the ratio times the row's weight norm: its threshold is "
                          "that ratio, not a gradient norm, so no line is drawn; red marks "
                          "are the steps where it scaled some row.")  # fmt: skip
    report_link = [] if diagnostics is None else [
        ("Diagnostics report of the AdaptiveClip run", f"{diagnostics}/report.html")]  # fmt: skip
    sections = [
        Section("What ran", paragraphs=[
            f"{result.task.description}. Every strategy trained the same model from the same "
            f"initialisation on the same batches (seed {result.seed}, {result.steps} steps, "
            f"{result.device}). Lower {result.task.metric_name} is better.",
        ], links=report_link),
        Section("Results", warnings=[caution] if caution else (), paragraphs=said,
                table=[_header(result), *cells], definitions=definitions(result)),
        Section("Training loss", images=[("training loss per strategy", images["loss"])]),
        Section("Gradient norm against the threshold", images=[
            ("gradient norm and threshold per strategy", images["norms"])],
            paragraphs=norms_note),
        Section("Update size", images=[("update size per strategy", images["updates"])],
                paragraphs=["Clipping bounds the size of each update; without it an exploding "
                            "gradient becomes an exploding step."]),
    ]  # fmt: skip
    links = [("demo.json: every number on this page, per step and per strategy", DATA)]
    if diagnostics is not None:
        links.insert(0, ("Diagnostics report of the AdaptiveClip run: per-layer norms, clip "
                         "rate, norm histogram and a max_norm recommendation",
                         f"{diagnostics}/report.html"))  # fmt: skip
    if (out / "runs").is_dir():
        links.append(("runs/: each clipper's log, one JSON record per step (`gradclip report "
                      "runs/NAME.jsonl` renders one into runs/NAME-report/)", "runs/"))  # fmt: skip
    sections.append(Section("Diagnostics and data", links=links))
    (out / DATA).write_text(json.dumps(_data(result)) + "\n")
    html = out / "index.html"
    html.write_text(page(f"gradclip demo: {result.task.key}", sections), encoding="utf-8")
    return html
