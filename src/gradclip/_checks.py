"""Argument validation, with one exception policy for the whole package.

* ``TypeError`` when a value has the wrong type (``None`` where a number is needed, a list, a
  module where tensors are expected, a ``bool`` passed as a count): :class:`ArgumentTypeError`.
  It also derives from ``ValueError``, which gradclip 0.1 raised for some of these, so that
  code catching either keeps working;
* ``ValueError`` when the type is right and the value is not (a negative threshold, NaN, a
  string that is not a number, a choice that does not exist).

The drop-ins take numbers as torch's functions do (``float(value)``: numeric strings and
one-element tensors too) and raise the exception types torch raises for the same input.

Every message names the argument, shows the value received and says how to fix it. Checks
run before anything is modified, so a call that raises has changed nothing.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Callable, Iterable, Sequence
from typing import TypeVar

import torch
from torch import Tensor

__all__ = [
    "ArgumentTypeError",
    "NotAScalarError",
    "NotATensorError",
    "check_choice",
    "check_count",
    "check_norm_type",
    "check_real",
    "check_threshold",
    "tensor_list",
    "to_float",
]

T = TypeVar("T")


class NotATensorError(TypeError, AttributeError, RuntimeError):
    """An element of ``parameters``/``tensors`` is not a tensor.

    It is a ``TypeError``; it also derives from the exceptions torch raises for the same
    input (``AttributeError`` for a non-tensor parameter, ``RuntimeError`` for a ``None``
    tensor in ``get_total_norm``), so code written against torch keeps catching it.

    Example:
        >>> import gradclip
        >>> try:
        ...     gradclip.clip_grad_norm_([None], 1.0)
        ... except gradclip.NotATensorError as err:
        ...     print(type(err).__mro__[1].__name__)
        TypeError
    """


class ArgumentTypeError(TypeError, ValueError):
    """An argument of the wrong type (see the module doc: a ``TypeError``, and a
    ``ValueError`` for code written against gradclip 0.1).

    Example:
        >>> import gradclip
        >>> try:
        ...     gradclip.ZClip(alpha=None)
        ... except TypeError as err:
        ...     print(str(err)[:36])
        `alpha` must be a real number in (0,
    """


class NotAScalarError(ValueError, RuntimeError):
    """A tensor passed where one number is needed holds several: a ``ValueError``, and the
    ``RuntimeError`` torch raises for it (``float()`` of a multi-element tensor).

    Example:
        >>> import torch, gradclip
        >>> try:
        ...     gradclip.clip_grad_value_([torch.nn.Parameter(torch.ones(1))], torch.ones(2))
        ... except RuntimeError as err:
        ...     print(str(err)[:42])
        `clip_value` must be one number, got a ten
    """


def to_float(value: object, name: str, fix: str) -> float:
    """``value`` as a float: a real number (a ``bool`` too), a one-element tensor, or a string
    that parses as one (``"inf"``), as ``float()`` takes it in torch's own functions. Other
    types: ``TypeError``; a string that is no number: ``ValueError``."""
    if type(value) is float:  # the usual case, before the ABC check below (slow when cold)
        return value
    if isinstance(value, str):
        try:
            return float(value)
        except ValueError:
            raise ValueError(f"`{name}` must be a real number, got {value!r:.80}; {fix}") from None
    if not isinstance(value, (numbers.Real, Tensor)) or (
        isinstance(value, Tensor) and value.is_complex()
    ):
        raise ArgumentTypeError(
            f"`{name}` must be a real number, got {type(value).__name__} {value!r:.80}; {fix}"
        )
    if isinstance(value, Tensor) and value.numel() != 1:
        raise NotAScalarError(
            f"`{name}` must be one number, got a tensor of shape {tuple(value.shape)}; {fix}"
        )
    return float(value)


def check_real(
    value: object, name: str, rule: str, ok: Callable[[float], bool], fix: str
) -> float:
    """A real-number constructor argument that must satisfy ``ok`` (NaN never does). Only
    real numbers: ``alpha=True`` or ``alpha="0.9"`` is a mistake (:class:`ArgumentTypeError`).

    Example:
        >>> check_real(0.5, "alpha", "in (0, 1)", lambda v: 0 < v < 1, "alpha=0.97")
        0.5
    """
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise ArgumentTypeError(
            f"`{name}` must be a real number {rule}, got {type(value).__name__} {value!r:.80}; "
            f"pass e.g. `{fix}`"
        )
    number = float(value)
    if math.isnan(number) or not ok(number):
        raise ValueError(f"`{name}` must be {rule}, got {number}; pass e.g. `{fix}`")
    return number


def check_threshold(value: object, name: str) -> float:
    """``max_norm`` / ``clip_value``: a real number >= 0 (``inf`` allowed: no clipping).

    A negative or NaN value raises: torch would flip every gradient's sign or make it NaN.

    Example:
        >>> check_threshold("inf", "max_norm")
        inf
    """
    number = to_float(value, name, f"pass a float such as `{name}=1.0`")
    if math.isnan(number) or number < 0:
        raise ValueError(
            f"`{name}` must be >= 0, got {number}; torch.nn.utils would "
            + ("turn every gradient into NaN" if math.isnan(number) else "flip every gradient's sign")
            + f". Pass a non-negative float such as `{name}=1.0` (`inf` disables clipping)."
        )
    return number


def check_norm_type(value: object) -> float:
    """``norm_type``: any order torch accepts (``'inf'`` included), but not NaN, which torch
    accepts and which turns every gradient into NaN.

    Example:
        >>> check_norm_type("inf")
        inf
    """
    number = to_float(value, "norm_type", "pass a number such as 2.0, or 'inf'")
    if math.isnan(number):
        raise ValueError(
            "`norm_type` must be a number, got nan; torch.nn.utils would turn every gradient "
            "into NaN. Pass e.g. `norm_type=2.0`, or 'inf' for the max norm (nothing was changed)."
        )
    return number


def check_count(
    value: object, name: str, minimum: int, fix: str, *, none: str | None = None
) -> int | None:
    """An integer argument ``>= minimum``. ``none`` says what ``None`` means where it is
    allowed (``None`` is then returned).

    Example:
        >>> check_count(128, "window", 1, "window=128")
        128
    """
    if value is None and none is not None:
        return None
    also = f" or None ({none})" if none is not None else ""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise ArgumentTypeError(
            f"`{name}` must be an int >= {minimum}{also}, got {type(value).__name__} "
            f"{value!r:.80}; pass e.g. `{fix}`"
        )
    if value < minimum:
        raise ValueError(f"`{name}` must be an int >= {minimum}{also}, got {value}; pass e.g. `{fix}`")
    return int(value)


def check_choice(value: object, name: str, choices: Sequence[T], fix: str) -> T:
    """One of ``choices`` (compared with ``==``), else ``ValueError`` listing them.

    Example:
        >>> check_choice("skip", "nonfinite", ("propagate", "error", "skip"), "nonfinite='skip'")
        'skip'
    """
    if isinstance(value, Tensor) or value not in choices:
        raise ValueError(
            f"`{name}` must be one of {', '.join(map(repr, choices))}, got {value!r:.80}; "
            f"pass e.g. `{fix}`"
        )
    return value  # type: ignore[return-value]


_TENSOR_TYPES = {Tensor, torch.nn.Parameter}


def tensor_list(items: Tensor | Iterable[Tensor], name: str) -> list[Tensor]:
    """A tensor or an iterable of tensors as a list (generators are consumed once).

    Example:
        >>> len(tensor_list(torch.nn.Linear(2, 2).parameters(), "parameters"))
        2
    """
    if isinstance(items, Tensor):
        return [items]
    try:
        out = list(items)  # type: ignore[arg-type]
    except TypeError:
        shown = "the module" if isinstance(items, torch.nn.Module) else ""
        raise TypeError(
            f"`{name}` must be a Tensor or an iterable of Tensors, got {shown} "
            f"{type(items).__name__} {items!r:.80}; pass e.g. `model.parameters()`"
        ) from None
    # the usual case: one C-level pass over the types (isinstance on each Parameter costs
    # twice as much), then the few distinct types
    types = set(map(type, out))
    if types <= _TENSOR_TYPES or all(issubclass(t, Tensor) for t in types):
        return out
    for i, item in enumerate(out):
        if not isinstance(item, Tensor):
            if isinstance(item, tuple):
                hint = "pass `model.parameters()`, not `model.named_parameters()`"
            elif isinstance(item, torch.nn.Module):
                hint = "pass `model.parameters()`, not the module"
            else:
                hint = "pass tensors such as `model.parameters()`"
            raise NotATensorError(
                f"`{name}` must contain only Tensors, but element {i} is "
                f"{type(item).__name__} {item!r:.80}; {hint}"
            )
    return out
