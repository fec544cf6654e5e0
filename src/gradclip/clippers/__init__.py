"""Clippers: stateful objects that choose the threshold and clip (see :class:`Clipper`)."""

from gradclip.clippers.base import Clipper
from gradclip.clippers.fixed import NormClip, ValueClip

__all__ = ["Clipper", "NormClip", "ValueClip"]
