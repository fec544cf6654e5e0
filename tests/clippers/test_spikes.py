"""The spike detector: its rule against a reference written from its definition, the three
policies, what a skipped step leaves untouched (torch's optimizers, fused and foreach), the
cap on spikes in a row, forensics, checkpoints and bad input. The registry
(``registry.py``) also runs every clipper contract with a detector attached."""

from __future__ import annotations

import math
import statistics

import pytest
import torch

import gradclip
from gradclip.clippers import forensics
from host_reads import HostReadDetector


def _norms(n: int, seed: int = 0, spikes: dict[int, float] | None = None) -> list[float]:
    """Log-normal norms near 1 (sigma 0.2), with the given steps multiplied."""
    gen = torch.Generator().manual_seed(seed)
    values = torch.exp(0.2 * torch.randn(n, generator=gen, dtype=torch.float64)).tolist()
    for i, factor in (spikes or {}).items():
        values[i] *= factor
    return values


def _param(norm: float, n: int = 4) -> torch.nn.Parameter:
    p = torch.nn.Parameter(torch.zeros(n))
    p.grad = torch.full((n,), norm / math.sqrt(n))
    return p


def _reference(norms: list[float], losses: list[float | None], window: int, sigma: float,
               warmup: int) -> list[bool]:
    """The rule of the SpikeDetector doc, on the host: a step is a spike when its log norm
    (or its loss) is non-finite or lies more than sigma sample deviations (floored) above
    the mean of the last `window` accepted ones, once `warmup` were accepted; spikes are
    never accepted, nor a zero norm's log; a finite loss is, unless the norm spiked."""
    logs: list[float] = []
    kept: list[float] = []
    out = []
    for norm, loss in zip(norms, losses, strict=True):
        x = math.log(norm) if norm > 0 and math.isfinite(norm) else (math.inf if norm != 0 else -math.inf)
        spike = not math.isfinite(norm)
        recent = logs[-window:]
        if len(logs) >= warmup:
            std = max(statistics.stdev(recent), 0.01)
            spike |= x > statistics.fmean(recent) + sigma * std
        norm_spike = spike
        if loss is not None:
            spike |= not math.isfinite(loss)
            recent = kept[-window:]
            if len(kept) >= warmup:
                if loss > 0 and min(recent) > 0:  # log space, as the norm
                    logs_ = [math.log(v) for v in recent]
                    std = max(statistics.stdev(logs_), 0.01)
                    spike |= loss > math.exp(statistics.fmean(logs_) + sigma * std)
                else:
                    mean = statistics.fmean(recent)
                    std = max(statistics.stdev(recent), 1e-3 * abs(mean) + 1e-12)
                    spike |= loss > mean + sigma * std
        if not spike and norm > 0:
            logs.append(x)
        if loss is not None and math.isfinite(loss) and not norm_spike:
            kept.append(loss)  # a loss-only spike is learnt: the loss may have a new level
        out.append(spike)
    return out


# -- the rule ----------------------------------------------------------------------------


@pytest.mark.parametrize("window,sigma,warmup", [(8, 3.0, 6), (32, 6.0, 20), (16, 2.0, 16)])
def test_decisions_follow_the_rule(window: int, sigma: float, warmup: int) -> None:
    spikes = {30: 50.0, 31: 40.0, 55: 8.0, 70: 1e4, 90: 0.0, 91: math.inf, 110: math.nan}
    norms = _norms(140, spikes=spikes)
    losses: list[float | None] = [2.0 + 0.1 * math.sin(i) for i in range(140)]
    losses[60], losses[100] = 50.0, math.nan
    losses[120:126] = [9.0] * 6  # a new level of the loss: learnt after a few spikes
    losses[80:90] = [-0.5 + 0.01 * i for i in range(10)]  # not all positive: raw losses
    expected = _reference(norms, losses, window, sigma, warmup)
    clipper = gradclip.NormClip(math.inf, spikes=gradclip.SpikeDetector(
        "off", window=window, sigma=sigma, warmup=warmup))
    got = []
    for norm, loss in zip(norms, losses, strict=True):
        got.append(bool(clipper({"w": _param(norm)}, loss=torch.tensor(loss)).spike))
    assert got == expected
    assert sum(expected) >= 6  # the rule was exercised


