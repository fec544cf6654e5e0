"""GradMonitor: per-layer norms, flags, flushing, sinks, summary, and no host read per step.

References are computed here, independently: per-layer norms are ``torch.linalg.vector_norm``
of the concatenated gradients of each module (grouped by a hand-written table, not by
:func:`gradclip.monitor.layer_name`), totals are float64 norms of all gradients, and the clip
coefficient is torch's rule applied by ``torch.nn.utils.clip_grad_norm_`` on a copy.
"""

from __future__ import annotations

import csv
import dataclasses
import json
import math
import statistics
import subprocess
import sys

import pytest
import torch

import gradclip
from gradclip.monitor import layer_name
from gradclip.readlog import read_log
from host_reads import HostReadDetector

pytestmark = pytest.mark.usefixtures("one_thread")


class Net(torch.nn.Module):
    """Leaf modules at two depths, and one parameter on the root."""

    def __init__(self):
        super().__init__()
        self.embed = torch.nn.Linear(6, 8)
        self.block = torch.nn.Sequential(
            torch.nn.Linear(8, 8), torch.nn.LayerNorm(8), torch.nn.Linear(8, 8)
        )
        self.head = torch.nn.Linear(8, 2)
        self.scale = torch.nn.Parameter(torch.ones(2))

    def forward(self, x):
        return self.head(torch.tanh(self.block(self.embed(x)))) * self.scale


# Which parameters form each layer, written out by hand (depth None, and depth 1).
LAYERS = {
    None: {
        "embed": ["embed.weight", "embed.bias"],
        "block.0": ["block.0.weight", "block.0.bias"],
        "block.1": ["block.1.weight", "block.1.bias"],
        "block.2": ["block.2.weight", "block.2.bias"],
        "head": ["head.weight", "head.bias"],
        "scale": ["scale"],
    },
    1: {
        "embed": ["embed.weight", "embed.bias"],
        "block": [f"block.{i}.{k}" for i in range(3) for k in ("weight", "bias")],
        "head": ["head.weight", "head.bias"],
        "scale": ["scale"],
    },
}


def backward(model, seed, scale=1.0):
    gen = torch.Generator().manual_seed(seed)
    model.zero_grad()
    out = model(torch.randn(16, 6, generator=gen))
    (out.pow(2).mean() * scale).backward()


def grads_by_name(model):
    return {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}


def reference_layers(grads, depth, p):
    return {
        layer: torch.linalg.vector_norm(torch.cat([grads[n].flatten() for n in names]).double(), p).item()
        for layer, names in LAYERS[depth].items()
    }


def reference_total(grads, p):
    flat = torch.cat([g.flatten() for g in grads.values()]).double()
    return torch.linalg.vector_norm(flat, p).item()


@pytest.mark.parametrize("depth", [None, 1])
@pytest.mark.parametrize("p", [2.0, 1.0, math.inf, 0.5])
def test_layer_and_total_norms_match_independent_norms(depth, p):
    torch.manual_seed(0)
    model = Net()
    records = []
    expected = []
    mon = gradclip.GradMonitor(gradclip.NormClip(0.05, norm_type=p), model, sinks=records.append,
                               every=3, depth=depth)  # fmt: skip
    for step in range(7):
        backward(model, step, scale=10.0 ** (step % 3 - 1))
        grads = grads_by_name(model)
        twin = [g.clone() for g in grads.values()]
        params = [torch.nn.Parameter(torch.zeros_like(g)) for g in twin]
        for q, g in zip(params, twin, strict=True):
            q.grad = g
        torch_total = torch.nn.utils.clip_grad_norm_(params, 0.05, p).item()
        expected.append((reference_layers(grads, depth, p), reference_total(grads, p), torch_total))
        mon()
    mon.close()
    assert len(records) == 7
    for record, (layers, total, torch_total) in zip(records, expected, strict=True):
        assert set(record["layers"]) == set(layers)
        for name, value in layers.items():
            assert record["layers"][name] == pytest.approx(value, rel=1e-5), name
        assert record["norm"] == pytest.approx(total, rel=1e-5)
        coef = min(1.0, 0.05 / (torch_total + 1e-6))  # torch's rule on torch's own norm
        assert record["coef"] == pytest.approx(coef, rel=1e-5)
        assert record["post_norm"] == pytest.approx(total * coef, rel=1e-5)
        assert record["threshold"] == pytest.approx(0.05)
        assert record["clipped"] == (coef < 1)
        assert (record["finite"], record["skipped"], record["norm_type"]) == (True, False, p)


