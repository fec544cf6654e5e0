"""AdaGC: per-tensor adaptive clipping against an EMA of each tensor's clipped norm (Wang et al., 2025)."""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any, ClassVar, NamedTuple

import torch
from torch import Tensor
from typing_extensions import Unpack

from gradclip._checks import check_count, check_real
from gradclip.clippers.base import Clipper, Step
from gradclip.clippers.groups import GroupOptions
from gradclip.nonfinite import NonFinitePolicy
from gradclip.norms import GradNorms
from gradclip.scale import clip_coefficient

if TYPE_CHECKING:
    from collections.abc import Iterable

    from torch.distributed import ProcessGroup

    from gradclip.distributed import GroupLike

__all__ = ["OFFICIAL_CODE", "AdaGC", "AdaGCState"]

OFFICIAL_CODE: dict[str, float] = {"relative": 1.04, "beta": 0.99}
"""The values of the authors' Megatron patch (``clip_ratio``, ``clip_beta``); the paper's,
which are the defaults, are 1.05 and 0.98. Use as ``AdaGC(**OFFICIAL_CODE)``."""



class AdaGCState(NamedTuple):
    """:class:`AdaGC`'s per-parameter statistics, one entry per parameter tensor (vectors
    over the parameters of the call; saved by parameter name in
    ``state_dict()["param_state"][name]``).

    Attributes:
        gamma: float32, γ_i (``inf`` until the tensor's first finite step).
        steps: int64, finite steps with a non-zero gradient seen by the tensor.
    """

    gamma: Tensor
    steps: Tensor


