"""The fused fold is used only where it equals clipping then stepping (issue: a fused
optimizer holding part of the model left the rest unclipped while ClipStats said clipped).

gradclip folds on accelerators only (on the CPU the fused kernel given a ``grad_scale`` costs
more than the multiply it saves); the tests of the fold's rules take the ``accelerator_path``
fixture, which runs that path on CPU tensors. Tests taking the ``device`` fixture
(conftest.py) run on the CPU and, with a GPU, on CUDA: there the fold hands its coefficient
to torch's CUDA fused kernels.
"""

from __future__ import annotations

import math
import warnings

import pytest
import torch

import gradclip
from gradclip import _foreach
from gradclip.clippers import fold

FUSED = [
    (torch.optim.SGD, {"lr": 0.1}),
    (torch.optim.SGD, {"lr": 0.1, "momentum": 0.9}),
    (torch.optim.SGD, {"lr": 0.1, "momentum": 0.9, "nesterov": True}),
    (torch.optim.SGD, {"lr": 0.1, "momentum": 0.5, "weight_decay": 0.1, "maximize": True}),
    (torch.optim.Adam, {"lr": 1e-2}),
    (torch.optim.Adam, {"lr": 1e-2, "amsgrad": True}),
    (torch.optim.AdamW, {"lr": 1e-2, "weight_decay": 0.1}),
    (torch.optim.Adagrad, {"lr": 0.1, "lr_decay": 0.1}),
]


def _model(device: torch.device | str = "cpu") -> torch.nn.Module:
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(12, 9), torch.nn.Tanh(), torch.nn.Linear(9, 3))
    return model.to(device)


def _backward(model: torch.nn.Module, step: int, scale: float = 30.0) -> None:
    model.zero_grad()
    x = torch.randn(5, 12, generator=torch.Generator().manual_seed(step))
    (model(x.to(next(model.parameters()).device)).pow(2).sum() * scale).backward()


def _skip_without_kernel(cls: type, device: torch.device) -> None:
    """Skip where this torch has no fused kernel for ``cls`` on ``device`` (say so)."""
    op = {"SGD": "_fused_sgd_", "Adam": "_fused_adam_", "AdamW": "_fused_adamw_",
          "Adagrad": "_fused_adagrad_"}[cls.__name__]
    key = "CUDA" if device.type == "cuda" else device.type.upper()
    if not torch._C._dispatch_has_kernel_for_dispatch_key(f"aten::{op}", key):
        pytest.skip(f"torch {torch.__version__} has no fused {cls.__name__} kernel on {device.type}")
    probe = torch.zeros(1, device=device, requires_grad=True)
    probe.grad = torch.zeros_like(probe)
    try:  # a kernel torch's optimizer still refuses (fused Adagrad on CUDA)
        cls([probe], fused=True).step()
    except RuntimeError as error:
        pytest.skip(f"torch {torch.__version__} refuses fused {cls.__name__} on {device.type}: {error}")


def _total(model: torch.nn.Module) -> float:
    return math.sqrt(sum(float(p.grad.double().square().sum()) for p in model.parameters()))


@pytest.mark.parametrize(("cls", "kwargs"), FUSED, ids=lambda v: getattr(v, "__name__", str(v)))
def test_fold_equals_clip_then_step_from_the_first_step(cls, kwargs, device, accelerator_path) -> None:
    """Lazily created optimizer state (momentum buffers, Adam moments) comes out the same."""
    _skip_without_kernel(cls, device)
    folded, plain = _model(device), _model(device)
    opt_f = cls(folded.parameters(), fused=True, **kwargs)
    opt_p = cls(plain.parameters(), fused=True, **kwargs)
    clip_f, clip_p = gradclip.NormClip(0.05), gradclip.NormClip(0.05)
    for step in range(4):
        _backward(folded, step)
        _backward(plain, step)
        folds = fold.plan(opt_f, [p.grad for p in folded.parameters()]) is not None
        # torch < 2.12: fused Adagrad takes no grad_scale (it does not set
        # _step_supports_amp_scaling, so GradScaler unscales for it too): gradclip multiplies
        assert folds is not (cls is torch.optim.Adagrad and _foreach.TORCH_VERSION < (2, 12))
        clip_f.step(folded, opt_f)
        clip_p(plain)
        opt_p.step()
        for p, q in zip(folded.parameters(), plain.parameters(), strict=True):
            torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)
        for p, q in zip(folded.parameters(), plain.parameters(), strict=True):
            for key, value in opt_f.state[p].items():
                torch.testing.assert_close(value, opt_p.state[q][key], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("part", ["first layer", "last layer", "one tensor"])
def test_an_optimizer_holding_part_of_the_model_gets_every_gradient_clipped(part, device, accelerator_path) -> None:
    model, reference = _model(device), _model(device)
    params = list(model.parameters())
    held = {"first layer": params[:2], "last layer": params[2:], "one tensor": params[1:2]}[part]
    index = [i for i, p in enumerate(params) if any(p is q for q in held)]
    opt = torch.optim.AdamW(held, lr=1e-2, fused=True)
    opt_ref = torch.optim.AdamW([list(reference.parameters())[i] for i in index], lr=1e-2)
    _backward(model, 0)
    _backward(reference, 0)
    assert _total(model) > 100  # far above the threshold
    stats = gradclip.NormClip(1.0).step(model, opt)
    assert _total(model) <= 1.0 + 1e-5  # every gradient, not only the optimizer's
    assert math.isclose(float(stats.post_norm), _total(model), rel_tol=1e-5)
    torch.nn.utils.clip_grad_norm_(reference.parameters(), 1.0)
    opt_ref.step()
    for p, q in zip(model.parameters(), reference.parameters(), strict=True):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-5, atol=1e-7)


