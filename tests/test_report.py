"""The report: its data (checked against naive loops over the same arrays), its files, and
the page in a real headless Chromium (images load, no console error)."""

from __future__ import annotations

import base64
import math
import re
import subprocess
import sys

import numpy as np
import pytest
import torch

import gradclip
from browser import chromium_or_skip, load_in_chromium
from gradclip.report import bin_max, build_report, render_report, rolling_mean
from gradclip.sinks import JSONLSink

pytestmark = pytest.mark.usefixtures("one_thread")

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def synthetic_records(n=300, layers=6, threshold=0.1, seed=0, nonfinite=(150,)):
    """Step records of a run whose threshold is ~10x below the median norm, with rare spikes
    and NaN/inf gradients in layer ``blocks.2.mlp`` at the ``nonfinite`` steps."""
    rng = np.random.default_rng(seed)
    names = [f"blocks.{i}.mlp" for i in range(layers)]
    records = []
    for step in range(n):
        norm = float(np.exp(rng.normal(0, 0.2)) * (50 if step % 97 == 5 else 1))
        lay = {name: norm * float(rng.uniform(0.1, 0.5)) for name in names}
        finite = step not in nonfinite
        if not finite:
            norm, lay["blocks.2.mlp"] = math.nan, math.nan
        coef = min(1.0, threshold / (norm + 1e-6)) if finite else math.nan
        records.append({
            "schema": 1, "step": step, "time": 0.0, "norm_type": 2.0, "norm": norm,
            "post_norm": norm * coef, "threshold": threshold, "coef": coef,
            "clipped": bool(coef < 1), "finite": finite, "skipped": False, "layers": lay,
            "extra": {"loss": 1.0 / (step + 1)},
        })  # fmt: skip
    return records


def write_log(path, records):
    sink = JSONLSink(path)
    sink.write(records)
    sink.close()
    return path


def test_rolling_mean_matches_a_loop():
    values = torch.tensor([1.0, 0, 0, 1, 1, 1, 0, 1])
    for window in (1, 3, 20):
        expected = [values[max(0, i - window + 1) : i + 1].mean().item() for i in range(len(values))]
        assert rolling_mean(values, window).tolist() == pytest.approx(expected)


def test_bin_max_matches_a_loop():
    rng = np.random.default_rng(1)
    values = rng.uniform(size=(4, 23))
    values[1, 3:9] = np.nan  # a whole bin missing in row 1
    values[2, 10] = np.inf
    starts, maxima = bin_max(torch.tensor(values), 4)
    width = math.ceil(23 / 4)
    assert starts.tolist() == list(range(0, 23, width))
    for b, s in enumerate(starts.tolist()):
        for g in range(4):
            chunk = values[g, s : s + width]
            expected = np.nan if np.isnan(chunk).all() else np.nanmax(chunk)
            np.testing.assert_equal(maxima[g, b].item(), expected)


def test_report_data_from_a_log(tmp_path):
    records = synthetic_records(n=300, layers=50)
    history = gradclip.read_log(write_log(tmp_path / "run.jsonl", records))
    report = build_report(history, max_layers=40, max_columns=100)
    norms = np.array([r["norm"] for r in records])
    clipped = np.array([r["clipped"] for r in records], dtype=float)
    # clip rate: the mean of the last `window` flags
    w = report.clip_rate_window
    expected = [clipped[max(0, i - w + 1) : i + 1].mean() for i in range(300)]
    assert report.clip_rate.tolist() == pytest.approx(expected)
    assert report.summary.clip_rate == pytest.approx(clipped.mean())
    assert report.summary.norm_percentiles["p50"] == pytest.approx(np.nanmedian(norms))
    # heatmap: the 40 layers with the largest finite peak, in module order
    names = list(records[0]["layers"])
    matrix = np.array([[r["layers"][n] for n in names] for r in records])
    peaks = np.nanmax(np.where(np.isfinite(matrix), matrix, -np.inf), axis=0)
    peaks[names.index("blocks.2.mlp")] = np.inf  # its NaN gradient makes it the top row
    top = sorted(np.argsort(-peaks, kind="stable")[:40])
    assert report.heatmap_layers == tuple(names[i] for i in top)
    assert report.heatmap.shape == (40, 100)
    row = 5  # any shown layer: column 50 holds steps 150-152
    col = names.index(report.heatmap_layers[row])
    assert report.heatmap[row, 50].item() == pytest.approx(np.max(matrix[150:153, col]))
    assert math.isinf(report.heatmap[report.heatmap_layers.index("blocks.2.mlp"), 50])
    assert [(e.step, e.layers) for e in report.nonfinite_events] == [(150, ("blocks.2.mlp",))]
    rec = report.recommendation  # 10x too low a threshold: raised by one 3x step, said so
    assert rec.max_norm == pytest.approx(3 * 0.1) and any("cannot tell" in w for w in rec.warnings)


