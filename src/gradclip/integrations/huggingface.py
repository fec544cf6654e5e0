"""Hugging Face: a ``Trainer`` callback that owns the clip, and a helper for Accelerate loops.

Needs ``transformers>=4.45`` and ``accelerate`` (``pip install 'gradclip[huggingface]'``);
importing this module without ``transformers`` raises ``ModuleNotFoundError`` with that command.

Example:
    >>> import gradclip
    >>> from gradclip.integrations.huggingface import GradClipCallback
    >>> callback = GradClipCallback(gradclip.ZClip())  # Trainer(..., callbacks=[callback])
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Mapping
from typing import Any

import torch

from gradclip.clippers.base import Clipper
from gradclip.clippers.spikes import check_loss
from gradclip.integrations._common import (
    ClipLog,
    check_monitor,
    clip_target,
    drop_grads_if_skipped,
    keyed,
    load_clipper,
    record_step,
    require,
    unscale_once,
)
from gradclip.monitor import GradMonitor
from gradclip.stats import ClipStats

_transformers = require(("transformers",), "huggingface", "gradclip.integrations.huggingface")
if not hasattr(_transformers.TrainerCallback, "on_pre_optimizer_step"):
    raise ImportError(
        f"gradclip.integrations.huggingface needs transformers>=4.45 (the callback clips in "
        f"on_pre_optimizer_step), found {_transformers.__version__}; upgrade with "
        "`pip install -U 'gradclip[huggingface]'`"
    )

__all__ = ["CHECKPOINT_FILE", "GradClipCallback", "clip_gradients"]

CHECKPOINT_FILE = "gradclip.pt"
"""The file, in each Trainer checkpoint folder, that holds the clipper's state."""

_STATE_VERSION = 1
_UNSUPPORTED = {
    "DEEPSPEED": "DeepSpeed clips inside its engine: set `gradient_clipping` in the DeepSpeed "
    "config (TrainingArguments(max_grad_norm=...)) instead",
    "FSDP": "this integration is tested with single-device and DDP training only (the "
    "clippers themselves are exact on FSDP shards: FSDP2 DTensors as they are, FSDP1 with "
    "`shard_group=...`; call `clipper(model)` yourself after the backward pass); use DDP, or "
    "the Trainer's own max_grad_norm",
    "MEGATRON_LM": "Megatron-LM clips inside its own optimizer; use its clip_grad setting",
    "XLA": "XLA is not supported",
}


def _check_distributed(distributed_type: object) -> None:
    name = getattr(distributed_type, "name", str(distributed_type)).upper()
    for key, why in _UNSUPPORTED.items():
        if key in name:
            raise ValueError(f"gradclip cannot clip under {name}: {why}")


