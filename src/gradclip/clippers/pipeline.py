"""One clip step, the same for every clipper.

1. measure (the clipper's ``_measure``: one pass, global under a distributed layout);
2. apply the non-finite policy (``error`` raises before anything changed);
3. the clipper's pure ``_step`` on its current state;
4. mask the coefficient of a skipped step, compute what the clip does to the norm;
5. commit the new state, masked by finiteness (:class:`~gradclip.clippers.state.StateStore`);
6. scale the gradients, or hand the coefficient to a fused optimizer
   (:mod:`gradclip.clippers.fold`);
7. return :class:`~gradclip.ClipStats`.

No step reads a device value on the host, except the ``error`` policy's check and, on the
CPU only, the skip of a multiply by exactly 1.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from gradclip import _foreach
from gradclip.nonfinite import raise_nonfinite
from gradclip.norms import total_norm
from gradclip.stats import ClipStats

if TYPE_CHECKING:
    from gradclip.clippers.base import Clipper
    from gradclip.clippers.fold import Fold
    from gradclip.clippers.groups import GroupedCall
    from gradclip.clippers.targets import Target

__all__ = ["clip"]


@torch.no_grad()
def clip(clipper: Clipper, target: Target, fold: Fold | None,
         grouped: GroupedCall | None = None) -> ClipStats:
    """Clip ``target``'s gradients with ``clipper`` (see the module doc); with ``fold``, a
    global coefficient is armed into the fused optimizer instead of multiplied; with
    ``grouped``, steps 3, 5 and 6 are per parameter group (:mod:`gradclip.clippers.groups`)."""
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
    if grouped is None:
        state = store.prepare(names)
        step = clipper._step(measured, state)
        threshold, coef = step.threshold, step.coef
    else:
        threshold, coef, pending = grouped.step(measured)
    if clipper.nonfinite == "skip":
        coef = torch.where(finite, coef, torch.ones_like(coef))
        skipped = ~finite
    else:
        skipped = torch.zeros_like(finite)
    after = None
    if coef.dim() == 0:
        post_norm = total * coef
        clipped = coef < 1
    else:
        factors = clipper._factors(measured, coef)
        after = measured.per_tensor * factors
        layout = target.layout
        if layout is not None:  # the post-clip norm of every shard and stage
            post_norm = layout.total(after, clipper.norm_type)
        else:
            post_norm = total_norm(after, clipper.norm_type)
        clipped = (factors < 1).any()
    if grouped is None:
        store.commit(state, step.state, finite)
    else:
        grouped.commit(pending, finite)
    if fold is not None and coef.dim() == 0:
        fold.arm(coef, skipped)
    elif grouped is None:
        clipper._apply(measured, coef)
    else:
        grouped.apply(measured, coef)
    effective = coef if coef.dim() == 0 else torch.where(
        total == 0, torch.ones_like(total), post_norm / total
    )
    groups = None if grouped is None or after is None else grouped.stats(after)
    return ClipStats(total, post_norm, threshold, effective, clipped, finite, skipped,
                     measured, names, groups)
