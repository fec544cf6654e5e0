"""PyTorch Lightning: a callback that clips with a gradclip clipper where Lightning says to.

Needs ``lightning`` (``pip install 'gradclip[lightning]'``); the legacy ``pytorch_lightning``
package is used when ``lightning`` is not installed. Importing this module without either
raises ``ModuleNotFoundError`` with that command.

Example:
    >>> import gradclip, lightning.pytorch as pl
    >>> from gradclip.integrations.lightning import GradClipCallback
    >>> trainer = pl.Trainer(callbacks=[GradClipCallback(gradclip.ZClip())], max_steps=10)
"""

from __future__ import annotations

import copy
import warnings
from collections.abc import Sequence
from typing import Any

import torch

from gradclip import _foreach
from gradclip.clippers.base import Clipper
from gradclip.integrations._common import (
    ClipLog,
    check_monitor,
    clip_target,
    drop_grads_if_skipped,
    keyed,
    load_clipper,
    require,
    unscale_once,
)
from gradclip.monitor import GradMonitor

_pl = require(
    ("lightning.pytorch", "pytorch_lightning"), "lightning", "gradclip.integrations.lightning"
)

__all__ = ["GradClipCallback"]

_STATE_VERSION = 1
_UNSUPPORTED = {
    "DeepSpeedStrategy": "DeepSpeed clips inside its engine: set `gradient_clipping` in the "
    "DeepSpeed config (or Trainer(gradient_clip_val=...)) instead of this callback",
    "FSDPStrategy": "the callback is tested with single-device and DDP training only; the "
    "clippers themselves are exact on FSDP1 shards when told the shard group: call "
    "`clipper(self, ...)` built with `shard_group=...` from configure_gradient_clipping, or use "
    "strategy='ddp'",
    "XLAStrategy": "gradients are reduced after on_before_optimizer_step, so a clipper would see "
    "local gradients",
    "SingleDeviceXLAStrategy": "XLA is not supported",
}