def test_layer_name_depth():
    assert layer_name("a.b.c.weight") == "a.b.c"
    assert layer_name("a.b.c.weight", 1) == "a"
    assert layer_name("a.b.c.weight", 5) == "a.b.c"
    assert layer_name("scale", 2) == "scale"


def test_flushes_every_n_steps_and_on_close(tmp_path):
    model = Net()
    batches = []

    class Recorder(gradclip.Sink):
        def write(self, records):
            batches.append([r["step"] for r in records])

    mon = gradclip.GradMonitor(gradclip.NormClip(1.0), model, sinks=Recorder(), every=4)
    for step in range(10):
        backward(model, step)
        mon()
        # a full buffer is written when the next step arrives, so log() can still reach it
        assert len(batches) == step // 4
    mon.close()
    assert batches == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9]]
    mon.close()  # twice is fine
    with pytest.raises(RuntimeError, match="closed"):
        mon.record(torch.tensor(1.0))


@pytest.mark.parametrize("p", [2.0, math.inf])
def test_no_host_read_except_the_flush(accelerator_path, p):
    model = Net()
    records = []
    mon = gradclip.GradMonitor(gradclip.NormClip(0.1, norm_type=p), model, sinks=records.append,
                               every=5)  # fmt: skip
    for step in range(11):
        backward(model, step)
        with HostReadDetector() as detector:
            mon(loss=torch.tensor(float(step)), lr=0.1)
            mon.log(update=torch.tensor(2.0))
        # steps 0-4 fill the buffer; step 5 flushes them, step 10 flushes 5-9
        assert detector.reads == (["Tensor.tolist"] if step in (5, 10) else []), step
    with HostReadDetector() as detector:
        mon.flush()
    assert detector.reads == ["Tensor.tolist"]
    assert [r["step"] for r in records] == list(range(11))
    assert [r["extra"] for r in records[:2]] == [
        {"loss": 0.0, "lr": 0.1, "update": 2.0}, {"loss": 1.0, "lr": 0.1, "update": 2.0}
    ]


def test_record_a_drop_in_total_norm():
    model = Net()
    records = []
    mon = gradclip.GradMonitor(sinks=records.append)
    norms = []
    for step in range(4):
        backward(model, step, scale=10.0**step)
        total = gradclip.clip_grad_norm_(model.parameters(), 0.5)
        norms.append(total.item())
        mon.record(total, max_norm=0.5, step=100 + step, loss=1.5)
    mon.close()
    assert [r["step"] for r in records] == [100, 101, 102, 103]
    for r, n in zip(records, norms, strict=True):
        coef = min(1.0, 0.5 / (n + 1e-6))
        assert (r["norm"], r["coef"], r["threshold"]) == pytest.approx((n, coef, 0.5))
        assert r["clipped"] == (coef < 1) and r["layers"] == {} and r["extra"] == {"loss": 1.5}


def test_monitor_without_clipper_explains():
    with pytest.raises(ValueError, match=r"GradMonitor\(clipper, model\)"):
        gradclip.GradMonitor()()
    with pytest.raises(ValueError, match="every"):
        gradclip.GradMonitor(every=0)
    with pytest.raises(ValueError, match="depth"):
        gradclip.GradMonitor(depth=0)
    with pytest.raises(TypeError, match="Clipper"):
        gradclip.GradMonitor(torch.nn.utils.clip_grad_norm_)
    with pytest.raises(RuntimeError, match="record one first"):
        gradclip.GradMonitor().log(loss=1.0)
    with pytest.raises(TypeError, match="ClipStats"):
        gradclip.GradMonitor().record(1.0)


