"""What a clipper is called on: parameters and their names, resolved once per call.

A clipper accepts a module (names from ``named_parameters()``), a mapping name -> parameter,
``(name, parameter)`` pairs, or plain parameters (named by position). :func:`resolve` turns
any of them into a :class:`Target`: the gradients to measure and the names and parameters
the measured norms are parallel to, under ``torch.distributed`` through the layout's plan.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from torch import Tensor

from gradclip import _foreach, distributed
from gradclip._checks import tensor_list

if TYPE_CHECKING:
    from torch.distributed import ProcessGroup

    from gradclip.distributed import GroupLike, Reduction

__all__ = [
    "WRAPPER_SEGMENTS",
    "Parameters",
    "Target",
    "named_grads",
    "named_params",
    "resolve",
    "unwrapped",
]

Parameters = (
    torch.nn.Module | Tensor | Mapping[str, Tensor] | Iterable[Tensor] | Iterable[tuple[str, Tensor]]
)
"""What a clipper accepts: a module, a mapping name -> parameter, ``(name, parameter)``
pairs, or parameters."""


WRAPPER_SEGMENTS = ("_orig_mod.", "_checkpoint_wrapped_module.", "_fsdp_wrapped_module.")
"""Name segments that wrappers insert (``torch.compile``'s ``OptimizedModule``, activation
checkpointing, FSDP1) and that gradclip leaves out of parameter names, so that names, and the
state keyed by them, are the same for the plain and the wrapped model."""


def unwrapped(module: torch.nn.Module) -> torch.nn.Module:
    """The module a wrapper holds: ``torch.compile``'s ``OptimizedModule`` (``_orig_mod``),
    ``DistributedDataParallel`` and ``DataParallel`` (``module``); others as they are."""
    while True:
        if isinstance(module, (torch.nn.parallel.DistributedDataParallel, torch.nn.DataParallel)):
            module = module.module
        elif type(module).__name__ == "OptimizedModule" and isinstance(
            getattr(module, "_orig_mod", None), torch.nn.Module
        ):
            module = module._orig_mod
        else:
            return module


def _clean(name: str) -> str:
    for segment in WRAPPER_SEGMENTS:
        if segment in name:
            name = name.replace(segment, "")
    return name


def named_params(parameters: Parameters) -> tuple[list[str], list[Tensor]]:
    """Every parameter and its name, with a gradient or not (see :func:`named_grads`).

    A module's names are those of the model inside its wrappers (see :func:`unwrapped` and
    :data:`WRAPPER_SEGMENTS`). Two parameters with one name raise ``ValueError``: state and
    logs keyed by name would mix them up.
    """
    if isinstance(parameters, torch.nn.Module):
        pairs = _foreach.named_parameters(unwrapped(parameters))
        joined = "\n".join(name for name, _ in pairs)  # one search per segment, every step
        if any(segment in joined for segment in WRAPPER_SEGMENTS):
            pairs = [(_clean(n), t) for n, t in pairs]
            _check_unique([n for n, _ in pairs])
    elif isinstance(parameters, Mapping):
        pairs = list(parameters.items())
    else:
        items = [parameters] if isinstance(parameters, Tensor) else list(parameters)
        if items and all(isinstance(i, tuple) and len(i) == 2 for i in items):
            pairs = [(str(n), t) for n, t in items]
            _check_unique([n for n, _ in pairs])
        else:
            pairs = list(zip(map(str, range(len(items))), items, strict=True))
    return [n for n, _ in pairs], tensor_list([t for _, t in pairs], "parameters")


def _check_unique(names: list[str]) -> None:
    if len(set(names)) != len(names):
        twice = sorted(n for n, count in Counter(names).items() if count > 1)
        raise ValueError(
            f"two parameters are named {twice[:5]}: the clipper keys its state and its records "
            "by parameter name; pass distinct names (e.g. `model.named_parameters()`)"
        )


def named_grads(parameters: Parameters) -> tuple[tuple[str, ...], list[Tensor], list[Tensor]]:
    """``(names, params, grads)`` of the parameters that have a gradient, each gradient once.

    A module gives its ``named_parameters()`` names; a mapping its keys; ``(name, tensor)``
    pairs their names; plain tensors their position (``"0"``, ``"1"``, ...).

    Example:
        >>> import torch
        >>> model = torch.nn.Linear(2, 1)
        >>> model(torch.ones(1, 2)).sum().backward()
        >>> named_grads(model)[0]
        ('weight', 'bias')
    """
    return _with_grads(*named_params(parameters))


def _with_grads(
    all_names: list[str], all_params: list[Tensor]
) -> tuple[tuple[str, ...], list[Tensor], list[Tensor]]:
    # Each gradient once, by identity; while compiling, each parameter once (an id() of a
    # gradient is a guard on an object zero_grad() replaces: see _foreach.distinct).
    by_param = _foreach.is_compiling()
    seen: set[int] = set()
    names, params, grads = [], [], []
    for name, param in zip(all_names, all_params, strict=True):
        grad = param.grad
        key = id(param) if by_param else id(grad)
        if grad is not None and key not in seen:
            seen.add(key)
            names.append(name)
            params.append(param)
            grads.append(grad)
    return tuple(names), params, grads


@dataclass(frozen=True)
class Target:
    """The parameters of one clip call.

    Attributes:
        grads: the tensors to measure and scale: this rank's non-empty local gradients
            (plain tensors), each once.
        local_names, local_params: the name and parameter of each of ``grads``.
        names, params: what the measured norms are parallel to. On one process, the same as
            the local ones; under a sharded layout every tensor split across ranks (the same
            list on every rank), whichever of them this rank holds part of.
        layout: the distributed reduction, or None on the single-process path.
        module: the module the clipper was called on, if any (AGC finds the head in it).
        excluded: ids of parameters whose group is left out (a group policy, for clippers
            that measure on their own: AGC).
    """

    grads: list[Tensor]
    local_names: tuple[str, ...]
    local_params: list[Tensor]
    names: tuple[str, ...]
    params: list[Tensor]
    layout: Reduction | None
    module: torch.nn.Module | None
    excluded: frozenset[int] = frozenset()

    @property
    def communicates(self) -> bool:
        """Whether measuring issues collectives (every rank must then take part)."""
        return self.layout is not None and self.layout.communicates


@torch.no_grad()
def resolve(
    parameters: Parameters,
    *,
    shard_group: ProcessGroup | None,
    extra_groups: tuple[GroupLike, ...],
    whole_tensors: str | None = None,
) -> Target:
    """The :class:`Target` of a call on ``parameters``; under ``torch.distributed``, with the
    layout's plan (``whole_tensors``: the name of a clipper that decides per row, which
    refuses flat shards)."""
    module = unwrapped(parameters) if isinstance(parameters, torch.nn.Module) else None
    all_names, all_params = named_params(parameters)
    names, params, grads = _with_grads(all_names, all_params)
    if not distributed.applies(shard_group, extra_groups):
        return Target(grads, names, params, names, params, None, module)
    layout = distributed.plan(
        grads, shard_group=shard_group, extra_groups=extra_groups, params=all_params,
        per_tensor=True, whole_tensors=whole_tensors,
    )
    return Target(
        layout.local,
        tuple(layout.select(names)),
        layout.select(params),
        tuple(layout.rows_of(names, all_names)),
        layout.rows_of(params, all_params),
        layout,
        module,
    )
