"""ClipStats: what one clip step did, as device tensors (no host sync until you ask), and the
step-record schema: the scalar and flag fields every consumer of a step reads (the monitor's
buffers, its log records, the sinks, :class:`~gradclip.History`, ``ClipStats.to_dict``).

Example:
    >>> from gradclip.stats import FLAG_FIELDS, SCALAR_FIELDS
    >>> SCALAR_FIELDS, FLAG_FIELDS
    (('norm', 'post_norm', 'threshold', 'coef'), ('clipped', 'finite', 'skipped'))
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import torch
from torch import Tensor

from gradclip.norms import GradNorms

__all__ = ["FLAG_FIELDS", "SCALAR_FIELDS", "STEP_FIELDS", "ClipStats", "StepField"]


class StepField(NamedTuple):
    """One field of a step record: its name (a :class:`ClipStats` attribute), its kind and
    what it means."""

    name: str
    kind: type  # float: a number (NaN/inf allowed); bool: a flag
    meaning: str


STEP_FIELDS: tuple[StepField, ...] = (
    StepField("norm", float, "total gradient norm before clipping"),
    StepField("post_norm", float, "total gradient norm after clipping"),
    StepField("threshold", float, "the threshold the clipper used this step (NaN: none)"),
    StepField("coef", float, "post_norm / norm: the factor applied (1: not clipped)"),
    StepField("clipped", bool, "some gradient was scaled down"),
    StepField("finite", bool, "every gradient value was finite"),
    StepField("skipped", bool, "the step was skipped (nonfinite='skip')"),
)
"""The step record's fields, in the order every record, log column and buffer uses."""

SCALAR_FIELDS: tuple[str, ...] = tuple(f.name for f in STEP_FIELDS if f.kind is float)
"""The numeric fields (float64 in logs and histories)."""

FLAG_FIELDS: tuple[str, ...] = tuple(f.name for f in STEP_FIELDS if f.kind is bool)
"""The boolean fields."""


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
        values = torch.stack([getattr(self, f.name).double() for f in STEP_FIELDS]).cpu().tolist()
        return {f.name: f.kind(v) for f, v in zip(STEP_FIELDS, values, strict=True)}
