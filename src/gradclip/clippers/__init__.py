"""Clippers: stateful objects that choose the threshold and clip (see :class:`Clipper`)."""

from gradclip.clippers.autoclip import AutoClip
from gradclip.clippers.base import Clipper
from gradclip.clippers.fixed import NormClip, ValueClip
from gradclip.clippers.zclip import ZClip

__all__ = ["AutoClip", "Clipper", "NormClip", "ValueClip", "ZClip"]
