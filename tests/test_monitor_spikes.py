"""Spikes in the monitor's log: the schema's spike fields, the forensics of a spike step (by
layer), the loss handed to the detector, logs written before the fields existed, and the
report's view of them."""

from __future__ import annotations

import json
import math

import pytest
import torch

import gradclip
from gradclip.records import decode_line, flat_record


def _model() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Tanh(), torch.nn.Linear(8, 1))


def _train(monitor: gradclip.GradMonitor, steps: int, glitch: dict[int, float], seed: int = 0,
           optimizer: torch.optim.Optimizer | None = None) -> list[float]:
    """Regression steps; the targets of the steps in ``glitch`` are multiplied."""
    model = monitor.module
    opt = optimizer or torch.optim.SGD(model.parameters(), lr=0.01)
    gen = torch.Generator().manual_seed(seed)
    losses = []
    for i in range(steps):
        opt.zero_grad()
        x = torch.randn(16, 4, generator=gen)
        y = x.sum(1, keepdim=True) * glitch.get(i, 1.0)
        loss = (model(x) - y).pow(2).mean()
        loss.backward()
        monitor.step(opt, loss=loss)
        losses.append(float(loss.detach()))
    return losses


def test_a_spike_step_carries_its_forensics_by_layer(tmp_path) -> None:
    records: list[dict] = []
    detector = gradclip.SpikeDetector(warmup=20)
    path = tmp_path / "run.jsonl"
    with gradclip.GradMonitor(gradclip.NormClip(10.0, spikes=detector), _model(),
                              log=path, sinks=records.append, every=8) as mon:
        _train(mon, 30, {25: 1000.0})
    assert [r["spike"] for r in records] == [i == 25 for i in range(30)]
    assert all(("forensics" in r) == r["spike"] for r in records)
    spike = records[25]
    assert spike["skipped"] and math.isfinite(spike["spike_bound"]) and spike["norm"] > spike["spike_bound"]
    assert spike["spike_score"] == pytest.approx(1 / 26)
    forensics = spike["forensics"]
    assert set(forensics["layers"]) == {"0", "2"}  # the monitor's layers, not parameters
    assert set(forensics["max_abs"]) == {"0", "2"} and forensics["nonfinite"] == []
    # the log reads back with the same forensics, and the history lists the spike
    history = gradclip.read_log(path)
    assert history.problems == () and history.spike.tolist() == [i == 25 for i in range(30)]
    (event,) = history.spike_events()
    assert event.step == 25 and event.skipped and event.layers == dict(
        sorted(forensics["layers"].items(), key=lambda kv: -kv[1]))
    assert event.max_abs == forensics["max_abs"] and event.loss == spike["extra"]["loss"]
    assert mon.summary().spike_steps == 1 and "spikes: 1" in mon.summary().to_text()


def test_without_a_detector_the_fields_say_so() -> None:
    records: list[dict] = []
    with gradclip.GradMonitor(gradclip.NormClip(10.0), _model(), sinks=records.append) as mon:
        _train(mon, 3, {})
    for r in records:
        assert (r["spike"], r["spike_score"], r["spike_bound"]) == (False, 0.0, math.inf)
        assert "forensics" not in r


def test_the_loss_reaches_the_detector() -> None:
    """A loss spike with an ordinary gradient norm: only the loss can tell."""
    clipper = gradclip.NormClip(10.0, spikes=gradclip.SpikeDetector("off", warmup=20))
    records: list[dict] = []
    with gradclip.GradMonitor(clipper, _model(), sinks=records.append) as mon:
        model = mon.module
        for i in range(30):
            model.zero_grad()
            x = torch.randn(16, 4, generator=torch.Generator().manual_seed(i))
            loss = (model(x) - 1).pow(2).mean()
            loss.backward()
            mon(loss=loss.detach() + (1e3 if i == 25 else 0.0))
    assert [r["spike"] for r in records] == [i == 25 for i in range(30)]


def test_on_accelerators_the_log_names_the_layers_from_the_device(accelerator_path) -> None:
    """No host read of the decision: the record's forensics are the detector's top layers,
    written on the device; max-abs and non-finite layers need the host and are left out."""
    records: list[dict] = []
    with gradclip.GradMonitor(gradclip.NormClip(10.0, spikes=gradclip.SpikeDetector(warmup=20)),
                              _model(), sinks=records.append, every=50) as mon:
        opt = torch.optim.AdamW(mon.module.parameters(), lr=1e-3, fused=True)
        _train(mon, 30, {25: 1000.0}, optimizer=opt)
    spike = records[25]
    assert spike["spike"] and spike["skipped"]
    assert set(spike["forensics"]["layers"]) == {"0", "2"}
    assert spike["forensics"]["max_abs"] == {} and "rank" not in spike["forensics"]


def test_old_logs_read_as_without_a_detector(tmp_path) -> None:
    line = ('{"schema": 1, "step": 4, "norm": 2.0, "post_norm": 1.0, "threshold": 1.0, '
            '"coef": 0.5, "clipped": true, "finite": true, "skipped": false}')
    record = decode_line(line)
    assert (record["spike"], record["spike_score"], record["spike_bound"]) == (False, 0.0, math.inf)
    path = tmp_path / "old.jsonl"
    path.write_text(line + "\n")
    history = gradclip.read_log(path)
    assert history.spike.tolist() == [False] and history.spike_events() == []


