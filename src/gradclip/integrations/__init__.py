"""Integrations with training frameworks, one module each; none is imported by ``gradclip``.

- :mod:`gradclip.integrations.lightning`: ``GradClipCallback`` for PyTorch Lightning
  (``pip install 'gradclip[lightning]'``).
- :mod:`gradclip.integrations.huggingface`: ``GradClipCallback`` for the ``transformers``
  Trainer and ``clip_gradients`` for Accelerate loops (``pip install 'gradclip[huggingface]'``).

Plain PyTorch, with or without ``torch.amp``, needs no integration: see the README,
"Integrations".

Example:
    >>> import gradclip
    >>> from gradclip.integrations.lightning import GradClipCallback  # needs lightning
    >>> callback = GradClipCallback(gradclip.AdaptiveClip(optimizer="AdamW"))  # the one it builds
"""

__all__: list[str] = []
