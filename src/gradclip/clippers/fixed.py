"""The fixed clippers: a total-norm threshold (torch's rule) and an element-value bound."""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor
from typing_extensions import Unpack

from gradclip import _foreach
from gradclip._checks import check_threshold
from gradclip.clippers.base import Clipper, Step
from gradclip.clippers.groups import GroupOptions
from gradclip.nonfinite import NonFinitePolicy
from gradclip.norms import GradNorms
from gradclip.scale import clip_coefficient, noop_on_host

if TYPE_CHECKING:
    from collections.abc import Iterable

    from torch.distributed import ProcessGroup

    from gradclip.distributed import GroupLike

__all__ = ["NormClip", "ValueClip"]


class _Threshold:
    """A threshold kept as a number and as 0-dim tensors, one per (device, dtype), that the
    step reads: changing the number updates them in place, so a compiled step does not
    recompile and a captured CUDA graph replays with the new value."""

    def __init__(self, value: float):
        self.value = value
        self._tensors: dict[tuple[torch.device, torch.dtype], Tensor] = {}

    def on(self, like: Tensor) -> Tensor:
        key = (like.device, like.dtype)
        tensor = self._tensors.get(key)
        if tensor is None:  # built on the device (a fill): no host-to-device copy
            tensor = self._tensors[key] = torch.full((), self.value, dtype=like.dtype,
                                                     device=like.device)
        return tensor

    def set(self, value: float) -> None:
        self.value = value
        for tensor in self._tensors.values():
            tensor.fill_(value)


class NormClip(Clipper[None]):
    """Clip the total gradient norm to ``max_norm``: ``torch.nn.utils.clip_grad_norm_`` as a clipper.

    Every gradient is multiplied by ``min(max_norm / (norm + 1e-6), 1)``; the gradients
    after the call equal those of :func:`gradclip.clip_grad_norm_` exactly. It keeps no
    statistics beyond the base counters. ``max_norm`` may be changed between steps (a
    schedule): the step reads it from a device tensor, so a compiled step does not recompile
    and a captured CUDA graph uses the new value.

    Args:
        max_norm: the largest total norm to allow (>= 0).
        norm_type: p of the total norm (default 2).
        nonfinite: ``"propagate"``, ``"error"`` or ``"skip"``.
        shard_group, extra_groups: distributed training (FSDP1/ZeRO shards, pipeline
            stages); see :class:`~gradclip.Clipper` and the README, "Distributed training".
        groups, policy, orthogonal: per-group clipping (``groups=optimizer.param_groups``);
            see :class:`~gradclip.Clipper` and :mod:`gradclip.grouping`.

    Example:
        >>> import torch, gradclip
        >>> p = torch.nn.Parameter(torch.zeros(2)); p.grad = torch.tensor([3.0, 4.0])
        >>> stats = gradclip.NormClip(max_norm=1.0)({"w": p})
        >>> p.grad, bool(stats.clipped)
        (tensor([0.6000, 0.8000]), True)
    """

    threshold_arg = "max_norm"

    def __init__(
        self,
        max_norm: float,
        norm_type: float | str = 2.0,
        *,
        nonfinite: NonFinitePolicy = "propagate",
        shard_group: ProcessGroup | None = None,
        extra_groups: Iterable[GroupLike] = (),
        **grouping: Unpack[GroupOptions],
    ):
        self._max_norm = _Threshold(check_threshold(max_norm, "max_norm"))
        super().__init__(
            norm_type=norm_type, nonfinite=nonfinite, shard_group=shard_group, extra_groups=extra_groups,
            **grouping,
        )

    @property
    def max_norm(self) -> float:
        """The largest total norm allowed (settable between steps)."""
        return self._max_norm.value

    @max_norm.setter
    def max_norm(self, value: float) -> None:
        self._max_norm.set(check_threshold(value, "max_norm"))

    def config(self) -> dict[str, Any]:
        return {"max_norm": self.max_norm, **super().config()}

    def _step(self, norms: GradNorms, state: None) -> Step:
        threshold = self._max_norm.on(norms.total)
        return Step(threshold, clip_coefficient(threshold, norms.total), None)


class ValueClip(Clipper[None]):
    """Clamp every gradient element to ``[-clip_value, clip_value]``: ``clip_grad_value_`` as a clipper.

    Its norms are max-abs norms (``norm_type=inf``): ``stats.norm`` is the largest gradient
    magnitude, ``stats.clipped`` says whether any element exceeded ``clip_value``, and on
    the CPU the clamp is skipped when none did. ``clip_value`` may be changed between steps
    (read from a device tensor, as :class:`NormClip`'s ``max_norm``).

    Args:
        clip_value: the largest element magnitude to allow (>= 0).
        nonfinite: ``"propagate"``, ``"error"`` or ``"skip"``.
        shard_group, extra_groups: distributed training (FSDP1/ZeRO shards, pipeline
            stages); see :class:`~gradclip.Clipper` and the README, "Distributed training".
        groups, policy, orthogonal: per-group clipping (``groups=optimizer.param_groups``);
            see :class:`~gradclip.Clipper` and :mod:`gradclip.grouping`.

    Example:
        >>> import torch, gradclip
        >>> p = torch.nn.Parameter(torch.zeros(2)); p.grad = torch.tensor([-3.0, 0.5])
        >>> stats = gradclip.ValueClip(1.0)([p])
        >>> p.grad
        tensor([-1.0000,  0.5000])
    """

    folds_into_fused = False  # a clamp is not a scale
    threshold_arg = "clip_value"

    def __init__(
        self,
        clip_value: float,
        *,
        nonfinite: NonFinitePolicy = "propagate",
        shard_group: ProcessGroup | None = None,
        extra_groups: Iterable[GroupLike] = (),
        **grouping: Unpack[GroupOptions],
    ):
        self._clip_value = _Threshold(check_threshold(clip_value, "clip_value"))
        super().__init__(
            norm_type=math.inf, nonfinite=nonfinite, shard_group=shard_group, extra_groups=extra_groups,
            **grouping,
        )

    @property
    def clip_value(self) -> float:
        """The largest element magnitude allowed (settable between steps)."""
        return self._clip_value.value

    @clip_value.setter
    def clip_value(self, value: float) -> None:
        self._clip_value.set(check_threshold(value, "clip_value"))

    def config(self) -> dict[str, Any]:
        return {"clip_value": self.clip_value, "nonfinite": self.nonfinite}

    def _step(self, norms: GradNorms, state: None) -> Step:
        total = norms.total
        threshold = self._clip_value.on(total)
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
            limit = self._clip_value.on(coef).to(device)
            bound = torch.where(coef.to(device) < 1, limit, math.inf)
            _foreach.foreach_clamp_(group, -bound, bound)

    def _apply_rows(self, norms: GradNorms, bounds: Tensor) -> None:
        """Clamp each tensor to its own bound (1-D, one per entry of ``norms.tensors``;
        ``inf``: not clamped): the step of per-group clip values (no host read)."""
        if any(dtype.is_complex for _, dtype in norms.groups):
            raise NotImplementedError(
                "ValueClip cannot clamp complex gradients; use NormClip (nothing was changed)"
            )
        for (device, _), (group, indices) in norms.groups.items():
            for g, i in zip(group, indices, strict=True):
                bound = bounds[i].to(device=device, dtype=g.dtype)
                g.clamp_(min=-bound, max=bound)
