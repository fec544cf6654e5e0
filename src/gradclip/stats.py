"""ClipStats: what one clip step did, as device tensors (no host sync until you ask)."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from gradclip.norms import GradNorms

__all__ = ["ClipStats"]


@dataclass(frozen=True)
class ClipStats:
    """The record of one clip step. Every field is a 0-dim tensor on the gradients' device.

    Attributes:
        norm: total gradient norm before clipping (float32; float64 for 64-bit gradients).
        post_norm: total gradient norm after clipping (equal to ``norm`` when nothing was
            clipped, and when the step was skipped).
        threshold: the threshold the clipper used this step: a total-norm threshold for
            global clippers, the element bound for :class:`~gradclip.ValueClip`, the ratio
            ``clipping`` for AGC; NaN where a method has no single threshold.
        coef: the factor applied to the total norm, ``post_norm / norm`` (1 when nothing was
            clipped; exactly the multiplier of every gradient for global clippers).
        clipped: bool, True when some gradient was scaled down.
        finite: bool, True when every gradient value was finite (the total norm is finite).
        skipped: bool, True when the step was skipped by ``nonfinite="skip"``.
        norms: the per-tensor pre-clip norms from the same pass (:class:`GradNorms`).
        names: the parameter name of each entry of ``norms.tensors``.

    Example:
        >>> import torch, gradclip
        >>> model = torch.nn.Linear(2, 1)
        >>> model(torch.ones(1, 2)).sum().backward()
        >>> stats = gradclip.NormClip(max_norm=0.1)(model)
        >>> sorted(stats.to_dict())[:3]
        ['clipped', 'coef', 'finite']
    """

    norm: Tensor
    post_norm: Tensor
    threshold: Tensor
    coef: Tensor
    clipped: Tensor
    finite: Tensor
    skipped: Tensor
    norms: GradNorms
    names: tuple[str, ...]

    def to_dict(self) -> dict[str, float | bool]:
        """The scalar fields as Python numbers (one host sync): for logging."""
        fields = ("norm", "post_norm", "threshold", "coef", "clipped", "finite", "skipped")
        values = torch.stack([getattr(self, f).double() for f in fields]).cpu().tolist()
        return {
            f: bool(v) if f in ("clipped", "finite", "skipped") else v
            for f, v in zip(fields, values, strict=True)
        }
