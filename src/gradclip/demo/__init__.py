"""Embedded demo tasks: small trainings where gradients explode or spike, side by side.

Read it top to bottom: :mod:`~gradclip.demo.problems` (the models, data and metrics),
:mod:`~gradclip.demo.tasks` (which settings make a task, and what each shows),
:mod:`~gradclip.demo.runner` (one training run, recorded step by step),
:mod:`~gradclip.demo.compare` (one run per clipping strategy, summarised),
:mod:`~gradclip.demo.render` (the table, the verdicts, the page) and
:mod:`~gradclip.demo.folder` (the output folder of ``gradclip demo``). Nothing is imported
here, so ``import gradclip`` stays light.
"""

__all__: list[str] = []
