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

__all__ = [
    "FLAG_FIELDS",
    "GROUP_PREFIX",
    "SCALAR_FIELDS",
    "STEP_FIELDS",
    "UPDATE_PREFIX",
    "ClipStats",
    "GroupStats",
    "StepField",
]


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

GROUP_PREFIX = "group/"
"""A step record's extras ``group/<name>/norm`` and ``group/<name>/coef``: a parameter
group's pre-clip norm and clip coefficient (:class:`GroupStats`, as the monitor logs it)."""
UPDATE_PREFIX = "update/"
"""A step record's extras ``update/<layer>``: the layer's update-to-parameter ratio
``‖Δθ‖ / ‖θ‖``; ``update/total`` the whole model's (the monitor's ``updates=``)."""


@dataclass(frozen=True)
class GroupStats:
    """What one clip step did to each parameter group (see :mod:`gradclip.grouping`).

    Every tensor is 1-D with one entry per group, on the gradients' device.

    Attributes:
        names: the group names.
        norm: each group's gradient norm before clipping (the p-norm of its tensors' norms).
        post_norm: each group's norm after clipping.
        threshold: the threshold each group was clipped at (NaN: excluded); groups that
            share a norm share it.
        coef: ``post_norm / norm`` per group (1: not clipped, and for excluded groups).
        excluded: per group, whether it was left out of the norm and the clip.

    Example:
        >>> import torch, gradclip
        >>> a, b = torch.nn.Parameter(torch.zeros(1)), torch.nn.Parameter(torch.zeros(1))
        >>> a.grad, b.grad = torch.tensor([4.0]), torch.tensor([0.5])
        >>> stats = gradclip.NormClip(1.0, groups={"a": [a], "b": [b]})({"a": a, "b": b})
        >>> stats.groups.names, stats.groups.coef
        (('a', 'b'), tensor([0.2500, 1.0000]))
    """

    names: tuple[str, ...]
    norm: Tensor
    post_norm: Tensor
    threshold: Tensor
    coef: Tensor
    excluded: tuple[bool, ...]

    def to_dict(self) -> dict[str, dict[str, float | bool]]:
        """Per group name, its fields as Python numbers (one host sync): for logging."""
        values = torch.stack([self.norm, self.post_norm, self.threshold, self.coef]).double()
        rows = values.cpu().tolist()
        return {
            name: {"norm": rows[0][i], "post_norm": rows[1][i], "threshold": rows[2][i],
                   "coef": rows[3][i], "excluded": self.excluded[i]}
            for i, name in enumerate(self.names)
        }


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
        groups: per parameter group, what the step did (:class:`GroupStats`), when the
            clipper clipped by groups; else None.

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
    groups: GroupStats | None = None

    def to_dict(self) -> dict[str, float | bool]:
        """The scalar fields as Python numbers (one host sync): for logging."""
        values = torch.stack([getattr(self, f.name).double() for f in STEP_FIELDS]).cpu().tolist()
        return {f.name: f.kind(v) for f, v in zip(STEP_FIELDS, values, strict=True)}
