"""The fixed clippers: a total-norm threshold (torch's rule) and an element-value bound."""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from gradclip import _foreach
from gradclip._checks import check_threshold
from gradclip.clippers.base import Clipper, Step
from gradclip.nonfinite import NonFinitePolicy
from gradclip.norms import GradNorms
from gradclip.scale import clip_coefficient, noop_on_host

if TYPE_CHECKING:
    from collections.abc import Iterable

    from torch.distributed import ProcessGroup

    from gradclip.clippers.spikes import SpikeDetector, SpikePolicy
    from gradclip.distributed import GroupLike

__all__ = ["NormClip", "ValueClip"]


class NormClip(Clipper[None]):
    """Clip the total gradient norm to ``max_norm``: ``torch.nn.utils.clip_grad_norm_`` as a clipper.

    Every gradient is multiplied by ``min(max_norm / (norm + 1e-6), 1)``; the gradients
    after the call equal those of :func:`gradclip.clip_grad_norm_` exactly. It keeps no
    statistics beyond the base counters.

    Args:
        max_norm: the largest total norm to allow (>= 0).
        norm_type: p of the total norm (default 2).
        nonfinite: ``"propagate"``, ``"error"`` or ``"skip"``.
        shard_group, extra_groups: distributed training (FSDP1/ZeRO shards, pipeline
            stages); see :class:`~gradclip.Clipper` and the README, "Distributed training".
        spikes: a :class:`~gradclip.SpikeDetector` (or ``"skip"``, ``"clip"``, ``"off"``)
            that skips, clips or records gradient spikes; None (default) for none.

    Example:
        >>> import torch, gradclip
        >>> p = torch.nn.Parameter(torch.zeros(2)); p.grad = torch.tensor([3.0, 4.0])
        >>> stats = gradclip.NormClip(max_norm=1.0)({"w": p})
        >>> p.grad, bool(stats.clipped)
        (tensor([0.6000, 0.8000]), True)
    """

    def __init__(
        self,
        max_norm: float,
        norm_type: float | str = 2.0,
        *,
        nonfinite: NonFinitePolicy = "propagate",
        shard_group: ProcessGroup | None = None,
        extra_groups: Iterable[GroupLike] = (),
        spikes: SpikeDetector | SpikePolicy | None = None,
    ):
        self.max_norm = check_threshold(max_norm, "max_norm")
        super().__init__(
            norm_type=norm_type, nonfinite=nonfinite, shard_group=shard_group, extra_groups=extra_groups,
            spikes=spikes,
        )

    def config(self) -> dict[str, Any]:
        return {"max_norm": self.max_norm, **super().config()}

    def _step(self, norms: GradNorms, state: None) -> Step:
        total = norms.total
        threshold = torch.full((), self.max_norm, dtype=total.dtype, device=total.device)
        return Step(threshold, clip_coefficient(self.max_norm, total), None)


class ValueClip(Clipper[None]):
    """Clamp every gradient element to ``[-clip_value, clip_value]``: ``clip_grad_value_`` as a clipper.

    Its norms are max-abs norms (``norm_type=inf``): ``stats.norm`` is the largest gradient
    magnitude, ``stats.clipped`` says whether any element exceeded ``clip_value``, and on
    the CPU the clamp is skipped when none did.

    Args:
        clip_value: the largest element magnitude to allow (>= 0).
        nonfinite: ``"propagate"``, ``"error"`` or ``"skip"``.
        shard_group, extra_groups: distributed training (FSDP1/ZeRO shards, pipeline
            stages); see :class:`~gradclip.Clipper` and the README, "Distributed training".
        spikes: a :class:`~gradclip.SpikeDetector` (or ``"skip"``, ``"clip"``, ``"off"``)
            that skips, clips or records gradient spikes; None (default) for none.

    Example:
        >>> import torch, gradclip
        >>> p = torch.nn.Parameter(torch.zeros(2)); p.grad = torch.tensor([-3.0, 0.5])
        >>> stats = gradclip.ValueClip(1.0)([p])
        >>> p.grad
        tensor([-1.0000,  0.5000])
    """

    folds_into_fused = False  # a clamp is not a scale

    def __init__(
        self,
        clip_value: float,
        *,
        nonfinite: NonFinitePolicy = "propagate",
        shard_group: ProcessGroup | None = None,
        extra_groups: Iterable[GroupLike] = (),
        spikes: SpikeDetector | SpikePolicy | None = None,
    ):
        self.clip_value = check_threshold(clip_value, "clip_value")
        super().__init__(
            norm_type=math.inf, nonfinite=nonfinite, shard_group=shard_group, extra_groups=extra_groups,
            spikes=spikes,
        )

    def config(self) -> dict[str, Any]:
        return {"clip_value": self.clip_value, "nonfinite": self.nonfinite, **self._spikes_config()}

    def _step(self, norms: GradNorms, state: None) -> Step:
        total = norms.total
        threshold = torch.full((), self.clip_value, dtype=total.dtype, device=total.device)
        # The max-abs norm after clamping is min(norm, clip_value): coef = that / norm.
        coef = torch.where(total <= threshold, torch.ones_like(total), threshold / total)
        return Step(threshold, coef, None)

    def _apply(self, norms: GradNorms, coef: Tensor) -> None:
        if any(dtype.is_complex for _, dtype in norms.groups):  # before any group is clamped
            raise NotImplementedError(
                "ValueClip cannot clamp complex gradients; use NormClip (nothing was changed)"
            )
        for (device, _), (group, _) in norms.groups.items():
            if noop_on_host(device, coef):
                continue
            if _foreach.is_host_device(device) and not _foreach.is_compiling():
                _foreach.foreach_clamp_(group, -self.clip_value, self.clip_value)
                continue
            # No host read: a coefficient of 1 (nothing above clip_value, or a skipped step)
            # clamps to an infinite bound, which changes nothing.
            bound = torch.where(coef.to(device) < 1, self.clip_value, math.inf)
            _foreach.foreach_clamp_(group, -bound, bound)