def test_without_a_loss_only_the_norm_is_judged() -> None:
    norms = _norms(60, spikes={40: 30.0})
    clipper = gradclip.NormClip(math.inf, spikes=gradclip.SpikeDetector("off", warmup=20))
    flags = [bool(clipper({"w": _param(n)}).spike) for n in norms]
    assert flags == _reference(norms, [None] * 60, 128, 6.0, 20)
    assert flags[40] and sum(flags) == 1


def test_a_new_level_of_the_loss_is_learnt_a_glitch_is_not() -> None:
    """A loss that stays 3x higher with ordinary gradients is a new regime: skipped a few
    steps, then normal again (no cap reached); a gradient spike's loss is never learnt."""
    clipper = gradclip.NormClip(math.inf, spikes=gradclip.SpikeDetector(warmup=20, max_skips=10))
    norms = _norms(200, spikes={150: 1e3})
    flags = []
    for i, n in enumerate(norms):
        loss = (1.0 if i < 100 else 3.0) + 0.01 * math.sin(i)
        loss = 1e6 if i == 150 else loss
        flags.append(bool(clipper({"w": _param(n)}, loss=loss).spike))
    shifted = [i for i, f in enumerate(flags) if f and i < 150]
    assert shifted and shifted[0] == 100 and len(shifted) < 10 and shifted[-1] < 110
    assert flags[150] and not any(flags[151:])
    assert float(clipper.spikes.state.losses.max()) < 4.0  # the glitch's loss was not learnt


