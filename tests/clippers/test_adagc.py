"""AdaGC against a per-tensor float64 reference written from the paper (Wang et al. 2025, Alg. 1).

The reference keeps γ and a step count per parameter name, exactly as documented on
:class:`AdaGC`: during a tensor's first ``warmup_steps`` finite steps, global clipping at
``warmup_max_norm`` (torch's coefficient) and γ = min of the clipped norms; afterwards
h = min(1, λ_rel·γ/‖g‖), γ ← β·γ + (1−β)·h·‖g‖. Non-finite steps and zero gradients never
enter γ or the counts.
"""

from __future__ import annotations

import io
import math

import pytest
import torch
from torch import nn

from gradclip import _foreach
from gradclip.clippers.adagc import OFFICIAL_CODE, AdaGC
from host_reads import HostReadDetector


class ReferenceAdaGC:
    """AdaGC one tensor at a time, in float64 Python numbers."""

    def __init__(self, relative: float = 1.05, beta: float = 0.98, warmup_steps: int = 100,
                 warmup_max_norm: float = 1.0) -> None:
        self.relative, self.beta, self.warmup, self.max_norm = relative, beta, warmup_steps, warmup_max_norm
        self.gamma: dict[str, float] = {}
        self.steps: dict[str, int] = {}

    def __call__(self, grads: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], list[float]]:
        wide = {n: g.double() for n, g in grads.items()}
        norms = {n: float(g.norm()) for n, g in wide.items()}
        total = math.sqrt(sum(v * v for v in norms.values()))
        finite = math.isfinite(total)
        global_coef = min(1.0, self.max_norm / (total + 1e-6))
        out, coefs = {}, []
        for name, g in wide.items():
            n = norms[name]
            gamma, steps = self.gamma.get(name, math.inf), self.steps.get(name, 0)
            if steps < self.warmup:
                h = global_coef
            else:
                limit = self.relative * gamma
                h = limit / n if n > limit else 1.0
            out[name] = g * h
            coefs.append(h)
            if finite and n > 0:
                if steps < self.warmup or steps == 0:
                    self.gamma[name] = min(gamma, h * n)
                else:
                    self.gamma[name] = self.beta * gamma + (1 - self.beta) * h * n
                self.steps[name] = steps + 1
        return out, coefs


def _model(dtype: torch.dtype = torch.float32) -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 16), nn.LayerNorm(16), nn.Linear(16, 3)).to(dtype)


BAD_STEPS = {117: float("nan"), 131: float("inf")}


def _grads(model: nn.Module, step: int, poison: float | None = None) -> dict[str, torch.Tensor]:
    """Per-tensor scales that drift, with per-tensor spikes (what AdaGC is for)."""
    gen = torch.Generator().manual_seed(step)
    out = {}
    for k, (name, p) in enumerate(model.named_parameters()):
        scale = math.exp(0.3 * float(torch.randn((), generator=gen))) * (1 + 0.01 * step) * 0.3
        if (step + 7 * k) % 23 == 0:
            scale *= 30  # a spike in this tensor only
        g = torch.randn(p.shape, generator=gen, dtype=torch.float64) * scale / math.sqrt(p.numel())
        out[name] = g.to(p.dtype)
    if poison is not None:
        out["1.weight"].view(-1)[3] = poison
    return out


def _set(model: nn.Module, grads: dict[str, torch.Tensor | None]) -> None:
    for name, p in model.named_parameters():
        g = grads.get(name)
        p.grad = None if g is None else g.clone()


def _state(clipper: AdaGC) -> dict[str, tuple[float, int]]:
    return {n: (float(e["gamma"]), int(e["steps"]))
            for n, e in clipper.state_dict()["param_state"].items()}


# -- the formula -----------------------------------------------------------------------------


