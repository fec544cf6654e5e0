"""Update measurement (:class:`Snapshot`) and update clipping (:class:`UpdateClip`).

References: float64 copies of the parameters taken by hand around ``optimizer.step()``, and
Levanter's rule (mean + 3 sigma of the last ``window`` unclipped update norms, no clipping
before half a window) written out below in plain Python; never a number from a previous run.
"""

from __future__ import annotations

import copy
import io
import math
import statistics

import pytest
import torch

import gradclip
from gradclip import _foreach
from gradclip.clippers.update import Snapshot
from host_reads import HostReadDetector


def _model(dtype: torch.dtype = torch.float64) -> torch.nn.Sequential:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Tanh(), torch.nn.Linear(8, 2)).to(dtype)


def _backward(model: torch.nn.Module, step: int, scale: float = 1.0) -> None:
    gen = torch.Generator().manual_seed(step)
    x = torch.randn(16, 4, generator=gen, dtype=next(model.parameters()).dtype)
    model.zero_grad()
    (model(x).pow(2).mean() * scale).backward()


def _scale(step: int) -> float:
    return 40.0 if step in (25, 31, 40) else 1.0


OPTIMIZERS = {
    "sgd": lambda ps: torch.optim.SGD(ps, lr=0.1, momentum=0.9),
    "adam": lambda ps: torch.optim.Adam(ps, lr=1e-2),
}


@pytest.mark.parametrize("name", OPTIMIZERS)
def test_snapshot_ratios_match_float64_copies(name: str) -> None:
    model = _model(torch.float32)
    opt = OPTIMIZERS[name](model.parameters())
    snap = Snapshot()
    for step in range(3):
        _backward(model, step)
        before = {n: q.detach().double().clone() for n, q in model.named_parameters()}
        snap.take(model)
        opt.step()
        got = snap.measure()
        names = list(before)
        assert got.names == tuple(names)
        after = {n: q.detach().double() for n, q in model.named_parameters()}
        update = torch.stack([torch.linalg.vector_norm(after[n] - before[n]) for n in names])
        param = torch.stack([torch.linalg.vector_norm(before[n]) for n in names])
        torch.testing.assert_close(got.update.double(), update, rtol=1e-6, atol=1e-9)
        torch.testing.assert_close(got.param.double(), param, rtol=1e-6, atol=0)
        torch.testing.assert_close(got.ratio().double(), update / param, rtol=2e-6, atol=1e-9)
        torch.testing.assert_close(got.total.double(), torch.linalg.vector_norm(update),
                                   rtol=1e-6, atol=1e-9)


