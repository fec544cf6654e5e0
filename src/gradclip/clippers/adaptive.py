"""AdaptiveClip: gradclip's default adaptive clipper, a guarded multiple of the median recent norm."""

from __future__ import annotations

import inspect
import math
import warnings
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any, NamedTuple

import torch
from torch import Tensor
from typing_extensions import Unpack

from gradclip import _foreach
from gradclip._checks import check_count, check_real, check_threshold
from gradclip.clippers.base import Clipper, Step
from gradclip.clippers.groups import GroupOptions
from gradclip.nonfinite import NonFinitePolicy
from gradclip.norms import GradNorms
from gradclip.scale import clip_coefficient

if TYPE_CHECKING:
    from collections.abc import Iterable

    from torch.distributed import ProcessGroup

    from gradclip.clippers.spikes import SpikeDetector, SpikePolicy
    from gradclip.distributed import GroupLike

__all__ = [
    "HOLD",
    "LOSS_BLOCK",
    "LOSS_CUT",
    "LOSS_GROWTH",
    "LOSS_PATIENCE",
    "LOSS_WINDOW",
    "LOSS_Z",
    "NORMALISING_WARMUP_GROWTH",
    "SECOND_MOMENT",
    "WARMUP_GROWTH",
    "AdaptiveClip",
    "AdaptiveClipState",
    "OptimizerKinds",
    "known_optimizers",
    "normalises",
    "optimizer_class",
    "optimizer_kind",
]

WARMUP_GROWTH = 0.01
"""``warmup_growth``'s default: the warm-up ramp grows the threshold by at most 1% a step."""
NORMALISING_WARMUP_GROWTH = 0.05
"""``warmup_growth``'s default where ``optimizer`` normalises its update (Adam and its kin): 5%
a step. While the ramp clips every step to a growing threshold, the gradients Adam sees grow
faster than its second moment follows, and its steps grow with them: a learning rate raised
for the length of the ramp (for a 50-fold ramp of one gradient direction under
``torch.optim.Adam``, the step reaches 2.4 times the learning rate after 390 steps at 1%, 1.9
times after 78 steps at 5%), which a faster ramp keeps short and lower. On a
generated AdamW classifier (``benchmarks/adamw_mlp.py``, 16 seeds) the default scored 1.22x
the best fixed threshold with 1% and 1.05x with 5%; the Adam task with corrupted batches, which
wants its start clipped, 1.01x and 1.04x (12 seeds)."""
SECOND_MOMENT = 0.999
"""``second_moment``'s default where ``optimizer`` normalises its update: ``torch.optim.Adam``'s
default beta2, a memory of ~1000 steps, whatever the optimizer's own. On the digits CNN under
``AdamW(betas=(0.9, 0.95))`` it scored 1.05x the best fixed threshold over 144 seeds, and that
optimizer's own 0.95 1.10x; the transformer (also 0.95) gave the same runs with either."""
HOLD = 1 / 32
"""``AdaptiveClip(optimizer=...)``'s ``hold`` for an optimizer that normalises its update (the
rule for the steps given no loss)."""
LOSS_BLOCK = 20
"""The loss gate (``follow_loss``) decides every this many recorded losses, from the mean of
the last block against the one before."""
LOSS_WINDOW = 100
"""...and from the trend (least-squares slope) of the last this many recorded losses."""
LOSS_Z = 2.0
"""A rise or a fall counts when it exceeds this many standard errors."""
LOSS_GROWTH = 0.02
"""While the loss falls to new lows, the threshold (and the ceiling after a back-off) may
grow by this much a step: x1.5 per block, ~40x the slow ``growth``."""
LOSS_CUT = 0.7
"""A significant rise of the loss multiplies the threshold by this (the median rule only)."""
LOSS_PATIENCE = 10
"""After this many decisions in a row without a new lowest block mean of the loss (200 losses),
the threshold is cut by ``LOSS_CUT`` too, down to ``min_relative`` times the median at most: a
plateau, where a clip that sets the step size acts as a learning rate that is too high
(``torch.optim.lr_scheduler.ReduceLROnPlateau``'s patience)."""

# Optimizers whose update size is set by the learning rate, not by the gradient's scale:
# per-coordinate second moments (Adam and its kin, RMSprop, Adagrad, Adadelta, Adafactor),
# signs (Rprop) or orthogonalisation (Muon).
_NORMALISING = tuple(
    getattr(torch.optim, name)
    for name in ("Adam", "AdamW", "Adamax", "NAdam", "RAdam", "SparseAdam", "Adagrad",
                 "Adadelta", "RMSprop", "Rprop", "Adafactor", "Muon")
    if hasattr(torch.optim, name)
)


def normalises(optimizer: torch.optim.Optimizer | type[torch.optim.Optimizer]) -> bool:
    """Whether ``optimizer`` (an optimizer, or its class)'s update ignores the gradient's
    overall scale.

    True for torch's Adam family, RMSprop, Adagrad, Adadelta, Adafactor, Rprop and Muon, and
    for any optimizer with ``betas`` among its defaults (Lion, 8-bit and fused Adams; of a
    class: among the arguments it takes); False for SGD (with or without momentum), ASGD and
    LBFGS, whose step is proportional to the gradient.

    Example:
        >>> import torch
        >>> p = [torch.nn.Parameter(torch.zeros(1))]
        >>> normalises(torch.optim.AdamW(p)), normalises(torch.optim.SGD(p, lr=0.1))
        (True, False)
        >>> normalises(torch.optim.RMSprop)
        True
    """
    kind = optimizer if isinstance(optimizer, type) else type(optimizer)
    if issubclass(kind, _NORMALISING):
        return True
    if issubclass(kind, (torch.optim.SGD, torch.optim.ASGD, torch.optim.LBFGS)):
        return False
    if isinstance(optimizer, type):
        return "betas" in inspect.signature(kind).parameters
    return "betas" in getattr(optimizer, "defaults", {})


OptimizerKind = torch.optim.Optimizer | type[torch.optim.Optimizer] | str
OptimizerKinds = OptimizerKind | Sequence[OptimizerKind]
"""What tells an optimizer's kind: the optimizer, its class, or its ``torch.optim`` name
(``"AdamW"``, any case); or a list of them (``[muon, adamw]``)."""


