"""The one non-finite policy shared by every clipper: ``propagate``, ``error`` or ``skip``.

* ``"propagate"`` (torch's behaviour): the non-finite norm flows into the coefficient, so
  NaN/inf reach the gradients as they would with ``torch.nn.utils.clip_grad_norm_``.
* ``"error"``: raise :class:`NonFiniteGradientError` before any gradient is touched, naming
  the parameters whose gradients are non-finite. Costs one host read per step.
* ``"skip"``: leave the gradients untouched and mark the step skipped
  (``ClipStats.skipped``); :meth:`gradclip.Clipper.step` then skips the optimizer step
  (through a fused optimizer's ``found_inf``: no host sync).

Under every policy a non-finite step never enters a clipper's statistics.
"""

from __future__ import annotations

from typing import Literal

import torch
from torch import Tensor

from gradclip._checks import check_choice

__all__ = ["POLICIES", "NonFiniteGradientError", "NonFinitePolicy", "check_policy", "raise_nonfinite"]

NonFinitePolicy = Literal["propagate", "error", "skip"]
POLICIES: tuple[str, ...] = ("propagate", "error", "skip")


class NonFiniteGradientError(RuntimeError):
    """Raised by ``nonfinite="error"`` when a gradient holds NaN or inf (nothing was changed)."""


def check_policy(nonfinite: object) -> NonFinitePolicy:
    """Validate a ``nonfinite=`` argument."""
    return check_choice(nonfinite, "nonfinite", POLICIES, "nonfinite='skip'")  # type: ignore[return-value]


def raise_nonfinite(total: Tensor, per_tensor: Tensor, names: tuple[str, ...]) -> None:
    """Raise :class:`NonFiniteGradientError` if the total norm is NaN/inf (host reads), naming
    the parameters whose norms are non-finite; when none is, the total itself overflowed or
    (distributed) another rank holds the NaN/inf: every rank raises, not only that one."""
    if bool(torch.isfinite(total)):
        return
    advice = (
        "Nothing was clipped. Use nonfinite='skip' to skip such steps, or find the source (e.g. "
        "the loss, a learning rate that is too high, or fp16 overflow without GradScaler)."
    )
    bad = (~torch.isfinite(per_tensor)).nonzero().flatten().tolist()
    if not bad:
        raise NonFiniteGradientError(
            f"non-finite gradient norm {total.item()}: every gradient on this rank is finite, so "
            f"another rank holds NaN/inf, or the total overflowed. {advice}"
        )
    shown = ", ".join(names[i] for i in bad[:5]) + (" ..." if len(bad) > 5 else "")
    raise NonFiniteGradientError(
        f"non-finite gradient in {len(bad)} parameter(s): {shown}. {advice}"
    )
