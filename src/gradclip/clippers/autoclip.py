"""AutoClip: clip to a percentile of the recent gradient norms (Seetharaman et al., 2020)."""

from __future__ import annotations

import math
import numbers
from typing import TYPE_CHECKING, Any, NamedTuple

import torch
from torch import Tensor
from typing_extensions import Unpack

from gradclip._checks import ArgumentTypeError, check_count
from gradclip.clippers.base import Clipper, Step
from gradclip.clippers.groups import GroupOptions
from gradclip.nonfinite import NonFinitePolicy
from gradclip.norms import GradNorms
from gradclip.scale import clip_coefficient

if TYPE_CHECKING:
    from collections.abc import Iterable

    from torch.distributed import ProcessGroup

    from gradclip.distributed import GroupLike

__all__ = ["AutoClip", "AutoClipState"]

GROW_START = 1024
"""First capacity of the history when ``window=None``; it doubles whenever it could fill."""


class AutoClipState(NamedTuple):
    """:class:`AutoClip`'s statistics (on the gradients' device after the first call).

    Attributes:
        history: float32, shape ``(window,)`` (``(capacity,)`` when ``window=None``), the
            recorded norms in ring order; slots not yet written hold ``+inf``. Norms of
            float64 gradients are recorded in float32.
        count: int64, 0-dim, the number of norms ever recorded (the next slot is
            ``count % len(history)``).
    """

    history: Tensor
    count: Tensor