@pytest.mark.parametrize("policy", ["propagate", "skip"])
def test_nonfinite_layer_is_named_and_summary_counts(policy):
    model = Net()
    mon = gradclip.GradMonitor(gradclip.NormClip(0.2, nonfinite=policy), model, every=3)
    norms, clipped = [], []
    for step in range(8):
        backward(model, step)
        if step in (4, 6):
            model.block[2].weight.grad[0, 0] = math.nan if step == 4 else math.inf
        grads = grads_by_name(model)
        total = reference_total(grads, 2.0)
        norms.append(total)
        clipped.append(math.isfinite(total) and total + 1e-6 > 0.2)
        mon()
        model.zero_grad()
    s = mon.summary(top=2)
    assert s.steps == 8 and s.nonfinite_steps == 2
    assert s.skipped_steps == (2 if policy == "skip" else 0)
    assert s.first_nonfinite.step == 4 and s.first_nonfinite.layers == ("block.2",)
    assert s.nonfinite_layers == {"block.2": 4}
    finite = [n for n in norms if math.isfinite(n)]
    assert s.norm_percentiles["p50"] == pytest.approx(statistics.median(finite), rel=1e-5)
    assert s.norm_percentiles["max"] == pytest.approx(max(finite), rel=1e-5)
    if policy == "skip":  # a skipped step is not clipped; propagate scales by NaN/0
        assert s.clip_rate == pytest.approx(sum(clipped) / 8)
    assert len(s.top_layers) == 2 and s.top_layers[0].max >= s.top_layers[1].max
    assert "first non-finite at step 4: block.2" in s.to_text()


def test_top_layers_rank_by_largest_norm():
    model = Net()
    mon = gradclip.GradMonitor(gradclip.NormClip(1e9), model, every=2)
    peaks: dict[str, float] = {}
    for step in range(5):
        backward(model, step)
        for layer, value in reference_layers(grads_by_name(model), None, 2.0).items():
            peaks[layer] = max(value, peaks.get(layer, 0.0))
        mon()
    top = mon.summary(top=3).top_layers
    expected = sorted(peaks, key=peaks.get, reverse=True)[:3]
    assert [t.name for t in top] == expected
    assert [t.max for t in top] == pytest.approx([peaks[n] for n in expected], rel=1e-5)


def test_parameter_set_change_regroups_layers():
    a, b = Net(), torch.nn.Linear(3, 1)
    records = []
    clipper = gradclip.NormClip(1.0)
    mon = gradclip.GradMonitor(clipper, sinks=records.append, every=10)
    backward(a, 0)
    mon(a)
    b(torch.ones(2, 3)).sum().backward()
    mon(b)
    mon.close()
    assert set(records[0]["layers"]) == set(LAYERS[None])
    assert set(records[1]["layers"]) == {"weight", "bias"}  # root parameters: their own layer


def test_jsonl_log_is_strict_json_with_schema(tmp_path):
    model = Net()
    path = tmp_path / "run.jsonl"
    with gradclip.GradMonitor(gradclip.NormClip(0.1), model, log=path, every=2) as mon:
        for step in range(5):
            backward(model, step)
            if step == 3:
                model.head.bias.grad[0] = math.inf
            mon(loss=float(step))
    lines = path.read_text().splitlines()
    assert len(lines) == 5

    def reject(name):
        raise AssertionError(f"non-standard JSON constant {name}")

    records = [json.loads(line, parse_constant=reject) for line in lines]
    assert {r["schema"] for r in records} == {gradclip.sinks.SCHEMA_VERSION}
    assert records[3]["norm"] == "Infinity" and records[3]["layers"]["head"] == "Infinity"
    history = read_log(path)
    assert history.problems == () and len(history) == 5
    assert history.extras["loss"].tolist() == [0.0, 1.0, 2.0, 3.0, 4.0]
    assert math.isinf(history.norm[3]) and not history.finite[3]


