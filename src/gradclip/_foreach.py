"""The only code that touches ``torch._foreach_*`` and private torch helpers.

Everything version-sensitive is wrapped here so that a torch upgrade that moves a private
helper breaks one file, not the package. The torch releases the suite has been run on are
``SUPPORTED_TORCH`` (README, "Tested versions"); importing gradclip under another torch
warns once.
"""

from __future__ import annotations

import functools
import operator
import re
import warnings
from collections.abc import Callable, Iterable, Sequence
from itertools import compress
from typing import ParamSpec, TypeVar

import torch
from torch import Tensor
from torch.amp.grad_scaler import OptState
from torch.utils import _foreach_utils

__all__ = [
    "SUPPORTED_TORCH",
    "TORCH_VERSION",
    "UntestedTorchWarning",
    "all_strided",
    "capturing",
    "check_foreach",
    "check_torch_version",
    "default_group_exists",
    "device_has_foreach",
    "distinct",
    "flatten",
    "foreach_clamp_",
    "foreach_mul_",
    "foreach_norm",
    "fused_handles",
    "grads_unscaled",
    "group_by_device_dtype",
    "has_foreach_support",
    "is_compiling",
    "is_host_device",
    "mesh_layout",
    "named_parameters",
    "no_grad",
    "real_dtype",
    "takes_grad_scale",
    "wide_dtype",
]

TORCH_VERSION: tuple[int, int] = tuple(  # type: ignore[assignment]
    int(x) for x in re.match(r"(\d+)\.(\d+)", torch.__version__).groups()  # type: ignore[union-attr]
)
"""(major, minor) of the installed torch: what the version shims below compare against."""

SUPPORTED_TORCH: tuple[tuple[int, int], tuple[int, int]] = ((2, 8), (2, 16))
"""``[oldest, first unsupported)`` torch (major, minor): the releases the whole suite has been
run on. pyproject.toml declares the same range (``torch>=2.8,<2.16``; a test keeps them equal)."""


class UntestedTorchWarning(UserWarning):
    """The installed torch is outside :data:`SUPPORTED_TORCH`."""


_version_warned = False


def check_torch_version(version: str | None = None) -> None:
    """Warn once per process if ``version`` (default: the installed torch's) is outside
    :data:`SUPPORTED_TORCH`. gradclip relies on private torch helpers that move between
    releases; under an untested torch it may break or misbehave. Runs when gradclip is imported.

    Example:
        >>> check_torch_version()  # an installed torch in the range: nothing happens
    """
    global _version_warned
    version = torch.__version__ if version is None else version
    match = re.match(r"(\d+)\.(\d+)", version)
    found = (int(match[1]), int(match[2])) if match else None
    low, high = SUPPORTED_TORCH
    if _version_warned or (found is not None and low <= found < high):
        return
    _version_warned = True
    warnings.warn(
        f"gradclip supports torch>={low[0]}.{low[1]},<{high[0]}.{high[1]} (the releases its "
        f"test suite runs on); torch {version} is installed. gradclip uses private torch "
        "helpers that change between releases: install a supported torch, or run gradclip's "
        "tests on this one before trusting it.",
        UntestedTorchWarning,
        stacklevel=2,
    )

Groups = dict[tuple[torch.device, torch.dtype], tuple[list[Tensor], list[int]]]


P = ParamSpec("P")
R = TypeVar("R")


def no_grad(fn: Callable[P, R]) -> Callable[P, R]:
    """``@torch.no_grad()`` for the drop-ins' hot path: the grad mode is switched by torch's C
    function directly, not by its context-manager objects (about eight Python frames a
    call, which run cold between streamed gradients). While compiling, torch's own context,
    which dynamo traces.

    Example:
        >>> @no_grad
        ... def double(t):
        ...     return t * 2
        >>> double(torch.ones(1, requires_grad=True)).requires_grad
        False
    """

    @functools.wraps(fn)
    def without_grad(*args: P.args, **kwargs: P.kwargs) -> R:
        if is_compiling():
            with torch.no_grad():
                return fn(*args, **kwargs)
        previous = torch.is_grad_enabled()
        torch._C._set_grad_enabled(False)
        try:
            return fn(*args, **kwargs)
        finally:
            torch._C._set_grad_enabled(previous)

    return without_grad