@pytest.mark.parametrize("nonfinite", ["propagate", "skip"])
def test_matches_the_reference_through_warmup_and_nonfinite_steps(nonfinite: str) -> None:
    model, clipper, reference = _model(), AdaGC(nonfinite=nonfinite), ReferenceAdaGC()
    clipped_after_warmup = 0
    for step in range(150):
        grads = _grads(model, step, BAD_STEPS.get(step))
        _set(model, grads)
        stats = clipper(model)
        expected, coefs = reference(grads)
        bad = step in BAD_STEPS
        for name, p in model.named_parameters():
            want = grads[name] if bad and nonfinite == "skip" else expected[name]
            torch.testing.assert_close(p.grad.double(), want.double(), rtol=1e-5, atol=1e-9,
                                       equal_nan=True, msg=f"{name} at step {step}")
        assert bool(stats.finite) == (not bad)
        assert bool(stats.skipped) == (bad and nonfinite == "skip")
        if not bad:
            assert bool(stats.clipped) == (min(coefs) < 1), step
            clipped_after_warmup += step >= 100 and bool(stats.clipped)
            if step < 100:
                assert float(stats.threshold) == 1.0
        ours = _state(clipper)
        assert ours.keys() == reference.gamma.keys()
        for name, (gamma, steps) in ours.items():
            assert steps == reference.steps[name]
            assert gamma == pytest.approx(reference.gamma[name], rel=1e-5), (name, step)
    assert clipped_after_warmup >= 5  # the spikes were clipped per tensor
    assert int(clipper.steps) == 150 - len(BAD_STEPS)
    assert int(clipper.nonfinite_steps) == len(BAD_STEPS)


def test_threshold_after_warmup_is_the_norm_of_per_tensor_thresholds() -> None:
    model, clipper, reference = _model(), AdaGC(warmup_steps=3), ReferenceAdaGC(warmup_steps=3)
    for step in range(8):
        grads = _grads(model, step)
        _set(model, grads)
        before = dict(reference.gamma)
        stats = clipper(model)
        reference(grads)
        if step >= 3:
            want = math.sqrt(sum((1.05 * g) ** 2 for g in before.values()))
            assert float(stats.threshold) == pytest.approx(want, rel=1e-6)
        else:
            assert float(stats.threshold) == 1.0


def test_gamma_grows_at_most_by_the_bounded_rate() -> None:
    model = _model()
    clipper = AdaGC(warmup_steps=5)
    bound = 1 + (1 - 0.98) * (1.05 - 1)
    previous = None
    for step in range(40):
        _set(model, {n: g * 1.5 ** step for n, g in _grads(model, 0).items()})  # explodes
        clipper(model)
        gamma = {n: v for n, (v, _) in _state(clipper).items()}
        if step > 5 and previous is not None:
            for name, value in gamma.items():
                assert value <= previous[name] * bound * (1 + 1e-6)
        previous = gamma


def test_warmup_zero_starts_gamma_at_the_first_norm() -> None:
    model, clipper, reference = _model(), AdaGC(warmup_steps=0), ReferenceAdaGC(warmup_steps=0)
    for step in range(30):
        grads = _grads(model, step)
        _set(model, grads)
        stats = clipper(model)
        expected, _ = reference(grads)
        if step == 0:
            assert not bool(stats.clipped)
        for name, p in model.named_parameters():
            torch.testing.assert_close(p.grad.double(), expected[name], rtol=1e-5, atol=1e-9)


def test_official_code_values_are_offered() -> None:
    clipper = AdaGC(**OFFICIAL_CODE)
    assert (clipper.relative, clipper.beta) == (1.04, 0.99)
    assert (AdaGC().relative, AdaGC().beta, AdaGC().warmup_steps, AdaGC().warmup_max_norm) == (
        1.05, 0.98, 100, 1.0)


# -- parameter sets that change ----------------------------------------------------------------


