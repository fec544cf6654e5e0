"""Workarounds for torch bugs that the tests' own set-ups hit on older torch releases.

Each one is gated on the versions it affects and cites the bug; gradclip itself is never
patched here. They correct what torch hands the code under test (the gradients), so the
tests keep comparing with the single-process reference on every torch version.
"""

from __future__ import annotations

import functools

import torch.distributed as dist

from gradclip import _foreach

__all__ = ["average_gloo_reduce_scatter"]


def average_gloo_reduce_scatter() -> None:
    """torch < 2.9: gloo's ``reduce_scatter_tensor`` ignores ``ReduceOp.AVG`` and sums
    (pytorch/pytorch#162338), so FSDP2 on CPU hands every rank ``world`` times the averaged
    gradient. Averages it as NCCL does (divide, then SUM); a no-op on fixed releases.
    Called in every process that runs FSDP2 over gloo, before its first backward."""
    if _foreach.TORCH_VERSION >= (2, 9) or getattr(dist, "_gradclip_avg_fixed", False):
        return
    original = dist.reduce_scatter_tensor

    @functools.wraps(original)
    def reduce_scatter_tensor(output, input, op=dist.ReduceOp.SUM, group=None, async_op=False):
        if op == dist.ReduceOp.AVG and dist.get_backend(group) == "gloo":
            input, op = input / dist.get_world_size(group), dist.ReduceOp.SUM
        return original(output, input, op=op, group=group, async_op=async_op)

    dist.reduce_scatter_tensor = reduce_scatter_tensor
    dist._gradclip_avg_fixed = True