def test_defaults_are_the_published_ones() -> None:
    detector = gradclip.SpikeDetector()
    assert (detector.policy, detector.window, detector.sigma) == ("skip", 128, 6.0)
    assert detector.warmup == max(20, 128 // 2) and detector.score_window == 10_000
    assert gradclip.SpikeDetector(window=16).warmup == 20
    assert gradclip.NormClip(1.0, spikes="clip").spikes.config() == gradclip.SpikeDetector("clip").config()


def test_nan_and_inf_are_spikes_from_the_first_step() -> None:
    clipper = gradclip.NormClip(1.0, spikes="skip")
    assert bool(clipper({"w": _param(math.nan)}).spike)
    assert bool(clipper({"w": _param(1.0)}, loss=math.inf).spike)
    assert not bool(clipper({"w": _param(1.0)}, loss=1.0).spike)
    stats = clipper({"w": _param(1.0)}, loss=torch.tensor(float("nan")))
    assert bool(stats.spike) and bool(stats.skipped)  # a spike, not a crash


def test_spike_score_is_the_fraction_of_recent_spikes() -> None:
    detector = gradclip.SpikeDetector("off", warmup=20, score_window=25)
    clipper = gradclip.NormClip(math.inf, spikes=detector)
    norms = _norms(80, spikes={i: 100.0 for i in range(30, 80, 7)})
    flags, scores = [], []
    for n in norms:
        stats = clipper({"w": _param(n)})
        flags.append(bool(stats.spike))
        scores.append(float(stats.spike_score))
    for i in range(len(norms)):
        recent = flags[max(0, i - 24) : i + 1]
        assert scores[i] == pytest.approx(sum(recent) / len(recent))


# -- policies ----------------------------------------------------------------------------


def _train(clipper: gradclip.Clipper, norms: list[float]) -> list[dict]:
    out = []
    for i, n in enumerate(norms):
        p = torch.nn.Parameter(torch.zeros(3))
        direction = torch.tensor([1.0, -2.0, 0.5 + 0.01 * i])
        p.grad = direction * (n / float(direction.norm()))
        stats = clipper({"w": p})
        out.append({"stats": stats.to_dict(), "grad": p.grad.clone()})
    return out


def test_off_changes_nothing() -> None:
    norms = _norms(120, spikes={50: 40.0, 80: 1e3})
    plain = _train(gradclip.AdaptiveClip(window=16), norms)
    watched = gradclip.AdaptiveClip(window=16, spikes=gradclip.SpikeDetector("off", warmup=20))
    recorded = _train(watched, norms)
    spikes = [r["stats"].pop("spike") for r in recorded]
    assert sum(spikes) == 2
    for a, b in zip(plain, recorded, strict=True):
        a["stats"].pop("spike")
        b["stats"].pop("spike_bound"), b["stats"].pop("spike_score")
        a["stats"].pop("spike_bound"), a["stats"].pop("spike_score")
        assert a["stats"] == b["stats"] and torch.equal(a["grad"], b["grad"])


def test_skip_leaves_the_gradients_and_skips() -> None:
    clipper = gradclip.NormClip(0.5, spikes=gradclip.SpikeDetector("skip", warmup=20))
    run = _train(clipper, _norms(40, spikes={30: 100.0}))
    for i, r in enumerate(run):
        assert r["stats"]["skipped"] == r["stats"]["spike"] == (i == 30)
    spike = run[30]
    assert spike["stats"]["coef"] == 1.0 and spike["stats"]["post_norm"] == spike["stats"]["norm"]
    assert float(spike["grad"].norm()) == pytest.approx(spike["stats"]["norm"])
    assert run[29]["stats"]["clipped"]  # the clipper still clips the other steps


@pytest.mark.parametrize("make", [
    lambda: gradclip.NormClip(100.0, spikes=gradclip.SpikeDetector("clip", warmup=20)),
    lambda: gradclip.AdaGC(warmup_steps=3, spikes=gradclip.SpikeDetector("clip", warmup=20)),
    lambda: gradclip.ValueClip(100.0, spikes=gradclip.SpikeDetector("clip", warmup=20)),
], ids=["NormClip", "AdaGC", "ValueClip"])
def test_clip_brings_a_spike_down_to_the_bound(make) -> None:
    clipper = make()
    run = _train(clipper, _norms(40, spikes={30: 100.0}))
    spike = run[30]["stats"]
    assert spike["spike"] and not spike["skipped"] and spike["clipped"]
    bound = spike["spike_bound"]
    assert math.isfinite(bound) and spike["post_norm"] <= bound * (1 + 1e-5)
    assert spike["threshold"] <= bound
    grad = run[30]["grad"]
    p = clipper.norm_type
    assert float(torch.linalg.vector_norm(grad.double(), p)) == pytest.approx(spike["post_norm"], rel=1e-5)
    assert not any(r["stats"]["spike"] for i, r in enumerate(run) if i != 30)


@pytest.mark.parametrize("policy", ["skip", "clip"])
@pytest.mark.parametrize("name,kwargs", [
    ("AdaptiveClip", {"window": 8}), ("ZClip", {"warmup_steps": 5}),
    ("AutoClip", {"percentile": 50.0, "window": 8}), ("AdaGC", {"warmup_steps": 3}),
])
def test_a_spike_enters_no_statistic(policy: str, name: str, kwargs: dict) -> None:
    norms = _norms(45, spikes={40: 200.0})
    clipper = getattr(gradclip, name)(**kwargs, spikes=gradclip.SpikeDetector(policy, warmup=20))
    _train(clipper, norms[:40])
    before = clipper.state_dict()
    stats = _train(clipper, norms[40:41])[0]["stats"]
    assert stats["spike"]
    after = clipper.state_dict()
    for key, value in before["state"].items():
        if key != "steps":
            assert torch.equal(value, after["state"][key]), key
    for pname, entry in before["param_state"].items():
        for key, value in entry.items():
            assert torch.equal(value, after["param_state"][pname][key]), (pname, key)
    for key in ("log_norms", "norm_count", "losses", "loss_count"):
        assert torch.equal(before["spikes"]["state"][key], after["spikes"]["state"][key]), key
    assert torch.equal(before["spikes"]["param_state"]["w"]["log_median"],
                       after["spikes"]["param_state"]["w"]["log_median"])


# -- a skipped step and torch's optimizers ------------------------------------------------


def _model() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(5, 8), torch.nn.Tanh(), torch.nn.Linear(8, 2))


