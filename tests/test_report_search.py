"""The finder's page: one curve per trial and round, the scores, every trial in the table."""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch

import gradclip

pytest.importorskip("matplotlib")

from gradclip.report.search import render_search, search_figure, smooth
from gradclip.tune import Candidate, Trial


@pytest.fixture(scope="module")
def search() -> gradclip.MaxNormSearch:
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 1)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    data = [(torch.randn(8, 4), torch.randn(8, 1)) for _ in range(30)]

    def train_step(batch, clip):
        x, y = batch
        opt.zero_grad()
        loss = torch.nn.functional.mse_loss(model(x), y)
        loss.backward()
        clip(model)
        opt.step()
        return loss

    return gradclip.find_max_norm(model, opt, train_step, data, horizon=12,
                                  candidates=[0.03, 0.3, 3.0])  # fmt: skip


def test_smooth_is_an_exponential_moving_average():
    values = [2.0, 4.0, math.nan, 0.0, 8.0]
    alpha = 1 / 3
    expected, level = [], None
    for v in values:
        if math.isnan(v):
            expected.append(math.nan)
            continue
        level = v if level is None else level + alpha * (v - level)
        expected.append(level)
    assert smooth(values, 2) == pytest.approx(expected, nan_ok=True)


def test_figure_has_a_curve_per_trial_and_a_point_per_finite_score(search):
    fig = search_figure(search)
    axes = fig.axes
    assert len(axes) == 2 * len(search.rounds)
    for r, (loss_ax, score_ax) in zip(search.rounds, zip(axes[::2], axes[1::2], strict=True),
                                      strict=True):  # fmt: skip
        labels = [line.get_label().split(" (")[0] for line in loss_ax.get_lines()]
        assert labels == [t.candidate.name for t in r.trials]
        for line, trial in zip(loss_ax.get_lines(), r.trials, strict=True):
            assert list(line.get_ydata()) == pytest.approx(smooth(trial.losses, max(1, r.steps // 10)))
        points = [t.get_text() for t in score_ax.texts]
        assert points == [t.candidate.name for t in r.trials if not t.diverged]


def test_a_diverging_or_far_worse_candidate_does_not_squash_the_loss_axis(search):
    # a round where "none" diverged (1e36 before the NaN) and 10 scored 100x the best: the
    # axis fits the others, on a log scale, and the legend says which curves left it
    first = search.rounds[0]
    steps = first.steps
    good = [t for t in first.trials if t.candidate.kind == "fixed"]
    best = min(good, key=lambda t: t.score)
    worse = Trial(Candidate("fixed", 10.0), tuple(100 * v for v in best.losses), (), (),
                  False, 100 * best.score, 0.0)  # fmt: skip
    diverged = Trial(Candidate("none"), (*best.losses[: steps // 2], 1e36, math.nan), (), (),
                     True, math.inf, 0.0)  # fmt: skip
    round_ = dataclasses.replace(first, trials=(*good, worse, diverged), relative=True)
    fig = search_figure(dataclasses.replace(search, rounds=(round_,)))
    loss_ax = fig.axes[0]
    labels = [line.get_label() for line in loss_ax.get_lines()]
    assert labels == [*(t.candidate.name for t in good), "10 (off scale)", "none (diverged)"]
    assert loss_ax.get_yscale() == "log"
    lo, hi = loss_ax.get_ylim()
    span = max(1, steps // 10)
    shown = [v for t in good for v in smooth(t.losses, span)]
    assert lo == pytest.approx(min(shown) / 1.1) and hi == pytest.approx(max(shown) * 1.1)


def test_page_lists_every_trial_and_the_decision(search, tmp_path):
    files = render_search(search, tmp_path)
    html = files.html.read_text()
    assert files.images["search"].read_bytes()[:4] == b"\x89PNG"
    assert search.statement.split(":")[0] in html
    for r in search.rounds:
        for t in r.trials:
            assert f"<td>{r.index}</td><td>{t.candidate.name}</td>" in html.replace("\n", "")