@pytest.mark.parametrize("bad,why", [
    ({"layers": {"h": "x"}}, "forensics.layers"),
    ({"nonfinite": "h"}, "forensics.nonfinite"),
    ({"rank": -1}, "forensics.rank"),
    ([1, 2], "forensics"),
])
def test_bad_forensics_are_refused_naming_the_field(bad, why) -> None:
    line = json.dumps({"schema": 1, "step": 4, "norm": 2.0, "post_norm": 1.0, "threshold": 1.0,
                       "coef": 0.5, "clipped": True, "finite": True, "skipped": True,
                       "spike": True, "forensics": bad})  # fmt: skip
    with pytest.raises(ValueError, match=why):
        decode_line(line)


def test_the_csv_log_keeps_the_forensics(tmp_path) -> None:
    jsonl, csvp = tmp_path / "run.jsonl", tmp_path / "run.csv"
    with gradclip.GradMonitor(gradclip.NormClip(10.0, spikes=gradclip.SpikeDetector(warmup=20)),
                              _model(), log=jsonl, sinks=[gradclip.CSVSink(csvp)]) as mon:
        _train(mon, 30, {22: 1000.0, 27: 1e4})
    a, b = gradclip.read_log(jsonl), gradclip.read_log(csvp)
    assert b.problems == () and b.forensics == a.forensics and len(a.forensics) == 2
    torch.testing.assert_close(a.spike_score, b.spike_score)
    row = flat_record({"step": 1, "forensics": {"layers": {"h": math.inf}}})
    assert row == {"step": 1, "forensics": '{"layers": {"h": "Infinity"}}'}


def test_report_lists_each_spike_with_its_layers(tmp_path) -> None:
    pytest.importorskip("matplotlib")
    from gradclip.report import build_report, render_report

    path = tmp_path / "run.jsonl"
    with gradclip.GradMonitor(gradclip.NormClip(10.0, spikes=gradclip.SpikeDetector(warmup=20)),
                              _model(), log=path) as mon:
        _train(mon, 30, {25: 1000.0})
    report = build_report(path)
    assert [e.step for e in report.spike_events] == [25]
    html = render_report(report, tmp_path / "report").html.read_text()
    section = html[html.index("<h2>Spikes</h2>"):]
    assert "<td>25</td>" in section and "<td>True</td>" in section
    event = report.spike_events[0]
    for name, ratio in event.layers.items():
        assert f"{name} ({ratio:.3g}x)" in section
    assert "SpikeScore" in section
    plain = render_report(build_report(gradclip.History.from_norms([1.0, 2.0] * 20)),
                          tmp_path / "plain").html.read_text()
    assert "<h2>Spikes</h2>" not in plain


def test_tensorboard_shows_the_spike_fields_only_with_a_detector(tmp_path) -> None:
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    tags = {}
    for name, spikes in (("with", gradclip.SpikeDetector(warmup=20)), ("without", None)):
        sink = gradclip.TensorBoardSink(tmp_path / name)
        with gradclip.GradMonitor(gradclip.NormClip(10.0, spikes=spikes), _model(), sinks=sink) as mon:
            _train(mon, 30, {25: 1000.0})
        acc = EventAccumulator(str(tmp_path / name))
        acc.Reload()
        tags[name] = set(acc.Tags()["scalars"])
        if spikes is not None:  # the series start once the detector has a bound
            assert [e.step for e in acc.Scalars("grad/spike")] == list(range(20, 30))
            assert [e.value for e in acc.Scalars("grad/spike")] == [float(i == 25) for i in range(20, 30)]
    spike_tags = {"grad/spike", "grad/spike_score", "grad/spike_bound"}
    assert spike_tags <= tags["with"] and not spike_tags & tags["without"]


def test_a_compiled_record_of_a_spike_writes_the_eager_log() -> None:
    """record() of a ClipStats with a detector's fields traces into one graph and writes the
    records the eager call writes, forensics included."""
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    names = ("a.weight", "a.bias", "b.weight")

    def stats(step: int) -> gradclip.ClipStats:
        per = torch.tensor([1.0, 0.5, 2.0]) * (100.0 if step == 4 else 1.0)
        total = per.norm()
        spike = torch.tensor(step == 4)
        return gradclip.ClipStats(
            total, total, torch.tensor(1.0), torch.tensor(1.0), torch.tensor(False),
            torch.tensor(True), spike, gradclip.GradNorms([], per, total, 2.0, per.dtype, {}),
            names, spike=spike, spike_score=torch.tensor(0.1 * step), spike_bound=torch.tensor(5.0),
            spike_top=torch.tensor([2, 0, 1]), spike_ratios=torch.tensor([9.0, 3.0, 1.0]))  # fmt: skip

    eager_records, compiled_records = [], []
    eager = gradclip.GradMonitor(sinks=eager_records.append, every=8)
    compiled = gradclip.GradMonitor(sinks=compiled_records.append, every=8)
    eager.record(stats(0))
    compiled.record(stats(0))  # sized eagerly first
    record = torch.compile(compiled.record, fullgraph=True)
    for step in range(1, 6):
        eager.record(stats(step))
        record(stats(step))
    eager.close()
    compiled.close()
    assert not counters["graph_break"]
    for got, want in zip(compiled_records, eager_records, strict=True):
        got.pop("time"), want.pop("time")
        assert got == want
    assert eager_records[4]["forensics"]["layers"] == {"b": 9.0, "a": 3.0}
