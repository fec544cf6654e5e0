"""gradclip.demo.compare and gradclip.demo.render: the data and text of ``gradclip demo``."""

from __future__ import annotations

import math

import pytest
import torch

import gradclip
from gradclip.demo import render
from gradclip.demo.compare import STRATEGIES, compare, spike_steps
from gradclip.demo.runner import run
from gradclip.demo.tasks import TASKS


@pytest.fixture(autouse=True)
def _one_thread(one_thread):  # the tasks' numbers are defined for a thread count
    yield


def test_same_arguments_same_table():
    first = compare("rnn-addition/violent", ["none", "fixed-good", "adaptive"], steps=60)
    second = compare("rnn-addition/violent", ["none", "fixed-good", "adaptive"], steps=60)
    assert first.rows == second.rows
    assert render.table(first) == render.table(second)


def test_rows_summarise_the_runs_they_come_from():
    result = compare("sgd-heavy-tail", ["none", "fixed-low", "fixed-good", "adaptive"], steps=120)
    for row in result.rows:
        r = result.runs[row.strategy]
        finite = [u for u in r.update_norms if math.isfinite(u)]
        assert row.metric == r.metric and row.steps == r.steps == 120
        assert row.clip_rate == pytest.approx(sum(r.clipped) / len(r.clipped))
        assert row.max_update == max(finite)
    best = min(r.metric for r in result.rows if r.strategy.startswith("fixed-"))
    adaptive = next(r for r in result.rows if r.strategy == "adaptive")
    assert adaptive.ratio_to_best == pytest.approx(adaptive.metric / best)
    assert result.best_fixed is not None and result.best_fixed.metric == best


def test_a_strategy_trains_as_its_clipper_does_on_its_own():
    task = TASKS["rnn-addition/moderate"]
    result = compare(task, ["fixed-good"], steps=40, seed=3)
    alone = run(task, gradclip.NormClip(task.fixed[1]), seed=3, steps=40)
    assert result.runs["fixed-good"].losses == alone.losses
    assert result.runs["fixed-good"].metric == alone.metric


def test_the_fixed_strategies_use_the_tasks_thresholds():
    task = TASKS["adam-spikes"]
    low, good, high = (STRATEGIES[f"fixed-{w}"].build(task) for w in ("low", "good", "high"))
    assert (low.max_norm, good.max_norm, high.max_norm) == task.fixed
    assert task.fixed[0] < task.fixed[1] < task.fixed[2]
    assert STRATEGIES["none"].build(task) is None


def test_record_sees_every_clip_step():
    seen: dict[str, int] = {}

    def record(name, clipper):
        def keep(stats):
            seen[name] = seen.get(name, 0) + 1
            assert isinstance(stats, gradclip.ClipStats)
            return stats

        return None if clipper is None else keep

    compare("sgd-heavy-tail", ["fixed-good", "adaptive"], steps=25, record=record)
    assert seen == {"fixed-good": 25, "adaptive": 25}


def test_spike_steps():
    assert spike_steps([1.0, 1.0, 11.0, 1.0, float("nan"), 9.0]) == [2, 4]
    assert spike_steps([]) == []
    assert spike_steps([float("inf")]) == [0]


def test_unknown_or_missing_strategies_name_the_choices():
    with pytest.raises(ValueError, match=r"unknown strategy 'fixed'.*choose from: none, fixed-low"):
        compare("sgd-heavy-tail", ["none", "fixed"], steps=5)
    with pytest.raises(ValueError, match="no strategy given"):
        compare("sgd-heavy-tail", [], steps=5)
    with pytest.raises(KeyError, match=r"unknown task 'rnn'.*rnn-addition/violent"):
        compare("rnn", ["none"], steps=5)


def test_table_and_verdicts_say_what_happened():
    result = compare("rnn-addition/violent", ["none", "fixed-good", "fixed-high"], steps=120)
    text = render.table(result)
    assert "no clipping" in text and "fixed 0.3 (good)" in text and "validation MSE" in text
    none = result.rows[0]
    assert none.diverged and none.steps < 120  # the weights blew up: the run stopped
    said = " ".join(render.verdicts(result))
    assert f"non-finite after {none.steps} steps" in said
    assert "too high (fixed 10 (high))" in said


def test_the_task_runs_on_the_device_it_is_given():
    cpu = run("adam-spikes", gradclip.NormClip(0.1), steps=10, device="cpu")
    default = run("adam-spikes", gradclip.NormClip(0.1), steps=10)
    assert cpu.losses == default.losses
    meta = torch.device("meta")
    with pytest.raises((NotImplementedError, RuntimeError)):  # a device is really used
        run("adam-spikes", gradclip.NormClip(0.1), steps=2, device=meta)


def test_the_demo_steps_clippers_through_the_optimizer():
    """On the Muon task the demo's clippers see the optimizer (their records show the Muon
    group left out), also when a monitor records them."""
    seen = []

    def record(name, clipper):
        return lambda stats: seen.append((name, stats.groups)) or stats

    compare("muon-adamw", ["fixed-good", "adaptive"], steps=3, record=record)
    assert [name for name, _ in seen] == ["fixed-good"] * 3 + ["adaptive"] * 3
    assert all(groups is not None and groups.excluded == (True, False) for _, groups in seen)



@pytest.mark.parametrize(
    ("key", "kind"),
    [("adam-spikes", torch.optim.Adam), ("sgd-heavy-tail", torch.optim.SGD),
     ("cnn-digits/adamw", torch.optim.AdamW), ("muon-adamw", torch.optim.AdamW)],
)
@pytest.mark.parametrize("name", ["adaptive", "adaptive-skip"])
def test_the_demo_builds_adaptive_clip_given_the_task_s_optimizer(key, kind, name):
    """The demo shows the recommended default, ``AdaptiveClip(optimizer=...)`` given the
    optimizer the task trains with (Muon + AdamW: both normalise), not the SGD rule."""
    built = []
    compare(key, [name], steps=1, record=lambda strategy, clipper: built.append(clipper) or (lambda s: s))
    options = {"spikes": "skip"} if name == "adaptive-skip" else {}
    p = torch.nn.Parameter(torch.zeros(2))
    expected = gradclip.AdaptiveClip(optimizer=kind([p], lr=0.1), **options)
    assert built[0].config() == expected.config()
    assert built[0].plateau is (kind is torch.optim.SGD)