def _levanter(history: list[float], norm: float, window: int, sigma: float) -> float:
    """The coefficient of Levanter's rule from the unclipped norms so far (float64)."""
    recent = history[-window:]
    if len(recent) < max(2, window // 2):
        return 1.0
    threshold = statistics.fmean(recent) + sigma * max(statistics.pstdev(recent), 1e-6)
    return min(1.0, threshold / max(norm, 1e-6)) if norm > threshold else 1.0


@pytest.mark.parametrize("name", OPTIMIZERS)
def test_update_clip_follows_levanters_rule(name: str) -> None:
    model = _model()
    opt = OPTIMIZERS[name](model.parameters())
    clipper = gradclip.UpdateClip(window=16)
    history: list[float] = []
    clipped = 0
    for step in range(48):
        _backward(model, step, _scale(step))
        # the unclipped update, from a twin of the model and its optimizer
        twin = copy.deepcopy(model)
        for q, t in zip(model.parameters(), twin.parameters(), strict=True):
            t.grad = q.grad.clone()
        twin_opt = OPTIMIZERS[name](twin.parameters())
        twin_opt.load_state_dict(copy.deepcopy(opt.state_dict()))
        twin_opt.step()
        before = [q.detach().clone() for q in model.parameters()]
        update = [t.detach() - b for t, b in zip(twin.parameters(), before, strict=True)]
        norm = math.sqrt(sum(float(u.square().sum()) for u in update))
        coef = _levanter(history, norm, 16, 3.0)
        history.append(norm)

        stats = clipper.step(model, opt)
        clipped += coef < 1
        assert bool(stats.clipped) == (coef < 1)
        assert float(stats.norm) == pytest.approx(norm, rel=1e-9)
        assert float(stats.coef) == pytest.approx(coef, rel=1e-6)  # float32 statistics
        for q, b, u in zip(model.parameters(), before, update, strict=True):
            torch.testing.assert_close(q.detach(), b + coef * u, rtol=0,
                                       atol=1e-6 * float(u.abs().max()) + 1e-15)
    if name == "sgd":  # SGD passes gradient spikes into its update (Adam normalises them)
        assert clipped >= 2


def test_an_update_that_needs_no_clipping_is_left_bit_for_bit() -> None:
    model, ref = _model(torch.float32), _model(torch.float32)
    opt, ref_opt = torch.optim.Adam(model.parameters()), torch.optim.Adam(ref.parameters())
    clipper = gradclip.UpdateClip(window=8)
    for step in range(12):
        _backward(model, step)
        _backward(ref, step)
        stats = clipper.step(model, opt)
        ref_opt.step()
        assert not bool(stats.clipped)
        for a, b in zip(model.parameters(), ref.parameters(), strict=True):
            assert torch.equal(a, b)


def test_any_optimizer_muon_included() -> None:
    model = torch.nn.Linear(6, 6, bias=False)
    opt = torch.optim.Muon(model.parameters(), lr=0.02)
    clipper = gradclip.UpdateClip(window=4)
    for step in range(6):
        model.zero_grad()
        model(torch.randn(3, 6, generator=torch.Generator().manual_seed(step))).sum().backward()
        before = model.weight.detach().clone()
        stats = clipper.step(model, opt)
        applied = torch.linalg.vector_norm(model.weight.detach() - before)
        torch.testing.assert_close(applied, stats.post_norm, rtol=1e-5, atol=1e-7)


def _poison_step(model: torch.nn.Module, opt: torch.optim.Optimizer) -> None:
    _backward(model, 99)
    next(model.parameters()).grad[0, 0] = math.nan


def test_skip_restores_the_parameters_and_leaves_the_statistics() -> None:
    model = _model()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    clipper = gradclip.UpdateClip(window=8, nonfinite="skip")
    for step in range(5):
        _backward(model, step)
        clipper.step(model, opt)
    state = {k: v.clone() for k, v in clipper.state._asdict().items()}
    before = [q.detach().clone() for q in model.parameters()]
    _poison_step(model, opt)
    stats = clipper.step(model, opt)
    assert bool(stats.skipped) and not bool(stats.finite)
    for q, b in zip(model.parameters(), before, strict=True):
        assert torch.equal(q, b)
    for k, v in clipper.state._asdict().items():
        assert torch.equal(v, state[k])


def test_error_restores_the_parameters_then_raises() -> None:
    model = _model()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    clipper = gradclip.UpdateClip(nonfinite="error")
    before = [q.detach().clone() for q in model.parameters()]
    _poison_step(model, opt)
    with pytest.raises(gradclip.NonFiniteGradientError, match="parameters were restored"):
        clipper.step(model, opt)
    for q, b in zip(model.parameters(), before, strict=True):
        assert torch.equal(q, b)


def test_resume_equals_uninterrupted() -> None:
    def run(split: int | None) -> list[torch.Tensor]:
        model = _model()
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        clipper = gradclip.UpdateClip(window=8)
        for step in range(30):
            if step == split:
                buffer = io.BytesIO()
                torch.save(clipper.state_dict(), buffer)
                buffer.seek(0)
                clipper = gradclip.UpdateClip(window=8)
                clipper.load_state_dict(torch.load(buffer))
            _backward(model, step, _scale(step + 5))
            clipper.step(model, opt)
        return [q.detach().clone() for q in model.parameters()]

    for a, b in zip(run(None), run(14), strict=True):
        assert torch.equal(a, b)


def test_no_host_read_on_accelerators(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(_foreach, "is_host_device", lambda device: False)
    model = _model()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    clipper = gradclip.UpdateClip(window=4, nonfinite="skip")
    for step in range(8):
        _backward(model, step, _scale(step + 20))
        with HostReadDetector() as mode:
            clipper.step(model, opt)
        assert mode.reads == [], (step, mode.reads)


def test_bad_arguments_and_calls() -> None:
    with pytest.raises(ValueError, match="window"):
        gradclip.UpdateClip(window=0)
    with pytest.raises(ValueError, match="sigma"):
        gradclip.UpdateClip(sigma=-1.0)
    with pytest.raises(ValueError, match="sigma"):
        gradclip.UpdateClip(sigma=math.nan)
    with pytest.raises(ValueError, match="min_history"):
        gradclip.UpdateClip(min_history=0)
    model = _model()
    with pytest.raises(TypeError, match=r"call `clipper.step\(model, optimizer\)`"):
        gradclip.UpdateClip()(model)
    with pytest.raises(TypeError, match="`optimizer` must be a torch optimizer"):
        gradclip.UpdateClip().step(model, "sgd")
    with pytest.raises(RuntimeError, match="before take"):
        Snapshot().measure()
