"""The rendering step of a report: PNG plots and one self-contained HTML page, published as a
folder that replaces only an earlier report (:class:`gradclip._files.OutputFolder`)."""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from pathlib import Path

import torch

from gradclip._files import OutputFolder
from gradclip.recommend import render_text
from gradclip.report import plots
from gradclip.report.data import Report
from gradclip.report.html import Section, page

__all__ = ["PRODUCER", "ReportFiles", "render_report", "write_report"]

PRODUCER = "gradclip report"
"""The name a report folder's manifest records: only a folder of this name is replaced."""


@dataclass(frozen=True)
class ReportFiles:
    """What :func:`render_report` wrote: the HTML page and each PNG, by plot name."""

    html: Path
    images: dict[str, Path]


def _fmt(value: float | None) -> str:
    return "-" if value is None else f"{value:.4g}"


def _layers_text(values: dict[str, float], unit: str) -> str:
    shown = [f"{name} ({value:.3g}{unit})" for name, value in list(values.items())[:5]]
    return ", ".join(shown) + (" ..." if len(values) > 5 else "") if shown else "-"


def _spikes_section(report: Report) -> Section:
    """Each spike the detector saw, with the layers that grew most against their own running
    median (the forensics of the log, where it has them)."""
    summ, events = report.summary, report.spike_events
    rows: list[list[object]] = [["step", "norm", "bound", "skipped", "loss",
                                 "top layers (norm / its median)", "max |g|", "non-finite"]]
    for e in events:
        rows.append([e.step, _fmt(e.norm), _fmt(e.bound), e.skipped,
                     "-" if math.isnan(e.loss) else _fmt(e.loss), _layers_text(e.layers, "x"),
                     _layers_text(e.max_abs, ""), ", ".join(e.nonfinite) or "-"])  # fmt: skip
    more = summ.spike_steps - len(events)
    return Section("Spikes", table=rows, paragraphs=[
        f"the spike detector called {summ.spike_steps} step(s) spikes; SpikeScore (the "
        f"fraction of recent steps that were spikes) at the end: {summ.spike_score:.3g}"
        + (f"; the first {len(events)} are listed" if more > 0 else "")])  # fmt: skip


def render_report(report: Report, out_dir: str | os.PathLike[str]) -> ReportFiles:
    """Write ``report.html`` and the PNG plots of ``report`` into the folder ``out_dir``.

    Plots: ``norms.png`` (total norm over time with threshold and clipped steps),
    ``clip_rate.png``, ``layers.png`` (per-layer heatmap, when layers were recorded),
    ``histogram.png`` (log scale), ``nonfinite.png`` (when any step was non-finite),
    ``updates.png`` (the update-to-parameter ratio per layer, when updates were recorded),
    ``groups.png`` (the clip coefficient per parameter group, when there were groups). The
    HTML embeds the same images and shows the summary and the recommendation.

    ``out_dir`` is created (with its parents), or filled if it is an empty folder, or
    replaced if it holds an earlier report whose files are unchanged. Anything else (a
    file, a link, a folder with other files) raises :class:`gradclip._files.OutputError`
    (a ``ValueError``) and nothing is written. The folder appears complete or not at all.

    Example:
        >>> import tempfile
        >>> from pathlib import Path
        >>> import gradclip
        >>> from gradclip.report import build_report, render_report
        >>> r = build_report(gradclip.History.from_norms([1.0, 2.0] * 50, threshold=1.5))
        >>> files = render_report(r, Path(tempfile.mkdtemp()) / "report")
        >>> files.html.name, sorted(files.images)
        ('report.html', ['clip_rate', 'histogram', 'norms'])
    """
    with OutputFolder(out_dir, producer=PRODUCER) as folder:
        staged = write_report(report, folder.stage)
        folder.commit()
    dest = Path(out_dir)  # as the caller wrote it
    return ReportFiles(dest / staged.html.name, {k: dest / p.name for k, p in staged.images.items()})


