"""Clippers with torch.amp.GradScaler: unscale once, clip the true gradients, let the scaler skip.

Tests taking the ``device`` fixture (conftest.py) run with the CPU's GradScaler and, with a GPU,
with CUDA's (its own unscale and inf-check kernels, the fused optimizer's ``grad_scale``).
"""

from __future__ import annotations

import pytest
import torch

import gradclip


def _model(device: torch.device | str = "cpu") -> torch.nn.Module:
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(5, 8), torch.nn.Tanh(), torch.nn.Linear(8, 1))
    return model.to(device)


def _batches(n: int, device: torch.device | str = "cpu") -> list[tuple[torch.Tensor, torch.Tensor]]:
    gen = torch.Generator().manual_seed(3)
    return [(torch.randn(16, 5, generator=gen).to(device),
             10 * torch.randn(16, 1, generator=gen).to(device)) for _ in range(n)]


@pytest.mark.parametrize("fused", [False, True])
def test_scaled_run_equals_unscaled_run(fused: bool, device: torch.device) -> None:
    """unscale_ -> clipper -> scaler.step gives the parameters of a run without any scaling."""
    runs = []
    for use_scaler in (False, True):
        model = _model(device)
        opt = torch.optim.AdamW(model.parameters(), lr=1e-2, fused=fused)
        scaler = torch.amp.GradScaler(device.type, init_scale=2.0**10) if use_scaler else None
        clipper = gradclip.AutoClip(percentile=50.0)
        norms = []
        for x, y in _batches(12, device):
            loss = torch.nn.functional.mse_loss(model(x), y)
            if scaler is None:
                loss.backward()
                norms.append(float(clipper(model).norm))
                opt.step()
            else:
                scaler.scale(loss).backward()
                scaler.unscale_(opt)
                norms.append(float(clipper(model).norm))
                scaler.step(opt)
                scaler.update()
            opt.zero_grad()
        runs.append(([p.detach().clone() for p in model.parameters()], norms))
    (params_a, norms_a), (params_b, norms_b) = runs
    assert norms_a == pytest.approx(norms_b, rel=1e-5)  # the clipper saw unscaled gradients
    for a, b in zip(params_a, params_b, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_inf_step_skipped_by_scaler_stays_out_of_the_statistics(device: torch.device) -> None:
    model = _model(device)
    opt = torch.optim.SGD(model.parameters(), lr=1e-2)
    scaler = torch.amp.GradScaler(device.type, init_scale=2.0**10)
    clipper = gradclip.ZClip(warmup_steps=3)
    for i, (x, y) in enumerate(_batches(8, device)):
        loss = torch.nn.functional.mse_loss(model(x), y)
        scaler.scale(loss * (float("inf") if i == 5 else 1.0)).backward()
        scaler.unscale_(opt)
        before = clipper.state_dict()["state"]
        stats = clipper(model)
        if i == 5:
            assert not bool(stats.finite)
            after = clipper.state_dict()["state"]
            for key in ("mean", "var", "warmup_norms", "warmup_count", "steps"):
                assert torch.equal(before[key], after[key]), key
        scaler.step(opt)
        scaler.update()
        opt.zero_grad()
    assert int(clipper.nonfinite_steps) == 1 and int(clipper.steps) == 7