@pytest.fixture(scope="module")
def rendered(tmp_path_factory):
    pytest.importorskip("matplotlib")
    out = tmp_path_factory.mktemp("report")
    log = write_log(out / "run.jsonl", synthetic_records())
    report = build_report(log)
    return report, render_report(report, out / "html")


def test_render_writes_pngs_and_embeds_them(rendered):
    report, files = rendered
    assert set(files.images) == {"norms", "clip_rate", "layers", "histogram", "nonfinite"}
    page = files.html.read_text()
    embedded = re.findall(r'src="data:image/png;base64,([^"]+)"', page)
    assert len(embedded) == len(files.images)
    on_disk = {p.read_bytes() for p in files.images.values()}
    assert {base64.b64decode(e) for e in embedded} == on_disk
    assert all(data.startswith(PNG_MAGIC) for data in on_disk)
    assert not re.search(r'(src|href)="(?!data:)', page)  # nothing outside the file
    # the evidence of the too-low threshold is on the page
    rec = report.recommendation
    assert f"recommended max_norm: {rec.max_norm:.4g}" in page
    assert "clipping fired on 100% of steps" in page
    assert "below the median pre-clip norm" in page
    assert "blocks.2.mlp" in page  # the layer where the NaN appeared


@pytest.fixture(scope="module")
def chromium():
    return chromium_or_skip()


def test_report_loads_in_headless_chromium(rendered, chromium, tmp_path):
    _, files = rendered
    result, console = load_in_chromium(chromium, files.html, tmp_path / "profile")
    assert result["images"] == len(files.images)
    assert result["loaded"] == result["images"], result
    assert result["errors"] == [] and console == []
    # a screenshot, kept out of the repo, for a person to look at when it fails
    shot = tmp_path / "report.png"
    subprocess.run([chromium, "--headless", "--no-sandbox", "--disable-gpu",
                    f"--user-data-dir={tmp_path / 'profile'}", f"--screenshot={shot}",
                    "--window-size=1200,2000", files.html.as_uri()],
                   capture_output=True, timeout=120)  # fmt: skip
    assert shot.read_bytes().startswith(PNG_MAGIC)


def test_the_chromium_probe_sees_broken_pages(chromium, tmp_path):
    """The check above can fail: a broken image and a script error are both caught."""
    page = tmp_path / "broken.html"
    page.write_text("<!DOCTYPE html><html><head><title>x</title></head><body>"
                    '<img src="data:image/png;base64,AAAA"><script>missing()</script></body></html>')  # fmt: skip
    result, console = load_in_chromium(chromium, page, tmp_path / "profile")
    assert result["images"] == 1 and result["loaded"] == 0
    assert any("missing" in e for e in result["errors"]) and console


def test_plots_need_matplotlib_with_a_hint(monkeypatch):
    from gradclip.report import plots

    monkeypatch.setitem(sys.modules, "matplotlib", None)
    monkeypatch.setitem(sys.modules, "matplotlib.figure", None)
    with pytest.raises(ImportError, match=r"pip install 'gradclip\[plot\]'"):
        plots.new_figure()


def test_report_of_a_run_without_layers(tmp_path):
    pytest.importorskip("matplotlib")
    history = gradclip.History.from_norms([1.0, 2.0, 40.0] * 30, threshold=1.5)
    report = build_report(history)
    assert report.heatmap_layers == () and report.summary.clip_rate == pytest.approx(2 / 3)
    files = render_report(report, tmp_path)
    assert set(files.images) == {"norms", "clip_rate", "histogram"}


def test_importing_imports_no_optional_framework():
    code = ("import sys, gradclip, gradclip.report, gradclip.report.plots; "
            "print(sorted(m for m in ('matplotlib', 'tensorboard') if m in sys.modules))")  # fmt: skip
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.stdout.strip() == "[]", done.stderr
