"""ZClip: z-score anomaly clipping on an EMA of the gradient norm (Kumar et al., 2025)."""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any, Literal, NamedTuple

import torch
from torch import Tensor
from typing_extensions import Unpack

from gradclip import _foreach
from gradclip._checks import check_choice, check_count, check_real, check_threshold
from gradclip.clippers.base import Clipper, Step
from gradclip.clippers.groups import GroupOptions
from gradclip.nonfinite import NonFinitePolicy
from gradclip.norms import GradNorms
from gradclip.scale import clip_coefficient

if TYPE_CHECKING:
    from collections.abc import Iterable

    from torch.distributed import ProcessGroup

    from gradclip.distributed import GroupLike

__all__ = ["ZClip", "ZClipState"]

EPS = 1e-6
"""Added to σ in the z-score (the paper's and the reference code's value)."""

ZClipMode = Literal["zscore", "percentile"]
MODES: tuple[str, ...] = ("zscore", "percentile")


class ZClipState(NamedTuple):
    """:class:`ZClip`'s statistics (on the gradients' device after the first call).

    Attributes:
        warmup_norms: float32, shape ``(warmup_steps,)``, the norms collected in warm-up.
        warmup_count: int64, 0-dim, how many were collected (warm-up ends at
            ``warmup_steps``).
        mean: float32, 0-dim, μ (0 until warm-up ends).
        var: float32, 0-dim, σ² (0 until warm-up ends).
    """

    warmup_norms: Tensor
    warmup_count: Tensor
    mean: Tensor
    var: Tensor


