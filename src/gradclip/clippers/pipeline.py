"""One clip step, the same for every clipper.

1. measure (the clipper's ``_measure``: one pass, global under a distributed layout);
2. apply the non-finite policy (``error`` raises before anything changed);
3. the spike detector's verdict, if the clipper has one (:mod:`gradclip.clippers.spikes`);
4. the clipper's pure ``_step`` on its current state (per parameter group with ``groups=``:
   :mod:`gradclip.clippers.groups`);
5. mask the coefficient of a skipped step, compute what the clip does to the norm;
6. commit the new state, masked by finiteness and by the detector's verdict
   (:class:`~gradclip.clippers.state.StateStore`);
7. scale the gradients, or hand the coefficient to a fused optimizer
   (:mod:`gradclip.clippers.fold`);
8. return :class:`~gradclip.ClipStats`.

No step reads a device value on the host, except the ``error`` policy's check and, on the
CPU only, the skip of a multiply by exactly 1 and the detector's forensics.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch

from gradclip import _foreach
from gradclip.clippers.spikes import StepLoss
from gradclip.nonfinite import raise_nonfinite
from gradclip.norms import total_norm
from gradclip.scale import clip_coefficient, scale_, scale_each_
from gradclip.stats import ClipStats

if TYPE_CHECKING:
    from torch import Tensor

    from gradclip.clippers.base import Clipper
    from gradclip.clippers.fold import Fold
    from gradclip.clippers.groups import GroupedCall
    from gradclip.clippers.targets import Target

__all__ = ["clip"]


@_foreach.no_grad
def clip(clipper: Clipper, target: Target, fold: Fold | None,
         grouped: GroupedCall | None = None, loss: Tensor | float | None = None) -> ClipStats:
    """Clip ``target``'s gradients with ``clipper`` (see the module doc); with ``fold``, a
    global coefficient (and the skip decision) is armed into the fused optimizer instead of
    multiplied; with ``grouped``, steps 4, 6 and 7 are per parameter group
    (:mod:`gradclip.clippers.groups`). ``loss`` goes to the clipper's spike detector, if any,
    and to its step where it reads it (AdaptiveClip)."""
    measured = clipper._measure(target)
    total, names = measured.total, target.names
    if not target.grads and not target.communicates:  # nothing to clip, nobody to wait for
        one = torch.ones(())
        false = torch.zeros((), dtype=torch.bool)
        nan = total.new_full((), float("nan"))
        return ClipStats(total, total, nan, one, false, ~false, false, measured, names)
    store = clipper._store
    if _foreach.capturing() and store.values["steps"].device != total.device:
        raise RuntimeError(
            f"{type(clipper).__name__} is being captured into a CUDA graph before its first "
            "call: that call moves its state to the GPU (a host-to-device copy, which a capture "
            "cannot contain). Call the clipper once before capturing (the warm-up iterations "
            "torch.cuda.graph needs anyway); nothing was changed."
        )
    store.to(total.device)
    finite = torch.isfinite(total)
    if clipper.nonfinite == "error":
        raise_nonfinite(total, measured.per_tensor, names)
    spikes = clipper.spikes
    step_loss = StepLoss(loss, total.device)  # averaged over ranks: every rank decides the same
    verdict = spikes.judge(measured, step_loss.over(spikes.loss_group), names) if spikes is not None else None
    if grouped is None:
        state = store.prepare(names)
        step = clipper._run_step(measured, state, step_loss)
        threshold, coef = step.threshold, step.coef
        pending: list[tuple[Any, Any, Any]] = [(store, state, step.state)]
    else:
        threshold, coef, pending = grouped.step(measured, step_loss)
    if clipper.nonfinite == "skip":
        coef = torch.where(finite, coef, torch.ones_like(coef))
        skipped = ~finite
    else:
        skipped = torch.zeros_like(finite)
    if verdict is not None and spikes.policy != "off":
        # a spike enters no statistic of the clipper's (nor of any group's clipper)
        pending = [(s, old, _unless(verdict.accept, new, old)) for s, old, new in pending]
        if spikes.policy == "skip":
            coef = torch.where(verdict.spike, torch.ones_like(coef), coef)
            skipped = skipped | verdict.spike
    after = None
    if coef.dim() == 0:
        post_norm = total * coef
        clipped = coef < 1
    else:
        factors = clipper._factors(measured, coef)
        after = measured.per_tensor * factors
        post_norm = _norm(after, target, clipper.norm_type)
        clipped = (factors < 1).any()
    after_spike = None  # the "clip" policy's factor, when it cannot join the coefficient
    rows_extra = None  # that factor per row, when only the clipped groups take it
    if verdict is not None and spikes.policy == "clip":  # down to the detector's bound
        extra = torch.where(verdict.spike & finite, clip_coefficient(verdict.bound, post_norm), 1.0)
        threshold = torch.where(verdict.spike, torch.minimum(threshold, verdict.bound), threshold)
        clipped = clipped | (extra < 1)
        if coef.dim() == 0 and clipper.folds_into_fused:
            coef = coef * extra
        else:
            after_spike = extra
        if grouped is not None and not grouped.passive and after is not None:
            rows_extra = torch.where(grouped.clipped_rows(after), extra, 1.0)
            after = after * rows_extra
            post_norm = _norm(after, target, clipper.norm_type)  # measured again
        else:
            post_norm = post_norm * extra
    if grouped is None:
        store.commit(*pending[0][1:], finite)
    else:
        grouped.commit(pending, finite)
    report = None
    if verdict is not None:
        spikes.commit(verdict)
        report = spikes.observe(verdict, measured, target)  # host work, before any change
    if fold is not None and coef.dim() == 0 and clipper.folds_into_fused:
        fold.arm(coef, skipped)
    else:
        if grouped is None:
            clipper._apply(measured, coef)
        else:
            grouped.apply(measured, coef)
        if after_spike is not None:
            if fold is not None:
                fold.arm(after_spike, skipped)
            elif rows_extra is not None:
                scale_each_(measured.groups, rows_extra)
            else:
                scale_(measured.groups, after_spike, foreach=None)
        elif fold is not None:
            fold.arm(None, skipped)
    effective = coef if coef.dim() == 0 and after_spike is None else torch.where(
        total == 0, torch.ones_like(total), post_norm / total
    )
    groups = None if grouped is None or after is None else grouped.stats(after)
    if verdict is None:
        return ClipStats(total, post_norm, threshold, effective, clipped, finite, skipped,
                         measured, names, groups)
    return ClipStats(total, post_norm, threshold, effective, clipped, finite, skipped, measured,
                     names, groups, spike=verdict.spike, spike_score=verdict.score,
                     spike_bound=verdict.bound, spike_top=verdict.top,
                     spike_ratios=verdict.ratios, spike_report=report)


def _norm(per_tensor: Tensor, target: Target, p: float) -> Tensor:
    """The total norm of per-tensor norms, over every shard and stage under a layout."""
    layout = target.layout
    return total_norm(per_tensor, p) if layout is None else layout.total(per_tensor, p)


def _unless(accept: Tensor, new: Any, old: Any) -> Any:
    """``new`` where ``accept``, else ``old``, field by field (a state NamedTuple, or None)."""
    if new is None:
        return None
    return type(new)(*(torch.where(accept, n, o) for n, o in zip(new, old, strict=True)))
