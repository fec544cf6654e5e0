"""gradclip.demo.render: what the table and the page say (columns defined, a short run
flagged as too short to judge) and how the figures are laid out (no legend over the data,
no ratio drawn on a norm axis). Checked on the data and the figure objects, not on pixels."""

from __future__ import annotations

import dataclasses
import math
import re
import statistics

import pytest

import gradclip
from gradclip.demo import render
from gradclip.demo.compare import STRATEGIES, compare
from gradclip.demo.tasks import TASKS

pytest.importorskip("matplotlib")


@pytest.fixture(autouse=True)
def _one_thread(one_thread):
    yield


@pytest.fixture(scope="module")
def short():
    return compare("sgd-heavy-tail", ["none", "fixed-good", "agc", "adaptive"], steps=40)


def test_the_table_says_what_its_columns_mean(short):
    text = render.table(short)
    footer = text.split("\n")[-5:]
    terms = [line.strip().split(":")[0] for line in footer]
    assert terms == ["vs best fixed", "diverged", "clip rate", "median / max update",
                     "update spikes"]  # fmt: skip
    assert "divided by the best (lowest) one among the fixed thresholds" in text
    assert f"over {render.SPIKE_FACTOR}x the run's median update" in text
    # the definitions are the computation: recount spikes and ratios from the runs
    best = min(r.metric for r in short.rows if r.strategy.startswith("fixed-"))
    for row in short.rows:
        updates = short.runs[row.strategy].update_norms
        median = statistics.median(u for u in updates if math.isfinite(u))
        expected = sum(not math.isfinite(u) or u > render.SPIKE_FACTOR * median for u in updates)
        assert row.spikes == expected
        assert row.ratio_to_best == pytest.approx(row.metric / best)


def test_a_short_run_is_flagged_where_the_verdict_is(short):
    said = render.verdicts(short)
    adaptive = next(i for i, v in enumerate(said) if v.startswith("AdaptiveClip, untuned"))
    assert said[adaptive + 1].startswith("Caution: 40 steps are too few to judge the clippers "
                                         "(the full run is 4000)")  # fmt: skip
    assert "on this seed after 40 steps" in said[adaptive]


def test_a_full_length_run_has_no_caution():
    task = dataclasses.replace(TASKS["sgd-heavy-tail"], steps=30)  # "full length" is 30 here
    said = render.verdicts(compare(task, ["fixed-good", "adaptive"]))
    assert not any(v.startswith("Caution") for v in said)
    assert any(v.startswith("AdaptiveClip, untuned") for v in said)


def test_no_legend_sits_on_the_data(short):
    figs = render.figures(short)
    for name in ("norms", "updates"):
        fig = figs[name]
        assert all(ax.get_legend() is None for ax in fig.axes), name
    assert len(figs["norms"].legends) == 1  # one legend for all panels, below them
    fig = figs["loss"]
    fig.canvas.draw()  # lay out, then compare where the legend and the axes are
    (ax,) = fig.axes
    legend = ax.get_legend().get_window_extent()
    axes_box = ax.get_window_extent()
    assert legend.x0 >= axes_box.x1  # beside the axes, not over the curves
    (below,) = figs["norms"].legends
    figs["norms"].canvas.draw()
    panels = [a.get_window_extent() for a in figs["norms"].axes if a.get_visible()]
    assert below.get_window_extent().y1 <= min(p.y0 for p in panels)


def test_agcs_ratio_is_not_drawn_on_a_norm_axis(short):
    agc = short.runs["agc"]
    ratio = gradclip.AGC().clipping
    assert all(t == pytest.approx(ratio) for t in agc.thresholds)  # what AGC reports: its ratio
    assert STRATEGIES["agc"].threshold == "ratio"
    assert {s.threshold for n, s in STRATEGIES.items() if n != "agc"} == {"norm"}
    panels = {ax.get_title(): ax for ax in render.figures(short)["norms"].axes}
    agc_panel = next(ax for title, ax in panels.items() if title.startswith("AGC"))
    assert "no norm threshold" in agc_panel.get_title()
    assert not [line for line in agc_panel.get_lines() if line.get_linestyle() == "--"]
    fixed_panel = next(ax for title, ax in panels.items() if title.startswith("fixed"))
    (dashed,) = [line for line in fixed_panel.get_lines() if line.get_linestyle() == "--"]
    assert list(dashed.get_ydata()) == pytest.approx([TASKS["sgd-heavy-tail"].fixed[1]] * 40)


def test_the_page_defines_its_terms_and_links_its_files(short, tmp_path):
    html = render.write(short, tmp_path, diagnostics="adaptive-report").read_text()
    for term, _ in render.definitions(short):
        assert f"<dt>{term}</dt>" in html.replace("&#x27;", "'")
    assert '<p class="warning">Caution: 40 steps are too few' in html
    hrefs = re.findall(r'<a href="([^"]+)"', html)
    assert hrefs.count("adaptive-report/report.html") == 2  # at the top and with the data
    assert "demo.json" in hrefs and (tmp_path / "demo.json").exists()
