"""AdaGC: per-tensor adaptive clipping against an EMA of each tensor's clipped norm (Wang et al., 2025)."""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar

import torch
from torch import Tensor

from gradclip._checks import check_count, check_real
from gradclip.clippers.base import Clipper
from gradclip.nonfinite import NonFinitePolicy
from gradclip.norms import GradNorms
from gradclip.scale import clip_coefficient

if TYPE_CHECKING:
    from collections.abc import Iterable

    from torch.distributed import ProcessGroup

    from gradclip.distributed import GroupLike

__all__ = ["OFFICIAL_CODE", "AdaGC"]

OFFICIAL_CODE: dict[str, float] = {"relative": 1.04, "beta": 0.99}
"""The values of the authors' Megatron patch (``clip_ratio``, ``clip_beta``); the paper's,
which are the defaults, are 1.05 and 0.98. Use as ``AdaGC(**OFFICIAL_CODE)``."""

_PARAM_KEYS = frozenset({"gamma", "steps"})


class AdaGC(Clipper):
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

    State (see :meth:`state_dict`), on the gradients' device after the first call, keyed by
    parameter name in ``state_dict()["param_state"][name]``:

    * ``gamma``: float32, 0-dim, γ_i (``inf`` until the tensor's first finite step);
    * ``steps``: int64, 0-dim, finite steps with a non-zero gradient seen by this tensor.

    Internally the entries of the current parameters are views into one vector each, so a
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
    ):
        self.relative = check_real(relative, "relative", "> 0", lambda v: 0 < v < math.inf,
                                    "relative=1.05")
        self.beta = check_real(beta, "beta", "in (0, 1)", lambda v: 0 < v < 1, "beta=0.98")
        self.warmup_steps = check_count(warmup_steps, "warmup_steps", 0, "warmup_steps=100")
        self.warmup_max_norm = check_real(
            warmup_max_norm, "warmup_max_norm", "> 0", lambda v: v > 0, "warmup_max_norm=1.0"
        )
        self._bound: _Bound | None = None
        self._pending: tuple[Tensor, Tensor] | None = None
        super().__init__(
            norm_type=2.0, nonfinite=nonfinite, shard_group=shard_group, extra_groups=extra_groups
        )

    def config(self) -> dict[str, Any]:
        return {
            "relative": self.relative,
            "beta": self.beta,
            "warmup_steps": self.warmup_steps,
            "warmup_max_norm": self.warmup_max_norm,
            "nonfinite": self.nonfinite,
        }

    def load_state_dict(self, state_dict: Mapping[str, Any]) -> None:
        entries = state_dict.get("param_state", {})
        bad = [name for name, entry in entries.items() if set(entry) != _PARAM_KEYS]
        if bad:
            raise ValueError(
                f"AdaGC state dict does not match: param_state entries {bad[:5]} must hold "
                f"exactly {sorted(_PARAM_KEYS)}; pass the value of `AdaGC.state_dict()`"
            )
        super().load_state_dict(state_dict)

    # -- the per-tensor vectors ------------------------------------------------------------

    def _vectors(self, names: tuple[str, ...], device: torch.device) -> _Bound:
        """γ and counts of ``names`` as two vectors whose elements are the per-name entries.

        Rebuilt only when the names change or the base replaced the per-name state (reset,
        load_state_dict, a move to another device); otherwise the vectors of the last step
        are reused, and their in-place updates are what ``state_dict()`` reads.
        """
        bound = self._bound
        if bound is not None and bound.names == names and bound.state is self._param_state:
            return bound
        state = self._param_state
        gammas, counts = [], []
        for name in names:
            entry = state.get(name)
            if entry is None:
                gammas.append(torch.full((), math.inf, dtype=torch.float32, device=device))
                counts.append(torch.zeros((), dtype=torch.long, device=device))
            else:
                gammas.append(entry["gamma"].to(device=device, dtype=torch.float32))
                counts.append(entry["steps"].to(device=device, dtype=torch.long))
        gamma = torch.stack(gammas)
        steps = torch.stack(counts)
        for i, name in enumerate(names):
            state[name] = {"gamma": gamma[i], "steps": steps[i]}
        self._bound = _Bound(names, state, gamma, steps)
        return self._bound

    # -- the step ----------------------------------------------------------------------------

    def _decide(
        self, norms: GradNorms, names: tuple[str, ...], params: list[Tensor]
    ) -> tuple[Tensor, Tensor]:
        norm = norms.per_tensor
        bound = self._vectors(names, norm.device)
        warm = bound.steps < self.warmup_steps
        global_coef = clip_coefficient(self.warmup_max_norm, norms.total)
        limit = (self.relative * bound.gamma).to(norm.dtype)
        # n > λγ is False for NaN norms and for a first step with γ = inf: h = 1 there.
        relative_coef = torch.where(norm > limit, limit / norm, torch.ones_like(norm))
        coef = torch.where(warm, global_coef, relative_coef)
        threshold = torch.where(
            warm.any(),
            torch.full((), self.warmup_max_norm, dtype=norms.total.dtype, device=norm.device),
            torch.linalg.vector_norm(limit).to(norms.total.dtype),
        )
        self._pending = (coef, warm)
        return threshold, coef

    def _update(self, norms: GradNorms, post_norm: Tensor, finite: Tensor) -> None:
        if self._pending is None or self._bound is None:
            raise RuntimeError("AdaGC._update runs only after AdaGC._decide in the same call")
        coef, warm = self._pending
        self._pending = None
        bound = self._bound
        norm = norms.per_tensor
        clipped = (coef * norm).float()
        # a zero gradient is an absent one: γ would decay toward 0 and freeze the tensor.
        active = finite & (norm > 0)
        first = warm | (bound.steps == 0)  # steps == 0: warmup_steps=0 starts γ at n_i
        gamma = torch.where(
            first,
            torch.minimum(bound.gamma, clipped),
            self.beta * bound.gamma + (1 - self.beta) * clipped,
        )
        bound.gamma.copy_(torch.where(active, gamma, bound.gamma))
        bound.steps.add_(active.long())


@dataclass(frozen=True)
class _Bound:
    """The per-tensor vectors of one parameter set; ``state`` is the dict they are bound to."""

    names: tuple[str, ...]
    state: dict[str, dict[str, Tensor]]
    gamma: Tensor
    steps: Tensor