def optimizer_class(name: str) -> type[torch.optim.Optimizer]:
    """The ``torch.optim`` optimizer class called ``name``, in any case (``ValueError`` naming
    the known ones otherwise): how ``gradclip recommend --optimizer`` names one.

    Example:
        >>> optimizer_class("adamw").__name__
        'AdamW'
    """
    classes = {
        key.lower(): cls for key, cls in vars(torch.optim).items()
        if isinstance(cls, type) and issubclass(cls, torch.optim.Optimizer) and cls is not torch.optim.Optimizer
    }  # fmt: skip
    if name.lower() not in classes:
        raise ValueError(
            f"`optimizer`={name!r} names no torch.optim optimizer; name one of "
            f"{', '.join(sorted(c.__name__ for c in classes.values()))} (for one from another "
            "package, the torch.optim kin it follows: 'Adam' for Lion or an 8-bit Adam, 'SGD' "
            "for a momentum SGD), or pass the optimizer itself"
        )
    return classes[name.lower()]


def optimizer_kind(optimizer: object, fix: str) -> tuple[str, bool]:
    """The kind of ``optimizer`` (:data:`OptimizerKinds`; a name read as its ``torch.optim``
    class): its class names, "+"-joined, and whether all of them normalise their update
    (:func:`normalises`). ``TypeError`` naming the argument with ``fix`` (what it is for)
    otherwise; ``ValueError`` for an unknown name.

    Example:
        >>> p = [torch.nn.Parameter(torch.zeros(1))]
        >>> optimizer_kind([torch.optim.SGD(p), "adamw"], "the one stepped")
        ('SGD+AdamW', False)
    """
    items = list(optimizer) if isinstance(optimizer, list | tuple) else [optimizer]
    kinds = [optimizer_class(o) if isinstance(o, str) else o for o in items]
    classes = [k if isinstance(k, type) else type(k) for k in kinds]
    if not kinds or not all(issubclass(c, torch.optim.Optimizer) for c in classes):
        raise TypeError(
            f"`optimizer` must be a torch.optim.Optimizer, its class or its name, or a list of "
            f"them ({fix}), got {', '.join(c.__name__ for c in classes) or 'an empty list'}"
        )
    return "+".join(c.__name__ for c in classes), all(normalises(k) for k in kinds)


def known_optimizers(optimizer: object) -> list[torch.optim.Optimizer] | None:
    """What a step stepped (an optimizer or a list of them, as :meth:`Clipper.step` takes
    them) where each is a ``torch.optim.Optimizer``, whose kind can be read; None otherwise
    (a wrapper that steps others) and for None.

    Example:
        >>> sgd = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.1)
        >>> known_optimizers(sgd) == [sgd], known_optimizers(object())
        (True, None)
    """
    stepped = list(optimizer) if isinstance(optimizer, list | tuple) else [optimizer]
    if not stepped or not all(isinstance(o, torch.optim.Optimizer) for o in stepped):
        return None
    return list(dict.fromkeys(stepped))  # each once


class AdaptiveClipState(NamedTuple):
    """:class:`AdaptiveClip`'s statistics (on the gradients' device after the first call).

    Attributes:
        history: float32, shape ``(window,)``, the recorded norms in ring order; slots not
            yet written hold ``+inf``.
        count: int64, 0-dim, the number of norms ever recorded (next slot: ``count % window``).
        threshold: float32, 0-dim, ``c`` after the last recorded step, before ``max_norm``
            (``inf`` before the first).
        warm: bool, 0-dim, True until the warm-up ramp has reached its cap.
        multiple: float32, 0-dim, the ceiling ``k`` for the next step.
        losses: float32, shape ``(LOSS_WINDOW,)``, the recorded losses in ring order (the
            loss gate; 0 in slots not yet written).
        loss_count: int64, 0-dim, the number of losses ever recorded.
        loss_best: float32, 0-dim, the lowest block mean of the losses (``inf`` before one).
        loss_mode: int64, 0-dim, the gate's last decision: 0 none, 1 the loss falls to new
            lows (fast growth), 2 it rises (no growth).
        loss_stall: int64, 0-dim, the decisions since the last new low, rise or plateau cut.
        moment: float32, 0-dim, the running mean of the squared clipped norms, decayed by
            ``second_moment`` a step and not bias-corrected (0 before the first; 0 throughout
            with ``second_moment=None``).

    A checkpoint written before the loss gate (without the ``loss*`` entries), before the
    plateau cut (without ``loss_stall``) or before the second moment (without ``moment``),
    loads with them as in a fresh state.
    """

    history: Tensor
    count: Tensor
    threshold: Tensor
    warm: Tensor
    multiple: Tensor
    losses: Tensor
    loss_count: Tensor
    loss_best: Tensor
    loss_mode: Tensor
    loss_stall: Tensor
    moment: Tensor


_UP, _DOWN = 1, 2  # loss_mode values (0: no decision)
_LOSS_FIELDS = ("losses", "loss_count", "loss_best", "loss_mode", "loss_stall")
"""The loss gate's part of :class:`AdaptiveClipState`, in the order :func:`_follow` returns it."""