def is_host_device(device: torch.device) -> bool:
    """True where reading a tensor's value on the host costs no device sync (the CPU).

    Fast paths that branch on a computed value (skip a no-op multiply, recompute an
    overflowed half-precision norm) run only where this is true. Tests patch it to
    exercise the accelerator code path on CPU tensors.
    """
    return device.type == "cpu"


is_compiling = torch.compiler.is_compiling
"""True while ``torch.compile`` (dynamo) traces the caller: value reads, locks and caches
must then be skipped, and tensors built as graph constants. torch's own function, not a
wrapper: it is asked several times on every clip, mostly with cold caches, where each
Python frame costs a few µs."""


_REAL = {torch.complex32: torch.float16, torch.complex64: torch.float32,
         torch.complex128: torch.float64}


def real_dtype(dtype: torch.dtype) -> torch.dtype:
    """``dtype.to_real()``, in a form ``torch.compile`` traces (it cannot trace that method)."""
    return _REAL.get(dtype, dtype)


def wide_dtype(device: torch.device) -> torch.dtype:
    """The widest float a device computes in: float64, except on Apple's MPS (no float64),
    where float32 is all there is. Sums of squared norms are taken in it, so that finite
    float32 norms up to float32's largest value never overflow into ``inf``."""
    return torch.float32 if device.type == "mps" else torch.float64


def distinct(tensors: Iterable[Tensor], *, lasting: bool) -> list[Tensor]:
    """The distinct tensors of ``tensors`` (by identity), first occurrence first.

    ``lasting``: the tensors live across steps (parameters). Identity is compared by
    ``id()``, which under ``torch.compile`` guards on each object: fine for parameters, a
    recompilation per step for gradients that ``zero_grad(set_to_none=True)`` replaces.
    While compiling, short-lived tensors are therefore not deduplicated (as in torch).
    """
    if not lasting and is_compiling():
        return list(tensors)
    if not isinstance(tensors, list):
        tensors = list(tensors)
    if len(set(map(id, tensors))) == len(tensors):  # the usual case: one C-level pass
        return tensors
    return list({id(t): t for t in tensors}.values())


def mesh_layout(mesh: object) -> str | tuple[int, ...]:
    """A description of a ``DeviceMesh``'s layout, the same on every rank of it, orderable.

    Recent torch describes a mesh by a Python layout object (``_layout``), read here
    without touching a tensor. Older releases keep the mesh as a (CPU) tensor of ranks,
    which is read once.
    """
    layout = getattr(mesh, "_layout", None)
    if layout is not None:
        return repr(layout)
    return tuple(mesh.mesh.flatten().tolist())  # type: ignore[attr-defined]


def capturing() -> bool:
    """True while a CUDA graph is being captured on the current stream (False without CUDA,
    and while compiling: dynamo cannot trace a torch function that returns a bool, and a
    compiled step is captured by torch's own CUDA-graph tooling, not by this Python)."""
    return (not is_compiling() and torch.cuda.is_available()
            and torch.cuda.is_current_stream_capturing())
check_torch_version()


def default_group_exists() -> bool:
    """``torch.distributed.is_initialized()`` (False where torch has no distributed package),
    read from torch's private record of the default process group: one attribute instead of
    four Python frames, asked on every clip. torch's function where that record moved."""
    if _DIST_WORLD is not None:
        return _DIST_WORLD._default_pg is not None
    return torch.distributed.is_available() and torch.distributed.is_initialized()


# torch's record of the default process group, where this torch keeps it (else None)
_DIST_WORLD = getattr(torch.distributed.distributed_c10d, "_world", None) if torch.distributed.is_available() else None
if not hasattr(_DIST_WORLD, "_default_pg"):
    _DIST_WORLD = None


def device_has_foreach(device: torch.device) -> bool:
    """Whether torch has ``_foreach_*`` kernels for this device type (torch's own rule,
    remembered per device type: it is asked on every clip, after the gradients streamed
    through the caches, where torch's three calls cost more than the lookup)."""
    known = _FOREACH_DEVICE.get(device.type)
    if known is None:
        known = _FOREACH_DEVICE[device.type] = _foreach_utils._device_has_foreach_support(device)
    return known