def test_a_crash_leaves_complete_lines(tmp_path):
    path = tmp_path / "crash.jsonl"
    script = f"""
import os, torch, gradclip
model = torch.nn.Linear(4, 2)
mon = gradclip.GradMonitor(gradclip.NormClip(1.0), model, log={str(path)!r}, every=10)
for step in range(25):
    model(torch.randn(3, 4)).sum().backward()
    mon()
os._exit(1)  # dies without closing: steps 20-24 were never flushed
"""
    subprocess.run([sys.executable, "-c", script], check=False, timeout=120)
    text = path.read_text()
    assert text.endswith("\n")
    history = read_log(path)
    assert history.problems == ()
    assert history.steps.tolist() == list(range(20))


def test_csv_sink(tmp_path):
    model = Net()
    path = tmp_path / "run.csv"
    with gradclip.GradMonitor(gradclip.NormClip(0.1), model, log=path, every=2) as mon:
        for step in range(3):
            backward(model, step)
            mon(loss=1.0)
    rows = list(csv.DictReader(path.open()))
    assert len(rows) == 3
    assert {"step", "norm", "clipped", "layer:block.0", "extra:loss"} <= set(rows[0])
    assert [int(r["step"]) for r in rows] == [0, 1, 2]


def test_tensorboard_sink(tmp_path):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    model = Net()
    sink = gradclip.TensorBoardSink(tmp_path / "tb")
    norms = []
    with gradclip.GradMonitor(gradclip.NormClip(0.1), model, sinks=sink, every=2) as mon:
        for step in range(3):
            backward(model, step)
            norms.append(reference_total(grads_by_name(model), 2.0))
            mon(loss=float(step))
    acc = EventAccumulator(str(tmp_path / "tb"))
    acc.Reload()
    tags = acc.Tags()["scalars"]
    assert {"grad/norm", "grad/clipped", "grad_layer/head", "extra/loss"} <= set(tags)
    assert [e.value for e in acc.Scalars("grad/norm")] == pytest.approx(norms, rel=1e-5)


def test_step_clips_records_and_steps_the_optimizer():
    model = Net()
    before = [p.detach().clone() for p in model.parameters()]
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    mon = gradclip.GradMonitor(gradclip.NormClip(1e-3, nonfinite="skip"), model)
    backward(model, 0)
    mon.step(opt, loss=2.0)
    moved = [not torch.equal(a, p) for a, p in zip(before, model.parameters(), strict=True)]
    assert all(moved)
    backward(model, 1)
    model.head.weight.grad[0, 0] = math.nan
    after_first = [p.detach().clone() for p in model.parameters()]
    mon.step(opt)  # skipped: the weights stay
    assert all(torch.equal(a, p) for a, p in zip(after_first, model.parameters(), strict=True))
    s = mon.summary()
    assert (s.steps, s.clipped_steps, s.skipped_steps) == (2, 1, 1)


