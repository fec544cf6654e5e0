"""Parameter groups, as the optimizers hold them, and which of them an orthogonalising
optimizer (Muon) updates.

``groups=`` (on every clipper and on :func:`gradclip.clip_grad_norm_`) takes an optimizer,
several optimizers, ``optimizer.param_groups`` (dicts with ``"params"``), a mapping name ->
parameters (or -> a group dict), or a list of parameter lists; :func:`as_groups` turns any of
them into :class:`ParamGroup` objects. A group's name is its ``"name"`` entry if it has one,
else its position (``"0"``, ``"1"``, ...; across several optimizers the positions continue),
or its key in a mapping. :func:`muon_like` is the default rule for orthogonalising optimizers.

Example:
    >>> import torch
    >>> w, b = torch.nn.Parameter(torch.zeros(3, 3)), torch.nn.Parameter(torch.zeros(3))
    >>> [(g.name, muon_like(g.options, g.optimizer)) for g in as_groups(
    ...     [torch.optim.Muon([w]), torch.optim.AdamW([b])])]
    [('0', True), ('1', False)]
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from gradclip._checks import ArgumentTypeError

__all__ = ["GroupsLike", "OrthogonalRule", "ParamGroup", "as_groups", "muon_like"]

GroupsLike = Any
"""What ``groups=`` takes: an optimizer, several optimizers, ``optimizer.param_groups`` (a
list of dicts with ``"params"``), a mapping name -> parameters (or -> a group dict), or a
list of parameter lists."""

OrthogonalRule = Callable[[Mapping[str, Any], object], bool]
"""``rule(group, optimizer) -> bool``: True for a group whose optimizer orthogonalises its
update (``optimizer`` is None when only the group dicts are known)."""

_ORTHOGONAL_CLASSES = ("muon", "dion", "polargrad", "scion")
_NEWTON_SCHULZ_KEYS = ("ns_steps", "ns_coefficients", "newton_schulz_steps", "backend_steps")


def muon_like(group: Mapping[str, Any], optimizer: object = None) -> bool:
    """The default rule for orthogonalising optimizers (Muon and its kin).

    A group is orthogonalised when, checked in this order:

    1. it has a boolean ``"use_muon"`` entry: that entry decides (KellerJordan's
       ``MuonWithAuxAdam`` keeps its AdamW groups in the same optimizer, with ``False``);
    2. it has a Newton–Schulz entry (``ns_steps``, ``ns_coefficients``,
       ``newton_schulz_steps`` or ``backend_steps``), as the groups of ``torch.optim.Muon``
       and its ports do: this recognises them in ``optimizer.param_groups`` alone;
    3. its optimizer is a ``torch.optim.Muon``;
    4. its optimizer's class name contains ``Muon``, ``Dion``, ``PolarGrad`` or ``Scion``
       (case-insensitive) and the group has no ``"betas"`` entry (an Adam group that such
       an optimizer carries along is not orthogonalised).

    Pass your own callable ``orthogonal=rule`` (``rule(group, optimizer) -> bool``) to change
    it, or ``orthogonal=None`` to clip such groups like any other.

    Example:
        >>> import torch
        >>> w = torch.nn.Parameter(torch.zeros(2, 2))
        >>> muon_like(torch.optim.Muon([w]).param_groups[0]), muon_like({"params": [w]})
        (True, False)
    """
    if not isinstance(group, Mapping):
        group = {}
    flag = group.get("use_muon")
    if isinstance(flag, bool):
        return flag
    if any(key in group for key in _NEWTON_SCHULZ_KEYS):
        return True
    if optimizer is None:
        return False
    muon = getattr(torch.optim, "Muon", None)
    if muon is not None and isinstance(optimizer, muon):
        return True
    name = type(optimizer).__name__.lower()
    return any(kind in name for kind in _ORTHOGONAL_CLASSES) and "betas" not in group


@dataclass(frozen=True)
class ParamGroup:
    """One parameter group, as given.

    Attributes:
        name: its name (see the module doc).
        params: its parameters, in order.
        options: the group dict (empty for a plain list of parameters).
        optimizer: the optimizer it belongs to, when known.
    """

    name: str
    params: tuple[Tensor, ...]
    options: Mapping[str, Any] = field(default_factory=dict)
    optimizer: object = None


def _is_optimizer(value: object) -> bool:
    groups = getattr(value, "param_groups", None)
    return isinstance(groups, list) and not isinstance(value, Mapping)


def _params_of(value: object, where: str) -> tuple[Tensor, ...]:
    if isinstance(value, torch.nn.Module):
        return tuple(value.parameters())
    if isinstance(value, Tensor):
        return (value,)
    try:
        items = tuple(value)  # type: ignore[call-overload]
    except TypeError:
        items = None
    if items is None or not all(isinstance(p, Tensor) for p in items):
        raise ArgumentTypeError(
            f"`groups`: {where} must hold parameters (a list of tensors, a module, or a dict "
            f"with 'params'), got {type(value).__name__} {value!r:.60}; pass e.g. "
            "`groups=optimizer.param_groups`"
        )
    return items  # type: ignore[return-value]


def _from_dict(group: Mapping[str, Any], name: str, optimizer: object) -> ParamGroup:
    if "params" not in group:
        raise ValueError(
            f"`groups`: group {name!r} is a dict without 'params' ({sorted(group)[:6]}); pass "
            "optimizer.param_groups, or dicts such as {'params': [...], 'clip': 'exclude'}"
        )
    own = group.get("name")
    label = own if isinstance(own, str) and own else name
    return ParamGroup(label, _params_of(group["params"], f"group {label!r}"), group, optimizer)


def as_groups(groups: GroupsLike) -> list[ParamGroup]:
    """``groups`` (see :data:`GroupsLike`) as :class:`ParamGroup` objects, in order.

    Raises:
        TypeError: ``groups`` is none of the accepted forms.
        ValueError: two groups have the same name.

    Example:
        >>> import torch
        >>> a, b = torch.nn.Parameter(torch.zeros(1)), torch.nn.Parameter(torch.zeros(1))
        >>> [g.name for g in as_groups({"backbone": [a], "head": [b]})]
        ['backbone', 'head']
    """
    out: list[ParamGroup] = []
    if _is_optimizer(groups):
        out = [_from_dict(g, str(i), groups) for i, g in enumerate(groups.param_groups)]
    elif isinstance(groups, Mapping):
        for key, value in groups.items():
            name = str(key)
            if isinstance(value, Mapping):
                found = _from_dict(value, name, None)
                out.append(ParamGroup(name, found.params, value, None))
            else:
                out.append(ParamGroup(name, _params_of(value, f"group {name!r}")))
    elif isinstance(groups, (Tensor, torch.nn.Module, str)) or not isinstance(groups, Iterable):
        raise ArgumentTypeError(
            f"`groups` must be an optimizer, optimizer.param_groups, several optimizers, or a "
            f"mapping name -> parameters; got {type(groups).__name__} {groups!r:.60}"
        )
    else:
        for item in groups:
            if _is_optimizer(item):
                start = len(out)
                out += [_from_dict(g, str(start + i), item) for i, g in enumerate(item.param_groups)]
            elif isinstance(item, Mapping):
                out.append(_from_dict(item, str(len(out)), None))
            else:
                out.append(ParamGroup(str(len(out)), _params_of(item, f"group {len(out)}")))
    names = [g.name for g in out]
    twice = sorted({n for n in names if names.count(n) > 1})
    if twice:
        raise ValueError(
            f"`groups`: two groups are named {twice}; give each group a distinct 'name' entry "
            "(their policies, state and records are keyed by name)"
        )
    return out