class ZClip(Clipper[ZClipState]):
    """Clip gradient-norm spikes detected by a z-score against an EMA of past norms.

    **Warm-up.** The first ``warmup_steps`` finite norms are collected (on the device) and
    nothing is clipped, except to ``max_norm`` if one is given. When the last one arrives,
    μ is their mean and σ² their population variance.

    **After warm-up**, with g the pre-clip total norm::

        z  = (g − μ) / (σ + 1e-6)
        mode="zscore":      c = μ + z_thr²·σ / z   if z > z_thr  (the reciprocal rule:
                                                    the larger the spike, the closer to μ)
                            no clipping otherwise
        mode="percentile":  c = μ + z_thr·σ        (clip whenever g > c)
        g* = min(g, c)                              the norm after the z-score clip
        μ  ← α·μ + (1 − α)·g*
        σ² ← α·σ² + (1 − α)·(g* − μ)²               with the *updated* μ, as in the paper

    The gradients are scaled by torch's coefficient ``c / (g + 1e-6)`` when the rule fires
    (by 1 otherwise), then capped by ``max_norm`` with the same formula if ``max_norm`` is
    given. The statistics learn from g*, the z-score clip, never from the ``max_norm`` cap:
    the cap is a guard outside the statistics, so they keep describing the gradients.
    ``stats.threshold`` is the norm the step is clipped to when the rule fires, otherwise the
    largest norm that passes (``μ + z_thr·(σ + 1e-6)`` in "zscore" mode), capped by
    ``max_norm``; during warm-up it is ``max_norm`` (or ``inf``).

    Caveat: the EMA follows a norm that grows steadily (an RNN blowing up, a learning rate
    that is too high), so the z-score never fires there; ``max_norm`` is the guard for that.
    The variance update with the updated mean runs low by about a factor α.

    Differences from the ``zclip`` package (1.0.0), each deliberate:

    * **No hidden absolute cap.** ``zclip.ZClip()`` defaults to ``max_grad_norm=1.0``
      (its README says None), which silently makes it a fixed clip at 1.0 whenever norms
      exceed 1. Here ``max_norm`` is None unless you pass it.
    * A NaN/inf step never enters the warm-up buffer, μ or σ² (every update is masked with
      ``torch.where``); in the package one NaN makes μ and σ² NaN forever.
    * No host sync per step (the package calls ``.item()`` every step), and the state is
      checkpointed (:meth:`state_dict`; the package has none, so a resumed run warms up again).
    * The package's ``clip_option="mean"``, ``clip_factor`` and ``skip_update_on_spike``
      options are not offered.

    State: :class:`ZClipState` (``clipper.state``, and in :meth:`state_dict`).

    Args:
        alpha: EMA smoothing α in (0, 1) (default 0.97, the paper's).
        z_threshold: z_thr > 0 (default 2.5, the paper's).
        warmup_steps: finite norms collected before clipping starts (int >= 1, default 25).
        max_norm: an optional absolute cap on the threshold (>= 0); None (default) for none.
        mode: ``"zscore"`` (default, the reciprocal rule) or ``"percentile"``.
        norm_type: p of the norms (default 2).
        nonfinite: ``"propagate"`` (torch's behaviour), ``"error"`` or ``"skip"``.
        shard_group, extra_groups: distributed training (FSDP1/ZeRO shards, pipeline
            stages); see :class:`~gradclip.Clipper` and the README, "Distributed training".
        groups, policy, orthogonal: per-group clipping (``groups=optimizer.param_groups``);
            see :class:`~gradclip.Clipper` and :mod:`gradclip.grouping`.

    Example:
        >>> import torch
        >>> from gradclip.clippers.zclip import ZClip
        >>> clipper = ZClip(warmup_steps=4)
        >>> p = torch.nn.Parameter(torch.zeros(1))
        >>> for norm in (1.0, 1.2, 0.8, 1.0, 1.1, 100.0):   # warm-up, a normal step, a spike
        ...     p.grad = torch.tensor([norm])
        ...     stats = clipper({"w": p})
        >>> bool(stats.clipped), round(float(p.grad), 3)   # pulled back close to μ ≈ 1
        (True, 1.004)

    References:
        Abhay Kumar, Louis Owen, Nilabhra Roy Chowdhury, Fabian Güra. "ZClip: Adaptive
        Spike Mitigation for LLM Pre-Training." arXiv:2504.02507, 2025.
    """

    def __init__(
        self,
        alpha: float = 0.97,
        z_threshold: float = 2.5,
        warmup_steps: int = 25,
        *,
        max_norm: float | None = None,
        mode: ZClipMode = "zscore",
        norm_type: float | str = 2.0,
        nonfinite: NonFinitePolicy = "propagate",
        shard_group: ProcessGroup | None = None,
        extra_groups: Iterable[GroupLike] = (),
        **grouping: Unpack[GroupOptions],
    ):
        self.alpha = check_real(alpha, "alpha", "in (0, 1) (an EMA smoothing factor; larger is "
                                "smoother)", lambda v: 0 < v < 1, "alpha=0.97")  # fmt: skip
        self.z_threshold = check_real(z_threshold, "z_threshold", "finite and > 0",
                                      lambda v: 0 < v < math.inf, "z_threshold=2.5")  # fmt: skip
        self.warmup_steps = check_count(warmup_steps, "warmup_steps", 1, "warmup_steps=25")
        self.max_norm = None if max_norm is None else check_threshold(max_norm, "max_norm")
        self.mode: ZClipMode = check_choice(mode, "mode", MODES, "mode='zscore'")  # type: ignore[assignment]
        self._slots: Tensor | None = None
        super().__init__(
            norm_type=norm_type, nonfinite=nonfinite, shard_group=shard_group, extra_groups=extra_groups,
            **grouping,
        )

    def config(self) -> dict[str, Any]:
        return {
            "alpha": self.alpha,
            "z_threshold": self.z_threshold,
            "warmup_steps": self.warmup_steps,
            "max_norm": self.max_norm,
            "mode": self.mode,
            **super().config(),
        }

    State = ZClipState

    def _init_state(self, tensors: int) -> ZClipState:
        return ZClipState(
            warmup_norms=torch.zeros(self.warmup_steps, dtype=torch.float32),
            warmup_count=torch.zeros((), dtype=torch.long),
            mean=torch.zeros((), dtype=torch.float32),
            var=torch.zeros((), dtype=torch.float32),
        )

    def _check_state(self, state: ZClipState) -> None:
        if bool((state.var < 0).any()) or not bool(torch.isfinite(state.mean)):
            raise ValueError(
                f"ZClip state dict holds mean={float(state.mean)}, var={float(state.var)}: the "
                "mean must be finite and the variance >= 0; the checkpoint is corrupt"
            )

    def _rule(self, total: Tensor, state: ZClipState) -> _Rule:
        """What the z-score rule says about this step's norm, from the current statistics."""
        norm = total.float()
        ready = state.warmup_count >= self.warmup_steps
        mean, std = state.mean, state.var.sqrt()
        z_thr = self.z_threshold
        if self.mode == "zscore":
            z = (norm - mean) / (std + EPS)
            spike = z > z_thr
            reciprocal = mean + (z_thr * z_thr) * std / z
            threshold = torch.where(spike, reciprocal, mean + z_thr * (std + EPS))
        else:
            threshold = mean + z_thr * std
            spike = norm > threshold
        return _Rule(
            norm=norm,
            finite=norm < math.inf,  # False for NaN and inf (norms are never negative)
            ready=ready,
            threshold=torch.where(ready, threshold, math.inf),
            fires=spike & ready,
        )

    def _step(self, norms: GradNorms, state: ZClipState) -> Step:
        total = norms.total
        rule = self._rule(total, state)
        adaptive = rule.threshold.to(total.dtype)
        # Unclipped steps get exactly 1. A non-finite norm flows into the coefficient (NaN,
        # or 0 for inf) as in torch, so that nonfinite="propagate" means what it says.
        coef = torch.where(rule.finite & ~rule.fires, 1.0, clip_coefficient(adaptive, total))
        if self.max_norm is not None:
            adaptive = torch.clamp(adaptive, max=self.max_norm)
            coef = torch.minimum(coef, clip_coefficient(self.max_norm, total))
        return Step(adaptive, coef, self._learn(rule, state))

    def _learn(self, rule: _Rule, state: ZClipState) -> ZClipState:
        """The statistics after this step's norm (unchanged for a non-finite one)."""
        norm = rule.norm
        # Warm-up: write the norm into the next slot; the step that fills the buffer sets μ, σ².
        count, buffer = state.warmup_count, state.warmup_norms
        if self._slots is None or self._slots.device != buffer.device:
            self._slots = torch.arange(self.warmup_steps, device=buffer.device)
        collect = rule.finite & ~rule.ready
        buffer = torch.where((self._slots == count) & collect, norm, buffer)
        count = count + collect
        filled = collect & (count == self.warmup_steps)
        # Moments in float64, stored within float32's range: one finite norm of 3e19 would
        # overflow a float32 variance to inf, and an inf variance never decays (no clip again).
        wide = _foreach.wide_dtype(buffer.device)
        warm_mean = buffer.to(wide).mean()
        warm_var = (buffer.to(wide) - warm_mean).square().mean()

        # After warm-up: EMA of the z-score-clipped norm g*, variance with the updated mean.
        clipped = torch.where(rule.fires, rule.threshold, norm).to(wide)
        alpha, old_mean, old_var = self.alpha, state.mean.to(wide), state.var.to(wide)
        ema_mean = alpha * old_mean + (1 - alpha) * clipped
        ema_var = alpha * old_var + (1 - alpha) * (clipped - ema_mean).square()
        learn = rule.finite & rule.ready
        mean = torch.where(learn, ema_mean, torch.where(filled, warm_mean, old_mean))
        var = torch.where(learn, ema_var, torch.where(filled, warm_var, old_var))
        return ZClipState(
            warmup_norms=buffer,
            warmup_count=count,
            mean=_fit(mean),
            var=_fit(var),
        )


def _fit(value: Tensor) -> Tensor:
    """A float64 statistic as float32, capped at float32's largest value instead of inf."""
    return value.clamp(max=torch.finfo(torch.float32).max).float()


class _Rule(NamedTuple):
    norm: Tensor  # float32 pre-clip total norm
    finite: Tensor  # the norm is finite: only then may it change a statistic
    ready: Tensor  # warm-up is over
    threshold: Tensor  # the adaptive threshold (inf during warm-up), float32
    fires: Tensor  # the z-score rule clips this step
