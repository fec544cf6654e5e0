"""Embedded demo tasks: small trainings where gradients explode or spike.

The tasks and their runner live in :mod:`gradclip.demo.tasks`; nothing is imported here, so
``import gradclip`` stays light.
"""

__all__: list[str] = []