def test_the_log_names_the_optimizer_the_monitor_steps(tmp_path):
    """``step`` writes the optimizer's kind to the records, in both formats, so that a
    recommendation read from the log follows it; ``optimizer=`` and ``record`` say it too."""
    model = Net()
    jsonl, csvp = tmp_path / "run.jsonl", tmp_path / "run.csv"
    adamw = torch.optim.AdamW(model.parameters(), lr=1e-3)
    with gradclip.GradMonitor(gradclip.NormClip(0.1), model, log=jsonl, sinks=[csvp], every=2) as mon:
        for step in range(3):
            backward(model, step)
            mon.step(adamw, loss=1.0)
    written = [json.loads(line) for line in jsonl.read_text().splitlines()]
    assert {(r["optimizer"], r["normalising"]) for r in written} == {("AdamW", True)}
    for path in (jsonl, csvp):
        h = read_log(path)
        assert (h.optimizer, h.normalising, h.problems) == ("AdamW", True, ())
    assert mon.history().optimizer == "AdamW"
    # given at construction (record() users), and changed by record(optimizer=...)
    sgd = torch.optim.SGD(model.parameters(), lr=0.1)
    records = []
    mon = gradclip.GradMonitor(gradclip.NormClip(0.1), model, sinks=records.append,
                               optimizer=[sgd, adamw], every=1)  # fmt: skip
    backward(model, 0)
    mon()
    backward(model, 1)
    mon.record(gradclip.NormClip(0.1)(model), optimizer=adamw)
    mon.close()
    assert [(r["optimizer"], r["normalising"]) for r in records] == [("SGD+AdamW", False), ("AdamW", True)]
    # not said: no field, and the history says None
    records.clear()
    with gradclip.GradMonitor(gradclip.NormClip(0.1), model, sinks=records.append) as mon:
        backward(model, 2)
        mon()
    assert "optimizer" not in records[0] and mon.history().optimizer is None


def test_a_stepped_wrapper_of_unknown_kind_is_not_named():
    model = Net()
    inner = torch.optim.SGD(model.parameters(), lr=0.1)

    class Stepper:  # steps an optimizer, as a framework's wrapper does; not a torch.optim one
        param_groups = inner.param_groups

        def step(self):
            inner.step()

    records = []
    with gradclip.GradMonitor(gradclip.NormClip(0.1), model, sinks=records.append) as mon:
        backward(model, 0)
        mon.step(Stepper())
    assert len(records) == 1 and "optimizer" not in records[0]


def test_a_bad_optimizer_is_named_and_records_nothing():
    model = Net()
    with pytest.raises(TypeError, match=r"`optimizer` must be a torch.optim.Optimizer.*got int"):
        gradclip.GradMonitor(gradclip.NormClip(0.1), model, optimizer=3)
    with pytest.raises(ValueError, match=r"`optimizer`='Lion' names no torch.optim optimizer"):
        gradclip.GradMonitor(gradclip.NormClip(0.1), model, optimizer="Lion")
    named = gradclip.GradMonitor(gradclip.NormClip(0.1), model, optimizer="adamw", sinks=lambda r: None)
    backward(model, 0)
    named()
    named.close()
    assert (named.history().optimizer, named.history().normalising) == ("AdamW", True)
    records = []
    with gradclip.GradMonitor(gradclip.NormClip(0.1), model, sinks=records.append) as mon:
        backward(model, 0)
        stats = gradclip.NormClip(0.1)(model)
        with pytest.raises(TypeError, match="`optimizer` must be"):
            mon.record(stats, optimizer=3)
    assert records == []


def test_empty_summary():
    s = gradclip.GradMonitor().summary()
    assert (s.steps, s.clip_rate, s.norm_percentiles, s.top_layers) == (0, 0.0, {}, ())
    assert s.first_nonfinite is None and s.threshold is None


# -- a changing parameter set: mixture of experts -----------------------------------------


class TopTwoMoE(torch.nn.Module):
    """Each token goes to its 2 best experts (of 6); an expert no token chose gets no gradient,
    so the set of parameters with gradients changes from step to step."""

    def __init__(self, d=8, experts=6):
        super().__init__()
        self.router = torch.nn.Linear(d, experts)
        self.experts = torch.nn.ModuleList(torch.nn.Linear(d, d) for _ in range(experts))
        self.head = torch.nn.Linear(d, 1)

    def forward(self, x):
        weights, chosen = self.router(x).softmax(-1).topk(2, dim=-1)
        out = torch.zeros_like(x)
        for e, expert in enumerate(self.experts):
            routed = (chosen == e).any(-1)
            if routed.any():
                w = (weights * (chosen == e)).sum(-1, keepdim=True)[routed]
                out[routed] = out[routed] + w * expert(x[routed])
        return self.head(out)