def test_a_new_parameter_starts_its_own_warmup_and_absent_ones_keep_their_state() -> None:
    model = _model()
    clipper, reference = AdaGC(warmup_steps=5), ReferenceAdaGC(warmup_steps=5)
    late = "2.weight"
    for step in range(40):
        grads: dict[str, torch.Tensor | None] = dict(_grads(model, step))
        if step < 12:
            grads[late] = None  # appears at step 12, after everyone else's warm-up
        if 20 <= step < 25:
            grads["0.bias"] = None  # absent for a while
        if 30 <= step < 33:
            grads["1.bias"] = torch.zeros_like(grads["1.bias"])  # unused, zero gradient
        _set(model, grads)
        before = _state(clipper)
        stats = clipper(model)
        expected, _ = reference({n: g for n, g in grads.items() if g is not None})
        for name, p in model.named_parameters():
            if name in expected:
                torch.testing.assert_close(p.grad.double(), expected[name], rtol=1e-5, atol=1e-9)
        after = _state(clipper)
        for name, (gamma, steps) in after.items():
            assert steps == reference.steps[name] and gamma == pytest.approx(reference.gamma[name], rel=1e-5)
        if 12 <= step < 17:  # the late tensor is in warm-up: clipped globally
            total = math.sqrt(sum(float(g.double().norm()) ** 2 for g in grads.values() if g is not None))
            coef = min(1.0, 1.0 / (total + 1e-6))
            torch.testing.assert_close(model.get_parameter(late).grad.double(),
                                       grads[late].double() * coef, rtol=1e-6, atol=0)
            assert float(stats.threshold) == 1.0
        if 20 <= step < 25:
            assert after["0.bias"] == before["0.bias"]
        if 30 <= step < 33:
            assert after["1.bias"] == before["1.bias"]
    assert _state(clipper)[late][1] == 40 - 12


# -- checkpoints -------------------------------------------------------------------------------


def _run(clipper: AdaGC, model: nn.Module, steps: range) -> list[tuple[dict, list[torch.Tensor]]]:
    out = []
    for step in steps:
        _set(model, _grads(model, step, BAD_STEPS.get(step)))
        stats = clipper(model)
        out.append((stats.to_dict(), [p.grad.clone() for p in model.parameters()]))
    return out


@pytest.mark.parametrize("stop", [60, 125])
def test_resume_mid_run_equals_uninterrupted_bit_for_bit(stop: int) -> None:
    model = _model()
    reference = _run(AdaGC(nonfinite="skip"), model, range(150))
    first = AdaGC(nonfinite="skip")
    head = _run(first, model, range(stop))
    buffer = io.BytesIO()
    torch.save(first.state_dict(), buffer)
    buffer.seek(0)
    resumed = AdaGC(nonfinite="skip")
    resumed.load_state_dict(torch.load(buffer, weights_only=True))
    tail = _run(resumed, model, range(stop, 150))
    for step, ((a, ga), (b, gb)) in enumerate(zip(reference, head + tail, strict=True)):
        assert a == b or all(a[k] == b[k] or (a[k] != a[k] and b[k] != b[k]) for k in a), step
        for x, y in zip(ga, gb, strict=True):  # bit for bit (NaN where the input had NaN)
            torch.testing.assert_close(x, y, rtol=0, atol=0, equal_nan=True, msg=str(step))
    sd = resumed.state_dict()
    straight = AdaGC(nonfinite="skip")
    _run(straight, _model(), range(150))
    for name, entry in straight.state_dict()["param_state"].items():
        assert torch.equal(entry["gamma"], sd["param_state"][name]["gamma"])
        assert torch.equal(entry["steps"], sd["param_state"][name]["steps"])


