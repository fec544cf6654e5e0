"""A restorable copy of a training state: model, optimizers, schedulers, GradScaler and RNGs.

:func:`gradclip.find_max_norm` trains the same model several times from the same state; this
module takes that state once (:func:`capture`) and puts it back, bit for bit, as often as
needed (:meth:`Snapshot.restore`). Tensors are copied to the CPU (or, with ``disk=True``,
into a file that is memory-mapped back), so the device holds no second copy of a large
model.

Restored in place, so that every reference the user holds stays valid:

* every parameter and buffer of the model (``copy_`` into the same tensor) and every
  ``.grad`` (the same gradient object when there was one, ``None`` when there was none);
* each optimizer's ``state`` and ``param_groups`` (the same dict objects, refilled with
  copies of the saved values, each on its own device and dtype: no cast, unlike
  ``Optimizer.load_state_dict``, which casts state to the parameter's dtype), and its plain
  attributes (counters, flags); several optimizers (Muon for the matrices, AdamW for the
  rest) are each restored so;
* the schedulers and the GradScaler through their ``state_dict`` / ``load_state_dict``;
* the global RNGs (torch CPU and CUDA, ``random``, NumPy's when it is imported) and any
  ``torch.Generator`` the data is drawn from.

What cannot be restored is refused before anything is touched (:class:`SnapshotError`): an
optimizer that keeps tensors outside ``state`` / ``param_groups``, or state values of a type
this module cannot copy (custom objects).

Example:
    >>> import torch
    >>> from gradclip.tune.snapshot import capture
    >>> model = torch.nn.Linear(2, 1)
    >>> opt = torch.optim.Adam(model.parameters())
    >>> before = model.weight.detach().clone()
    >>> snap = capture(model, opt)
    >>> model(torch.ones(1, 2)).sum().backward(); opt.step()
    >>> snap.restore()
    >>> torch.equal(model.weight, before), opt.state[model.weight]
    (True, {})
"""

from __future__ import annotations

import copy
import numbers
import os
import random
import sys
import tempfile
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from gradclip.clippers.base import Optimizers, optimizer_list

__all__ = ["Snapshot", "SnapshotError", "capture"]


class SnapshotError(ValueError):
    """The training state holds something the snapshot cannot copy and put back."""


# What torch.optim.Optimizer itself keeps on an instance, and what LR schedulers and
# accelerate add to it; everything else is the optimizer's own and is checked.
_OPTIMIZER_OWN = frozenset({
    "defaults", "state", "param_groups", "_zero_grad_profile_name",
    "_warned_capturable_if_run_uncaptured", "_optimizer_step_pre_hooks",
    "_optimizer_step_post_hooks", "_optimizer_state_dict_pre_hooks",
    "_optimizer_state_dict_post_hooks", "_optimizer_load_state_dict_pre_hooks",
    "_optimizer_load_state_dict_post_hooks", "_opt_called", "step",
})  # fmt: skip
_PLAIN = (type(None), bool, int, float, complex, str, bytes)


def _is_plain(value: object) -> bool:
    if isinstance(value, (_PLAIN, numbers.Number)):
        return True
    if isinstance(value, list | tuple):
        return all(_is_plain(v) for v in value)
    if isinstance(value, dict):
        return all(_is_plain(k) and _is_plain(v) for k, v in value.items())
    return False


def _has_tensor(value: object, depth: int = 0) -> bool:
    if isinstance(value, Tensor):
        return True
    if depth > 3:
        return False
    if isinstance(value, list | tuple | set | frozenset):
        return any(_has_tensor(v, depth + 1) for v in value)
    if isinstance(value, Mapping):
        return any(_has_tensor(v, depth + 1) for v in value.values())
    return False


def _copyable(value: object, where: str) -> None:
    """Refuse a state value that is neither a tensor nor plain data (nested)."""
    if isinstance(value, Tensor) or _is_plain(value):
        return
    if isinstance(value, list | tuple):
        for i, v in enumerate(value):
            _copyable(v, f"{where}[{i}]")
        return
    if isinstance(value, Mapping):
        for k, v in value.items():
            _copyable(v, f"{where}[{k!r}]")
        return
    raise SnapshotError(
        f"{where} holds a {type(value).__name__}, which the snapshot cannot copy and restore; "
        "the finder supports optimizer state made of tensors and plain numbers (every torch "
        "optimizer); nothing was changed"
    )


def _to_cpu(value: Any) -> Any:
    if isinstance(value, Tensor):
        return value.detach().to("cpu", copy=True)
    if isinstance(value, list):
        return [_to_cpu(v) for v in value]
    if isinstance(value, tuple):
        return tuple(_to_cpu(v) for v in value)
    if isinstance(value, Mapping):
        return {k: _to_cpu(v) for k, v in value.items()}
    return copy.deepcopy(value)