_FOREACH_DEVICE: dict[str, bool] = {}


def has_foreach_support(tensors: Sequence[Tensor], device: torch.device) -> bool:
    """torch's ``foreach=None`` rule: a supported device and only plain ``torch.Tensor``
    (outside compilation checked in one C-level pass, not torch's generator)."""
    if is_compiling():
        return _foreach_utils._has_foreach_support(list(tensors), device)
    return device_has_foreach(device) and set(map(type, tensors)) <= _FOREACH_TYPES


_FOREACH_TYPES = {type(None), *_foreach_utils._foreach_supported_types}


def check_foreach(groups: Groups, foreach: bool | None) -> None:
    """Raise as torch does when ``foreach=True`` meets a device without foreach kernels.

    Called before anything is modified, so the error never leaves a half-applied clip.
    """
    if foreach:
        for device, _ in groups:
            if not device_has_foreach(device):
                raise RuntimeError(
                    f"foreach=True was passed, but can't use the foreach API on {device.type} tensors"
                )


def group_by_device_dtype(tensors: list[Tensor]) -> Groups:
    """Group tensors by (device, dtype): ``{key: (tensors, indices into the input)}``.

    While compiling, grouped in Python: torch < 2.9 cannot trace its own C++ grouping (its
    own ``clip_grad_norm_`` breaks the graph there), and the groups are static anyway.
    """
    if is_compiling():
        groups: Groups = {}
        for i, t in enumerate(tensors):
            group = groups.setdefault((t.device, t.dtype), ([], []))
            group[0].append(t)
            group[1].append(i)
        return groups
    # torch's C++ grouping without its Python wrapper's no_grad context (it creates no
    # graph): ~2 µs a call, more when the call runs cold between streamed gradients
    grouped = torch._C._group_tensors_by_device_and_dtype([tensors], True)
    for key, (lists, indices) in grouped.items():  # in place: no comprehension frame
        grouped[key] = (lists[0], indices)
    return grouped


def foreach_norm(tensors: list[Tensor], p: float, dtype: torch.dtype | None) -> Sequence[Tensor]:
    """Per-tensor p-norms in one multi-tensor call; ``dtype`` sets the accumulation/result dtype."""
    if dtype is None:
        return torch._foreach_norm(tensors, p)
    return torch._foreach_norm(tensors, p, dtype=dtype)


def foreach_mul_(tensors: list[Tensor], scale: Tensor | list[Tensor] | float) -> None:
    """Multiply every tensor in place by a 0-dim tensor, or each by its own 0-dim tensor, or
    (on the CPU only, where the host decided it) by a Python number."""
    torch._foreach_mul_(tensors, scale)


def foreach_clamp_(tensors: list[Tensor], low: float | Tensor, high: float | Tensor) -> None:
    """Clamp every tensor in place to ``[low, high]`` with torch's foreach order (min, then
    max); 0-dim tensor bounds are read on the device, not on the host.

    On the CPU torch's multi-tensor clamp is a loop of per-tensor kernels, a lower bound
    pass and then an upper bound pass over each tensor: tensors of ``ONE_PASS_NUMEL``
    elements or more are clamped by one ``clamp_`` instead (the same elements, NaN kept:
    one read and write of memory instead of two)."""
    if isinstance(low, Tensor):
        torch._foreach_clamp_min_(tensors, [low] * len(tensors))
        torch._foreach_clamp_max_(tensors, [high] * len(tensors))
        return
    if tensors and is_host_device(tensors[0].device) and not is_compiling():
        numels = list(map(Tensor.numel, tensors))
        if max(numels) >= ONE_PASS_NUMEL:
            large = list(map(ONE_PASS_NUMEL.__le__, numels))
            for t in compress(tensors, large):
                t.clamp_(low, high)
            tensors = list(compress(tensors, map(operator.not_, large)))
            if not tensors:
                return
    torch._foreach_clamp_min_(tensors, low)
    torch._foreach_clamp_max_(tensors, high)


ONE_PASS_NUMEL = 1 << 15
"""CPU tensors from this many elements are clamped in one pass (:func:`foreach_clamp_`):
below it a tensor stays in cache between torch's two passes, and one more kernel call
(~1.5 µs) would cost more than the second pass."""


