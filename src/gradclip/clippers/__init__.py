"""Clippers: stateful objects that choose the threshold and clip (see :class:`Clipper`)."""

from gradclip.clippers.adagc import AdaGC, AdaGCState
from gradclip.clippers.adaptive import AdaptiveClip, AdaptiveClipState
from gradclip.clippers.agc import AGC, LAST_LINEAR
from gradclip.clippers.autoclip import AutoClip, AutoClipState
from gradclip.clippers.base import Clipper, Step
from gradclip.clippers.fixed import NormClip, ValueClip
from gradclip.clippers.targets import Parameters, named_grads
from gradclip.clippers.update import Snapshot, UpdateClip, UpdateClipState, UpdateNorms
from gradclip.clippers.zclip import ZClip, ZClipState

__all__ = [
    "AGC",
    "LAST_LINEAR",
    "AdaGC",
    "AdaGCState",
    "AdaptiveClip",
    "AdaptiveClipState",
    "AutoClip",
    "AutoClipState",
    "Clipper",
    "NormClip",
    "Parameters",
    "Snapshot",
    "Step",
    "UpdateClip",
    "UpdateClipState",
    "UpdateNorms",
    "ValueClip",
    "ZClip",
    "ZClipState",
    "named_grads",
]