def _back(value: Any, like: Any) -> Any:
    """A fresh copy of the saved ``value`` on the device (and dtype) of ``like``, the tensor
    it was saved from (recorded as ``(device, dtype)``)."""
    if isinstance(value, Tensor):
        device, dtype = like
        return value.to(device=device, dtype=dtype, copy=True)
    if isinstance(value, list):
        return [_back(v, w) for v, w in zip(value, like, strict=True)]
    if isinstance(value, tuple):
        return tuple(_back(v, w) for v, w in zip(value, like, strict=True))
    if isinstance(value, Mapping):
        return {k: _back(v, like[k]) for k, v in value.items()}
    return copy.deepcopy(value)


def _placement(value: Any) -> Any:
    if isinstance(value, Tensor):
        return (value.device, value.dtype)
    if isinstance(value, list | tuple):
        return type(value)(_placement(v) for v in value)
    if isinstance(value, Mapping):
        return {k: _placement(v) for k, v in value.items()}
    return None


def check_optimizer(optimizer: torch.optim.Optimizer) -> None:
    """Raise :class:`SnapshotError` if the snapshot could not restore ``optimizer`` exactly."""
    for name, value in vars(optimizer).items():
        if name not in _OPTIMIZER_OWN and _has_tensor(value):
            raise SnapshotError(
                f"{type(optimizer).__name__} keeps tensors in the attribute {name!r}, outside "
                "optimizer.state and optimizer.param_groups, where the snapshot cannot restore "
                "them; keep per-parameter state in optimizer.state (as torch optimizers do); "
                "nothing was changed"
            )
    for i, p in enumerate(_params(optimizer)):
        if p in optimizer.state:
            _copyable(dict(optimizer.state[p]), f"{type(optimizer).__name__}.state[param {i}]")
    for g, group in enumerate(optimizer.param_groups):
        for key, value in group.items():
            if key != "params":
                _copyable(value, f"{type(optimizer).__name__}.param_groups[{g}][{key!r}]")


def _params(optimizer: torch.optim.Optimizer) -> list[Tensor]:
    return [p for group in optimizer.param_groups for p in group["params"]]


class Snapshot:
    """A captured training state; :meth:`restore` puts it back (any number of times).

    Built by :func:`capture`. ``nbytes`` is the size of the tensors it holds; ``path`` the
    file they live in when captured with ``disk=True`` (removed by :meth:`close`).
    """

    def __init__(
        self,
        model: nn.Module,
        optimizers: tuple[torch.optim.Optimizer, ...],
        schedulers: tuple[Any, ...],
        scaler: Any,
        generators: tuple[torch.Generator, ...],
        disk: str | os.PathLike[str] | bool,
    ):
        self._model, self._optimizers = model, optimizers
        self._schedulers, self._scaler, self._generators = schedulers, scaler, generators
        self._params = list(model.parameters())
        self._tensors = self._params + list(model.buffers())
        self._grad_objects = [p.grad for p in self._params]
        self._opt_params = [_params(opt) for opt in optimizers]
        opt_state = [[dict(opt.state[p]) if p in opt.state else None for p in params]
                     for opt, params in zip(optimizers, self._opt_params, strict=True)]  # fmt: skip
        groups = [[{k: v for k, v in g.items() if k != "params"} for g in opt.param_groups]
                  for opt in optimizers]  # fmt: skip
        self._placement = {
            "tensors": [(t.device, t.dtype) for t in self._tensors],
            "grads": [None if g is None else (g.device, g.dtype) for g in self._grad_objects],
            "opt_state": _placement(opt_state),
            "groups": _placement(groups),
        }
        payload = {
            "tensors": [_to_cpu(t) for t in self._tensors],
            "grads": [None if g is None else _to_cpu(g) for g in self._grad_objects],
            "opt_state": _to_cpu(opt_state),
            "groups": _to_cpu(groups),
        }
        self.nbytes = sum(t.numel() * t.element_size() for t in _leaves(payload))
        self._attrs = [{k: copy.deepcopy(v) for k, v in vars(opt).items()
                        if k not in _OPTIMIZER_OWN and _is_plain(v)} for opt in optimizers]  # fmt: skip
        self._scheduler_states = [copy.deepcopy(s.state_dict()) for s in schedulers]
        self._scaler_state = (
            None if scaler is None or not scaler.is_enabled() else scaler.state_dict()
        )
        self._rng = _rng_state()
        self._generator_states = [g.get_state() for g in generators]
        self.path: Path | None = None
        if disk:
            folder = None if disk is True else os.fspath(disk)
            fd, name = tempfile.mkstemp(prefix="gradclip-snapshot-", suffix=".pt", dir=folder)
            os.close(fd)
            self.path = Path(name)
            torch.save(payload, self.path)
            self._payload: dict[str, Any] | None = None
        else:
            self._payload = payload

    def _load(self) -> dict[str, Any]:
        if self._payload is not None:
            return self._payload
        if self.path is None:
            raise RuntimeError("this snapshot was closed; capture a new one")
        return torch.load(self.path, mmap=True, weights_only=True)  # type: ignore[no-any-return]

    def restore(self) -> None:
        """Put the captured state back: values bit for bit, in the same objects."""
        payload = self._load()
        place = self._placement
        with torch.no_grad():
            for t, saved in zip(self._tensors, payload["tensors"], strict=True):
                t.copy_(saved)
            for p, obj, saved, where in zip(self._params, self._grad_objects, payload["grads"],
                                            place["grads"], strict=True):  # fmt: skip
                if obj is None:
                    p.grad = None
                elif obj.shape == saved.shape and (obj.device, obj.dtype) == where:
                    p.grad = obj.copy_(saved)  # the same object: views into it stay views
                else:  # resized behind our back: a fresh tensor with the saved values
                    p.grad = saved.to(device=where[0], dtype=where[1], copy=True)
        for i, opt in enumerate(self._optimizers):
            self._restore_optimizer(opt, self._opt_params[i], payload["opt_state"][i],
                                    place["opt_state"][i], payload["groups"][i],
                                    place["groups"][i], self._attrs[i])  # fmt: skip
        for scheduler, state in zip(self._schedulers, self._scheduler_states, strict=True):
            scheduler.load_state_dict(copy.deepcopy(state))
        if self._scaler_state is not None:
            self._scaler.load_state_dict(dict(self._scaler_state))
        _set_rng_state(self._rng)
        for g, state in zip(self._generators, self._generator_states, strict=True):
            g.set_state(state)

    @staticmethod
    def _restore_optimizer(
        opt: torch.optim.Optimizer, params: list[Tensor], state: list[Any], state_where: list[Any],
        groups: list[dict[str, Any]], groups_where: list[Any], attrs: dict[str, Any],
    ) -> None:
        opt.state.clear()
        for p, saved, where in zip(params, state, state_where, strict=True):
            if saved is not None:
                opt.state[p] = _back(saved, where)
        for group, saved, where in zip(opt.param_groups, groups, groups_where, strict=True):
            for key in [k for k in group if k != "params" and k not in saved]:
                del group[key]
            group.update(_back(saved, where))
        for key in [k for k in vars(opt) if k not in _OPTIMIZER_OWN and _is_plain(vars(opt)[k])]:
            if key not in attrs:
                delattr(opt, key)
        for key, value in attrs.items():
            setattr(opt, key, copy.deepcopy(value))

    def close(self) -> None:
        """Free the saved tensors (and remove the file of a disk snapshot)."""
        self._payload = None
        if self.path is not None:
            self.path.unlink(missing_ok=True)
            self.path = None


