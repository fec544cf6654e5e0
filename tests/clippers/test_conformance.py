"""Every clipper of the registry through the same contract (README, "Clippers"; the
protocol in ``gradclip.clippers.base``)."""

from __future__ import annotations

import io
import math

import pytest
import torch

import gradclip
from host_reads import HostReadDetector

from .registry import ENTRIES, Entry

pytestmark = [
    pytest.mark.parametrize("entry", ENTRIES, ids=[e.id for e in ENTRIES]),
    # every clipper at its defaults, stepped with Adam too: AdaptiveClip says it was built
    # for another kind (tested in test_adaptive.py)
    pytest.mark.filterwarnings("ignore:AdaptiveClip was built:UserWarning"),
]


def _model(dtype: torch.dtype = torch.float32) -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(
        torch.nn.Linear(6, 16), torch.nn.Tanh(), torch.nn.Linear(16, 16), torch.nn.Linear(16, 3)
    ).to(dtype)


def _scales(steps: int, seed: int = 1) -> list[float]:
    """Norm scales near 1 with occasional x30 spikes (what adaptive clippers are for)."""
    gen = torch.Generator().manual_seed(seed)
    scales = torch.exp(0.3 * torch.randn(steps, generator=gen, dtype=torch.float64))
    spikes = torch.rand(steps, generator=gen, dtype=torch.float64) < 0.1
    return torch.where(spikes, scales * 30, scales).tolist()


def _set_grads(model: torch.nn.Module, step: int, scale: float, poison: float | None = None) -> None:
    gen = torch.Generator().manual_seed(1000 + step)
    params = list(model.parameters())
    raw = [torch.randn(p.shape, generator=gen, dtype=torch.float64) for p in params]
    norm = math.sqrt(sum(float(r.pow(2).sum()) for r in raw))
    for p, r in zip(params, raw, strict=True):
        p.grad = (r * (scale / norm)).to(p.dtype)
    if poison is not None:
        params[1].grad.view(-1)[0] = poison


def _run(clipper: gradclip.Clipper, model: torch.nn.Module, scales: list[float], start: int = 0,
         poison: dict[int, float] | None = None, seeds: list[int] | None = None) -> list[dict]:
    """Clip a sequence of gradient steps; return per-step stats and clipped grads.

    Step i's gradient directions are seeded by ``seeds[i - start]`` (default: i)."""
    out = []
    for i, scale in enumerate(scales, start=start):
        _set_grads(model, seeds[i - start] if seeds else i, scale, (poison or {}).get(i))
        stats = clipper(model)
        out.append({"stats": stats.to_dict(), "grads": [p.grad.clone() for p in model.parameters()]})
    return out


def _assert_same_runs(a: list[dict], b: list[dict]) -> None:
    assert len(a) == len(b)
    for x, y in zip(a, b, strict=True):
        assert x["stats"] == y["stats"] or _nan_equal(x["stats"], y["stats"])
        for g, h in zip(x["grads"], y["grads"], strict=True):
            assert torch.equal(g, h)


def _nan_equal(x: dict, y: dict) -> bool:
    return all(
        x[k] == y[k] or (isinstance(x[k], float) and math.isnan(x[k]) and math.isnan(y[k])) for k in x
    )


def _state_without_counters(clipper: gradclip.Clipper) -> dict:
    """The state dict without what counts every step, skipped ones too: the non-finite
    counter, and a spike detector's steps judged, spikes in a row and SpikeScore ring."""
    sd = clipper.state_dict()
    sd["state"].pop("nonfinite_steps")
    if "spikes" in sd:
        for key in ("steps", "run", "flags", "in_window", "judged"):
            sd["spikes"]["state"].pop(key)
    return sd


def _states_equal(a: dict, b: dict) -> bool:
    def eq(x, y):
        if isinstance(x, dict):
            return x.keys() == y.keys() and all(eq(x[k], y[k]) for k in x)
        if isinstance(x, torch.Tensor):
            return torch.equal(x, y) or bool(torch.isnan(x).all() and torch.isnan(y).all())
        return x == y
    return eq(a, b)


# -- checkpoints -------------------------------------------------------------------------