def moe_layer_norms(model):
    """Reference per-module 2-norms of the gradients that exist this step."""
    by_layer: dict[str, list[torch.Tensor]] = {}
    for name, p in model.named_parameters():
        if p.grad is not None:
            by_layer.setdefault(name.rsplit(".", 1)[0], []).append(p.grad.flatten().double())
    return {k: torch.linalg.vector_norm(torch.cat(v)).item() for k, v in by_layer.items()}


def test_a_changing_parameter_set_costs_no_flush_and_no_host_read(accelerator_path):
    torch.manual_seed(0)
    model = TopTwoMoE()
    clipper = gradclip.NormClip(0.5)
    batches, expected, sets = [], [], set()

    class Recorder(gradclip.Sink):
        def write(self, records):
            batches.append(list(records))

    mon = gradclip.GradMonitor(sinks=Recorder(), every=10)
    for step in range(25):
        model.zero_grad(set_to_none=True)
        model(torch.randn(2, 8)).pow(2).sum().backward()  # 2 tokens: at most 4 experts
        expected.append(moe_layer_norms(model))
        stats = clipper(model)
        sets.add(stats.names)
        with HostReadDetector() as detector:
            mon.record(stats)
        # only the records that find a full buffer flush it: steps 10 and 20
        assert detector.reads == (["Tensor.tolist"] if step in (10, 20) else []), step
    mon.close()
    assert len(sets) >= 5  # the parameter set did change, again and again
    assert [len(b) for b in batches] == [10, 10, 5]
    records = [r for b in batches for r in b]
    for record, layers in zip(records, expected, strict=True):
        assert set(record["layers"]) == set(layers)  # absent experts are absent, not 0
        for name, value in layers.items():
            assert record["layers"][name] == pytest.approx(value, rel=1e-5), name


# -- a failed record() records nothing ------------------------------------------------------


def test_a_record_that_raises_changes_nothing():
    model = Net()
    clipper = gradclip.NormClip(0.05)
    records = []
    mon = gradclip.GradMonitor(sinks=records.append, every=4)
    expected = []
    bad_calls = [
        (dict(loss="abc"), TypeError, "scalar `loss`"),
        (dict(loss=torch.ones(2)), ValueError, "one real number"),
        (dict(loss=None), TypeError, "scalar `loss`"),
        (dict(step=-1), ValueError, "`step`"),
        (dict(step=True), TypeError, "`step`"),
        (dict(step=2**60), ValueError, "2\\*\\*53"),
        (dict(step=torch.tensor(1.5)), ValueError, "`step`"),
    ]
    for step in range(6):
        backward(model, step, scale=10.0 ** (step % 3 - 1))
        grads = grads_by_name(model)
        stats = clipper(model)
        kwargs, error, words = bad_calls[step % len(bad_calls)]
        with pytest.raises(error, match=words):
            mon.record(stats, lr=0.1, **kwargs)  # lr is fine: the call fails on the other one
        broken = dataclasses.replace(stats, names=stats.names[:-1])
        with pytest.raises(ValueError, match="names for"):
            mon.record(broken, lr=0.1)
        mon.record(stats, lr=0.5)
        expected.append((reference_layers(grads, None, 2.0), reference_total(grads, 2.0)))
    mon.close()
    assert [r["step"] for r in records] == list(range(6))  # failed calls used no step number
    for record, (layers, total) in zip(records, expected, strict=True):
        assert record["extra"] == {"lr": 0.5}
        assert record["norm"] == pytest.approx(total, rel=1e-5)
        for name, value in layers.items():  # no partial sums left by the failed calls
            assert record["layers"][name] == pytest.approx(value, rel=1e-5), name


# -- torch.compile -----------------------------------------------------------------------------

NAMES = ("embed.weight", "embed.bias", "block.0.weight", "block.1.weight", "head.weight")


