"""NormClip and ValueClip beyond the conformance registry."""

from __future__ import annotations

import pytest
import torch

import gradclip


@pytest.mark.parametrize("complex_first", [False, True])
def test_value_clip_refuses_complex_before_clamping_anything(complex_first):
    real = torch.nn.Parameter(torch.zeros(3))
    real.grad = torch.tensor([5.0, -5.0, 0.5])
    cplx = torch.nn.Parameter(torch.zeros(2, dtype=torch.complex64))
    cplx.grad = torch.tensor([3 + 4j, 1j], dtype=torch.complex64)
    before = [real.grad.clone(), cplx.grad.clone()]
    with pytest.raises(NotImplementedError, match=r"complex.*nothing was changed"):
        gradclip.ValueClip(1.0)([cplx, real] if complex_first else [real, cplx])
    assert torch.equal(real.grad, before[0]) and torch.equal(cplx.grad, before[1])


def test_value_clip_clamps_like_torch():
    grads = [torch.tensor([5.0, -5.0, 0.5]), torch.tensor([[0.2, -3.0]])]
    ours = [torch.nn.Parameter(torch.zeros_like(g)) for g in grads]
    theirs = [torch.nn.Parameter(torch.zeros_like(g)) for g in grads]
    for a, b, g in zip(ours, theirs, grads, strict=True):
        a.grad, b.grad = g.clone(), g.clone()
    stats = gradclip.ValueClip(1.0)(ours)
    torch.nn.utils.clip_grad_value_(theirs, 1.0)
    assert all(torch.equal(a.grad, b.grad) for a, b in zip(ours, theirs, strict=True))
    assert bool(stats.clipped) and float(stats.norm) == 5.0 and float(stats.post_norm) == 1.0
