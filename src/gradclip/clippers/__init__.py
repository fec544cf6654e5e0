"""Clippers: stateful objects that choose the threshold and clip (see :class:`Clipper`)."""

from gradclip.clippers.adagc import AdaGC
from gradclip.clippers.adaptive import AdaptiveClip
from gradclip.clippers.agc import AGC, LAST_LINEAR
from gradclip.clippers.autoclip import AutoClip
from gradclip.clippers.base import Clipper, Parameters, named_grads
from gradclip.clippers.fixed import NormClip, ValueClip
from gradclip.clippers.zclip import ZClip

__all__ = [
    "AGC",
    "LAST_LINEAR",
    "AdaGC",
    "AdaptiveClip",
    "AutoClip",
    "Clipper",
    "NormClip",
    "Parameters",
    "ValueClip",
    "ZClip",
    "named_grads",
]
