"""The max_norm finder's page: each candidate's loss curve, the scores, and the decision.

:func:`search_figure` draws a :class:`~gradclip.tune.MaxNormSearch` on one figure (one row
per round: the smoothed loss of every candidate over the round's steps, and each
candidate's score against its threshold, with two standard errors); :func:`render_search`
writes that figure and a self-contained HTML page (the decision in words, the table of
scores, the cost) into a folder the caller owns. Needs matplotlib.

Example:
    >>> import tempfile, torch, gradclip
    >>> from gradclip.report.search import render_search
    >>> model = torch.nn.Linear(2, 1)
    >>> opt = torch.optim.SGD(model.parameters(), lr=0.1)
    >>> def train_step(x, clip):
    ...     opt.zero_grad(); loss = model(x).pow(2).mean(); loss.backward()
    ...     clip(model); opt.step(); return loss
    >>> s = gradclip.find_max_norm(model, opt, train_step, [torch.ones(4, 2)] * 12,
    ...                            horizon=8, candidates=[0.1, 1.0])
    >>> files = render_search(s, tempfile.mkdtemp())
    >>> sorted(files.images), files.html.name
    (['search'], 'search.html')
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from gradclip.report import plots
from gradclip.report.html import Section, page
from gradclip.report.render import ReportFiles
from gradclip.tune import TAIL, MaxNormSearch, Round, Trial, render_text

__all__ = ["OFF_SCALE", "render_search", "search_figure", "smooth"]

OFF_SCALE = 10.0
"""The loss plot's y axis covers the candidates scored within this factor of a round's best;
the curves of the others (and of those that diverged) run off it, marked in the legend."""


def smooth(values: Sequence[float], span: int) -> list[float]:
    """Exponential moving average with the centre of mass of ``span`` steps (the curves'
    smoothing; NaN/inf values are carried through as gaps).

    Example:
        >>> smooth([1.0, 3.0, 3.0], 1)
        [1.0, 2.0, 2.5]
    """
    alpha = 1.0 / (1.0 + max(0, span))
    out: list[float] = []
    level: float | None = None
    for v in values:
        if not math.isfinite(v):
            out.append(math.nan)
            continue
        level = v if level is None else level + alpha * (v - level)
        out.append(level)
    return out


def _threshold_axis(r: Round) -> dict[str, float]:
    """Where each candidate sits on the score plot's log x axis: fixed thresholds at their
    value, no clipping beyond the largest, the adaptive default before the smallest."""
    fixed = [t.candidate.max_norm for t in r.trials if t.candidate.kind == "fixed"]
    lo, hi = (min(fixed), max(fixed)) if fixed else (1.0, 1.0)
    place = {}
    for t in r.trials:
        c = t.candidate
        place[c.name] = c.max_norm if c.kind == "fixed" else (hi * 10 if c.kind == "none" else lo / 10)  # type: ignore[assignment]
    return place


def _on_scale(r: Round) -> list[Trial]:
    """The trials the loss plot's y axis is fitted to: those that did not diverge and whose
    score is within ``OFF_SCALE`` times the round's best (with every loss positive; all that
    did not diverge otherwise). One diverging candidate would otherwise squash every other
    curve into a flat line at the bottom (a loss of 1e36 against 0.1)."""
    usable = [t for t in r.trials if not t.diverged and math.isfinite(t.score)]
    if not usable or not r.relative:
        return usable
    best = min(t.score for t in usable)
    return [t for t in usable if t.score <= OFF_SCALE * best]


def _fit_loss_axis(ax: Any, curves: Sequence[Sequence[float]], relative: bool) -> None:
    """Fit the y axis to ``curves`` (a log axis when the losses are positive: candidates'
    losses differ by ratios); other curves run off the axis."""
    values = [v for curve in curves for v in curve if math.isfinite(v)]
    if not values:
        return
    lo, hi = min(values), max(values)
    if relative and lo > 0:
        _log_axis(ax, "y")
        ax.set_ylim(lo / 1.1, hi * 1.1)
    else:
        pad = 0.05 * (hi - lo) or 0.05 * abs(hi) or 1.0
        ax.set_ylim(lo - pad, hi + pad)


def _log_axis(ax: Any, which: str) -> None:
    """A log axis labelled with plain numbers (0.2, 0.3 rather than 2x10^-1) and, where it
    spans under two decades (a search's losses and thresholds often span less than one, and
    then carry no major label or one), its minor ticks at 2, 3 and 5 x 10^k. ``which``:
    ``"x"`` or ``"y"``."""
    from matplotlib.ticker import FuncFormatter

    axis = getattr(ax, f"{which}axis")

    def minor(value: float, _: object) -> str:
        lo, hi = axis.get_view_interval()
        if value <= 0 or lo <= 0 or hi / lo > 100:
            return ""
        mantissa = value / 10 ** math.floor(math.log10(value) + 1e-9)
        return f"{value:g}" if any(abs(mantissa - m) < 1e-6 for m in (2, 3, 5)) else ""

    getattr(ax, f"set_{which}scale")("log")
    axis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
    axis.set_minor_formatter(FuncFormatter(minor))


def search_figure(search: MaxNormSearch) -> Any:
    """A matplotlib Figure: per round, the candidates' smoothed loss curves (left; the y axis
    fitted to those within ``OFF_SCALE`` of the best, on a log scale when every loss is
    positive) and how far each candidate's score is above the round's best, against its
    threshold (right; error bars: two standard errors)."""
    rounds = search.rounds
    fig, axes = plots.new_figure(len(rounds), 2, width=5.6, height=3.3, squeeze=False)
    for row, r in zip(axes, rounds, strict=True):
        loss_ax, score_ax = row
        span = max(1, r.steps // 10)
        shown = {id(t) for t in _on_scale(r)}
        curves = []
        for t in r.trials:
            name = t.candidate.name
            width = 2.2 if name == search.choice.name else 1.0
            note = " (diverged)" if t.diverged else "" if id(t) in shown else " (off scale)"
            curve = smooth(t.losses, span)
            loss_ax.plot(range(r.first_batch, r.first_batch + len(t.losses)), curve, lw=width,
                         label=name + note)  # fmt: skip
            if id(t) in shown:
                curves.append(curve)
        _fit_loss_axis(loss_ax, curves, r.relative)
        start = r.first_batch + r.steps - max(1, round(TAIL * r.steps))
        loss_ax.axvspan(start, r.first_batch + r.steps, color="#eeeeee", zorder=0,
                        label="scored")  # fmt: skip
        plots._finish(loss_ax, f"round {r.index}: loss (EMA over {span} steps)", "step",
                      "training loss", "outside")  # fmt: skip
        place = _threshold_axis(r)
        for t in r.trials:
            if t.diverged:
                continue
            name = t.candidate.name
            diff, se = r.margins.get(name, (0.0, 0.0))
            y = 100 * diff if r.relative else diff
            err = 100 * 2 * se if r.relative else 2 * se
            color = "#d62728" if name == search.choice.name else "#1f77b4"
            score_ax.errorbar([place[name]], [y], yerr=[err], fmt="o", color=color, capsize=3)
            score_ax.annotate(name, (place[name], y), fontsize=7, xytext=(3, 3),
                              textcoords="offset points")  # fmt: skip
        _log_axis(score_ax, "x")
        ylabel = "% loss above the best" if r.relative else "loss above the best"
        plots._finish(score_ax, f"round {r.index}: vs the best (red: the choice)",
                      "max_norm (adaptive left, none right)", ylabel, None)  # fmt: skip
    return fig


def render_search(search: MaxNormSearch, folder: str | os.PathLike[str]) -> ReportFiles:
    """Write ``search.png`` and ``search.html`` into ``folder`` (an existing folder the caller
    owns, e.g. a staging folder); returns where they are."""
    out = Path(folder)
    png = plots.save_png(search_figure(search))
    image = out / "search.png"
    image.write_bytes(png)
    table: list[list[object]] = [["round", "candidate", "score", "vs best (± s.e.)",
                                  "clip rate", "diverged"]]  # fmt: skip
    for r in search.rounds:
        for t in sorted(r.trials, key=lambda t: t.score):
            diff, se = r.margins.get(t.candidate.name, (0.0, 0.0))
            margin = f"{diff:+.2%} ± {se:.2%}" if r.relative else f"{diff:+.3g} ± {se:.2g}"
            table.append([r.index, t.candidate.name, "-" if t.diverged else f"{t.score:.5g}",
                          "-" if t.diverged else margin, f"{t.clip_rate:.0%}",
                          "yes" if t.diverged else ""])  # fmt: skip
    sections = [
        Section("Decision", paragraphs=[render_text(search).splitlines()[0],
                                        f"{search.confidence}: {search.statement}"],
                warnings=search.warnings),
        Section("Loss curves and scores", images=[("loss curves and scores", png)]),
        Section("Every trial", table=table),
        Section("How to read it", paragraphs=[
            "Every candidate trains from the same state on the same batches; the state is put "
            "back after each. The score is the (geometric) mean loss over the shaded last part "
            "of a round; two candidates tie when their step-by-step difference (of log-losses) "
            "is within two standard errors. Round 2 starts where round 1's best ended, on the next batches, among "
            "round 1's best thresholds: a pick must hold there too. The adaptive default "
            "starts with a warm-up and is slow in any short run by design; it is kept when no "
            "threshold is clearly better on steady training.",
            f"cost: {search.cost.steps} steps, {search.cost.seconds:.1f} s",
        ]),
    ]
    html = out / "search.html"
    html.write_text(page("max_norm search", sections), encoding="utf-8")
    return ReportFiles(html, {"search": image})