def all_strided(tensors: Iterable[Tensor]) -> bool:
    """Every tensor is dense (strided, not sparse): it can be viewed, concatenated, and
    clamped without a sparse kernel failing half-way through a list."""
    return {t.layout for t in tensors} <= _STRIDED


_STRIDED = {torch.strided}


def flatten(tensors: list[Tensor]) -> Tensor:
    """One new 1-D tensor holding every tensor's elements in order (a single C++ call)."""
    return torch._utils._flatten_dense_tensors(tensors)


_MODULE = torch.nn.Module


def named_parameters(module: torch.nn.Module) -> list[tuple[str, Tensor]]:
    """``list(module.named_parameters())``, about twice as fast (read every training step).

    The same walk as torch's (pre-order, a module or parameter met twice counted once,
    names of the first occurrence), over ``_modules`` / ``_parameters`` without torch's
    generator chain. A module tree that customises the walk (a wrapper overriding
    ``named_parameters``, ``_named_members`` or ``named_modules``, as FSDP1 does to
    clean its names) gets torch's own method.
    """
    root = type(module)
    if (
        root.named_parameters is not _MODULE.named_parameters
        or root._named_members is not _MODULE._named_members
    ):
        return list(module.named_parameters())
    out: list[tuple[str, Tensor]] = []
    seen_params: set[int] = set()
    seen_modules: set[int] = set()

    def visit(prefix: str, m: torch.nn.Module) -> bool:
        if id(m) in seen_modules:
            return True
        if type(m).named_modules is not _MODULE.named_modules:
            return False
        seen_modules.add(id(m))
        for name, param in m._parameters.items():
            if param is not None and id(param) not in seen_params:
                seen_params.add(id(param))
                out.append((prefix + name, param))
        for name, child in m._modules.items():
            if child is not None and not visit(prefix + name + ".", child):
                return False
        return True

    return out if visit("", module) else list(module.named_parameters())


_LOW_PRECISION = (torch.float16, torch.bfloat16)


def fused_handles(optimizer: torch.optim.Optimizer, grad: Tensor) -> bool:
    """Whether the optimizer's fused kernel updates a parameter with this gradient correctly,
    so that a clip may be folded into it.

    torch < 2.14: the fused CPU ``SGD`` and ``Adagrad`` kernels skip the vectorised part of
    float16/bfloat16 updates (pytorch/pytorch#191763, fixed in 2.14 by #192545, not
    backported). The clip is then applied by a plain multiply, and a warning (shown once,
    by Python's default filter) says that the optimizer itself is affected.
    """
    if (
        TORCH_VERSION < (2, 14)
        and grad.device.type == "cpu"
        and grad.dtype in _LOW_PRECISION
        and isinstance(optimizer, (torch.optim.SGD, torch.optim.Adagrad))
    ):
        warnings.warn(
            f"torch {torch.__version__}: fused CPU {type(optimizer).__name__} skips most "
            "float16/bfloat16 parameter updates (pytorch/pytorch#191763, fixed in torch "
            "2.14). gradclip clips these gradients by a plain multiply instead of folding "
            "the clip into the optimizer, but the optimizer's own step is still affected: "
            "use fused=False, float32 parameters, or torch>=2.14.",
            stacklevel=4,
        )
        return False
    return True


# ---------------------------------------------------------------------------------------
# optimizers and GradScaler: private attributes read in one place


def takes_grad_scale(optimizer: torch.optim.Optimizer) -> bool:
    """Whether ``optimizer.step()`` divides by ``optimizer.grad_scale`` and skips on
    ``optimizer.found_inf`` itself, as ``GradScaler`` relies on (torch's private flag).

    torch < 2.12: the fused ``Adagrad`` does not declare it, so it is stepped like any other
    optimizer (GradScaler unscales its gradients first, and so does gradclip).
    """
    return bool(getattr(optimizer, "_step_supports_amp_scaling", False))


def grads_unscaled(scaler: torch.amp.GradScaler, optimizer: torch.optim.Optimizer) -> bool:
    """Whether ``scaler.unscale_(optimizer)`` already ran since the last ``update()`` (a second
    call raises). torch has no public query: it keeps the stage per optimizer."""
    return scaler._per_optimizer_states[id(optimizer)]["stage"] is not OptState.READY