def _grads(model: torch.nn.Module, step: int, scale: float) -> None:
    gen = torch.Generator().manual_seed(step)
    for p in model.parameters():
        p.grad = scale * torch.randn(p.shape, generator=gen)


OPTIMIZERS = {
    "AdamW": lambda ps, **kw: torch.optim.AdamW(ps, lr=1e-2, **kw),
    "Adam": lambda ps, **kw: torch.optim.Adam(ps, lr=1e-2, **kw),
    "SGD": lambda ps, **kw: torch.optim.SGD(ps, lr=1e-2, momentum=0.9, **kw),
}


def _snapshot(model: torch.nn.Module, opt: torch.optim.Optimizer, clipper: gradclip.Clipper):
    sd = clipper.state_dict()
    sd["state"].pop("steps")  # steps seen: this one too (a count of calls, not a statistic)
    for key in ("steps", "run", "flags", "in_window", "judged"):  # they count every step
        sd["spikes"]["state"].pop(key)
    return ([p.detach().clone() for p in model.parameters()],
            [{k: v.clone() if isinstance(v, torch.Tensor) else v for k, v in opt.state[p].items()}
             for p in model.parameters()], sd)  # fmt: skip


def _same(a, b) -> None:
    params_a, state_a, clip_a = a
    params_b, state_b, clip_b = b
    assert all(torch.equal(x, y) for x, y in zip(params_a, params_b, strict=True))
    for x, y in zip(state_a, state_b, strict=True):
        assert x.keys() == y.keys()
        for k in x:
            assert torch.equal(x[k], y[k]), k  # step counters included

    def eq(x, y):
        if isinstance(x, dict):
            return x.keys() == y.keys() and all(eq(x[k], y[k]) for k in x)
        return torch.equal(x, y) if isinstance(x, torch.Tensor) else x == y

    assert eq(clip_a, clip_b)


@pytest.mark.parametrize("kind", ["fused", "foreach"])
@pytest.mark.parametrize("opt_name", list(OPTIMIZERS))
@pytest.mark.parametrize("clipper_name", ["NormClip", "AdaptiveClip", "AdaGC"])
def test_a_skipped_step_leaves_everything_bit_identical(kind: str, opt_name: str, clipper_name: str) -> None:
    model = _model()
    opt = OPTIMIZERS[opt_name](model.parameters(), **{kind: True})
    kwargs = {"NormClip": {"max_norm": 1.0}, "AdaptiveClip": {"window": 8, "optimizer": opt},
              "AdaGC": {"warmup_steps": 3}}[clipper_name]  # fmt: skip
    clipper = getattr(gradclip, clipper_name)(**kwargs, spikes=gradclip.SpikeDetector(warmup=20))
    scales = _norms(26)
    for i in range(25):
        _grads(model, i, scales[i])
        assert not bool(clipper.step(model, opt, loss=1.0).skipped)
    before = _snapshot(model, opt, clipper)
    _grads(model, 25, 500.0)
    stats = clipper.step(model, opt, loss=1.0)
    assert bool(stats.skipped) and bool(stats.spike)
    _same(before, _snapshot(model, opt, clipper))
    assert not hasattr(opt, "grad_scale") and not hasattr(opt, "found_inf")
    _grads(model, 26, scales[25])  # and the next step goes on as usual
    assert not bool(clipper.step(model, opt, loss=1.0).skipped)
    assert not torch.equal(before[0][0], next(model.parameters()))