def write_report(report: Report, folder: str | os.PathLike[str]) -> ReportFiles:
    """Write the files of :func:`render_report` into ``folder``, an existing folder the
    caller owns (a staging folder): no check, no publishing. Returns where they are."""
    out = Path(folder)
    h, rec, summ = report.history, report.recommendation, report.summary
    pngs: dict[str, bytes] = {}

    fig, ax = plots.new_figure(height=3.6)
    plots.plot_norms(ax, h.steps, h.norm, threshold=h.threshold, clipped=h.clipped,
                     post_norm=h.post_norm, recommended=rec.max_norm,
                     spike_bound=h.spike_bound, spikes=h.spike,
                     title="Total gradient norm: threshold and clipped steps")  # fmt: skip
    pngs["norms"] = plots.save_png(fig)

    fig, ax = plots.new_figure(height=2.6)
    plots.plot_clip_rate(ax, h.steps, report.clip_rate, window=report.clip_rate_window,
                         title="How often clipping fired")  # fmt: skip
    pngs["clip_rate"] = plots.save_png(fig)

    if report.heatmap_layers:
        fig, ax = plots.new_figure(height=max(2.5, 0.16 * len(report.heatmap_layers) + 1.2))
        plots.plot_layer_heatmap(ax, report.heatmap_steps, report.heatmap, report.heatmap_layers,
                                 title="Per-layer pre-clip norm (red: non-finite)")  # fmt: skip
        pngs["layers"] = plots.save_png(fig)

    fig, ax = plots.new_figure(height=3.0)
    plots.plot_histogram(ax, h.norm, threshold=summ.threshold, recommended=rec.max_norm,
                         title="Pre-clip norms (log scale)")  # fmt: skip
    pngs["histogram"] = plots.save_png(fig)

    if report.update_ratios:
        fig, ax = plots.new_figure(height=3.2)
        for layer, ratio in report.update_ratios.items():
            ok = torch.isfinite(ratio) & (ratio > 0)  # a log scale: no zero updates
            if not ok.any():
                continue
            plots.plot_series(ax, h.steps[ok], ratio[ok], label=layer, logy=True,
                              ylabel="||Δθ|| / ||θ||",
                              title="Update-to-parameter ratio per layer")  # fmt: skip
        pngs["updates"] = plots.save_png(fig)

    if report.group_coefs:
        fig, ax = plots.new_figure(height=3.0)
        for group, coef in report.group_coefs.items():
            ok = torch.isfinite(coef) & (coef > 0)
            plots.plot_series(ax, h.steps[ok], coef[ok], label=f"group {group}",
                              logy=bool(ok.any()),
                              ylabel="clip coefficient",
                              title="Clip coefficient per parameter group (1: not clipped)")  # fmt: skip
        pngs["groups"] = plots.save_png(fig)

    if report.nonfinite_events:
        fig, ax = plots.new_figure(height=1.8)
        plots.plot_nonfinite(ax, h.steps, h.finite, h.skipped, title="Non-finite gradients")
        pngs["nonfinite"] = plots.save_png(fig)

    images = {}
    for name, data in pngs.items():
        images[name] = out / f"{name}.png"
        images[name].write_bytes(data)

    sections = []
    if h.problems:
        sections.append(Section("Problems with the log", warnings=[
            *h.problems, "the report shows the records that could be read"]))  # fmt: skip
    pct = summ.norm_percentiles
    sections.append(Section("Summary", table=[
        ["steps", "clipped", "clip rate", "non-finite", "skipped", "threshold (last)",
         "norm p50", "p90", "p99", "max"],
        [summ.steps, summ.clipped_steps, f"{summ.clip_rate:.1%}", summ.nonfinite_steps,
         summ.skipped_steps, _fmt(summ.threshold), *(_fmt(pct.get(k)) for k in
         ("p50", "p90", "p99", "max"))],
    ], paragraphs=[f"source: {h.source or '-'}; norm type: {h.norm_type:g}"
                   + (f"; optimizer: {h.optimizer}" if h.optimizer else "")]))  # fmt: skip
    sections.append(Section("Recommended max_norm", warnings=rec.warnings,
                            preformatted=render_text(rec).split("\nwarning:")[0]))  # fmt: skip
    sections.append(Section("Total norm over time", images=[("total norm", pngs["norms"])]))
    sections.append(Section("Clip rate over time", images=[("clip rate", pngs["clip_rate"])]))
    if "layers" in pngs:
        tops = [["layer", "largest norm", "mean norm"]] + [
            [t.name, _fmt(t.max), _fmt(t.mean)] for t in summ.top_layers]  # fmt: skip
        sections.append(Section("Per-layer norms", images=[("per-layer heatmap", pngs["layers"])],
                                table=tops))  # fmt: skip
    if "groups" in pngs:
        rows = [["group", "norm p50", "clip rate", "median coefficient", "smallest"]]
        for group, coef in report.group_coefs.items():
            norm = report.group_norms.get(group, coef.new_full(coef.shape, math.nan))
            ok = torch.isfinite(coef)
            finite_norm = norm[torch.isfinite(norm)]
            rows.append([
                group, _fmt(float(finite_norm.median()) if finite_norm.numel() else None),
                f"{float((coef[ok] < 1).double().mean()) if ok.any() else 0.0:.1%}",
                _fmt(float(coef[ok].median()) if ok.any() else None),
                _fmt(float(coef[ok].min()) if ok.any() else None),
            ])
        sections.append(Section("Parameter groups", images=[("group coefficients", pngs["groups"])],
                                table=rows, warnings=[s.describe() for s in report.stalls]))  # fmt: skip
    elif report.stalls:
        sections.append(Section("Stalls", warnings=[s.describe() for s in report.stalls]))
    if "updates" in pngs:
        sections.append(Section("Updates", images=[("update ratios", pngs["updates"])],
                                paragraphs=["||Δθ|| / ||θ||: how far each step moved each layer, "
                                            "relative to its size (the total, and the layers "
                                            "that moved most)"]))  # fmt: skip
    sections.append(Section("Norm histogram", images=[("histogram", pngs["histogram"])]))
    if report.nonfinite_events:
        rows = [["step", "skipped", "non-finite layers"]] + [
            [e.step, e.skipped, ", ".join(e.layers) or "-"] for e in report.nonfinite_events]  # fmt: skip
        sections.append(Section("Non-finite events", images=[("non-finite", pngs["nonfinite"])],
                                table=rows))  # fmt: skip
    else:
        sections.append(Section("Non-finite events", paragraphs=[
            f"none: every one of the {summ.steps} steps had finite gradients"]))  # fmt: skip
    if summ.spike_steps:
        sections.append(_spikes_section(report))
    html = out / "report.html"
    html.write_text(page(report.title, sections), encoding="utf-8")
    return ReportFiles(html, images)
