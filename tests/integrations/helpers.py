"""Shared by the integration tests: an independent norm, and a recording optimizer."""

from __future__ import annotations

import math
from collections.abc import Iterable

import torch

RTOL = 1e-5  # our float32 accumulation against the float64 reference


def float64_norm(params: Iterable[torch.Tensor]) -> float:
    """Total 2-norm of the gradients of ``params``, in float64 (the independent reference)."""
    grads = [p.grad.detach().double() for p in params if p.grad is not None]
    if not grads:
        return 0.0
    return math.sqrt(sum(float(g.pow(2).sum()) for g in grads))


def optimizer_params(optimizer: torch.optim.Optimizer) -> list[torch.Tensor]:
    return [p for group in optimizer.param_groups for p in group["params"]]


def recording(cls: type[torch.optim.Optimizer]) -> type[torch.optim.Optimizer]:
    """``cls`` that records, in ``.seen``, the gradient norm each update is made from.

    A closure (Lightning passes one) runs first, as in torch's optimizers; a fused
    optimizer's ``grad_scale`` (the folded clip coefficient) divides the gradients.
    """

    class Recording(cls):  # type: ignore[misc,valid-type]
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            self.seen: list[float] = []
            self.folded: list[bool] = []  # a grad_scale was handed to the step

        def step(self, closure=None):
            loss = None
            if closure is not None:
                with torch.enable_grad():
                    loss = closure()
            scale = getattr(self, "grad_scale", None)
            self.folded.append(scale is not None)
            norm = float64_norm(optimizer_params(self))
            self.seen.append(norm if scale is None else norm / float(scale))
            super().step()
            return loss

    Recording.__name__ = f"Recording{cls.__name__}"
    return Recording