@pytest.mark.parametrize("kind,reads", [("fused", 0), ("foreach", 1)])
def test_host_reads_of_a_skip_on_accelerators(kind: str, reads: int, monkeypatch, accelerator_path) -> None:
    """Fused optimizers get the skip through found_inf (no read, AGC's per-row coefficient
    too); others need the decision on the host, once a step. (The optimizer's own step is
    replaced by a counter here: foreach Adam reads its CPU step counters itself.)"""
    for make in (lambda: gradclip.NormClip(1.0, spikes=gradclip.SpikeDetector(warmup=20)),
                 lambda: gradclip.AGC(0.05, exclude=None, spikes=gradclip.SpikeDetector(warmup=20))):
        model = _model()
        opt = torch.optim.AdamW(model.parameters(), lr=1e-2, **{kind: True})
        calls = []
        opt.step = lambda opt=opt, calls=calls: calls.append(getattr(opt, "found_inf", None))
        clipper = make()
        scales = _norms(30, spikes={29: 1e3})
        for i, scale in enumerate(scales):
            _grads(model, i, scale)
            with HostReadDetector() as mode:
                stats = clipper.step(model, opt, loss=torch.tensor(1.0))
            assert len(mode.reads) == reads, (i, mode.reads)
        assert bool(stats.skipped)
        if kind == "fused":  # every step reaches the kernel; the last one with found_inf set
            assert len(calls) == 30 and float(calls[-1]) == 1.0 and float(calls[-2]) == 0.0
        else:  # the skipped step never reaches the optimizer
            assert len(calls) == 29 and calls[0] is None


def test_the_fold_arms_found_inf_alone_for_per_row_clippers(accelerator_path) -> None:
    model = _model()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, fused=True)
    seen = {}
    original = opt.step

    def spy(*args, **kwargs):
        seen["grad_scale"], seen["found_inf"] = opt.grad_scale, opt.found_inf
        return original(*args, **kwargs)

    opt.step = spy
    _grads(model, 0, 1.0)
    gradclip.AGC(0.05, exclude=None, spikes="skip").step(model, opt)
    assert seen["grad_scale"] is None and float(seen["found_inf"]) == 0.0


# -- the cap -----------------------------------------------------------------------------


def test_too_many_spikes_in_a_row_raise_naming_the_step_norm_bound_and_layers() -> None:
    model = _model()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, fused=True)
    clipper = gradclip.NormClip(1.0, spikes=gradclip.SpikeDetector(warmup=20, max_skips=3))
    for i, scale in enumerate(_norms(25)):
        _grads(model, i, scale)
        clipper.step(model, opt)
    before = _snapshot(model, opt, clipper)
    for i in range(2):
        _grads(model, 100 + i, 1e3)
        assert bool(clipper.step(model, opt).skipped)
    _grads(model, 102, 1e3)
    params = [p.detach().clone() for p in model.parameters()]
    with pytest.raises(gradclip.GradientSpikeError) as info:
        clipper.step(model, opt)
    err = info.value
    assert isinstance(err, RuntimeError)
    message = str(err)
    assert "3 gradient spikes in a row" in message and "max_skips=3" in message
    assert f"step {err.report.step}" in message and err.report.step == 27
    assert f"{err.report.norm:.4g}" in message and f"{err.report.bound:.4g}" in message
    assert err.report.layers and err.report.layers[0].name in message
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), params, strict=True))
    assert not hasattr(opt, "grad_scale")
    _same((before[0], before[1], None), (params, _snapshot(model, opt, clipper)[1], None))


def test_no_cap_with_max_skips_none_or_policy_off() -> None:
    for detector in (gradclip.SpikeDetector(warmup=20, max_skips=None),
                     gradclip.SpikeDetector("off", warmup=20, max_skips=1)):
        clipper = gradclip.NormClip(1.0, spikes=detector)
        for n in _norms(25) + [1e4] * 30:
            clipper({"w": _param(n)})
        assert int(detector.state.run) == 30


class _FakeEvent:
    """An accelerator event whose copy has always arrived."""

    def __init__(self, device=None):
        self.recorded = 0

    def record(self):
        self.recorded += 1

    def query(self):
        return True