class GradClipCallback(_transformers.TrainerCallback):  # type: ignore[misc,name-defined]
    """Clip with a gradclip clipper in the ``Trainer``, instead of its ``max_grad_norm``.

    The Trainer clips (``args.max_grad_norm``) before any callback runs, so the callback
    turns that clip off (with a warning when it was on: pass ``max_grad_norm=0`` to
    ``TrainingArguments`` to silence it) and clips in ``on_pre_optimizer_step``: once per
    optimizer step, after gradient accumulation, on unscaled gradients (it unscales fp16
    gradients itself when the Trainer has not), before ``optimizer.step()``.

    **Logging**: on each of the Trainer's logging steps it adds, with one host read,
    ``gradclip/grad_norm`` and ``gradclip/grad_norm_clipped`` (total norm of the last step
    before and after clipping), ``gradclip/threshold``, ``gradclip/clip_rate`` (fraction of
    optimizer steps clipped since the run began) and ``gradclip/nonfinite_steps`` to the logs:
    into ``trainer.state.log_history`` and to the callbacks after this one. The Trainer's
    reporting callbacks (``report_to``) come before user callbacks; to have the figures in
    TensorBoard or W&B too, put this callback first:
    ``trainer.callback_handler.callbacks.insert(0, callback)``.

    **Monitor**: with ``monitor=GradMonitor(...)``, each optimizer step's
    :class:`~gradclip.ClipStats` is also recorded into it (per-layer norms, its log), as
    training step ``state.global_step``, on the main process only (every process sees the
    same norms); no second pass over the gradients and no host read besides the monitor's own
    flushes. The callback flushes it when training ends; closing it is yours (use it as a
    context manager), so a later ``trainer.train()`` can go on recording.

    **Checkpoints**: each Trainer checkpoint folder gets :data:`CHECKPOINT_FILE` with the
    clipper's state; ``trainer.train(resume_from_checkpoint=...)`` on a checkpoint of
    ``args.output_dir`` reloads it, so the resumed run has the clipper state it had (for a
    checkpoint elsewhere, call :meth:`load_checkpoint` first). A checkpoint written with a
    different clipper raises ``ValueError`` naming the difference.

    **Refused**: DeepSpeed and Megatron-LM (they clip inside their engines), FSDP (untested
    here: the clippers themselves are exact on FSDP shards) and XLA; single-device and DDP
    runs are supported.

    **Skipped steps** (``nonfinite="skip"``, or a spike under a detector's ``"skip"``): the
    gradients are set to ``None``, so the optimizer leaves the parameters and their state
    (Adam's step counters included) unchanged; one host read per step, under those policies
    only. The Trainer counts the step as taken: ``state.global_step`` advances and the
    learning-rate scheduler steps (the Trainer holds the scheduler back only for a step its
    fp16 ``GradScaler`` skipped), see :mod:`gradclip.integrations._common`.

    **The loss**: the Trainer hands its callbacks no loss, so the callback reads it where
    the Trainer does, from the model's output (``outputs["loss"]``, through a forward hook
    on the model while it trains with gradients enabled: evaluation passes are not read),
    and hands the clipper the mean over the optimizer step's micro-batches, a device tensor
    (no host read). :class:`~gradclip.AdaptiveClip`'s loss gate and a spike detector use
    it. A loss computed outside the model (``compute_loss_func``, label smoothing, a
    ``compute_loss`` override) is not in that output: hand it over with :meth:`add_loss`
    from your override. A step that gets no loss while the clipper would read it warns once
    (AdaptiveClip then follows the norms alone, with AdamW its ``hold``, and a spike
    detector judges the norm alone). In a plain Accelerate loop, :func:`clip_gradients`
    takes the loss.

    **Spike detection** (``clipper = gradclip.AdaptiveClip(spikes="skip")``): the detector
    judges the loss and the gradient norm; ``gradclip/spikes`` and ``gradclip/spike_score``
    join the logged figures.

    Args:
        clipper: the :class:`~gradclip.Clipper` to clip with.
        monitor: a :class:`~gradclip.GradMonitor` that records every clip step (None: none).

    Example:
        >>> import gradclip
        >>> from transformers import Trainer, TrainingArguments
        >>> from gradclip.integrations.huggingface import GradClipCallback
        >>> args = TrainingArguments("out", max_grad_norm=0, logging_steps=10)
        >>> callback = GradClipCallback(gradclip.AutoClip())
        >>> # trainer = Trainer(model, args, train_dataset=ds, callbacks=[callback])
    """

    def __init__(self, clipper: Clipper, *, monitor: GradMonitor | None = None):
        if not isinstance(clipper, Clipper):
            raise TypeError(
                f"`clipper` must be a gradclip Clipper, got {type(clipper).__name__} "
                f"{clipper!r:.60}; pass e.g. gradclip.NormClip(1.0)"
            )
        self.clipper = clipper
        self.monitor = check_monitor(monitor)
        self._log = ClipLog(clipper, self.monitor)
        self._loaded_from: str | None = None
        self._hook: torch.utils.hooks.RemovableHandle | None = None
        self._loss_sum: torch.Tensor | None = None  # this optimizer step's micro-batch losses
        self._losses = 0
        self._added = False  # add_loss was called: the forward hook reads no more
        self._no_loss_checked = False  # the first step without a loss decides the warning

    # -- checks and resume ------------------------------------------------------------------

    def on_train_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if args.max_grad_norm is not None and args.max_grad_norm > 0:
            warnings.warn(
                f"TrainingArguments(max_grad_norm={args.max_grad_norm}) makes the Trainer clip "
                "before GradClipCallback, so gradients would be clipped twice; gradclip turned "
                "it off for this run (args.max_grad_norm = 0). Pass max_grad_norm=0 to "
                f"silence this (gradclip.NormClip({args.max_grad_norm}) is the Trainer's rule)",
                stacklevel=2,
            )
            args.max_grad_norm = 0.0
        if args.deepspeed:
            _check_distributed("DEEPSPEED")
        if args.fsdp:
            _check_distributed("FSDP")
        if state.global_step > 0 and self._loaded_from is None:
            self._resume(args, state)
        model = kwargs.get("model")
        if self._hook is None and isinstance(model, torch.nn.Module):
            self._hook = model.register_forward_hook(self._read_loss)

    def add_loss(self, loss: torch.Tensor | float) -> None:
        """Count one micro-batch's training loss toward the current optimizer step.

        For a loss the model's output does not hold: call it from a ``compute_loss``
        override (or a ``compute_loss_func``) with the loss it returns. From the first call
        on, the forward hook no longer reads the model's output (what it read for the current
        step is dropped), so every micro-batch's loss must come through here. The clipper
        gets the mean over the step's micro-batches; a tensor stays on its device (no host
        read).

        Args:
            loss: the micro-batch's loss, a 0-dim (or one-element) tensor or a number.

        In a ``Trainer`` subclass::

            def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
                outputs = model(**inputs)
                loss = my_loss(outputs, inputs)
                callback.add_loss(loss)          # the GradClipCallback in callbacks=[...]
                return (loss, outputs) if return_outputs else loss

        Example:
            >>> import torch, gradclip
            >>> from gradclip.integrations.huggingface import GradClipCallback
            >>> callback = GradClipCallback(gradclip.AdaptiveClip(optimizer="AdamW"))
            >>> callback.add_loss(torch.tensor(2.0))
        """
        value = torch.as_tensor(check_loss(loss), dtype=torch.float32)
        if not self._added:
            self._added = True
            self._loss_sum, self._losses = None, 0  # the hook's reading of this step
        self._add(value)

    def _add(self, loss: torch.Tensor) -> None:
        self._loss_sum = loss if self._loss_sum is None else self._loss_sum + loss
        self._losses += 1

    def _read_loss(self, module: torch.nn.Module, args: Any, output: Any) -> None:
        """Forward hook: add a training pass's ``output["loss"]`` to the step's sum."""
        if self._added or not (module.training and torch.is_grad_enabled()):
            return  # add_loss hands the loss, or an evaluation or prediction pass
        loss = output.get("loss") if isinstance(output, Mapping) else None
        if isinstance(loss, torch.Tensor) and loss.numel() == 1:
            self._add(loss.detach().float().reshape(()))

    def _step_loss(self) -> torch.Tensor | None:
        """The mean loss of the micro-batches since the last optimizer step (None: none seen);
        starts the next step's sum."""
        total, count = self._loss_sum, self._losses
        self._loss_sum, self._losses = None, 0
        return None if total is None else total / count

    def _resume(self, args: Any, state: Any) -> None:
        folders = [os.path.join(args.output_dir, f"checkpoint-{state.global_step}")]
        if isinstance(getattr(args, "resume_from_checkpoint", None), str):
            folders.insert(0, args.resume_from_checkpoint)
        for folder in folders:
            path = os.path.join(folder, CHECKPOINT_FILE)
            if os.path.isfile(path):
                saved = torch.load(path, map_location="cpu", weights_only=True)
                if saved.get("global_step") == state.global_step:
                    self.load_checkpoint(folder)
                    return
        warnings.warn(
            f"resuming at step {state.global_step}, but no {CHECKPOINT_FILE} of that step is in "
            f"{' or '.join(folders)}: the clipper starts with fresh statistics. If the checkpoint "
            "is elsewhere, call callback.load_checkpoint(folder) before trainer.train()",
            stacklevel=3,
        )

    def load_checkpoint(self, folder: str | os.PathLike[str]) -> None:
        """Load the clipper state that :meth:`on_save` wrote into a checkpoint ``folder``."""
        path = os.path.join(os.fspath(folder), CHECKPOINT_FILE)
        saved = torch.load(path, map_location="cpu", weights_only=True)
        if saved.get("version") != _STATE_VERSION or "clipper" not in saved:
            raise ValueError(
                f"cannot resume gradclip from {path}: not a GradClipCallback file of version "
                f"{_STATE_VERSION}; resume with the gradclip that wrote it"
            )
        load_clipper(self.clipper, saved["clipper"], path)
        self._log.load_state_dict(saved["counters"])
        self._loaded_from = path

    def on_save(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if not args.should_save:
            return
        folder = os.path.join(args.output_dir, f"checkpoint-{state.global_step}")
        if not os.path.isdir(folder):
            warnings.warn(
                f"no checkpoint folder {folder} to save the clipper state in (hyperparameter "
                "search runs save elsewhere); this checkpoint resumes with fresh statistics",
                stacklevel=2,
            )
            return
        state_dict = {
            "version": _STATE_VERSION,
            "global_step": state.global_step,
            "clipper": self.clipper.state_dict(),
            "counters": self._log.state_dict(),
        }
        torch.save(state_dict, os.path.join(folder, CHECKPOINT_FILE))

    # -- the step ---------------------------------------------------------------------------

    def on_pre_optimizer_step(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        model, optimizer = kwargs.get("model"), kwargs.get("optimizer")
        if model is None:
            return
        inner = getattr(optimizer, "optimizer", optimizer)  # accelerate's AcceleratedOptimizer
        scaler = getattr(optimizer, "scaler", None)
        if scaler is not None and inner is not None:
            unscale_once(scaler, inner)
        target = clip_target(model, inner)
        if inner is not None:
            self.clipper.check_optimizer(inner)
        loss = self._step_loss()
        if loss is None:
            self._warn_no_loss(state.global_step)
        stats = self.clipper(target, loss=loss)
        self._log.record(stats, step=state.global_step, main=state.is_world_process_zero,
                         optimizer=inner)  # fmt: skip
        drop_grads_if_skipped(self.clipper, stats, target)

    def _warn_no_loss(self, step: int) -> None:
        """At the first optimizer step without a loss (one check, not one per step): warn if
        the clipper would read it."""
        if self._no_loss_checked:
            return
        self._no_loss_checked = True
        if not self.clipper.uses_loss:
            return
        warnings.warn(
            f"GradClipCallback got no training loss for optimizer step {step + 1}: the model's "
            'output holds no "loss" (a compute_loss override, compute_loss_func or label '
            f"smoothing computes it outside the model), so {type(self.clipper).__name__} "
            "follows the gradient norms alone. Call callback.add_loss(loss) where your "
            "loss is computed",
            stacklevel=3,
        )

    def on_train_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self._loaded_from = None  # a later trainer.train() looks for its own checkpoint
        if self._hook is not None:
            self._hook.remove()
            self._hook = None
        self._step_loss()  # a step the Trainer ended before its optimizer step
        if self.monitor is not None:
            self.monitor.flush()

    def on_log(self, args: Any, state: Any, control: Any, logs: Any = None, **kwargs: Any) -> None:
        if logs is None or "loss" not in logs:
            return  # evaluation, or the summary at the end of training
        figures = keyed(self._log.read(), "gradclip/")
        logs.update(figures)
        # The Trainer appended a copy of `logs` to the history before calling back.
        if state.log_history and "loss" in state.log_history[-1]:
            state.log_history[-1].update(figures)


def clip_gradients(
    accelerator: Any,
    model: torch.nn.Module,
    clipper: Clipper,
    *,
    optimizer: torch.optim.Optimizer | None = None,
    monitor: GradMonitor | None = None,
    loss: torch.Tensor | float | None = None,
) -> ClipStats | None:
    """Clip in a plain Accelerate loop: once per optimizer step, on unscaled gradients.

    Use it where ``accelerator.clip_grad_norm_`` would go. Inside
    ``accelerator.accumulate(model)`` it does nothing (returns ``None``) until the micro-batch
    that syncs gradients; then it unscales fp16 gradients (once; an earlier
    ``accelerator.unscale_gradients()`` is fine), clips and returns the
    :class:`~gradclip.ClipStats`. With several optimizers pass the one about to step, so that
    only its parameters are clipped (and only it is unscaled).

    A skipped step (``nonfinite="skip"``, a spike detector's ``"skip"``) sets the gradients
    to ``None``, so ``optimizer.step()`` changes nothing (Adam's step counters included).

    With ``monitor``, each optimizer step's ClipStats is also recorded into it, on the main
    process only (no second pass, no host read besides the monitor's flushes); close the
    monitor after the loop (or use it as a context manager) so its last steps are written.

    Args:
        accelerator: the ``accelerate.Accelerator`` of the loop.
        model: the prepared model.
        clipper: the :class:`~gradclip.Clipper` to clip with.
        optimizer: the optimizer about to step (default: every prepared optimizer).
        monitor: a :class:`~gradclip.GradMonitor` that records every clip step (None: none).
        loss: this optimizer step's loss, for the clipper's spike detector (averaged over
            processes; every process must pass one).

    Returns:
        The step's :class:`~gradclip.ClipStats`, or ``None`` between optimizer steps.

    Raises:
        ValueError: under DeepSpeed, FSDP, Megatron-LM or XLA.

    Example:
        >>> import gradclip, torch
        >>> from accelerate import Accelerator
        >>> from gradclip.integrations.huggingface import clip_gradients
        >>> accelerator = Accelerator(cpu=True)
        >>> model = torch.nn.Linear(4, 1)
        >>> optimizer = torch.optim.AdamW(model.parameters())
        >>> model, optimizer = accelerator.prepare(model, optimizer)
        >>> accelerator.backward(model(torch.randn(8, 4)).pow(2).mean())
        >>> stats = clip_gradients(accelerator, model, gradclip.NormClip(1.0))
        >>> optimizer.step()
    """
    if not isinstance(clipper, Clipper):
        raise TypeError(
            f"`clipper` must be a gradclip Clipper, got {type(clipper).__name__} "
            f"{clipper!r:.60}; pass e.g. gradclip.NormClip(1.0)"
        )
    check_monitor(monitor)
    _check_distributed(accelerator.distributed_type)
    if not accelerator.sync_gradients:
        return None
    optimizers = (
        [optimizer] if optimizer is not None else list(getattr(accelerator, "_optimizers", []))
    )
    inner = [getattr(o, "optimizer", o) for o in optimizers]
    scaler = getattr(accelerator, "scaler", None)
    if scaler is not None:
        for opt in inner:
            unscale_once(scaler, opt)
    unwrapped = accelerator.unwrap_model(model)
    target = clip_target(unwrapped, inner[0] if optimizer is not None else None)
    if inner:
        clipper.check_optimizer(inner)
    stats = clipper(target, loss=loss)
    if accelerator.is_main_process:
        record_step(monitor, stats, optimizer=inner[0] if len(inner) == 1 else None)
    drop_grads_if_skipped(clipper, stats, target)
    return stats