class GradClipCallback(_pl.Callback):  # type: ignore[misc,name-defined]
    """Clip gradients with gradclip clippers in ``on_before_optimizer_step``.

    That hook runs once per optimizer step, after gradient accumulation, after the
    gradients were unscaled under fp16 mixed precision, and before ``optimizer.step()``;
    Lightning calls it in automatic and in manual optimization (``opt.step()``). Under fp16
    with a fused optimizer, which Lightning leaves scaled, the callback unscales first.

    **One clipper per optimizer**: each optimizer's parameters are clipped by their own clipper
    (an adaptive threshold learnt on a generator's norms means nothing to a discriminator).
    Pass one clipper per optimizer, in ``configure_optimizers`` order, or a single clipper:
    further optimizers then get a copy of it (same arguments, fresh statistics). They are in
    :attr:`clippers`.

    **Logging**: with ``log=True``, every optimizer step logs through ``pl_module.log_dict``
    (so through the Trainer's logger, at its ``log_every_n_steps``) ``gradclip/grad_norm`` and
    ``gradclip/grad_norm_clipped`` (total norm before and after clipping),
    ``gradclip/threshold``, ``gradclip/clip_rate`` (fraction of optimizer steps clipped since
    the run began) and ``gradclip/nonfinite_steps``; with several optimizers, under
    ``gradclip/opt{i}/``. The values are device tensors: Lightning reads them only on
    logging steps.

    **Monitor**: with ``monitor=GradMonitor(...)``, each optimizer step's
    :class:`~gradclip.ClipStats` is also recorded into it (per-layer norms, its log), as
    training step ``trainer.global_step``, on global rank zero only (every rank sees the same
    norms); no second pass over the gradients and no host read besides the monitor's own
    flushes. The callback flushes it when training ends or raises; closing it is yours (use it
    as a context manager), so a later ``fit`` can go on recording. One optimizer only.

    **Checkpoints**: the clippers' statistics and the counters are the callback's
    ``state_dict``, saved in Lightning checkpoints; ``Trainer.fit(ckpt_path=...)`` resumes
    them exactly. A checkpoint written with a different clipper raises ``ValueError`` naming
    the difference.

    **Strategies**: single device, DDP and ``ModelParallelStrategy`` (FSDP2 / tensor
    parallel: the clippers read the whole model's norms from the DTensor shards, and every
    rank clips its own). **Refused**: ``Trainer(gradient_clip_val=...)`` (two clips stacked),
    two of these callbacks, DeepSpeed (it clips in its engine), ``FSDPStrategy`` (untested
    here) and XLA.

    **Skipped steps** (``nonfinite="skip"``, or a spike under a detector's ``"skip"``): the
    gradients of the clipped parameters are set to ``None``, so the optimizer leaves them and
    their state (Adam's step counters included) unchanged; one host read per step, under
    those policies only. Lightning counts the step as taken: ``trainer.global_step``
    advances, the learning-rate schedulers step, and under fp16 the ``GradScaler`` updates
    its scale as after a finite step (see :mod:`gradclip.integrations._common`).

    **Spike detection** (``clipper = gradclip.AdaptiveClip(spikes="skip")``): the callback
    hands the detector the loss of each optimizer step, the sum of the losses Lightning
    passes to ``on_before_backward`` since the last step (the accumulated micro-batches'
    mean; unscaled under fp16), with one optimizer; with several the detector judges the
    gradient norm alone. It also logs ``gradclip/spikes`` (spikes so far) and
    ``gradclip/spike_score``. The same loss feeds :class:`~gradclip.AdaptiveClip`'s loss
    gate (``follow_loss``), with or without a detector.

    Args:
        clipper: a :class:`~gradclip.Clipper`, or one per optimizer.
        log: log the figures above through the Trainer's logger.
        monitor: a :class:`~gradclip.GradMonitor` that records every clip step (None: none).

    Example:
        >>> import gradclip, lightning.pytorch as pl
        >>> from gradclip.integrations.lightning import GradClipCallback
        >>> callback = GradClipCallback(gradclip.AutoClip(percentile=10))
        >>> trainer = pl.Trainer(callbacks=[callback], precision="bf16-mixed", max_steps=10)
    """

    def __init__(
        self,
        clipper: Clipper | Sequence[Clipper],
        *,
        log: bool = True,
        monitor: GradMonitor | None = None,
    ):
        iterable = isinstance(clipper, Sequence) and not isinstance(clipper, str)
        given = list(clipper) if iterable else [clipper]
        for c in given:
            if not isinstance(c, Clipper):
                raise TypeError(
                    f"`clipper` must be a gradclip Clipper or a sequence of them, got "
                    f"{type(c).__name__} {c!r:.60}; pass e.g. gradclip.NormClip(1.0)"
                )
        if not given:
            raise ValueError("`clipper` is an empty sequence; pass at least one gradclip Clipper")
        self._fixed = iterable  # one clipper per optimizer, given by the user
        self._template = copy.deepcopy(given[0])
        self._template.reset()
        self.monitor = check_monitor(monitor)
        self._logs = [ClipLog(c) for c in given]
        self._logs[0].monitor = self.monitor
        self._log = log
        self._loss: torch.Tensor | None = None  # the losses since the last optimizer step

    @property
    def clippers(self) -> list[Clipper]:
        """The clipper of each optimizer, in ``trainer.optimizers`` order."""
        return [entry.clipper for entry in self._logs]

    def _entry(self, index: int) -> ClipLog:
        while len(self._logs) <= index:
            if self._fixed:
                raise ValueError(
                    f"optimizer {index} has no clipper: GradClipCallback got {len(self._logs)} "
                    "clipper(s); pass one per optimizer, in configure_optimizers order, or a "
                    "single clipper to copy for every optimizer"
                )
            self._logs.append(ClipLog(copy.deepcopy(self._template)))
        return self._logs[index]

    # -- checks ---------------------------------------------------------------------------

    def setup(self, trainer: Any, pl_module: Any, stage: str) -> None:
        if stage != "fit":
            return
        clip_val = trainer.gradient_clip_val
        if clip_val is not None and clip_val > 0:
            raise ValueError(
                f"Trainer(gradient_clip_val={clip_val}) clips the gradients too, so they would "
                "be clipped twice; remove gradient_clip_val from the Trainer: GradClipCallback "
                f"does the clipping (gradclip.NormClip({clip_val}) is Lightning's rule)"
            )
        ours = [cb for cb in trainer.callbacks if isinstance(cb, GradClipCallback)]
        if len(ours) > 1:
            raise ValueError(
                f"the Trainer has {len(ours)} GradClipCallbacks, which would clip each step "
                "several times; keep one (it takes one clipper per optimizer)"
            )
        for cls in type(trainer.strategy).__mro__:
            if cls.__name__ in _UNSUPPORTED:
                raise ValueError(
                    f"GradClipCallback does not support {type(trainer.strategy).__name__}: "
                    f"{_UNSUPPORTED[cls.__name__]}"
                )
        supported = (
            _pl.strategies.SingleDeviceStrategy,
            _pl.strategies.DDPStrategy,
            _pl.strategies.ModelParallelStrategy,
        )
        if not isinstance(trainer.strategy, supported):
            raise ValueError(
                f"GradClipCallback supports single-device, DDP and ModelParallel (FSDP2 / "
                f"tensor parallel) strategies, not {type(trainer.strategy).__name__}; use "
                "strategy='auto', 'ddp' or ModelParallelStrategy(...)"
            )
        hook = type(pl_module).configure_gradient_clipping
        if hook is not _pl.LightningModule.configure_gradient_clipping:
            warnings.warn(
                f"{type(pl_module).__name__} overrides configure_gradient_clipping, which runs "
                "after GradClipCallback has clipped; if it clips too, the gradients are clipped "
                "twice: remove the override",
                stacklevel=2,
            )

    def on_train_start(self, trainer: Any, pl_module: Any) -> None:
        if self.monitor is not None and len(trainer.optimizers) > 1:
            raise ValueError(
                f"GradClipCallback(monitor=...) records one optimizer's steps, and this run has "
                f"{len(trainer.optimizers)} optimizers; leave out `monitor` (each optimizer's "
                "figures are still logged, under gradclip/opt{i}/)"
            )

    # -- the step -------------------------------------------------------------------------

    def on_before_backward(self, trainer: Any, pl_module: Any, loss: torch.Tensor) -> None:
        value = loss.detach()
        scaler = getattr(trainer.precision_plugin, "scaler", None)
        scale = getattr(scaler, "_scale", None)  # fp16: Lightning hands over the scaled loss
        if scaler is not None and scaler.is_enabled() and isinstance(scale, torch.Tensor):
            value = value / scale.to(value.device)  # on the device: no read
        self._loss = value if self._loss is None else self._loss + value

    def on_before_optimizer_step(
        self, trainer: Any, pl_module: Any, optimizer: torch.optim.Optimizer
    ) -> None:
        optimizers = trainer.optimizers
        raw = getattr(optimizer, "_optimizer", optimizer)  # a LightningOptimizer's own
        index = next((i for i, o in enumerate(optimizers) if o is optimizer or o is raw), 0)
        entry = self._entry(index)
        scaler = getattr(trainer.precision_plugin, "scaler", None)
        if (
            scaler is not None
            and _foreach.takes_grad_scale(optimizer)
            and any(p.grad is not None for g in optimizer.param_groups for p in g["params"])
        ):
            unscale_once(scaler, optimizer)  # Lightning does not unscale for fused optimizers
        target = clip_target(pl_module, optimizer)
        entry.clipper.check_optimizer(raw)
        loss, self._loss = (self._loss if len(optimizers) <= 1 else None), None
        stats = entry.clipper(target, loss=loss)
        entry.record(stats, step=trainer.global_step, main=trainer.is_global_zero, optimizer=raw)
        drop_grads_if_skipped(entry.clipper, stats, target)
        if self._log and entry.last is not None:
            prefix = "gradclip/" if len(optimizers) <= 1 else f"gradclip/opt{index}/"
            pl_module.log_dict(keyed(entry.tensors(), prefix), on_step=True, on_epoch=False)

    def on_train_end(self, trainer: Any, pl_module: Any) -> None:
        if self.monitor is not None:
            self.monitor.flush()

    def on_exception(self, trainer: Any, pl_module: Any, exception: BaseException) -> None:
        if self.monitor is not None:
            self.monitor.flush()  # the steps up to the failure reach the log

    # -- checkpoints ----------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        return {
            "version": _STATE_VERSION,
            "clippers": [entry.clipper.state_dict() for entry in self._logs],
            "counters": [entry.state_dict() for entry in self._logs],
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        where = "the Lightning checkpoint's GradClipCallback state"
        if state_dict.get("version") != _STATE_VERSION or "clippers" not in state_dict:
            raise ValueError(
                f"cannot resume gradclip from {where}: it is not a GradClipCallback state of "
                f"version {_STATE_VERSION}; resume with the gradclip that wrote it"
            )
        for index, (clipper_state, counters) in enumerate(
            zip(state_dict["clippers"], state_dict["counters"], strict=True)
        ):
            entry = self._entry(index)
            load_clipper(entry.clipper, clipper_state, f"{where} (optimizer {index})")
            entry.load_state_dict(counters)