def stats_from(per_tensor, max_norm):
    """A ClipStats built from tensors with torch's rule, as a clipper would return it."""
    total = per_tensor.pow(2).sum().sqrt()
    coef = torch.clamp(max_norm / (total + 1e-6), max=1.0)
    return gradclip.ClipStats(
        total, total * coef, torch.full_like(total, max_norm), coef, coef < 1,
        torch.isfinite(total), torch.zeros_like(total, dtype=torch.bool),
        gradclip.GradNorms([], per_tensor, total, 2.0, per_tensor.dtype, {}), NAMES,
    )  # fmt: skip


def record_and_log(monitor, stats, step, loss):
    """One training step's monitoring: the clip's stats with the step and loss, then the
    update size attached after the optimizer step."""
    monitor.record(stats, step=step, loss=loss)
    monitor.log(update=loss * 2)


def test_a_compiled_record_writes_the_eager_log_and_compiles_once():
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    eager_records, compiled_records = [], []
    eager = gradclip.GradMonitor(sinks=eager_records.append, every=3)
    compiled = gradclip.GradMonitor(sinks=compiled_records.append, every=3)
    record = torch.compile(compiled.record, fullgraph=True)
    step_fn = torch.compile(record_and_log, fullgraph=True)
    gen = torch.Generator().manual_seed(0)
    for step in range(8):
        stats = stats_from(torch.rand(5, generator=gen) * 10.0 ** (step % 3 - 1), 1.0)
        loss = torch.tensor(1.0 / (step + 1))
        eager.record(stats, loss=loss)
        record(stats, loss=loss)
        if step % 3 == 2:
            compiled.flush()  # the flush stays outside the compiled code
    for step in range(8, 12):  # a step number and a scalar attached after record()
        stats = stats_from(torch.rand(5, generator=gen), 1.0)
        record_and_log(eager, stats, torch.tensor(10 * step), torch.tensor(float(step)))
        step_fn(compiled, stats, torch.tensor(10 * step), torch.tensor(float(step)))
        if step % 3 == 2:
            compiled.flush()
    eager.close()
    compiled.close()
    assert counters["stats"]["unique_graphs"] == 2 and not counters["graph_break"]  # 1 each
    assert len(compiled_records) == len(eager_records) == 12
    for got, want in zip(compiled_records, eager_records, strict=True):
        assert math.isnan(got.pop("time")) and want.pop("time") > 0  # no clock in a graph
        assert got == want
    assert [r["step"] for r in eager_records] == [*range(8), 80, 90, 100, 110]
    assert eager_records[-1]["extra"] == {"loss": 11.0, "update": 22.0}
    assert compiled.summary() == eager.summary()


def test_a_compiled_step_never_reallocates_buffers_unseen():
    got = []
    mon = gradclip.GradMonitor(sinks=got.append, every=4)
    mon.record(stats_from(torch.ones(5), 1.0))  # eager: room for 16 layers
    wide = dataclasses.replace(stats_from(torch.ones(40), 1.0),
                               names=tuple(f"l{i}.weight" for i in range(40)))  # fmt: skip
    with pytest.raises(RuntimeError, match="record one step of this model eagerly first"):
        torch.compile(mon.record, fullgraph=True)(wide)
    mon.record(wide)  # eagerly the buffers grow
    torch.compile(mon.record, fullgraph=True)(wide)
    mon.close()
    assert [len(r["layers"]) for r in got] == [4, 40, 40]


def test_too_many_compiled_steps_between_flushes_are_named():
    compiled_records = []
    mon = gradclip.GradMonitor(sinks=compiled_records.append, every=4)
    record = torch.compile(mon.record, fullgraph=True)
    norms = [torch.full((5,), float(i)) for i in range(7)]
    for pt in norms:
        record(stats_from(pt, 1.0))
    with pytest.warns(UserWarning, match="7 steps were recorded since the last flush.*oldest 3"):
        mon.flush()
    # the last `every` steps, in order
    assert [r["step"] for r in compiled_records] == [3, 4, 5, 6]
    assert [r["norm"] for r in compiled_records] == pytest.approx(
        [torch.linalg.vector_norm(pt).item() for pt in norms[3:]]
    )