def test_resume_from_checkpoint_equals_uninterrupted_run(entry: Entry) -> None:
    scales = _scales(2 * entry.warmup + 40)
    half = len(scales) // 2
    reference = _run(entry.make(), _model(), scales)

    first = entry.make()
    model = _model()
    head = _run(first, model, scales[:half])
    buffer = io.BytesIO()
    torch.save(first.state_dict(), buffer)
    buffer.seek(0)
    resumed = entry.make()
    resumed.load_state_dict(torch.load(buffer))
    tail = _run(resumed, model, scales[half:], start=half)
    _assert_same_runs(reference, head + tail)


def test_state_dict_round_trip_and_reset(entry: Entry) -> None:
    clipper = entry.make()
    _run(clipper, _model(), _scales(entry.warmup + 5))
    saved = clipper.state_dict()
    other = entry.make()
    other.load_state_dict(saved)
    assert _states_equal(other.state_dict(), saved)
    assert saved["type"] == entry.name and isinstance(saved["version"], int)
    clipper.reset()
    assert _states_equal(clipper.state_dict(), entry.make().state_dict())


def test_load_state_dict_rejects_mismatch(entry: Entry) -> None:
    clipper = entry.make()
    saved = clipper.state_dict()
    foreign = next(e for e in ENTRIES if e.name != entry.name).make().state_dict()
    with pytest.raises(ValueError, match=foreign["type"]):
        clipper.load_state_dict(foreign)
    with pytest.raises(ValueError, match="version"):
        clipper.load_state_dict({**saved, "version": saved["version"] + 1})
    broken = {**saved, "state": {k: v for k, v in saved["state"].items() if k != "steps"}}
    with pytest.raises(ValueError, match="steps"):
        clipper.load_state_dict(broken)
    with pytest.raises(ValueError, match="missing"):
        clipper.load_state_dict({"state": {}})


# -- behaviour ---------------------------------------------------------------------------


def test_small_gradients_are_not_touched(entry: Entry) -> None:
    clipper = entry.make()
    model = _model()
    _run(clipper, model, [1.0] * (entry.warmup + 10))
    _set_grads(model, 999, 1e-4)
    before = [(p.grad.clone(), p.grad._version) for p in model.parameters()]
    stats = clipper(model)
    assert not bool(stats.clipped)
    for p, (grad, version) in zip(model.parameters(), before, strict=True):
        assert torch.equal(p.grad, grad)
        assert p.grad._version == version  # CPU: not even rewritten


def test_clipping_bounds_what_it_reports(entry: Entry) -> None:
    clipper = entry.make()
    model = _model()
    for step, stats in enumerate(_run(clipper, model, _scales(entry.warmup + 30))):
        post = math.sqrt(sum(float(g.double().pow(2).sum()) for g in stats["grads"]))
        if clipper.norm_type == 2.0:
            assert post == pytest.approx(stats["stats"]["post_norm"], rel=1e-5), step
        assert stats["stats"]["post_norm"] <= stats["stats"]["norm"] * (1 + 1e-6)