def test_an_optimizer_holding_more_than_the_clipper_measured_is_not_folded(accelerator_path) -> None:
    model, extra = _model(), torch.nn.Linear(4, 4)
    opt = torch.optim.Adam([*model.parameters(), *extra.parameters()], lr=1e-2, fused=True)
    _backward(model, 0)
    extra(torch.ones(1, 4)).sum().mul(1e3).backward()
    before = extra.weight.grad.clone()
    assert fold.plan(opt, [p.grad for p in model.parameters()]) is None
    gradclip.NormClip(1.0).step(model, opt)
    assert _total(model) <= 1.0 + 1e-5
    assert torch.equal(extra.weight.grad, before)  # not the clipper's: untouched


def test_a_grad_scale_of_someone_else_is_never_overwritten(accelerator_path) -> None:
    model = _model()
    opt = torch.optim.Adam(model.parameters(), lr=1e-2, fused=True)
    _backward(model, 0)
    theirs = torch.tensor(1.0)
    opt.grad_scale = theirs
    assert fold.plan(opt, [p.grad for p in model.parameters()]) is None
    del opt.grad_scale


def test_fused_cpu_sgd_on_half_precision_is_folded_only_where_torch_is_fixed(accelerator_path) -> None:
    """torch < 2.14: fused CPU SGD/Adagrad skip most fp16/bf16 updates (pytorch#191763)."""
    p = torch.nn.Parameter(torch.ones(1000, dtype=torch.bfloat16))
    p.grad = torch.ones(1000, dtype=torch.bfloat16)
    opt = torch.optim.SGD([p], lr=0.1, fused=True)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        folds = fold.plan(opt, [p.grad]) is not None
    broken = _foreach.TORCH_VERSION < (2, 14)
    assert folds is not broken
    assert any("191763" in str(w.message) for w in caught) is broken
    # the kernel itself: element 0 is in the vectorised part
    opt.step()
    assert (float(p.detach()[0]) == 1.0) is broken


@pytest.mark.parametrize(("cls", "kwargs"), FUSED[::3], ids=lambda v: getattr(v, "__name__", str(v)))
def test_on_the_cpu_the_step_is_torchs_clip_then_step_bit_for_bit(cls, kwargs) -> None:
    """No fold on the CPU: the fused kernel with a ``grad_scale`` costs more there than the
    multiply it saves (bench_compile, one thread: 1.23x -> 1.09x torch's eager recipe)."""
    _skip_without_kernel(cls, torch.device("cpu"))
    ours, theirs = _model(), _model()
    opt_o = cls(ours.parameters(), fused=True, **kwargs)
    opt_t = cls(theirs.parameters(), fused=True, **kwargs)
    for step in range(3):
        _backward(ours, step)
        _backward(theirs, step)
        assert fold.plan(opt_o, [p.grad for p in ours.parameters()]) is None
        gradclip.NormClip(0.05).step(ours, opt_o)
        torch.nn.utils.clip_grad_norm_(theirs.parameters(), 0.05)
        opt_t.step()
        for p, q in zip(ours.parameters(), theirs.parameters(), strict=True):
            assert torch.equal(p, q) and torch.equal(p.grad, q.grad)