class AdaGC(Clipper[AdaGCState]):
    """Clip each tensor's gradient against an EMA of its own past clipped norms.

    Per parameter tensor i, with ``n_i = ‖g_i‖₂`` its gradient norm this step::

        h_i = min(1, λ_rel · γ_i / n_i)               (1 when n_i <= λ_rel · γ_i)
        g_i ← h_i · g_i
        γ_i ← β · γ_i + (1 − β) · h_i · n_i           (h_i · n_i = ‖h_i · g_i‖)

    **Warm-up.** During a tensor's first ``warmup_steps`` finite steps it is clipped
    globally instead: ``h = min(1, λ_abs / (‖g‖ + 1e-6))`` with ``‖g‖`` the total norm of
    every gradient (torch's ``clip_grad_norm_`` coefficient at ``warmup_max_norm``), and
    ``γ_i`` is the minimum over those steps of its clipped norm ``h · n_i``. When all tensors
    start together this is the paper's schedule (GlobalGC for ``T_start`` steps, γ
    initialised to the minimum clipped per-tensor norm). With ``warmup_steps=0``, γ_i starts
    at the tensor's first norm, unclipped.

    Because ``h_i · n_i <= λ_rel · γ_i``, γ can grow by at most a factor
    ``1 + (1 − β)(λ_rel − 1)`` (≈ 1.001 with the defaults) per step: a steady explosion is
    clipped instead of followed.

    **Parameter sets that change.** State is per parameter name. A name seen for the first
    time (a layer unfrozen or added mid-run) starts with its own warm-up: global clipping of
    that tensor for its first ``warmup_steps`` finite steps, γ the minimum of its clipped
    norms. A parameter absent from a step (``grad`` is None) keeps its state unchanged, and
    so does one whose gradient is exactly zero (an unused parameter under
    ``zero_grad(set_to_none=False)``): in the paper's rule a zero norm would decay γ toward
    0, after which the tensor's gradients would be zeroed for good. Names are kept in the
    state after they disappear.

    **Non-finite steps** (a NaN/inf anywhere in the gradients) change no γ and no count,
    under every ``nonfinite`` policy. With ``"propagate"`` the gradients are scaled as the
    formulas give (NaN stays NaN; an infinite tensor gets ``h = 0``, as in torch).

    :class:`~gradclip.ClipStats`: ``coef`` is ``post_norm / norm``; ``threshold`` is
    ``warmup_max_norm`` while any tensor is in warm-up, afterwards the norm of the
    per-tensor thresholds ``‖(λ_rel · γ_i)_i‖₂`` (the total norm if every tensor sat exactly
    at its threshold).

    State: :class:`AdaGCState`, per parameter name, on the gradients' device after the first
    call. The entries of the current parameters are views into one vector per field, so a
    step is a handful of vectorised operations over the per-tensor norms, with no host sync.

    **Distributed training.** ``n_i`` is the norm of the whole tensor under every layout
    (DDP, FSDP1 with ``shard_group``, FSDP2, tensor parallel, HSDP, 2-D meshes, pipeline
    stages with ``extra_groups``): the per-tensor norms are all-reduced with the total, in
    the same collective. Every rank therefore holds the same γ for every parameter name,
    including the tensors of which it holds no part (an empty FSDP shard, or a gradient that
    is None on this rank only), and scales its own shards; a sharded parameter that takes
    gradients but has none on any rank gets an entry that stays at ``inf`` / 0, as if
    absent. Under FSDP1 with ``use_orig_params=False`` a "tensor" is a flat parameter.

    Differences from the reference code, each deliberate: the official Megatron patch syncs
    the host once per parameter per step and never checkpoints γ (a resumed run warms up
    again); ``pytorch_optimizer.AdaGC`` is an AdamW with the clip inside and floors γ and
    the norm at its ``eps``. Here the clip is optimizer-agnostic, γ is checkpointed by name,
    and a step never reads a device value.

    Args:
        relative: λ_rel > 0, the per-tensor threshold relative to γ (default 1.05, the
            paper's; the official code uses 1.04, see :data:`OFFICIAL_CODE`).
        beta: β in (0, 1), the EMA coefficient of γ (default 0.98, the paper's; official
            code 0.99).
        warmup_steps: T_start >= 0, finite steps of global clipping per tensor (default 100).
        warmup_max_norm: λ_abs > 0, the total-norm threshold of the warm-up (default 1.0).
        nonfinite: ``"propagate"`` (torch's behaviour), ``"error"`` or ``"skip"``.
        shard_group, extra_groups: distributed training (FSDP1/ZeRO shards, pipeline
            stages); see :class:`~gradclip.Clipper` and the README, "Distributed training".
        groups, policy, orthogonal: per-group clipping (``groups=optimizer.param_groups``);
            see :class:`~gradclip.Clipper` and :mod:`gradclip.grouping`.

    Example:
        >>> import torch
        >>> from gradclip.clippers.adagc import AdaGC
        >>> model = torch.nn.Linear(4, 2)
        >>> clipper = AdaGC(warmup_steps=2)
        >>> for step in range(3):
        ...     model.zero_grad()
        ...     (model(torch.ones(1, 4)).sum() * (1 + 9 * (step == 2))).backward()
        ...     stats = clipper(model)
        >>> bool(stats.clipped)                       # the x10 step is clipped per tensor
        True
        >>> sorted(clipper.state_dict()["param_state"])
        ['bias', 'weight']

    References:
        Wang, Li, Chen, Zeng, Yang, Yu, Ma, Shen, "AdaGC: Improving Training Stability for
        Large Language Model Pretraining", arXiv 2502.11034 (Algorithm 1).
    """

    STATE_VERSION: ClassVar[int] = 1
    State = AdaGCState
    per_tensor_state = True
    folds_into_fused = False  # one coefficient per tensor

    def __init__(
        self,
        relative: float = 1.05,
        beta: float = 0.98,
        warmup_steps: int = 100,
        warmup_max_norm: float = 1.0,
        *,
        nonfinite: NonFinitePolicy = "propagate",
        shard_group: ProcessGroup | None = None,
        extra_groups: Iterable[GroupLike] = (),
        **grouping: Unpack[GroupOptions],
    ):
        self.relative = check_real(relative, "relative", "> 0", lambda v: 0 < v < math.inf,
                                    "relative=1.05")
        self.beta = check_real(beta, "beta", "in (0, 1)", lambda v: 0 < v < 1, "beta=0.98")
        self.warmup_steps = check_count(warmup_steps, "warmup_steps", 0, "warmup_steps=100")
        self.warmup_max_norm = check_real(
            warmup_max_norm, "warmup_max_norm", "> 0", lambda v: v > 0, "warmup_max_norm=1.0"
        )
        super().__init__(
            norm_type=2.0, nonfinite=nonfinite, shard_group=shard_group, extra_groups=extra_groups,
            **grouping,
        )

    def config(self) -> dict[str, Any]:
        return {
            "relative": self.relative,
            "beta": self.beta,
            "warmup_steps": self.warmup_steps,
            "warmup_max_norm": self.warmup_max_norm,
            "nonfinite": self.nonfinite,
        }

    def _init_state(self, tensors: int) -> AdaGCState:
        return AdaGCState(
            gamma=torch.full((tensors,), math.inf, dtype=torch.float32),
            steps=torch.zeros(tensors, dtype=torch.long),
        )

    def _step(self, norms: GradNorms, state: AdaGCState) -> Step:
        norm = norms.per_tensor
        gamma, steps = state
        warm = steps < self.warmup_steps
        global_coef = clip_coefficient(self.warmup_max_norm, norms.total)
        limit = (self.relative * gamma).to(norm.dtype)
        # n > λγ is False for NaN norms and for a first step with γ = inf: h = 1 there.
        relative_coef = torch.where(norm > limit, limit / norm, torch.ones_like(norm))
        coef = torch.where(warm, global_coef, relative_coef)
        threshold = torch.where(
            warm.any(),
            torch.full((), self.warmup_max_norm, dtype=norms.total.dtype, device=norm.device),
            torch.linalg.vector_norm(limit).to(norms.total.dtype),
        )
        clipped = (coef * norm).float()
        # a zero gradient is an absent one: γ would decay toward 0 and freeze the tensor.
        active = torch.isfinite(norms.total) & (norm > 0)
        first = warm | (steps == 0)  # steps == 0: warmup_steps=0 starts γ at n_i
        new_gamma = torch.where(
            first, torch.minimum(gamma, clipped), self.beta * gamma + (1 - self.beta) * clipped
        )
        new_state = AdaGCState(torch.where(active, new_gamma, gamma), steps + active.long())
        return Step(threshold, coef, new_state)