@pytest.mark.parametrize("poison", [float("nan"), float("inf")])
def test_nonfinite_steps_never_enter_the_statistics(entry: Entry, poison: float) -> None:
    scales = _scales(entry.warmup + 30)
    bad_steps = {entry.warmup // 2, entry.warmup + 10}
    clean = entry.make()
    model = _model()
    clean_run = _run(clean, model, [s for i, s in enumerate(scales) if i not in bad_steps])
    poisoned = entry.make(nonfinite="skip")
    # The clean steps of both runs see the same gradients.
    clean_index = iter(range(len(scales)))
    seeds = [10_000 + i if i in bad_steps else next(clean_index) for i in range(len(scales))]
    poisoned_run = _run(poisoned, model, scales, poison=dict.fromkeys(bad_steps, poison), seeds=seeds)
    kept = [r for i, r in enumerate(poisoned_run) if i not in bad_steps]
    # Same thresholds on every clean step (gradients differ: the step index seeds them).
    assert [r["stats"]["threshold"] for r in kept] == pytest.approx(
        [r["stats"]["threshold"] for r in clean_run], rel=1e-6, nan_ok=True
    )
    assert int(poisoned.nonfinite_steps) == len(bad_steps)
    assert int(poisoned.steps) == int(clean.steps)
    for i in bad_steps:
        assert poisoned_run[i]["stats"]["skipped"] and not poisoned_run[i]["stats"]["finite"]


def test_propagate_matches_torch_on_nonfinite(entry: Entry) -> None:
    clipper = entry.make()
    model = _model()
    _set_grads(model, 0, 50.0, poison=float("nan"))
    stats = clipper(model)
    # A detector that skips spikes skips a NaN step whatever `nonfinite` says (the NaN is
    # then left where it is: the caller does not step).
    assert not bool(stats.finite) and bool(stats.skipped) == entry.skips_spikes
    assert torch.isnan(list(model.parameters())[1].grad).any()


def test_error_policy_raises_before_touching(entry: Entry) -> None:
    clipper = entry.make(nonfinite="error")
    model = _model()
    _set_grads(model, 0, 50.0, poison=float("inf"))
    before = [p.grad.clone() for p in model.parameters()]
    with pytest.raises(gradclip.NonFiniteGradientError, match=r"0\.bias"):
        clipper(model)
    assert all(torch.equal(p.grad, b) for p, b in zip(model.parameters(), before, strict=True))
    assert int(clipper.steps) == 0


def test_error_policy_raises_when_only_the_total_overflows(entry: Entry) -> None:
    # Every gradient is finite, the float32 total is not: torch's coefficient would be 0 and
    # would zero every gradient, which "error" must not let happen silently.
    clipper = entry.make(nonfinite="error")
    params = [torch.nn.Parameter(torch.zeros(1)) for _ in range(2)]
    for p in params:
        p.grad = torch.tensor([3e38])
    total = torch.linalg.vector_norm(torch.tensor([3e38, 3e38]), clipper.norm_type)
    if torch.isfinite(total):  # the inf norm (ValueClip) is a max: it cannot overflow
        assert bool(clipper(params).finite)
        return
    with pytest.raises(gradclip.NonFiniteGradientError, match="the total overflowed"):
        clipper(params)
    assert all(torch.equal(p.grad, torch.tensor([3e38])) for p in params)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_low_precision_gradients(entry: Entry, dtype: torch.dtype) -> None:
    clipper = entry.make()
    model = _model(dtype)
    for r in _run(clipper, model, _scales(entry.warmup + 20)):
        assert r["stats"]["finite"]
        assert all(g.dtype == dtype and torch.isfinite(g).all() for g in r["grads"])


@pytest.mark.parametrize("optimizer", ["fused", "fused, accelerator path", "foreach"])
def test_skip_leaves_parameters_and_optimizer_untouched(
    entry: Entry, optimizer: str, request: pytest.FixtureRequest
) -> None:
    """On an accelerator a fused optimizer gets the skip through ``found_inf``; elsewhere
    the step is not called."""
    if optimizer.endswith("accelerator path"):
        request.getfixturevalue("accelerator_path")
    model = _model()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, **{optimizer.split(",")[0]: True})
    clipper = entry.make(nonfinite="skip")
    for i, scale in enumerate(_scales(entry.warmup + 5)):
        _set_grads(model, i, scale)
        clipper.step(model, opt)
    params = [p.detach().clone() for p in model.parameters()]
    opt_state = [{k: v.clone() for k, v in opt.state[p].items()} for p in model.parameters()]
    clipper_state = _state_without_counters(clipper)
    _set_grads(model, 77, 1.0, poison=float("nan"))
    stats = clipper.step(model, opt)
    assert bool(stats.skipped)
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), params, strict=True))
    for p, saved in zip(model.parameters(), opt_state, strict=True):
        assert opt.state[p].keys() == saved.keys()
        for k, v in opt.state[p].items():
            assert torch.equal(v, saved[k]), k
    assert _states_equal(_state_without_counters(clipper), clipper_state)
    assert not hasattr(opt, "grad_scale") and not hasattr(opt, "found_inf")


def test_fused_fold_equals_clip_then_step(entry: Entry, accelerator_path: None) -> None:
    """The fold (used on accelerators; here forced onto CPU tensors) steps like clip then step."""
    if not entry.scales_globally:
        pytest.skip("only a single global coefficient folds into grad_scale")
    models = [_model(), _model()]
    opts = [torch.optim.AdamW(models[0].parameters(), lr=1e-2, fused=True),
            torch.optim.AdamW(models[1].parameters(), lr=1e-2)]
    clippers = [entry.make(), entry.make()]
    for i, scale in enumerate(_scales(entry.warmup + 15)):
        for model in models:
            _set_grads(model, i, scale)
        clippers[0].step(models[0], opts[0])  # folded into the fused kernel
        if not bool(clippers[1](models[1]).skipped):  # a spike detector's skip
            opts[1].step()
    for p, q in zip(models[0].parameters(), models[1].parameters(), strict=True):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)