def test_on_accelerators_the_cap_is_watched_without_waiting(monkeypatch, accelerator_path) -> None:
    monkeypatch.setattr(torch, "Event", _FakeEvent)
    clipper = gradclip.NormClip(1.0, spikes=gradclip.SpikeDetector(warmup=20, max_skips=2))
    for n in _norms(25):
        clipper({"w": _param(n)})
    clipper({"w": _param(1e4)})
    clipper({"w": _param(1e4)})  # the second in a row: on the device, the cap is reached
    with pytest.raises(gradclip.GradientSpikeError, match="2 gradient spikes in a row") as info:
        clipper({"w": _param(1e4)})  # its copy is read on the host a step later
    assert info.value.report.step == 26 and info.value.report.layers[0].name == "w"


def test_the_watch_reads_no_device_value(monkeypatch, accelerator_path) -> None:
    """Posting a step's copy reads nothing; reading an arrived copy is a read of host memory."""
    waiting = _FakeEvent()
    waiting.query = lambda: False
    monkeypatch.setattr(torch, "Event", lambda device=None: waiting)
    clipper = gradclip.NormClip(1.0, spikes=gradclip.SpikeDetector(warmup=20, max_skips=2))
    for n in _norms(25) + [1e4] * 5:
        with HostReadDetector() as mode:
            clipper({"w": _param(n)})
        assert mode.reads == []
    assert waiting.recorded == 2  # the first copy, then only the probe: none arrived


# -- forensics ---------------------------------------------------------------------------


def test_the_report_names_the_layer_that_spiked() -> None:
    reports = []
    model = _model()
    clipper = gradclip.NormClip(math.inf, spikes=gradclip.SpikeDetector(warmup=20, on_spike=reports.append))
    scales = _norms(25)
    for i, scale in enumerate(scales):
        _grads(model, i, scale)
        clipper(model, loss=2.0)
    _grads(model, 30, scales[0])
    model[2].weight.grad *= 300
    stats = clipper(model, loss=2.5)
    assert bool(stats.spike) and len(reports) == 1
    report = reports[0]
    assert report is stats.spike_report and isinstance(report, gradclip.SpikeReport)
    assert report.layers[0].name == "2.weight" and report.step == 25 and report.policy == "skip"
    top = report.layers[0]
    assert top.max_abs == float(model[2].weight.grad.abs().max())
    assert top.norm == pytest.approx(float(model[2].weight.grad.norm()), rel=1e-5)
    assert top.ratio == pytest.approx(top.norm / top.median, rel=1e-4) and top.ratio > 50
    assert [layer.ratio for layer in report.layers] == sorted((layer.ratio for layer in report.layers), reverse=True)
    assert len(report.layers) == 4  # every parameter, at most top_k=5
    assert report.loss == 2.5 and report.rank is None and report.nonfinite == ()
    assert report.norm == pytest.approx(float(stats.norm)) and report.bound < report.norm
    assert "2.weight" in report.to_text() and report.to_record()["layers"]["2.weight"] == top.ratio


def test_a_nonfinite_step_names_its_layers_in_backward_order() -> None:
    model = _model()
    clipper = gradclip.NormClip(1.0, spikes="skip")
    _grads(model, 0, 1.0)
    model[0].weight.grad[0, 0] = math.inf
    model[2].bias.grad[0] = math.nan
    report = clipper(model).spike_report
    assert report.nonfinite == ("2.bias", "0.weight")
    assert report.layers[0].name in report.nonfinite and math.isinf(report.layers[0].ratio)


def test_running_medians_follow_each_parameter() -> None:
    clipper = gradclip.NormClip(math.inf, spikes="off")
    for _ in range(200):
        clipper({"a": _param(3.0), "b": _param(0.01)})
    medians = clipper.state_dict()["spikes"]["param_state"]
    assert math.exp(float(medians["a"]["log_median"])) == pytest.approx(3.0, rel=0.06)
    assert math.exp(float(medians["b"]["log_median"])) == pytest.approx(0.01, rel=0.06)