class AutoClip(Clipper[AutoClipState]):
    """Clip the total norm to the ``percentile``-th percentile of the norms seen so far.

    Algorithm 1 of the paper: on every step the current pre-clip norm is first appended to
    the history, then the threshold is the percentile of the history, and the gradients are
    clipped to it with torch's coefficient::

        history <- history + [‖g_t‖]            (the last ``window`` finite norms)
        c_t      = percentile(history, p)        (numpy's default 'linear' interpolation)
        g_t     <- g_t * min(1, c_t / (‖g_t‖ + 1e-6))

    So the first step's threshold is its own norm; ``percentile=100`` (the largest norm)
    scales only by torch's 1e-6 in the denominator; a small percentile clips most steps to
    a typical norm (the paper's choice, p=10, was tuned with Adam; with plain SGD it can
    starve training: prefer a higher percentile there).

    Differences from the paper, each deliberate:

    * The history is a bounded ring buffer of the last ``window`` norms (the paper keeps
      every norm forever, so its cost and memory grow with training). ``window=None`` keeps
      the paper's full history in a buffer that doubles in size on the device; the doubling
      is decided from the number of calls, a host-side count, so it needs no host sync.
    * A NaN/inf norm is never written into the history (its slot is masked with
      ``torch.where`` and the write position does not advance): one bad step cannot poison
      every later threshold. The threshold of such a step is the percentile of the history
      without it (``inf`` if the history is still empty); what happens to the gradients is
      the ``nonfinite`` policy's business.

    State: :class:`AutoClipState` (``clipper.state``, and in :meth:`state_dict`);
    ``stats.threshold`` and ``stats.coef`` come in the norm's dtype.

    Nothing in a step reads a device value on the host: the percentile is a sort of the
    buffer (O(window log window) on the device) and an interpolation whose positions were
    tabulated once on the host, in float64 as numpy computes them.

    Args:
        percentile: p in ``(0, 100]`` (default 10, the paper's recommendation).
        window: how many recent norms the percentile looks at (int >= 1, default 1024), or
            ``None`` for every norm since the start (the paper; memory grows with training).
        norm_type: p of the norms (default 2).
        nonfinite: ``"propagate"`` (torch's behaviour), ``"error"`` or ``"skip"``.
        shard_group, extra_groups: distributed training (FSDP1/ZeRO shards, pipeline
            stages); see :class:`~gradclip.Clipper` and the README, "Distributed training".
        groups, policy, orthogonal: per-group clipping (``groups=optimizer.param_groups``);
            see :class:`~gradclip.Clipper` and :mod:`gradclip.grouping`.

    Example:
        >>> import torch
        >>> from gradclip.clippers.autoclip import AutoClip
        >>> clipper = AutoClip(percentile=50, window=100)
        >>> p = torch.nn.Parameter(torch.zeros(2))
        >>> for grad in ([3.0, 4.0], [0.6, 0.8], [30.0, 40.0]):   # norms 5, 1, 50
        ...     p.grad = torch.tensor(grad)
        ...     stats = clipper({"w": p})
        >>> stats.threshold                # median of [5, 1, 50]
        tensor(5.)
        >>> p.grad                         # the norm-50 step clipped to ~5
        tensor([3.0000, 4.0000])

    References:
        Prem Seetharaman, Gordon Wichern, Bryan Pardo, Jonathan Le Roux. "AutoClip:
        Adaptive Gradient Clipping for Source Separation Networks." IEEE MLSP 2020,
        arXiv:2007.14469 (Algorithm 1).
    """

    def __init__(
        self,
        percentile: float = 10.0,
        window: int | None = 1024,
        *,
        norm_type: float | str = 2.0,
        nonfinite: NonFinitePolicy = "propagate",
        shard_group: ProcessGroup | None = None,
        extra_groups: Iterable[GroupLike] = (),
        **grouping: Unpack[GroupOptions],
    ):
        self.percentile = _check_percentile(percentile)
        self.window = check_count(
            window, "window", 1, "window=1024", none="keep every norm, as the paper does"
        )
        self._growable_fields = ("history",) if self.window is None else ()
        self._tables: dict[tuple[int, torch.device], tuple[Tensor, Tensor, Tensor]] = {}
        super().__init__(
            norm_type=norm_type, nonfinite=nonfinite, shard_group=shard_group, extra_groups=extra_groups,
            **grouping,
        )

    State = AutoClipState

    def config(self) -> dict[str, Any]:
        return {"percentile": self.percentile, "window": self.window, **super().config()}

    def _init_state(self, tensors: int) -> AutoClipState:
        capacity = GROW_START if self.window is None else self.window
        return AutoClipState(
            history=torch.full((capacity,), math.inf, dtype=torch.float32),
            count=torch.zeros((), dtype=torch.long),
        )

    def _prepare(self, state: AutoClipState, calls: int) -> AutoClipState:
        # window=None: count <= calls, so the buffer could fill on this step: double it now,
        # decided from the host's count of calls (no device read).
        if self.window is None and calls >= state.history.numel():
            grown = torch.cat([state.history, torch.full_like(state.history, math.inf)])
            return state._replace(history=grown)
        return state

    def _step(self, norms: GradNorms, state: AutoClipState) -> Step:
        history, count, total = state.history, state.count, norms.total
        norm = total.to(history.dtype)
        recorded = norm < math.inf  # False for NaN and inf (norms are never negative)
        slots, *positions = self._table(history)
        write = (slots == torch.remainder(count, history.numel())) & recorded
        appended = torch.where(write, norm, history)
        count = count + recorded
        valid = torch.clamp(count, max=appended.numel())
        threshold = _percentile(appended, valid, tuple(positions)).to(total.dtype)  # type: ignore[arg-type]
        return Step(threshold, clip_coefficient(threshold, total), AutoClipState(appended, count))

    def _table(self, history: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Slot indices, and :func:`_positions`, for this capacity and device (built on the
        host once; log2 times for a growing history)."""
        key = (history.numel(), history.device)
        table = self._tables.get(key)
        if table is None:
            slots = torch.arange(key[0], device=key[1])
            table = (slots, *_positions(self.percentile, *key))
            self._tables = {key: table}  # a grown history never needs the smaller table again
        return table


def _percentile(values: Tensor, valid: Tensor, positions: tuple[Tensor, Tensor]) -> Tensor:
    """``numpy.percentile(values[valid entries], p)`` ('linear'), on the device.

    Invalid entries hold ``+inf``, so after sorting the ``valid`` real ones come first.
    ``positions`` is :func:`_positions` for ``p``. ``inf`` when there is no valid entry.
    """
    ordered = values.sort().values
    last = torch.clamp(valid - 1, min=0).reshape(1)
    index_table, weight_table = positions
    below = index_table.gather(0, last)
    pair = ordered.gather(0, torch.cat([below, torch.minimum(below + 1, last)]))
    # torch.lerp and numpy's _lerp are the same two-sided formula (exact at both ends).
    value = torch.lerp(pair[0], pair[1], weight_table.gather(0, last)[0])
    return torch.where(valid > 0, value, math.inf)


def _positions(percentile: float, capacity: int, device: torch.device) -> tuple[Tensor, Tensor]:
    """For n = 1..capacity valid norms: the index below numpy's virtual index (n-1)·p/100
    and the interpolation weight, computed once on the host in float64 as numpy does (a
    float32 product on the device would be off by up to 4e-7 of the gap between norms)."""
    virtual = torch.arange(capacity, dtype=torch.float64) * (percentile / 100.0)
    below = virtual.floor()
    return below.long().to(device), (virtual - below).float().to(device)


def _check_percentile(percentile: object) -> float:
    if isinstance(percentile, bool) or not isinstance(percentile, numbers.Real):
        raise ArgumentTypeError(
            f"`percentile` must be a number in (0, 100], got {percentile!r:.80}; pass e.g. "
            "`percentile=10.0` (the paper's choice)"
        )
    value = float(percentile)
    if value == 0:
        raise ValueError(
            "`percentile` must be in (0, 100], got 0: percentile=0 clips every step to the "
            "smallest norm in the window (with window=None the smallest ever, so one tiny norm "
            "pins the threshold for good). For the paper's p=0 behaviour pass a tiny positive "
            "percentile such as `percentile=1e-6`: it interpolates to within 1e-5 of the gap "
            "above the minimum for window=1024; the paper's recommendation is `percentile=10.0`"
        )
    if not 0 < value <= 100:
        raise ValueError(
            f"`percentile` must be in (0, 100], got {value}; it is a percentile (10 means "
            "the 10th percentile), not a quantile in [0, 1]: pass e.g. `percentile=10.0`"
        )
    return value
