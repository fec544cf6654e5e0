"""benchmarks/bench_quality.py: the verdicts drawn from the records (no training here, except
one tiny run of the skip strategy)."""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))
import bench_quality as bq


def _record(task: str, strategy: str, seed: int, metric: float, skip_rate: float = 0.0) -> bq.Record:
    return bq.Record(task, strategy, seed, metric, False, 100, 0, 0.5, 1.0, 0.1, skip_rate)


def _records(task: str, medians: dict[str, float], skip_rate: float = 0.0) -> list[bq.Record]:
    return [_record(task, s, seed, m * (1 + 0.01 * seed), skip_rate if "skip" in s else 0.0)
            for s, m in medians.items() for seed in range(3)]  # fmt: skip


def test_spike_tasks_compare_the_skip_defaults_with_the_best_fixed() -> None:
    records = _records("adam-spikes", {"fixed 0.1": 1.0, "fixed 1": 2.0, "skip": 1.2,
                                       bq.OURS: 1.1, bq.OURS_SKIP: 0.9}, skip_rate=0.001)  # fmt: skip
    records += _records("sgd-label-noise", {"fixed 0.1": 1.0, "skip": 0.2, bq.OURS_SKIP: 1.3})
    summary = bq.summarize(records)
    adam, label = summary.tasks
    assert adam.spike_passes is True and "0.90x the best fixed" in adam.spike_why
    assert "skip alone 1.20x" in adam.spike_why and "0.10% of steps" in adam.spike_why
    assert label.spike_passes is False
    assert summary.spikes_passed is False
    assert "FAIL  sgd-label-noise" in bq.render(summary)


def test_other_tasks_check_how_often_it_fires_and_what_it_changes() -> None:
    quiet = _records("sgd-heavy-tail", {bq.OURS: 1.0, bq.OURS_SKIP: 1.01}, skip_rate=0.002)
    loud = _records("rnn-addition/violent", {bq.OURS: 1.0, bq.OURS_SKIP: 1.0}, skip_rate=0.02)
    moved = _records("rnn-addition/moderate", {bq.OURS: 1.0, bq.OURS_SKIP: 1.05}, skip_rate=0.002)
    better = _records("sgd-label-noise-x", {bq.OURS: 1.0, bq.OURS_SKIP: 0.5}, skip_rate=0.002)
    verdicts = {t.task: t.spike_passes for t in bq.summarize(quiet + loud + moved + better).tasks}
    assert verdicts == {"sgd-heavy-tail": True, "rnn-addition/violent": False,
                        "rnn-addition/moderate": False, "sgd-label-noise-x": True}  # fmt: skip


def test_the_skip_strategies_run_and_report_their_skip_rate() -> None:
    table = bq.strategies()
    assert table[bq.SKIP]().spikes.policy == "skip"
    assert isinstance(table[bq.OURS_SKIP](), bq.gradclip.AdaptiveClip)
    record = bq.run_one("sgd-label-noise", bq.SKIP, seed=0, quick=True)
    direct = bq.run("sgd-label-noise", table[bq.SKIP](), seed=0, quick=True)
    assert record.skip_rate == direct.skipped_steps / direct.steps and record.metric == direct.metric
