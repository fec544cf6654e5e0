"""Reports of what clipping did: data (:func:`build_report`), then rendering (:func:`render_report`).

The plot functions in :mod:`gradclip.report.plots` and the page builder in
:mod:`gradclip.report.html` work on plain arrays, for reuse outside this report (the demo).
Rendering needs matplotlib: ``pip install 'gradclip[plot]'``; building the data does not.

Example:
    >>> import tempfile
    >>> from pathlib import Path
    >>> import torch
    >>> import gradclip
    >>> from gradclip.report import build_report, render_report
    >>> log = Path(tempfile.mkdtemp()) / "run.jsonl"
    >>> model = torch.nn.Linear(4, 1)
    >>> with gradclip.GradMonitor(gradclip.NormClip(1.0), model, log=log) as monitor:
    ...     for _ in range(60):
    ...         model(torch.randn(8, 4)).pow(2).mean().backward()
    ...         stats = monitor()  # clip, record
    ...         model.zero_grad()
    >>> report = build_report(log)  # the data: summary, recommendation, heatmap, ...
    >>> files = render_report(report, log.parent / "run-report")  # the page and its plots
    >>> files.html.relative_to(log.parent).as_posix()
    'run-report/report.html'
"""

from gradclip.report.data import Report, bin_max, build_report, rolling_mean
from gradclip.report.render import PRODUCER, ReportFiles, render_report, write_report

__all__ = [
    "PRODUCER",
    "Report",
    "ReportFiles",
    "bin_max",
    "build_report",
    "render_report",
    "rolling_mean",
    "write_report",
]
