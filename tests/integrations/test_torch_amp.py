"""Plain torch.amp loops (what tests/clippers/test_amp.py does not cover): a GradScaler with
gradient accumulation, and bf16 autocast through a fused optimizer's folded clip."""

from __future__ import annotations

import pytest
import torch

import gradclip

from .helpers import RTOL, float64_norm, recording

MAX_NORM = 0.5


def _model() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(5, 8), torch.nn.Tanh(), torch.nn.Linear(8, 1))


def _batches(n: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    gen = torch.Generator().manual_seed(3)
    return [
        (torch.randn(16, 5, generator=gen), 10 * torch.randn(16, 1, generator=gen))
        for _ in range(n)
    ]


def test_fp16_scaler_with_accumulation_clips_once_per_step_on_true_gradients() -> None:
    model = _model()
    opt = recording(torch.optim.AdamW)(model.parameters(), lr=1e-2)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**12)
    clipper = gradclip.NormClip(MAX_NORM)
    accumulate, pre = 3, []
    for i, (x, y) in enumerate(_batches(9)):
        with torch.autocast("cpu", dtype=torch.float16):
            loss = torch.nn.functional.mse_loss(model(x).float(), y) / accumulate
        scaler.scale(loss).backward()
        if (i + 1) % accumulate == 0:
            scaler.unscale_(opt)
            pre.append(float64_norm(model.parameters()))
            stats = clipper(model)
            assert float(stats.norm) == pytest.approx(pre[-1], rel=RTOL)
            scaler.step(opt)
            scaler.update()
            opt.zero_grad()
    assert int(clipper.steps) == len(opt.seen) == 3
    assert min(pre) > MAX_NORM
    assert opt.seen == pytest.approx([MAX_NORM] * 3, rel=RTOL)


def test_bf16_autocast_fused_step_sees_clipped_gradients(accelerator_path) -> None:
    model = _model()
    opt = recording(torch.optim.AdamW)(model.parameters(), lr=1e-2, fused=True)
    clipper = gradclip.AutoClip(percentile=50.0)
    for x, y in _batches(6):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = torch.nn.functional.mse_loss(model(x).float(), y)
        loss.backward()
        pre = float64_norm(model.parameters())
        stats = clipper.step(model, opt)
        assert float(stats.norm) == pytest.approx(pre, rel=RTOL)
        # seen: the gradients at the step divided by the grad_scale handed to the fused kernel
        assert opt.seen[-1] == pytest.approx(float(stats.post_norm), rel=RTOL)
        assert opt.seen[-1] <= float(stats.threshold) * (1 + RTOL)
        opt.zero_grad()
    assert opt.folded == [True] * 6
    assert not hasattr(opt, "grad_scale")  # handed back after the step
