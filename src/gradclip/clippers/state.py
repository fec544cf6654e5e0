"""A clipper's statistics: typed, on the gradients' device, checkpointed exactly.

Every clipper holds two counters (``steps``, ``nonfinite_steps``) and the fields of its
``State`` NamedTuple: global ones (one tensor per field), or, for a clipper that keeps
state per parameter (``per_tensor_state``, AdaGC), one 0-dim tensor per field and parameter
name. :class:`StateStore` keeps them, hands the clipper's pure step the current ``State``,
and commits what the step returns: masked by the step's finiteness with ``torch.where`` (a
non-finite step never changes a statistic) and copied into the existing tensors in place,
so that the state keeps its memory across steps (a captured CUDA graph replays into it).

``state_dict()`` and ``load_state_dict()`` derive keys, dtypes and shapes from a fresh
state, and loading validates every tensor before anything is replaced.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any, NamedTuple

import torch
from torch import Tensor

from gradclip import _foreach

if TYPE_CHECKING:
    from gradclip.clippers.base import Clipper

__all__ = ["COUNTERS", "StateStore"]

COUNTERS = ("steps", "nonfinite_steps")
"""The base counters (int64, 0-dim): finite steps seen, and steps with NaN/inf gradients."""


class _Bound(NamedTuple):
    """Per-name entries of one parameter set gathered into vectors (one per field); the
    per-name entries are views into them, so committing into a vector updates them."""

    names: tuple[str, ...]
    entries: dict[str, dict[str, Tensor]]
    vectors: NamedTuple


class StateStore:
    """The statistics of one clipper (see the module doc).

    Attributes:
        values: counters and global fields by name (CPU until the first step, then on the
            gradients' device).
        per_name: for per-tensor state, ``{parameter name: {field: 0-dim tensor}}``.
        device: where the tensors are (None before the first step).
    """

    def __init__(self, clipper: Clipper):
        self.clipper = clipper
        fresh = clipper._init_state(0) if clipper.State is not None else None
        self.values: dict[str, Tensor] = {k: torch.zeros((), dtype=torch.long) for k in COUNTERS}
        if fresh is not None and not clipper.per_tensor_state:
            self.values.update(fresh._asdict())
        self.per_name: dict[str, dict[str, Tensor]] = {}
        self.device: torch.device | None = None
        self.calls = 0  # calls since reset or load: a host count, read by `prepare`
        self._bound: _Bound | None = None
        self._loaded: frozenset[str] = frozenset()  # per-name entries not yet matched

    # -- the step ----------------------------------------------------------------------------

    def to(self, device: torch.device) -> None:
        """Move every tensor to ``device`` (once: a no-op afterwards).

        Decided from where the tensors are, not from a Python attribute: an attribute that
        changes on the first call would be a guard that recompiles a compiled step once.
        """
        if self.values["steps"].device == device:
            if not _foreach.is_compiling():
                self.device = device
            return
        self.values = {k: v.to(device) for k, v in self.values.items()}
        self.per_name = {n: {k: v.to(device) for k, v in e.items()} for n, e in self.per_name.items()}
        self._bound = None
        self.device = device

    def prepare(self, names: tuple[str, ...]) -> Any:
        """The ``State`` for the coming step (see :meth:`current`), after the clipper's
        ``_prepare`` (a buffer that grows is replaced here, before the step); counts the call."""
        state = self.current(names)
        if _foreach.is_compiling():  # a host count read in a graph is a guard: a recompile per call
            return state
        if state is not None and not self.clipper.per_tensor_state:
            prepared = self.clipper._prepare(state, self.calls)
            if prepared is not state:
                self.values.update(prepared._asdict())
                state = prepared
        self.calls += 1
        return state

    def current(self, names: tuple[str, ...]) -> Any:
        """The ``State`` the clipper's step reads: its global fields, or the per-name entries
        of ``names`` as vectors (a name seen for the first time gets a fresh entry)."""
        clipper = self.clipper
        if clipper.State is None:
            return None
        if not clipper.per_tensor_state:
            return clipper.State(**{f: self.values[f] for f in clipper.State._fields})
        return self._vectors(names).vectors

    def _vectors(self, names: tuple[str, ...]) -> _Bound:
        bound = self._bound
        if bound is not None and bound.names == names and bound.entries is self.per_name:
            return bound
        clipper, entries = self.clipper, self.per_name
        if self._loaded and names:
            if self._loaded.isdisjoint(names):
                raise ValueError(
                    f"the loaded {type(clipper).__name__} state holds entries for the parameters "
                    f"{sorted(self._loaded)[:4]}, but this call's parameters are named "
                    f"{list(names[:4])}: none match, so every statistic would silently start "
                    "from scratch. Load the state into a clipper called on the same model (names "
                    "come from named_parameters(); torch.compile's `_orig_mod.` and DDP's "
                    "`module.` are left out), or rename the keys of state_dict['param_state']. "
                    "Nothing was changed."
                )
            self._loaded = frozenset()
        fresh = clipper._init_state(1)
        columns: dict[str, list[Tensor]] = {f: [] for f in clipper.State._fields}
        for name in names:
            entry = entries.get(name)
            for f in clipper.State._fields:
                value = getattr(fresh, f)[0] if entry is None else entry[f]
                columns[f].append(value.to(self.device or value.device))
        vectors = clipper.State(**{
            f: torch.stack(col) if col else getattr(fresh, f)[:0].to(self.device or "cpu")
            for f, col in columns.items()
        })
        for i, name in enumerate(names):
            entries[name] = {f: getattr(vectors, f)[i] for f in clipper.State._fields}
        self._bound = _Bound(names, entries, vectors)
        return self._bound

    def commit(self, old: Any, new: Any, finite: Tensor) -> None:
        """Write ``new`` over ``old`` (both ``State``) where ``finite``; count the step."""
        if old is not None:
            for before, after in zip(old, new, strict=True):
                before.copy_(torch.where(finite, after, before))
        self.values["steps"].add_(finite.long())
        self.values["nonfinite_steps"].add_((~finite).long())

    # -- checkpoints -------------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        return {
            "state": {k: v.detach().clone() for k, v in self.values.items()},
            "param_state": {
                name: {k: v.detach().clone() for k, v in entry.items()}
                for name, entry in self.per_name.items()
            },
        }

    def load(self, state: Mapping[str, Any], param_state: Mapping[str, Any]) -> None:
        """Replace every statistic with validated copies of ``state`` / ``param_state``;
        ``ValueError`` naming the first problem, with nothing replaced."""
        clipper = self.clipper
        own = type(clipper).__name__
        expected = dict(StateStore(clipper).values)
        optional = set(getattr(clipper, "_optional_fields", ()))  # a SpikeDetector has none
        if not isinstance(state, Mapping) or not set(expected) - optional <= set(state) <= set(expected):
            got = set(state) if isinstance(state, Mapping) else type(state).__name__
            raise ValueError(
                f"{own} state dict does not match: expected the entries {sorted(expected)}, "
                f"got {sorted(got) if isinstance(got, set) else got}; pass the value of "
                f"`{own}.state_dict()`"
            )
        # a field newer than the checkpoint starts as in a fresh state
        values = {k: _checked(own, k, state[k], expected[k], clipper) if k in state else expected[k]
                  for k in expected}  # fmt: skip
        per_name: dict[str, dict[str, Tensor]] = {}
        if not isinstance(param_state, Mapping):
            raise ValueError(f"{own} state dict: `param_state` must be a mapping, got "
                             f"{type(param_state).__name__}")
        if param_state and not clipper.per_tensor_state:
            raise ValueError(f"{own} keeps no per-parameter state, but the state dict holds "
                             f"entries for {sorted(param_state)[:5]}")
        if param_state:
            row = {f: v[0] for f, v in clipper._init_state(1)._asdict().items()}
            for name, entry in param_state.items():
                if not isinstance(entry, Mapping) or not set(row) - optional <= set(entry) <= set(row):
                    raise ValueError(
                        f"{own} state dict does not match: param_state entry {name!r} must hold "
                        f"exactly {sorted(row)}; pass the value of `{own}.state_dict()`"
                    )
                per_name[str(name)] = {
                    f: _checked(own, f"param_state[{name!r}][{f!r}]", entry[f], row[f], clipper)
                    if f in entry else row[f]
                    for f in row
                }
        if self.device is not None:
            values = {k: v.to(self.device) for k, v in values.items()}
            per_name = {n: {k: v.to(self.device) for k, v in e.items()} for n, e in per_name.items()}
        self.values, self.per_name, self._bound = values, per_name, None
        self._loaded = frozenset(per_name)
        # Outside the training step: reading the counters here costs no step a sync.
        self.calls = int(values["steps"]) + int(values["nonfinite_steps"])
        if clipper.State is not None and not clipper.per_tensor_state:
            clipper._check_state(clipper.State(**{f: values[f] for f in clipper.State._fields}))


def _checked(own: str, key: str, value: Any, fresh: Tensor, clipper: Clipper) -> Tensor:
    """A copy of ``value`` with the dtype and shape of ``fresh`` and no NaN; counters >= 0."""
    try:
        tensor = torch.as_tensor(value).detach().clone().cpu()
    except (TypeError, ValueError, RuntimeError):
        raise ValueError(f"{own} state dict: {key!r} must be a tensor, got "
                         f"{type(value).__name__} {value!r:.60}") from None
    if tensor.dtype != fresh.dtype:
        raise ValueError(
            f"{own} state dict: {key!r} has dtype {tensor.dtype}, expected {fresh.dtype}; pass "
            f"the value of `{own}.state_dict()`"
        )
    growable = key in clipper._growable_fields
    if tensor.shape != fresh.shape and not (growable and tensor.dim() == fresh.dim() and tensor.numel()):
        raise ValueError(
            f"{own} state dict: {key!r} has shape {tuple(tensor.shape)}, but {clipper!r} "
            f"needs {tuple(fresh.shape)}; build the clipper as "
            f"gradclip.{own}(**state_dict['config'])"
        )
    if tensor.is_floating_point() and bool(torch.isnan(tensor).any()):
        raise ValueError(
            f"{own} state dict: {key!r} holds NaN, which would make every later gradient NaN; "
            "the checkpoint is corrupt (a clipper never stores NaN)"
        )
    if not tensor.is_floating_point() and tensor.dtype != torch.bool and bool((tensor < 0).any()):
        raise ValueError(f"{own} state dict: {key!r} holds a negative count {tensor.min().item()}")
    if tensor.is_floating_point() and bool((tensor == -math.inf).any()):
        raise ValueError(f"{own} state dict: {key!r} holds -inf; the checkpoint is corrupt")
    return tensor
