"""ClipStats: what one clip step did, as device tensors (no host sync until you ask), and the
step-record schema: the scalar and flag fields every consumer of a step reads (the monitor's
buffers, its log records, the sinks, :class:`~gradclip.History`, ``ClipStats.to_dict``).

Example:
    >>> from gradclip.stats import FLAG_FIELDS, SCALAR_FIELDS
    >>> SCALAR_FIELDS
    ('norm', 'post_norm', 'threshold', 'coef', 'spike_bound', 'spike_score')
    >>> FLAG_FIELDS
    ('clipped', 'finite', 'skipped', 'spike')
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, NamedTuple

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
    """One field of a step record: its name (a :class:`ClipStats` attribute), its kind, what
    it means, and the value a record written before the field existed reads as (None: every
    record has it)."""

    name: str
    kind: type  # float: a number (NaN/inf allowed); bool: a flag
    meaning: str
    default: float | bool | None = None


STEP_FIELDS: tuple[StepField, ...] = (
    StepField("norm", float, "total gradient norm before clipping"),
    StepField("post_norm", float, "total gradient norm after clipping"),
    StepField("threshold", float, "the threshold the clipper used this step (NaN: none)"),
    StepField("coef", float, "post_norm / norm: the factor applied (1: not clipped)"),
    StepField("clipped", bool, "some gradient was scaled down"),
    StepField("finite", bool, "every gradient value was finite"),
    StepField("skipped", bool, "the step was skipped (nonfinite='skip', or a spike under spikes='skip')"),
    StepField("spike_bound", float, "the spike detector's bound: the largest norm that is not "
              "a spike (inf: no detector, or its warm-up)", math.inf),
    StepField("spike_score", float, "the SpikeScore: the fraction of recent steps that were "
              "spikes (0: no detector)", 0.0),
    StepField("spike", bool, "the spike detector called this step a spike (False: no "
              "detector)", False),
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


_CONSTANTS: dict[tuple[torch.device, torch.dtype, float], Tensor] = {}


def _constant(value: float, like: Tensor) -> Tensor:
    """A 0-dim tensor of ``value`` like ``like``, shared between steps (never written to):
    a step without a spike detector allocates nothing for the spike fields."""
    if torch.compiler.is_compiling():
        return torch.full_like(like, value)
    key = (like.device, like.dtype, value)
    tensor = _CONSTANTS.get(key)
    if tensor is None:
        tensor = _CONSTANTS[key] = torch.full((), value, dtype=like.dtype, device=like.device)
    return tensor


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
        skipped: bool, True when the step was skipped (by ``nonfinite="skip"``, or as a spike
            under a spike detector's ``"skip"`` policy).
        norms: the per-tensor pre-clip norms from the same pass (:class:`GradNorms`).
        names: the parameter name of each entry of ``norms.tensors``.
        groups: per parameter group, what the step did (:class:`GroupStats`), when the
            clipper clipped by groups; else None.
        spike: bool, True when the clipper's spike detector called the step a spike (False
            without a detector; see :class:`gradclip.SpikeDetector`).
        spike_score: the detector's SpikeScore after this step (0 without a detector).
        spike_bound: the detector's bound, the largest norm that is not a spike (``inf``
            without a detector, and in its warm-up).
        spike_top, spike_ratios: the parameters with the largest ratio of their norm to their
            running median (int64 indices into ``names``, largest first) and those ratios
            (None without a detector).
        spike_report: the :class:`gradclip.SpikeReport` of a spike, when it was read on the
            host (on the CPU, or with ``on_spike``); None otherwise.

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
    spike: Tensor | None = None
    spike_score: Tensor | None = None
    spike_bound: Tensor | None = None
    spike_top: Tensor | None = None
    spike_ratios: Tensor | None = None
    spike_report: Any = None

    def __post_init__(self) -> None:
        # without a detector: no spike, no score, no bound (the schema's fields are tensors)
        if self.spike is None:
            object.__setattr__(self, "spike", _constant(False, self.finite))
        if self.spike_score is None:
            object.__setattr__(self, "spike_score", _constant(0.0, self.norm))
        if self.spike_bound is None:
            object.__setattr__(self, "spike_bound", _constant(math.inf, self.norm))

    def clipped_norms(self) -> tuple[Tensor, Tensor]:
        """``(norm, post_norm)`` of what the threshold was compared with: the totals, or,
        where the clip left groups out (an orthogonalising optimizer's, Muon's, by
        :meth:`~gradclip.Clipper.step`), the ``norm_type``-norms of the groups it clipped.
        Muon's matrices can dominate the total by orders of magnitude.

        Example:
            >>> import torch, gradclip
            >>> a, b = torch.nn.Parameter(torch.zeros(1)), torch.nn.Parameter(torch.zeros(1))
            >>> a.grad, b.grad = torch.tensor([4.0]), torch.tensor([300.0])
            >>> clip = gradclip.NormClip(1.0, groups={"a": [a], "b": [b]}, policy={"b": "exclude"})
            >>> stats = clip({"a": a, "b": b})
            >>> stats.norm, stats.clipped_norms()
            (tensor(300.0267), (tensor(4.), tensor(1.0000)))
        """
        groups = self.groups
        kept = [] if groups is None else [i for i, out in enumerate(groups.excluded) if not out]
        if groups is None or not kept or len(kept) == len(groups.excluded):
            return self.norm, self.post_norm
        p = self.norms.norm_type
        return (torch.linalg.vector_norm(groups.norm[kept], p).to(self.norm.dtype),
                torch.linalg.vector_norm(groups.post_norm[kept], p).to(self.norm.dtype))

    def to_dict(self) -> dict[str, float | bool]:
        """The scalar fields as Python numbers (one host sync): for logging."""
        values = torch.stack([getattr(self, f.name).double() for f in STEP_FIELDS]).cpu().tolist()
        return {f.name: f.kind(v) for f, v in zip(STEP_FIELDS, values, strict=True)}