def test_no_host_sync_on_accelerators(entry: Entry, accelerator_path: None) -> None:
    """No device value read on the host, the first call included; after the first call no
    tensor built from host data either (a host-to-device copy: what a CUDA graph cannot
    capture). Index tensors and constants are built once, on the first call."""
    clipper = entry.make()
    model = _model()
    steps = _scales(entry.warmup + 10)
    for i, scale in enumerate(steps):
        _set_grads(model, i, scale)
        with HostReadDetector() as mode:
            clipper(model)
        assert mode.reads == [], (i, mode.reads)
        assert i == 0 or mode.copies == [], (i, mode.copies)


def test_host_read_detector_is_not_vacuous(entry: Entry) -> None:
    clipper = entry.make(nonfinite="error")
    model = _model()
    _set_grads(model, 0, 1.0)
    with HostReadDetector() as mode:
        clipper(model)
    assert mode.reads  # the error policy must read the finite flag


def test_bad_arguments_name_the_argument(entry: Entry) -> None:
    assert entry.bad, "every clipper must list arguments it refuses"
    for kwargs, error, name in entry.bad:
        with pytest.raises(error, match=name):
            entry.cls()(**kwargs)


def test_parameter_targets_agree(entry: Entry) -> None:
    """A module, named pairs and a name->param mapping give the same clip."""
    results = []
    for make_target in (lambda m: m, lambda m: m.named_parameters(), lambda m: dict(m.named_parameters())):
        model = _model()
        clipper = entry.make()
        for i, scale in enumerate(_scales(entry.warmup + 8)):
            _set_grads(model, i, scale)
            clipper(make_target(model))
        results.append([p.grad.clone() for p in model.parameters()])
    for other in results[1:]:
        assert all(torch.equal(a, b) for a, b in zip(results[0], other, strict=True))


@pytest.mark.parametrize("huge", [1e20, 3e30, 1e37])
def test_huge_finite_gradients_are_measured_and_clipped(entry: Entry, huge: float) -> None:
    """Finite float32 gradients whose float32 sum of squares overflows: measured (not inf),
    clipped (not zeroed), never called non-finite (nonfinite="error" does not raise)."""
    clipper = entry.make(nonfinite="error")
    model = _model()
    _run(clipper, model, _scales(entry.warmup + 3))
    _set_grads(model, 99, huge)
    p = clipper.norm_type

    def norm() -> float:
        flat = torch.cat([q.grad.double().flatten() for q in model.parameters()])
        return float(torch.linalg.vector_norm(flat, p))

    expected = norm()
    stats = clipper(model)
    assert bool(stats.finite) and not bool(stats.skipped)
    assert math.isclose(float(stats.norm), expected, rel_tol=1e-4)
    grads = [q.grad for q in model.parameters()]
    assert all(bool(torch.isfinite(g).all()) for g in grads)
    assert any(bool((g != 0).any()) for g in grads)
    assert math.isclose(float(stats.post_norm), norm(), rel_tol=1e-4)


@pytest.mark.parametrize("huge", [3e19, 1e30, 3e38])
def test_statistics_survive_huge_finite_norms(entry: Entry, huge: float) -> None:
    """A huge finite norm (in warm-up, where nothing is clipped yet) poisons no statistic:
    the state stays free of NaN, every threshold stays finite, and spikes are clipped again
    once the statistics have forgotten it (ZClip's EMA takes about 2 ln(norm) / (1 - alpha)
    steps: 5,800 for 3e38 at alpha 0.97; a float32 variance overflowed to inf forever)."""
    clipper = entry.make()
    p = torch.nn.Parameter(torch.zeros(10))
    gen = torch.Generator().manual_seed(0)

    def step(scale: float):
        direction = torch.randn(10, generator=gen, dtype=torch.float64)
        p.grad = (direction * (scale / float(direction.norm()))).float()
        return clipper({"w": p})

    step(1.0)
    step(huge)
    recovered = None
    scales = [s for s in _scales(8000, seed=3) if s < 10]  # no spikes but the probes
    for i, scale in enumerate(scales):
        stats = step(30.0 if i % 250 == 249 else scale)
        if i > entry.warmup + 10:
            threshold = float(stats.threshold)
            assert math.isfinite(threshold) or math.isnan(threshold), (i, threshold)
        if i % 250 == 249 and bool(stats.clipped):
            recovered = i
            break
    for name, value in clipper.state_dict()["state"].items():
        if value.is_floating_point():
            assert not bool(torch.isnan(value).any()), name
    if entry.name not in ("NormClip", "ValueClip", "AGC"):  # those hold no statistic
        assert recovered is not None, "a x30 spike is clipped again"


