"""Synthetic gradient steps with a chosen total norm, shared by the per-algorithm tests."""

from __future__ import annotations

import math
from collections.abc import Iterable

import pytest
import torch

from gradclip import _foreach
from gradclip.clippers.base import Clipper
from host_reads import HostReadDetector

SHAPES = [(4, 3), (5,), (2, 2, 2)]


def grads_with_norm(norm: float, step: int) -> list[torch.Tensor]:
    """float32 gradients whose total 2-norm is ``norm``; NaN/inf put one bad element in."""
    gen = torch.Generator().manual_seed(step)
    grads = [torch.randn(s, generator=gen, dtype=torch.float64) for s in SHAPES]
    total = math.sqrt(sum(float(g.square().sum()) for g in grads))
    scale = norm / total if math.isfinite(norm) else 1.0 / total
    grads = [(g * scale).float() for g in grads]
    if not math.isfinite(norm):
        grads[1][2] = norm
    return grads


def make_params() -> dict[str, torch.nn.Parameter]:
    return {f"p{i}": torch.nn.Parameter(torch.zeros(s)) for i, s in enumerate(SHAPES)}


def set_grads(
    params: dict[str, torch.nn.Parameter] | Iterable[torch.nn.Parameter], grads: list[torch.Tensor]
) -> None:
    for p, g in zip(params.values() if isinstance(params, dict) else params, grads, strict=True):
        p.grad = g.clone()


def float64_norm(grads: list[torch.Tensor]) -> float:
    return math.sqrt(sum(float(g.double().square().sum()) for g in grads))


def assert_steps_read_nothing(
    clipper: Clipper, norms: list[float], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Run ``clipper`` on steps of these norms: the first on the CPU path (which reads the
    coefficient: the detector works), the rest on the accelerator path with no host read."""
    params = make_params()
    grads = [grads_with_norm(n, s) for s, n in enumerate(norms)]
    set_grads(params, grads[0])
    with HostReadDetector() as control:
        clipper(params)
    assert control.reads
    monkeypatch.setattr(_foreach, "is_host_device", lambda device: False)
    for g in grads[1:]:
        set_grads(params, g)
        with HostReadDetector() as mode:
            clipper(params)
        assert mode.reads == []