class AdaptiveClip(Clipper[AdaptiveClipState]):
    """Clip to a guarded multiple of the median recent gradient norm: no threshold to tune.

    With ``g`` the pre-clip total norm of this step, ``m`` the median of the last ``window``
    recorded norms (the lower median; ``inf`` while none is recorded; with ``second_moment``,
    the default under Adam and its kin, the larger of that and ``√v̂``, the norm the
    optimizer's second moment holds: see below), ``c`` the previous
    step's threshold and ``k`` the ceiling as a multiple of the median (``relative`` at
    first)::

        first norm:  c = warmup_start · g                                  the warm-up starts low
        warm-up:     c = min(c · (1 + warmup_growth), min(k, warmup_relative) · m)
                     until the ramp first reaches that cap
        afterwards:  c = min(c · (1 + growth), k · m)          grows slowly, falls at once
        spike:       if the window is full and g > spike · m:
                     c = min(c, max(backoff · c, min_relative · m))        back off
                     k = max(c / m, min_relative)                          and remember it
        otherwise:   k = min(k · (1 + recovery), relative)                 (from the next step)
        threshold  = min(c, max_norm)
        g         ← g · min(1, threshold / (‖g‖ + 1e-6))                   torch's coefficient

    Given the step's loss (``loss=loss`` to :meth:`step` or the call; ``follow_loss``), every
    20 recorded losses the gate compares the last 20 with the 20 before and looks at the
    trend of the last 100::

        the mean rose by > 2 standard errors:     c ← cut(c), then no growth       (mode 2)
        the trend falls (slope < -2 standard
        errors) to a new lowest block mean:       growth, warmup_growth and
                                                  recovery become 0.02 a step      (mode 1)
        otherwise:                                the rates above                  (mode 0)
        10 decisions in a row without a new low
        (a plateau; ``plateau``):                 c ← cut(c)
        where cut(c) = max(0.7 · c, min(c, min_relative · m)): never below the back-off's floor
        and, once 100 losses are recorded, a step whose loss is no higher than their median
        is no spike, whatever its norm

    A step is judged against the norms before it; its own norm is recorded afterwards. With
    the defaults: the threshold starts at 1% of the first norm and ramps up by at most 1% a
    step to half the median; from there it creeps toward twice the median by at most 0.05%
    a step (x1.65 per 1000 steps). A norm above 6x the median halves it, down to 1/48 of the
    median, and lowers the ceiling to match, which then recovers by 0.1% a step. In stable
    training the threshold ends up clipping only outliers; in unstable training it stays
    where the spikes stop. Each ingredient answers a failure of a published method, or of a
    fixed threshold:

    * **Scale-free.** Every quantity (but the optional ``max_norm``) is a multiple of recent
      norms, so a loss scaled by 1e3 gives the same clipping decisions. A fixed ``max_norm``
      that is 10x off is fatal.
    * **A robust statistic of recent norms**: the median of a bounded window (AutoClip's
      percentile of past norms, without its unbounded history; Pascanu et al.'s "statistics
      of the average norm"). A spike moves the median by one rank, where it drags ZClip's
      EMA mean and variance along.
    * **Clip outliers, not typical steps** (``relative=2``): the threshold tops out at twice
      the median. AutoClip's p=10 clips almost every step below the typical norm, which
      with plain SGD lowers the learning rate and under-trains. (From half the median, the
      creep takes ~2800 spike-free steps to get there.)
    * **A bound on how fast the threshold may grow** (``growth``; AdaGC's threshold can grow
      by about 0.1% a step): a gradient that grows steadily, as in an exploding RNN, raises
      the median. ZClip's EMA follows it and never fires; here the threshold follows at most
      ``(1 + growth)`` per step, so the explosion is clipped instead of followed. Falling
      norms are followed at once.
    * **A warm-up** (``warmup_start``, ``warmup_growth``, ``warmup_relative``): the first
      norms of a network are often its largest (our RNNs start 15-30x above their settled
      norm), and a statistic of them is meaningless. As a learning-rate warm-up does, the
      threshold starts at a small fraction of the first norm and ramps up; the ramp stops at
      half the median, below the typical norm, and the slow ``growth`` takes over from
      there. Given an optimizer that normalises its update, the ramp is five times faster
      (:data:`NORMALISING_WARMUP_GROWTH`): there a growing clip acts as a raised learning
      rate while it lasts. AdaGC's warm-up needs an absolute threshold (1.0) instead.
    * **Spike back-off** (``spike``, ``backoff``, ``min_relative``, ``recovery``), as the
      dynamic loss scaling of ``torch.amp.GradScaler`` backs off on an overflow: a norm
      above ``spike`` times the median (ZClip's spike idea, against a robust reference)
      halves the threshold, and the ceiling ``k`` drops to the new threshold's multiple of
      the median, so the back-off holds when the norms move. When the creep reaches a
      threshold at which training turns unstable (a learning rate too high for it), the
      spikes push it back below, and it returns only slowly. A single data glitch costs one
      halving, regained in ~1400 steps. Spikes that keep coming, as with heavy-tailed
      gradient noise, hold the threshold near ``min_relative`` times the median, where
      clipped SGD does well under such noise (Zhang et al., 2020). That floor keeps the
      back-off from freezing training, as AGC at λ = 0.01 freezes an RNN. Spikes are looked
      for once the window is full. Given the loss, a norm above that line on a batch whose
      loss is no higher than the median of the last 100 is no spike: it is the network
      learning. A classifier's norms can grow 6x within a few steps as it leaves its first
      plateau, while its loss falls (the digits CNN under SGD, steps ~170-230: the step's
      loss 0.4-1.0x the median), and one back-off there holds a 600-step run below its
      typical norm to its end, the ceiling regrowing 0.1% a step (1.11x the best fixed
      threshold over 144 seeds; 1.02x with this test). The spikes that harm raise the loss
      with the norm: a corrupted batch (10^7x the median loss on the benchmark's Adam task),
      heavy-tailed noise (mostly 35x and more), an RNN's cliffs; those tasks run as before
      (bit-identical but one RNN seed of 24).
    * **The loss decides how fast** (``follow_loss``, when the loss is passed). The
      threshold grows slowly because a norm statistic cannot tell a run that needs clipping
      from one that is slowed by it: an image classifier's norms grow 8x while it learns,
      and a slow ramp then clips every step of a 600-step run (2.9x the best fixed
      threshold). The loss can: while it falls to new lows, the threshold and the ceiling
      grow 40x faster; when it rises beyond its noise, the threshold drops by 0.7 (not below
      the back-off's floor) and stops growing, as a learning rate is cut when the loss rises
      ("bold driver"). A loss that recovers from a rise is no new low and grows nothing: an
      exploding RNN otherwise climbs back into its explosions. Both tests compare against the
      loss's own noise (20- and 100-step statistics), so heavy-tailed losses rarely trigger
      them. And when the
      loss makes no new low for 200 losses (``LOSS_PATIENCE`` decisions), the threshold is
      cut by 0.7 as well, down to the back-off's floor: where the clip sets the step size,
      a plateau says that step is too large, as ``ReduceLROnPlateau`` reads it of a learning
      rate (on the quality benchmark's label-noise task, 0.18x the best fixed threshold
      from 0.28x; on the violent RNN, whose loss can sit on a plateau for a thousand steps at
      a threshold near the median norm, 0.95x from 1.20x over 12 seeds, its median unchanged
      on six held-out seeds; where the clip does not bind it changes nothing the run feels). Not
      where ``optimizer`` normalises its update (``plateau``): there the learning rate sets
      the step size. With ``hold`` too (below).
    * **The optimizer's normalisation** (``optimizer``, ``hold``). Adam and its kin divide
      each step by a running estimate of the gradient's scale, so their update's size is set
      by the learning rate, not by the gradient norm. Given such an optimizer (see
      :func:`normalises`) and no loss, ``AdaptiveClip`` clips every step to one constant
      threshold, ``hold`` = 1/32 of the first recorded norm: spikes are cut fully, and the
      second-moment estimate sees gradients of one size instead of lagging behind falling
      norms, so Adam's steps stay as large as its learning rate. That is a bet on the
      learning rate: on the quality benchmark's spiky Adam task it wins (the best fixed
      threshold, where the median rule is 1.19x off), on an AdamW image classifier whose
      norms fall 500x in 600 steps it loses (1.49x; the median rule 1.26x). Given the loss,
      the median rule with its gate does well on both (1.04x and 1.12x; on six other seeds
      1.01x and 1.35x, where ``hold`` is 1.00x and 1.59x): a step given a loss follows it,
      ``hold`` or not, and ``hold`` is the rule for the steps without one. With SGD, whose
      step is proportional to the gradient, a threshold below the typical norm is a
      smaller learning rate, and the median rule applies.
    * **The optimizer's memory** (``second_moment``). Adam divides each step by a running
      mean of the squared gradients (decay beta2: ~1000 steps at 0.999). Where the norms fall,
      by orders of magnitude as a classifier fits its training set, that mean still holds the
      larger norms of earlier steps, and a gradient far above the recent median but within
      that scale makes an ordinary step: the median calls it a spike, and the back-off then
      holds the threshold at its floor, 20-60x below the median, clipping every step (the
      digits CNN under AdamW, from step ~300 of 600). So with ``second_moment`` the rule's
      reference ``m`` is the larger of the median and ``√v̂``, where ``v̂`` is the running
      mean of the squared norms after clipping (decay ``second_moment``, bias-corrected as
      Adam's): for the same decay, the sum of Adam's ``exp_avg_sq`` over a model's
      parameters. A corrupted batch far above both is still a spike. Its default, where
      ``optimizer`` normalises its update, is :data:`SECOND_MOMENT` (0.999), the memory of
      Adam's default beta2; with norms that do not fall, ``√v̂`` stays near the median and
      changes little. On the digits CNN under AdamW: 1.05x the best fixed threshold over 144
      seeds, from 1.14x.
    * **An optional absolute ceiling** (``max_norm``), outside the statistics.
    * **Non-finite steps never enter the statistics**: a NaN/inf norm changes no state
      (every update is masked with ``torch.where``), whatever the ``nonfinite`` policy does
      with the gradients; the packaged autoclip and zclip are poisoned for good by one NaN.
      An all-zero gradient (norm 0) is not recorded either: it carries no scale, and a
      median of zeros would clip every later step to nothing.

    The defaults are round values, the same for every task; the quality benchmark
    (``benchmarks/bench_quality.py``) compares them with a hand-tuned fixed threshold on the
    tasks of ``gradclip demo``, and judges them on real-data tasks they were not chosen on.
    With SGD the threshold cannot know the learning rate: when the rate is too high, the
    best fixed threshold clips every step, which ``AdaptiveClip`` reaches only through the
    back-off. Pass ``optimizer=`` (the one stepped after the clip) so that the rule fits
    it; :func:`gradclip.find_max_norm` measures the best threshold on your model instead.

    State: :class:`AdaptiveClipState` (``clipper.state``, and in :meth:`state_dict`).

    A step sorts ``window`` floats and does about 40 operations on 0-dim tensors (0.1 ms on a
    CPU), with no host sync. Given a loss, the gate adds about 80 operations on up to 100 floats
    to the steps that decide (1 in 20) and about 20 to the others (the spike test's count of the
    losses at least as high as this one among them: +0.015 ms a step); on an accelerator, where
    branching would cost a sync, all 100 run every step (on six 128x128 layers at one CPU
    thread: 0.39 ms a step instead of 0.30, 0.53 with all of them every step). Under
    ``torch.distributed`` it adds one all-reduce of the loss (none where a spike detector
    averages it over the same ranks: they share it). :class:`~gradclip.ClipStats` ``threshold``
    is the threshold applied; on a step whose norm is not recorded (NaN, inf or 0) it is the one
    the state gives without that norm (``inf`` before the first recorded norm), and its loss is
    not recorded either.

    Args:
        relative: the largest threshold, as a multiple of the median recent norm (> 0,
            default 2).
        window: how many recent norms the median looks at (int >= 1, default 128).
        growth: after the warm-up the threshold grows by at most ``(1 + growth)`` per step
            (>= 0, default 5e-4; 0 makes it a ratchet that only falls).
        warmup_start: the first threshold, as a fraction of the first recorded norm (> 0,
            default 0.01; ``inf`` skips the ramp: the first steps go unclipped and the
            threshold then starts at ``warmup_relative · m``).
        warmup_growth: the per-step growth bound of the warm-up ramp (>= 0; default
            :data:`WARMUP_GROWTH`, 0.01, and :data:`NORMALISING_WARMUP_GROWTH`, 0.05, where
            ``optimizer`` normalises its update).
        warmup_relative: where the ramp ends, as a multiple of the median (in
            (0, relative], default 0.5).
        spike: a norm above ``spike`` times the median is a spike (> 1, default 6; None
            disables the back-off); given the loss, only where the step's loss is above
            the median of the last 100.
        backoff: the factor a spike applies to the threshold (in (0, 1], default 0.5).
        min_relative: the lowest threshold the back-off reaches, as a multiple of the
            median (in (0, relative], default 1/48; chosen on the quality benchmark's
            heavy-tailed SGD task, where 1/32 was 1.13x the best fixed threshold and 1/48 is
            0.93x).
        recovery: after a back-off, the ceiling ``k`` regrows by ``(1 + recovery)`` per step
            (>= 0, default 1e-3, AdaGC's rate; the threshold under it still grows by at
            most ``growth``).
        max_norm: an optional absolute ceiling on the threshold (>= 0); None (default) for
            none.
        hold: clip every step given no loss (every step, with ``follow_loss=False``) to
            ``hold`` x the first recorded norm, held for good (> 0); None (default) for the
            median rule. Only the threshold changes: the norms are still recorded, the
            checkpoint format is the same. Pass the loss on every step or on none: a run
            that mixes them switches rules from step to step.
        second_moment: the decay of the running mean of squared clipped norms whose root
            joins the median in the reference ``m`` (see above; in [0, 1), 0 for none).
            Default: :data:`SECOND_MOMENT` (0.999) where ``optimizer`` normalises its update,
            none otherwise.
        optimizer: the optimizer stepped after the clip, or a list of them (``[muon,
            adamw]``, as :meth:`step` takes them); or, where the optimizer does not exist yet
            (a framework builds it), its class or ``torch.optim`` name (``"AdamW"``). When it
            normalises its update (all of them do; :func:`normalises`: Adam, AdamW, RMSprop,
            Adagrad, Muon, ...) and ``hold`` is None, ``hold`` becomes :data:`HOLD` (1/32) for
            the steps given no loss, ``plateau`` False and ``second_moment``
            :data:`SECOND_MOMENT`. Only its kind is read; no reference is kept.
        follow_loss: when a loss is passed to :meth:`step` or the call, let it set how fast
            the threshold grows and cut it when the loss rises (default True; see above). A
            NaN or infinite loss is not recorded; a step given a loss follows the median
            rule and this gate, with ``hold`` too. Pass the loss tensor: a Python number is
            copied to the device each step. Under ``torch.distributed`` the loss is averaged
            over ``loss_group`` first (one all-reduce), so every rank decides the same: every
            rank must then pass its loss on every step.
        plateau: given the loss, cut the threshold by 0.7 after ``LOSS_PATIENCE`` gate
            decisions without a new low of the loss (see above). None (default): unless
            ``optimizer`` normalises its update, where the step size is set by the learning
            rate, not by the clip, and a long run's plateaus would walk the threshold down to
            its floor for nothing.
        loss_group: the process group the loss is averaged over (default: the default
            process group, when ``torch.distributed`` is initialised).
        norm_type: p of the norms (default 2).
        nonfinite: ``"propagate"`` (torch's behaviour), ``"error"`` or ``"skip"``.
        shard_group, extra_groups: distributed training (FSDP1/ZeRO shards, pipeline
            stages); see :class:`~gradclip.Clipper` and the README, "Distributed training".
        groups, policy, orthogonal: per-group clipping (``groups=optimizer.param_groups``);
            see :class:`~gradclip.Clipper` and :mod:`gradclip.grouping`.
        spikes: a :class:`~gradclip.SpikeDetector` (or ``"skip"``, ``"clip"``, ``"off"``)
            that skips, clips or records gradient spikes; None (default) for none.

    With an optimizer that normalises its update::

        clipper = gradclip.AdaptiveClip(optimizer=optimizer)   # Adam(W): hold = 1/32
        clipper.step(model, optimizer, loss=loss)               # ...unless given the loss

    Example:
        >>> import math, torch
        >>> from gradclip.clippers.adaptive import AdaptiveClip
        >>> clipper = AdaptiveClip(window=4, warmup_start=math.inf, growth=0.0)
        >>> p = torch.nn.Parameter(torch.zeros(1))
        >>> for norm in (1.0, 2.0, 3.0, 4.0, 100.0):     # the last one is a spike
        ...     p.grad = torch.tensor([norm])
        ...     stats = clipper({"w": p})
        >>> stats.threshold       # half the median of 1 (set at step 2), halved by the spike
        tensor(0.2500)
        >>> p.grad
        tensor([0.2500])
        >>> adam = AdaptiveClip(optimizer=torch.optim.Adam([p]))
        >>> for norm in (8.0, 1.0, 100.0):
        ...     p.grad = torch.tensor([norm])
        ...     stats = adam({"w": p})
        >>> adam.hold, stats.threshold     # 1/32 of the first norm, held
        (0.03125, tensor(0.2500))

    References:
        Pascanu, Mikolov, Bengio. "On the difficulty of training recurrent neural networks."
        ICML 2013 (norm clipping; the threshold from statistics of the average norm).
        Seetharaman, Wichern, Pardo, Le Roux. "AutoClip: Adaptive Gradient Clipping for
        Source Separation Networks." IEEE MLSP 2020 (a percentile of past norms).
        Kumar, Owen, Roy Chowdhury, Güra. "ZClip: Adaptive Spike Mitigation for LLM
        Pre-Training." arXiv:2504.02507, 2025 (spikes measured against recent norms).
        Wang et al. "AdaGC: Improving Training Stability for Large Language Model
        Pretraining." arXiv:2502.11034 (a bounded growth rate of the threshold).
        Zhang, Karimireddy, Veit, Kim, Reddi, Kumar, Sra. "Why are adaptive methods good for
        attention models?" NeurIPS 2020 (clipping under heavy-tailed noise).
    """

    def __init__(
        self,
        relative: float = 2.0,
        window: int = 128,
        *,
        growth: float = 5e-4,
        warmup_start: float = 1e-2,
        warmup_growth: float | None = None,
        warmup_relative: float = 0.5,
        spike: float | None = 6.0,
        backoff: float = 0.5,
        min_relative: float = 1 / 48,
        recovery: float = 1e-3,
        max_norm: float | None = None,
        hold: float | None = None,
        second_moment: float | None = None,
        optimizer: OptimizerKinds | None = None,
        follow_loss: bool = True,
        plateau: bool | None = None,
        loss_group: ProcessGroup | None = None,
        norm_type: float | str = 2.0,
        nonfinite: NonFinitePolicy = "propagate",
        shard_group: ProcessGroup | None = None,
        extra_groups: Iterable[GroupLike] = (),
        spikes: SpikeDetector | SpikePolicy | None = None,
        **grouping: Unpack[GroupOptions],
    ):
        self.relative = check_real(
            relative, "relative", "finite and > 0", lambda v: 0 < v < math.inf, "relative=2.0"
        )
        self.window = check_count(window, "window", 1, "window=128")
        self.growth = check_real(
            growth, "growth", "finite and >= 0", lambda v: 0 <= v < math.inf, "growth=5e-4"
        )
        self.warmup_start = check_real(
            warmup_start, "warmup_start", "> 0 (inf: no ramp)", lambda v: v > 0, "warmup_start=0.01"
        )
        within = f"in (0, relative={self.relative:g}]"
        self.warmup_relative = check_real(
            warmup_relative,
            "warmup_relative",
            within,
            lambda v: 0 < v <= self.relative,
            "warmup_relative=0.5",
        )
        self.spike = (
            None
            if spike is None
            else check_real(
                spike, "spike", "finite and > 1 (or None)", lambda v: 1 < v < math.inf, "spike=6.0"
            )
        )
        self.backoff = check_real(
            backoff, "backoff", "in (0, 1]", lambda v: 0 < v <= 1, "backoff=0.5"
        )
        self.min_relative = check_real(
            min_relative,
            "min_relative",
            within,
            lambda v: 0 < v <= self.relative,
            "min_relative=1/48",
        )
        self.recovery = check_real(
            recovery, "recovery", "finite and >= 0", lambda v: 0 <= v < math.inf, "recovery=1e-3"
        )
        self.max_norm = None if max_norm is None else check_threshold(max_norm, "max_norm")
        # several optimizers, as Clipper.step takes them ([muon, adamw]): hold when all
        # of them normalise their update
        kind = None if optimizer is None else optimizer_kind(optimizer, "the ones stepped after the clip")
        normalising = kind is not None and kind[1]
        if warmup_growth is None:
            warmup_growth = NORMALISING_WARMUP_GROWTH if normalising else WARMUP_GROWTH
        self.warmup_growth = check_real(
            warmup_growth,
            "warmup_growth",
            "finite and >= 0",
            lambda v: 0 <= v < math.inf,
            "warmup_growth=0.01",
        )
        chosen = hold if hold is not None else plateau  # a rule the caller picked, if any
        if hold is None and normalising:
            hold = HOLD
        self.hold = None if hold is None else check_real(
            hold, "hold", "finite and > 0 (or None)", lambda v: 0 < v < math.inf, "hold=0.25"
        )
        if second_moment is None and normalising:
            second_moment = SECOND_MOMENT
        second_moment = None if second_moment is None else check_real(
            second_moment, "second_moment", "in [0, 1) (0: none)", lambda v: 0 <= v < 1,
            "second_moment=0.999",
        )
        self.second_moment = second_moment or None  # 0: no second moment, as None
        if not isinstance(follow_loss, bool):
            raise TypeError(
                f"`follow_loss` must be True or False, got {type(follow_loss).__name__} "
                f"{follow_loss!r:.60}; pass follow_loss=False to ignore the loss"
            )
        self.follow_loss = follow_loss
        self.reads_loss = follow_loss  # with `hold` too: a step given a loss follows it
        if plateau is None:  # the clip sets the step size unless the optimizer normalises it
            plateau = not normalising
        if not isinstance(plateau, bool):
            raise TypeError(
                f"`plateau` must be True, False or None, got {type(plateau).__name__} "
                f"{plateau!r:.60}; pass plateau=False to never cut on a plateau of the loss"
            )
        self.plateau = plateau
        # whether it was built for an optimizer that normalises its update, to warn once when
        # it steps another kind (check_optimizer); None where the caller picked a rule
        # (`hold`, `plateau`) without naming the optimizer
        self._built_for = (
            (normalising, f"for {kind[0]}") if kind is not None
            else (False, "without `optimizer`") if chosen is None else None
        )  # fmt: skip
        self._checked = False
        self.loss_group = loss_group  # not in config(): process groups are not comparable
        self._constants: _Constants | None = None
        super().__init__(
            norm_type=norm_type,
            nonfinite=nonfinite,
            shard_group=shard_group,
            extra_groups=extra_groups,
            spikes=spikes,
            **grouping,
        )

    def check_optimizer(self, optimizer: object) -> None:
        """Warn once when the optimizer stepped after the clip is not of the kind this
        clipper was built for (``optimizer=``): one that normalises its update (Adam and its
        kin) where it was built without one, or the other way round. Silent for an optimizer
        whose kind is not known (a wrapper that steps others), and where ``hold`` or
        ``plateau`` was given without ``optimizer`` (a rule picked by hand)."""
        if self._checked or self._built_for is None or _foreach.is_compiling():
            return
        self._checked = True
        stepped = known_optimizers(optimizer)
        if stepped is None:
            return
        names, normalising = optimizer_kind(stepped, "the ones stepped after the clip")
        built_normalising, built = self._built_for
        if normalising == built_normalising:
            return
        named = names.split("+")
        suggested = repr(named[0] if len(named) == 1 else named)
        warnings.warn(
            f"AdaptiveClip was built {built}, and it steps {names}, which "
            f"{'normalises' if normalising else 'does not normalise'} its update: its rule "
            + ("is SGD's (a plateau of the loss cuts the threshold, as a learning-rate decay "
               "would; Adam's step size is its learning rate's, not the clip's)"
               if normalising else "is Adam's, which clips every step given no loss")
            + f". Build it as AdaptiveClip(optimizer=optimizer), or AdaptiveClip(optimizer="
            f"{suggested}) where a framework builds the optimizer",
            stacklevel=3,
        )

    def config(self) -> dict[str, Any]:
        return {
            "relative": self.relative,
            "window": self.window,
            "growth": self.growth,
            "warmup_start": self.warmup_start,
            "warmup_growth": self.warmup_growth,
            "warmup_relative": self.warmup_relative,
            "spike": self.spike,
            "backoff": self.backoff,
            "min_relative": self.min_relative,
            "recovery": self.recovery,
            "max_norm": self.max_norm,
            # only when not the default: a checkpoint written before they existed loads
            **{k: getattr(self, k) for k, default in _LATER_ARGS.items() if getattr(self, k) != default},
            **super().config(),
        }

    def load_state_dict(self, state_dict: Mapping[str, Any]) -> None:
        # `hold` and `follow_loss` are in config() only when not the default (so that older
        # checkpoints load), and the protocol compares this clipper's keys: a checkpoint saved
        # with one would load unnoticed into a clipper without it. Refuse it, as any other
        # differing argument.
        theirs = state_dict.get("config") if isinstance(state_dict, Mapping) else None
        if isinstance(theirs, Mapping):
            for key, default in _LATER_ARGS.items():
                if theirs.get(key, default) != default and getattr(self, key) == default:
                    raise ValueError(
                        f"the AdaptiveClip state dict was saved with different arguments: "
                        f"{key}={theirs[key]!r} (here {default!r}); build the clipper as "
                        "gradclip.AdaptiveClip(**state_dict['config'])"
                    )
        super().load_state_dict(state_dict)

    State = AdaptiveClipState
    _optional_fields = (*_LOSS_FIELDS, "moment")

    def _init_state(self, tensors: int) -> AdaptiveClipState:
        return AdaptiveClipState(
            history=torch.full((self.window,), math.inf, dtype=torch.float32),
            count=torch.zeros((), dtype=torch.long),
            threshold=torch.full((), math.inf, dtype=torch.float32),
            warm=torch.ones((), dtype=torch.bool),
            multiple=torch.full((), self.relative, dtype=torch.float32),
            losses=torch.zeros(LOSS_WINDOW, dtype=torch.float32),
            loss_count=torch.zeros((), dtype=torch.long),
            loss_best=torch.full((), math.inf, dtype=torch.float32),
            loss_mode=torch.zeros((), dtype=torch.long),
            loss_stall=torch.zeros((), dtype=torch.long),
            moment=torch.zeros((), dtype=torch.float32),
        )

    def _check_state(self, state: AdaptiveClipState) -> None:
        multiple = float(state.multiple)
        if not 0 < multiple <= self.relative or bool((state.history <= 0).any()):
            raise ValueError(
                f"AdaptiveClip state dict holds multiple={multiple} (must be in (0, "
                f"relative={self.relative:g}]) or a recorded norm <= 0; the checkpoint is corrupt"
            )
        mode, stall = int(state.loss_mode), int(state.loss_stall)
        if mode not in (0, _UP, _DOWN) or not 0 <= stall < LOSS_PATIENCE \
                or not bool(torch.isfinite(state.losses).all()):  # fmt: skip
            raise ValueError(
                f"AdaptiveClip state dict holds loss_mode={mode} (must be 0, 1 or 2), "
                f"loss_stall={stall} (must be in [0, {LOSS_PATIENCE})) or a non-finite "
                "recorded loss; the checkpoint is corrupt"
            )
        moment = float(state.moment)
        if not 0 <= moment < math.inf:
            raise ValueError(
                f"AdaptiveClip state dict holds moment={moment} (must be finite and >= 0); the "
                "checkpoint is corrupt"
            )

    def _constants_on(self, device: torch.device) -> _Constants:
        """The step's constants as device tensors, built once per device: an operation on a
        Python number costs twice one on a tensor, and a step is mostly such operations."""
        constants = self._constants
        if constants is None or constants.slots.device != device:
            window = self.window
            # The lower median of n recorded norms sits at sorted index (n - 1) // 2.
            # Built on the device (fill, arange), not copied from the host: a first call
            # makes no host-to-device copy either.
            counts = torch.arange(window + 1, device=device)

            def f32(value: float) -> Tensor:
                return torch.full((), value, dtype=torch.float32, device=device)

            one, decay = f32(1.0), f32(self.second_moment or 0.0)

            constants = self._constants = _Constants(
                slots=torch.arange(window, device=device),
                window=torch.full((), window, dtype=torch.long, device=device),
                # the lower median of n recorded norms sits at sorted index (n - 1) // 2
                middle=torch.div((counts - 1).clamp(0, window - 1), 2, rounding_mode="floor"),
                zero=f32(0.0),
                inf=f32(math.inf),
                rate=f32(1 + self.growth),
                warmup_rate=f32(1 + self.warmup_growth),
                warmup_start=f32(self.warmup_start),
                warmup_relative=f32(self.warmup_relative),
                relative=f32(self.relative),
                recovery_rate=f32(1 + self.recovery),
                spike=f32(math.inf if self.spike is None else self.spike),
                backoff=f32(self.backoff),
                min_relative=f32(self.min_relative),
                hold=f32(math.inf if self.hold is None else self.hold),
                decay=decay,
                rest=one - decay,  # as float32 computes it, not 1 - 0.999 rounded
                one=one,
                no=torch.zeros((), dtype=torch.bool, device=device),
                loss_rate=f32(1 + LOSS_GROWTH),
                loss_cut=f32(LOSS_CUT),
                loss_slots=torch.arange(LOSS_WINDOW, device=device),
                loss_x=torch.arange(LOSS_WINDOW, device=device, dtype=torch.float32),
            )
        return constants

    def _step(self, norms: GradNorms, state: AdaptiveClipState, loss: Tensor | None = None) -> Step:
        """This step's threshold and the state after it (see the class doc); pure."""
        if self.hold is not None and loss is None:
            return self._hold_step(norms.total, state)
        total = norms.total
        history, count, previous, warm, multiple = state[:5]
        k = self._constants_on(history.device)
        norm = total.float()
        recorded = (norm > k.zero) & (norm < k.inf)  # False for NaN, inf and a zero gradient
        rate, warmup_rate, recovery_rate = k.rate, k.warmup_rate, k.recovery_rate
        loss_state = tuple(getattr(state, name) for name in _LOSS_FIELDS)
        unchanged = previous
        # Unwritten slots hold +inf and sort last: the lower median of the recorded norms,
        # and inf while there is none.
        # gather, not take: no host read, and it traces under torch.compile
        middle = k.middle.gather(0, torch.minimum(count, k.window).reshape(1))
        median = history.sort().values.gather(0, middle).reshape(())
        if self.second_moment is not None:
            # the norm the optimizer's second moment holds (bias-corrected as Adam does; 0
            # before the first recorded norm): the rule's reference where it is the larger
            # (named `median` from here on, as everything below is a multiple of it)
            held = state.moment / (k.one - torch.pow(k.decay, count))  # 0/0 before the first
            median = torch.fmax(median, held.sqrt())  # fmax: NaN never wins
        floor = k.min_relative * median  # the back-off's floor, which bounds every cut too
        typical = k.no  # a large norm on a batch of typical loss is no spike
        if loss is not None:  # given only where follow_loss (reads_loss)
            cut, plateau, typical, loss_state = _follow(state, loss, k)
            mode = loss_state[3]  # (losses, count, best, mode, stall)
            up, down = mode == _UP, mode == _DOWN
            rate = torch.where(up, k.loss_rate, torch.where(down, k.one, rate))
            warmup_rate = torch.where(
                up, torch.maximum(k.loss_rate, warmup_rate), torch.where(down, k.one, warmup_rate)
            )
            recovery_rate = torch.where(up, torch.maximum(k.loss_rate, recovery_rate), recovery_rate)
            if self.plateau:  # a plateau cuts as a rise does
                cut = torch.where(plateau, k.loss_cut, cut)
            # never below the floor (nor lower where a threshold already sits below it)
            previous = torch.maximum(previous * cut, torch.minimum(previous, floor))

        first = count == 0
        grown = previous * torch.where(warm, warmup_rate, rate)
        cap = torch.where(warm, torch.minimum(multiple, k.warmup_relative), multiple) * median
        # An unrecorded first norm (NaN, inf, 0) gives no threshold yet: inf.
        start = k.warmup_start * torch.where(recorded, norm, k.inf)
        threshold = torch.where(first, start, torch.minimum(grown, cap))
        still_warm = warm & (first | (grown < cap))
        new_multiple = torch.minimum(multiple * recovery_rate, k.relative)
        # Never a spike with spike=None (k.spike is inf) or before the window is full.
        spiked = (norm > k.spike * median) & (count >= k.window) & recorded & ~typical
        backed_off = torch.maximum(k.backoff * threshold, floor)
        threshold = torch.where(spiked, torch.minimum(threshold, backed_off), threshold)
        new_multiple = torch.where(
            spiked, torch.maximum(threshold / median, k.min_relative), new_multiple
        )
        write = (k.slots == torch.remainder(count, k.window)) & recorded
        applied, coefficient = self._applied(threshold, total)
        gate = {name: torch.where(recorded, new, getattr(state, name))
                for name, new in zip(_LOSS_FIELDS, loss_state, strict=True)}  # fmt: skip
        new_state = AdaptiveClipState(  # every entry masked by `recorded` (a finite norm)
            history=torch.where(write, norm, history),
            count=count + recorded,
            threshold=torch.where(recorded, threshold, unchanged),
            warm=torch.where(recorded, still_warm, warm),
            multiple=torch.where(recorded, new_multiple, multiple),
            moment=self._moment(state.moment, norm, coefficient, recorded, k),
            **gate,
        )
        return Step(applied, coefficient, new_state)

    def _moment(
        self, moment: Tensor, norm: Tensor, coefficient: Tensor, recorded: Tensor, k: _Constants
    ) -> Tensor:
        """The running mean of the squared clipped norms after a step (``moment`` where
        ``second_moment`` is None or the norm is not recorded): Adam's ``exp_avg_sq``, summed."""
        if self.second_moment is None:
            return moment
        clipped = norm * coefficient.float()
        new = k.decay * moment + k.rest * clipped.square()
        # a clipped norm above ~1e19 squares to inf in float32: left out, as a NaN norm is,
        # rather than hold the reference at inf (no clipping) for good
        return torch.where(recorded & torch.isfinite(new), new, moment)

    def _applied(self, threshold: Tensor, total: Tensor) -> tuple[Tensor, Tensor]:
        """The threshold applied (``threshold`` under ``max_norm``, in the norm's dtype) and
        its coefficient."""
        applied = threshold if self.max_norm is None else torch.clamp(threshold, max=self.max_norm)
        applied = applied.to(total.dtype)
        return applied, clip_coefficient(applied, total)

    def _hold_step(self, total: Tensor, state: AdaptiveClipState) -> Step:
        """``hold`` mode, for a step given no loss: ``hold`` x the first recorded norm, held
        for good."""
        history, count, previous, warm = state[:4]
        k = self._constants_on(history.device)
        norm = total.float()
        recorded = (norm > k.zero) & (norm < k.inf)
        first = count == 0
        threshold = torch.where(first, k.hold * torch.where(recorded, norm, k.inf), previous)
        write = (k.slots == torch.remainder(count, k.window)) & recorded
        applied, coefficient = self._applied(threshold, total)
        new_state = state._replace(  # the norms are still recorded: the state reads the same
            history=torch.where(write, norm, history),
            count=count + recorded,
            threshold=torch.where(recorded, threshold, previous),
            warm=warm & ~recorded,
            moment=self._moment(state.moment, norm, coefficient, recorded, k),
        )
        return Step(applied, coefficient, new_state)