# -- checkpoints -------------------------------------------------------------------------


def test_resume_is_bit_exact() -> None:
    norms = _norms(90, spikes={50: 50.0, 70: 1e3})
    losses = [1.0 + 0.05 * math.cos(i) for i in range(90)]

    def run(clipper, ns, ls):
        return [clipper({"w": _param(n)}, loss=loss).to_dict() for n, loss in zip(ns, ls, strict=True)]

    make = lambda: gradclip.AdaptiveClip(window=8, spikes=gradclip.SpikeDetector("clip", warmup=20))  # noqa: E731
    straight = run(make(), norms, losses)
    first = make()
    head = run(first, norms[:60], losses[:60])
    resumed = make()
    resumed.load_state_dict(first.state_dict())
    tail = run(resumed, norms[60:], losses[60:])
    assert head + tail == straight
    assert sum(r["spike"] for r in straight) == 2


def test_load_refuses_a_mismatched_detector_and_changes_nothing() -> None:
    clipper = gradclip.NormClip(1.0, spikes=gradclip.SpikeDetector(window=16))
    clipper({"w": _param(1.0)})
    saved = clipper.state_dict()
    with pytest.raises(ValueError, match="spikes"):
        gradclip.NormClip(1.0, spikes=gradclip.SpikeDetector(window=32)).load_state_dict(saved)
    with pytest.raises(ValueError, match="spike detector"):
        gradclip.NormClip(1.0).load_state_dict(saved)
    with pytest.raises(ValueError, match="spikes"):
        clipper.load_state_dict(gradclip.NormClip(1.0).state_dict())
    bad = clipper.state_dict()
    bad["spikes"]["state"]["in_window"] = torch.tensor(3)
    other = gradclip.NormClip(1.0, spikes=gradclip.SpikeDetector(window=16))
    fresh = other.state_dict()
    with pytest.raises(ValueError, match="corrupt"):
        other.load_state_dict(bad)
    assert str(other.state_dict()) == str(fresh)
    rebuilt = gradclip.NormClip(**saved["config"])  # the saved config rebuilds the clipper
    rebuilt.load_state_dict(saved)


def test_reset_forgets_the_detector_too() -> None:
    clipper = gradclip.NormClip(1.0, spikes="skip")
    for n in _norms(30):
        clipper({"w": _param(n)})
    clipper.reset()
    assert str(clipper.state_dict()) == str(gradclip.NormClip(1.0, spikes="skip").state_dict())


# -- compile -----------------------------------------------------------------------------


def test_the_decision_traces_in_one_graph() -> None:
    from gradclip.norms import GradNorms

    detector = gradclip.SpikeDetector("skip", warmup=20)
    names = ("a", "b")

    def judge(per_tensor: torch.Tensor, loss: torch.Tensor):
        norms = GradNorms([], per_tensor, per_tensor.norm(), 2.0, per_tensor.dtype, {})
        verdict = detector.judge(norms, loss, names)
        detector.commit(verdict)
        return verdict.spike, verdict.bound, verdict.score

    eager = gradclip.SpikeDetector("skip", warmup=20)

    def eager_judge(per_tensor, loss):
        norms = GradNorms([], per_tensor, per_tensor.norm(), 2.0, per_tensor.dtype, {})
        verdict = eager.judge(norms, loss, names)
        eager.commit(verdict)
        return verdict.spike, verdict.bound, verdict.score

    eager_judge(torch.ones(2), torch.tensor(1.0))  # state on its device before tracing
    judge(torch.ones(2), torch.tensor(1.0))
    compiled = torch.compile(judge, fullgraph=True)
    for i, n in enumerate(_norms(30, spikes={27: 1e3})):
        per, loss = torch.tensor([n, 0.5 * n]), torch.tensor(1.0 + 0.01 * i)
        (spike, bound, score), (spike_e, bound_e, score_e) = compiled(per, loss), eager_judge(per, loss)
        assert torch.equal(spike, spike_e), i  # the decision: exactly eager's
        torch.testing.assert_close(bound, bound_e, rtol=1e-5, atol=0)  # fused: rounding
        torch.testing.assert_close(score, score_e)