def _state_tensors(clipper: gradclip.Clipper) -> list[tuple[tuple[str, ...], str]]:
    """(path to the mapping, key) of every floating-point tensor in the state dict (a spike
    detector's included), and of the step counter."""
    saved = clipper.state_dict()
    out: list[tuple[tuple[str, ...], str]] = [(("state",), "steps")]
    for prefix in ((), ("spikes",)) if "spikes" in saved else ((),):
        part = saved
        for p in prefix:
            part = part[p]
        out += [((*prefix, "state"), k) for k, v in part["state"].items() if v.is_floating_point()]
        for name, entry in part["param_state"].items():
            out += [((*prefix, "param_state", name), k) for k, v in entry.items() if v.is_floating_point()]
    return out


@pytest.mark.parametrize("corruption", ["nan", "shape", "dtype", "not a tensor"])
def test_load_state_dict_refuses_corrupt_tensors(entry: Entry, corruption: str) -> None:
    """A checkpoint is validated when loaded, not at the next step; nothing is replaced."""
    clipper, model = entry.make(), _model()
    _run(clipper, model, _scales(entry.warmup + 3))
    saved = clipper.state_dict()
    for path, key in _state_tensors(clipper):
        if corruption == "nan" and key == "steps":
            continue
        bad = clipper.state_dict()
        where = bad
        for p in path:
            where = where[p]
        value = where[key]
        where[key] = {
            "nan": lambda v: torch.full_like(v, math.nan),
            "shape": lambda v: torch.zeros(*v.shape, 2, dtype=v.dtype),
            "dtype": lambda v: v.to(torch.float16 if v.dtype != torch.float16 else torch.float64),
            "not a tensor": lambda v: "corrupt",
        }[corruption](value)
        fresh = entry.make()
        fresh.load_state_dict(saved)
        before = fresh.state_dict()
        with pytest.raises(ValueError, match=repr(key)):
            fresh.load_state_dict(bad)
        assert _states_equal(fresh.state_dict(), before), key


@pytest.mark.parametrize("wrap", ["compile", "DataParallel", "both"])
def test_state_by_name_survives_model_wrappers(entry: Entry, wrap: str) -> None:
    """A state saved from the plain model resumes exactly on the wrapped one (names leave out
    torch.compile's `_orig_mod.` and DataParallel's / DDP's `module.`)."""
    scales = _scales(entry.warmup + 12)
    split = entry.warmup + 4
    straight = _run(entry.make(), _model(), scales)
    first, model = entry.make(), _model()
    head = _run(first, model, scales[:split])
    wrapped: torch.nn.Module = model
    if wrap in ("DataParallel", "both"):
        wrapped = torch.nn.DataParallel(wrapped)
    if wrap in ("compile", "both"):
        wrapped = torch.compile(wrapped)
    resumed = entry.make()
    resumed.load_state_dict(first.state_dict())
    tail = []
    for i, scale in enumerate(scales[split:], start=split):
        _set_grads(model, i, scale)
        stats = resumed(wrapped)
        assert all("_orig_mod" not in n and not n.startswith("module.") for n in stats.names)
        tail.append({"stats": stats.to_dict(), "grads": [p.grad.clone() for p in model.parameters()]})
    _assert_same_runs(straight, head + tail)


def test_names_that_collide_are_refused(entry: Entry) -> None:
    model = _model()
    _set_grads(model, 0, 1.0)
    params = list(model.parameters())
    snap = [p.grad.clone() for p in params]
    with pytest.raises(ValueError, match="named"):
        entry.make()([("w", params[0]), ("w", params[1])])
    assert all(torch.equal(p.grad, s) for p, s in zip(params, snap, strict=True))