def _follow(
    state: AdaptiveClipState, loss: Tensor, k: _Constants
) -> tuple[Tensor, Tensor, Tensor, tuple[Tensor, ...]]:
    """The loss gate (see :class:`AdaptiveClip`, ``follow_loss``): this step's factor on the
    previous threshold, whether it is a plateau cut (which the caller floors), whether the
    loss is typical (no spike, whatever the norm), and the new ``losses``, ``loss_count``,
    ``loss_best``, ``loss_mode``, ``loss_stall``.

    Typical: once ``LOSS_WINDOW`` losses are recorded, no higher than their lower median,
    i.e. more than half of them at least as high (counted, not sorted; a NaN loss counts
    none).

    Every ``LOSS_BLOCK`` recorded losses (from two blocks on): a rise of the last block's mean
    over the one before by more than ``LOSS_Z`` standard errors sets mode 2 and the factor
    ``LOSS_CUT``; else a least-squares slope of the last (up to ``LOSS_WINDOW``, from three
    blocks on) losses below ``-LOSS_Z`` standard errors, with the block's mean a new low, sets
    mode 1; else mode 0. A decision that is neither a rise nor a new low counts towards
    ``LOSS_PATIENCE``; the one that reaches it is a plateau (and the count restarts). Non-finite
    losses are not recorded. Tensor operations only, no host read, except on the CPU outside
    compilation, where the steps that decide nothing skip the statistics. ``loss``: float32,
    0-dim, on the state's device (``StepLoss.over``)."""
    ok = torch.isfinite(loss)
    higher = (state.losses >= loss).sum()
    typical = (state.loss_count >= LOSS_WINDOW) & (higher > LOSS_WINDOW // 2)
    losses = torch.where((k.loss_slots == torch.remainder(state.loss_count, LOSS_WINDOW)) & ok,
                         loss, state.losses)  # fmt: skip
    count = state.loss_count + ok
    decide = ok & (torch.remainder(count, LOSS_BLOCK) == 0) & (count >= 2 * LOSS_BLOCK)
    if _foreach.is_host_device(decide.device) and not _foreach.is_compiling() and not decide:
        # on the CPU reading is free: the statistics only on the steps that decide (1 in 20)
        gate = (losses, count, state.loss_best, state.loss_mode, state.loss_stall)
        return k.one, k.no, typical, gate
    # the ring in recording order, the newest last; the first LOSS_WINDOW - count unwritten
    ring = losses.gather(0, torch.remainder(count + k.loss_slots, LOSS_WINDOW))
    last, before = ring[-LOSS_BLOCK:], ring[-2 * LOSS_BLOCK : -LOSS_BLOCK]
    mean = last.mean()
    error = ((last.var() + before.var()) / LOSS_BLOCK).sqrt()
    rise = decide & (mean > before.mean() + LOSS_Z * error)
    # the slope's t statistic over the written slots
    seen = torch.clamp(count, max=LOSS_WINDOW)
    written = (k.loss_slots >= LOSS_WINDOW - seen).float()
    n = seen.float()
    dx = (k.loss_x - (k.loss_x * written).sum() / n) * written
    dy = (ring - (ring * written).sum() / n) * written
    sxx = dx.square().sum()
    slope = (dx * dy).sum() / sxx
    residual = (dy - slope * dx).square().sum()
    t = slope / (residual / (n - 2) / sxx).sqrt()
    fall = decide & ~rise & (count >= 3 * LOSS_BLOCK) & (t < -LOSS_Z) & (mean < state.loss_best)
    mode = torch.where(decide, torch.where(rise, _DOWN, torch.where(fall, _UP, 0)), state.loss_mode)
    best = torch.where(decide, torch.minimum(state.loss_best, mean), state.loss_best)
    cut = torch.where(rise, k.loss_cut, k.one)
    stalled = decide & ~rise & (mean >= state.loss_best)
    stall = torch.where(decide, torch.where(stalled, state.loss_stall + 1, 0), state.loss_stall)
    plateau = stall >= LOSS_PATIENCE
    return cut, plateau, typical, (losses, count, best, mode, torch.where(plateau, 0, stall))


_LATER_ARGS: dict[str, Any] = {
    "hold": None, "follow_loss": True, "plateau": True, "second_moment": None,
}
"""Arguments added after the first checkpoints, and their defaults: in ``config()`` only when
set otherwise."""


class _Constants(NamedTuple):
    slots: Tensor  # arange(window): the ring buffer's slot indices
    window: Tensor  # int64 0-dim
    middle: Tensor  # int64 (window + 1,): sorted index of the lower median of n norms
    zero: Tensor  # the rest: float32 0-dim
    inf: Tensor
    rate: Tensor  # 1 + growth
    warmup_rate: Tensor  # 1 + warmup_growth
    warmup_start: Tensor
    warmup_relative: Tensor
    relative: Tensor
    recovery_rate: Tensor  # 1 + recovery
    spike: Tensor  # inf when spike=None
    backoff: Tensor
    min_relative: Tensor
    hold: Tensor  # inf when hold=None
    decay: Tensor  # second_moment (0 when None)
    rest: Tensor  # 1 - decay
    one: Tensor
    no: Tensor  # bool 0-dim False
    loss_rate: Tensor  # 1 + LOSS_GROWTH
    loss_cut: Tensor
    loss_slots: Tensor  # arange(LOSS_WINDOW)
    loss_x: Tensor  # the same, float32: the slope's abscissae