def test_state_dict_is_keyed_by_parameter_name() -> None:
    model, clipper = _model(), AdaGC(warmup_steps=2)
    _run(clipper, model, range(4))
    sd = clipper.state_dict()
    assert sorted(sd["param_state"]) == sorted(n for n, _ in model.named_parameters())
    for entry in sd["param_state"].values():
        assert set(entry) == {"gamma", "steps"}
        assert entry["gamma"].dtype == torch.float32 and entry["gamma"].shape == ()
        assert entry["steps"].dtype == torch.long and int(entry["steps"]) == 4
    # the saved entries are copies: later steps do not change a saved state dict
    saved = float(sd["param_state"]["0.weight"]["gamma"])
    _run(clipper, model, range(4, 8))
    assert float(sd["param_state"]["0.weight"]["gamma"]) == saved
    broken = {**sd, "param_state": {"0.weight": {"gamma": torch.tensor(1.0)}}}
    with pytest.raises(ValueError, match="param_state"):
        AdaGC(warmup_steps=2).load_state_dict(broken)
    clipper.reset()
    assert clipper.state_dict()["param_state"] == {}
    _run(clipper, model, range(2))  # works after a reset (the vectors are rebound)
    assert int(clipper.state_dict()["param_state"]["0.weight"]["steps"]) == 2


# -- dtypes, arguments, syncs ------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_low_precision_gradients(dtype: torch.dtype) -> None:
    model, clipper, reference = _model(dtype), AdaGC(warmup_steps=5), ReferenceAdaGC(warmup_steps=5)
    eps = torch.finfo(dtype).eps
    for step in range(30):
        grads = _grads(model, step)
        _set(model, grads)
        stats = clipper(model)
        expected, _ = reference(grads)
        assert bool(stats.finite) and stats.norm.dtype == torch.float32
        for name, p in model.named_parameters():
            assert p.grad.dtype == dtype
            torch.testing.assert_close(p.grad.double(), expected[name], rtol=4 * eps, atol=1e-7)


@pytest.mark.parametrize(
    ("kwargs", "name"),
    [
        ({"relative": 0.0}, "relative"),
        ({"relative": -1.05}, "relative"),
        ({"relative": float("nan")}, "relative"),
        ({"relative": float("inf")}, "relative"),
        ({"beta": 0.0}, "beta"),
        ({"beta": 1.0}, "beta"),
        ({"beta": float("nan")}, "beta"),
        ({"warmup_steps": -1}, "warmup_steps"),
        ({"warmup_steps": 2.5}, "warmup_steps"),
        ({"warmup_max_norm": 0.0}, "warmup_max_norm"),
        ({"warmup_max_norm": -1.0}, "warmup_max_norm"),
        ({"nonfinite": "ignore"}, "nonfinite"),
    ],
)
def test_bad_arguments_name_the_argument(kwargs: dict, name: str) -> None:
    with pytest.raises(ValueError, match=name):
        AdaGC(**kwargs)


def test_no_host_sync_in_the_step(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(_foreach, "is_host_device", lambda device: False)
    model, clipper = _model(), AdaGC(warmup_steps=3, nonfinite="skip")
    for step in range(8):  # warm-up, its end, a non-finite step, a new parameter set
        grads: dict[str, torch.Tensor | None] = dict(_grads(model, step, float("nan") if step == 5 else None))
        if step < 6:
            grads["2.bias"] = None
        _set(model, grads)
        with HostReadDetector() as mode:
            clipper(model)
        assert mode.reads == [], (step, mode.reads)


def test_loaded_state_matching_no_parameter_is_refused_not_restarted() -> None:
    """Per-name state never silently starts from scratch: a checkpoint whose names match none
    of the parameters of the next call raises there, before anything changes."""
    torch.manual_seed(0)
    saved_from = torch.nn.Sequential(torch.nn.Linear(3, 2))
    saved_from(torch.ones(1, 3)).sum().backward()
    first = AdaGC(warmup_steps=1)
    first(saved_from)
    other = torch.nn.Module()
    other.proj = torch.nn.Linear(3, 2)  # names "proj.weight", "proj.bias": no "0.weight"
    other.proj(torch.ones(1, 3)).sum().backward()
    before = [p.grad.clone() for p in other.parameters()]
    resumed = AdaGC(warmup_steps=1)
    resumed.load_state_dict(first.state_dict())
    with pytest.raises(ValueError, match="none match"):
        resumed(other)
    assert all(torch.equal(p.grad, b) for p, b in zip(other.parameters(), before, strict=True))
    resumed(saved_from)  # the right model resumes; a partial match later is fine
    resumed(other)