def _leaves(value: Any) -> Iterable[Tensor]:
    if isinstance(value, Tensor):
        yield value
    elif isinstance(value, list | tuple):
        for v in value:
            yield from _leaves(v)
    elif isinstance(value, Mapping):
        for v in value.values():
            yield from _leaves(v)


def _rng_state() -> dict[str, Any]:
    state: dict[str, Any] = {"torch": torch.get_rng_state(), "random": random.getstate()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    numpy = sys.modules.get("numpy")
    if numpy is not None:
        state["numpy"] = numpy.random.get_state()
    return state


def _set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["random"])
    if "cuda" in state:
        torch.cuda.set_rng_state_all(state["cuda"])
    if "numpy" in state:
        sys.modules["numpy"].random.set_state(state["numpy"])


def capture(
    model: nn.Module,
    optimizer: Optimizers,
    *,
    scheduler: Any = None,
    scaler: Any = None,
    generators: Iterable[torch.Generator] = (),
    disk: str | os.PathLike[str] | bool = False,
) -> Snapshot:
    """Snapshot the training state (see the module doc); raises :class:`SnapshotError`,
    before copying anything, when an optimizer holds state the snapshot cannot restore.

    Args:
        model: its parameters, buffers and gradients are saved.
        optimizer: an optimizer, or a list of them (``[muon, adamw]``): the ``state``,
            ``param_groups`` and plain attributes of each are saved.
        scheduler: an LR scheduler (anything with ``state_dict`` / ``load_state_dict``), or
            a list of them (one per optimizer).
        scaler: a ``torch.amp.GradScaler``.
        generators: ``torch.Generator`` objects the data is drawn from.
        disk: False (default) keeps the copy in CPU memory; True writes it to a temporary
            file, a folder path writes it there.
    """
    optimizers = tuple(optimizer_list(optimizer, "the ones whose state is copied"))
    schedulers = (() if scheduler is None else
                  tuple(scheduler) if isinstance(scheduler, list | tuple) else (scheduler,))  # fmt: skip
    for opt in optimizers:
        check_optimizer(opt)
    return Snapshot(model, optimizers, schedulers, scaler, tuple(generators), disk)