# -- bad input ---------------------------------------------------------------------------


@pytest.mark.parametrize("kwargs,error,name", [
    ({"window": 0}, ValueError, "window"),
    ({"window": 1}, ValueError, "window"),
    ({"window": 2.5}, TypeError, "window"),
    ({"sigma": 0.0}, ValueError, "sigma"),
    ({"sigma": -1.0}, ValueError, "sigma"),
    ({"sigma": math.nan}, ValueError, "sigma"),
    ({"sigma": "6"}, TypeError, "sigma"),
    ({"max_skips": 0}, ValueError, "max_skips"),
    ({"warmup": 1}, ValueError, "warmup"),
    ({"top_k": 0}, ValueError, "top_k"),
    ({"score_window": 0}, ValueError, "score_window"),
    ({"policy": "ignore"}, ValueError, "policy"),
    ({"on_spike": "print"}, TypeError, "on_spike"),
])
def test_bad_arguments_name_the_argument(kwargs: dict, error: type, name: str) -> None:
    with pytest.raises(error, match=name):
        gradclip.SpikeDetector(**kwargs)


@pytest.mark.parametrize("loss,error", [
    (torch.ones(2), ValueError), (torch.ones(1, 3), ValueError), ("1.0", TypeError),
    ([1.0], TypeError), (torch.tensor(True), ValueError), (torch.tensor(1j), ValueError),
])
def test_a_loss_that_is_not_one_real_number_changes_nothing(loss, error) -> None:
    model = _model()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    clipper = gradclip.NormClip(0.1, spikes="skip")
    _grads(model, 0, 1.0)
    grads = [p.grad.clone() for p in model.parameters()]
    params = [p.detach().clone() for p in model.parameters()]
    state = str(clipper.state_dict())
    for call in (lambda: clipper(model, loss=loss), lambda: clipper.step(model, opt, loss=loss)):
        with pytest.raises(error, match="loss"):
            call()
    assert all(torch.equal(p.grad, g) for p, g in zip(model.parameters(), grads, strict=True))
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), params, strict=True))
    assert str(clipper.state_dict()) == state


def test_report_text_and_the_watch_helpers() -> None:
    report = forensics.SpikeReport(
        step=3, norm=10.0, bound=2.0, loss=5.0, loss_bound=1.0, score=0.5, run=2, policy="clip",
        layers=(forensics.SpikeLayer("w", 10.0, 1.0, 10.0, math.nan),), nonfinite=("w",), rank=1)
    text = report.to_text()
    assert "loss 5 (bound 1)" in text and "rank 1" in text and "max |g|" not in text
    assert report.to_record() == {"layers": {"w": 10.0}, "max_abs": {}, "nonfinite": ["w"], "rank": 1}
    forensics.check_cap(report, 3)  # below the cap: nothing
    with pytest.raises(gradclip.GradientSpikeError, match="non-finite from w"):
        forensics.check_cap(report, 2)


def test_a_heavy_tailed_loss_rarely_fires() -> None:
    """Losses with a power-law tail (Pareto, index 0.75: no finite mean) and ordinary norms:
    in log space the tail is exponential, and 6 sigma is rarely reached (a raw window's mean
    and deviation would chase the largest values)."""
    gen = torch.Generator().manual_seed(3)
    losses = (torch.rand(3000, generator=gen, dtype=torch.float64) ** (-1 / 0.75)).tolist()
    clipper = gradclip.NormClip(math.inf, spikes=gradclip.SpikeDetector("off"))
    fired = sum(bool(clipper({"w": _param(1.0)}, loss=loss).spike) for loss in losses)
    assert fired < 0.005 * len(losses)
