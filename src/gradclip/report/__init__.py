"""Reports of what clipping did: data (:func:`build_report`), then rendering (:func:`render_report`).

The plot functions in :mod:`gradclip.report.plots` and the page builder in
:mod:`gradclip.report.html` work on plain arrays, for reuse outside this report (the demo).
Rendering needs matplotlib: ``pip install 'gradclip[plot]'``; building the data does not.

Example:
    >>> from gradclip.report import build_report, render_report
    >>> report = build_report("run.jsonl")  # doctest: +SKIP
    >>> files = render_report(report, "report/")  # doctest: +SKIP
    >>> files.html  # doctest: +SKIP
    PosixPath('report/report.html')
"""

from gradclip.report.data import Report, bin_max, build_report, rolling_mean
from gradclip.report.render import ReportFiles, render_report

__all__ = ["Report", "ReportFiles", "bin_max", "build_report", "render_report", "rolling_mean"]
