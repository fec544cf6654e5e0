"""Folding the clip into a fused optimizer: no multiply of its own, no host sync.

torch's fused optimizers (``Adam``, ``AdamW``, ``SGD``, ``Adagrad`` with ``fused=True``)
take ``grad_scale`` and ``found_inf`` tensors, as ``torch.amp.GradScaler`` uses them: every
gradient is divided by ``grad_scale`` inside the kernel, and a step with ``found_inf`` set is
not taken (the step counters are put back). A clipper with one global coefficient can hand
``1 / coef`` and its skip decision to the kernel instead of multiplying the gradients first.

A clipper whose coefficient does not fold (per tensor or per row: AGC, AdaGC; a clamp:
ValueClip) still hands over its skip decision: it scales the gradients itself and arms
``found_inf`` alone (no ``grad_scale``), so a skipped step costs no host sync either.

The fold is used on accelerators only. On the CPU, where reading a value costs no sync,
torch's fused kernel given a ``grad_scale`` costs more than the multiply it saves (one
thread, fused AdamW: 510 µs a step instead of 424, for a 53 µs multiply saved), so there
the clipper multiplies and the step is torch's clip-then-step, bit for bit.

Where used, the fold is exactly equivalent to clipping and then stepping: the
optimizer updates exactly the gradients the clipper measured (a fused optimizer that holds
part of the model would leave the rest unclipped), it holds no ``grad_scale`` of someone
else's, and its kernel handles every dtype it is given (see
:func:`gradclip._foreach.fused_handles`). Otherwise the clipper scales the gradients and the
optimizer steps as usual. Optimizer state created lazily on the first step comes out the
same either way (the kernels divide by ``grad_scale`` before anything else).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor

from gradclip import _foreach

__all__ = ["Fold", "plan"]


@dataclass
class Fold:
    """A fused optimizer that will receive this step's coefficient.

    Attributes:
        optimizer: the fused optimizer.
        armed: True once :meth:`arm` handed it a coefficient (the step must then go through
            :meth:`step`, which takes the tensors back).
    """

    optimizer: torch.optim.Optimizer
    armed: bool = field(default=False)

    def arm(self, coef: Tensor | None, skipped: Tensor) -> None:
        """Hand ``coef`` (0-dim, at most 1; None: the gradients are already scaled) and the
        skip flag to the optimizer's kernel."""
        grad_scale = None if coef is None else coef.reciprocal().float()
        self.optimizer.grad_scale = grad_scale  # type: ignore[attr-defined]
        self.optimizer.found_inf = skipped.float()  # type: ignore[attr-defined]
        self.armed = True

    def step(self) -> None:
        """``optimizer.step()`` with the armed coefficient; the tensors are removed after."""
        try:
            self.optimizer.step()
        finally:
            del self.optimizer.grad_scale  # type: ignore[attr-defined]
            del self.optimizer.found_inf  # type: ignore[attr-defined]
            self.armed = False


def plan(optimizer: torch.optim.Optimizer, grads: list[Tensor]) -> Fold | None:
    """A :class:`Fold` when ``optimizer`` is fused and folding is exactly equivalent to
    clipping ``grads`` then stepping; None otherwise."""
    if not (
        _foreach.takes_grad_scale(optimizer)
        and optimizer.defaults.get("fused")
    ):
        return None
    if grads and _foreach.is_host_device(grads[0].device):
        return None  # on the CPU the multiply is cheaper (module doc)
    if getattr(optimizer, "grad_scale", None) is not None or getattr(optimizer, "found_inf", None) is not None:
        return None  # someone else's (a GradScaler's): never overwritten
    ours = {id(g) for g in grads}
    theirs: set[int] = set()
    for group in optimizer.param_groups:
        for p in group["params"]:
            grad = p.grad
            if grad is None:
                continue
            if id(grad) not in ours or not _foreach.fused_handles(optimizer, grad):
                return None
            theirs.add(id(grad))
    return Fold(optimizer) if theirs == ours else None
