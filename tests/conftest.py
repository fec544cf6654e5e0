"""Shared helpers: parameter sets with gradients, exact clones, and comparisons with torch.

Every comparison is against a real reference: torch itself run on an exact clone of the
same inputs, or a float64 formula. Nothing here knows a number produced by gradclip.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Iterable, Sequence

import pytest
import torch
from torch import Tensor

INF = math.inf
LOW_PRECISION = (torch.float16, torch.bfloat16)
REAL_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
ALL_DTYPES = (*REAL_DTYPES, torch.complex64)

# Relative tolerance of a total norm / clip coefficient computed in each dtype: torch rounds
# per-tensor norms (and, in a low-precision-only set, the coefficient) to the gradient's
# dtype, gradclip accumulates in float32 and rounds once, so the two may differ by ~2 ulp.
RTOL = {
    torch.float16: 2 * torch.finfo(torch.float16).eps,
    torch.bfloat16: 2 * torch.finfo(torch.bfloat16).eps,
    torch.float32: 1e-5,
    torch.float64: 1e-5,
    torch.complex64: 1e-5,
    torch.complex128: 1e-5,
}


Spec = tuple[Sequence[int], torch.dtype] | None
"""One parameter: (shape, dtype) with a gradient, or None for a parameter without one."""


def make_grad(
    shape: Sequence[int], dtype: torch.dtype, *, scale: float = 1.0, seed: int = 0
) -> Tensor:
    """Deterministic normal values times ``scale``, drawn in float64 then cast to ``dtype``."""
    gen = torch.Generator().manual_seed(seed)
    if dtype.is_complex:
        real = torch.randn(tuple(shape), generator=gen, dtype=torch.float64)
        imag = torch.randn(tuple(shape), generator=gen, dtype=torch.float64)
        return torch.complex(real, imag).mul(scale).to(dtype)
    return torch.randn(tuple(shape), generator=gen, dtype=torch.float64).mul(scale).to(dtype)


def make_params(
    specs: Iterable[Spec], *, scale: float = 1.0, seed: int = 0
) -> list[torch.nn.Parameter]:
    """One Parameter per spec; ``None`` makes a float32 parameter whose ``.grad`` is None."""
    params = []
    for i, spec in enumerate(specs):
        if spec is None:
            params.append(torch.nn.Parameter(torch.zeros(3)))
            continue
        shape, dtype = spec
        p = torch.nn.Parameter(torch.zeros(tuple(shape), dtype=dtype))
        p.grad = make_grad(shape, dtype, scale=scale, seed=seed * 1000 + i)
        params.append(p)
    return params


def params_with_grads(grads: Iterable[Tensor | None]) -> list[torch.nn.Parameter]:
    """A Parameter for each gradient (zeros of its shape and dtype), with ``.grad`` set."""
    params = []
    for g in grads:
        if g is None:
            params.append(torch.nn.Parameter(torch.zeros(3)))
            continue
        p = torch.nn.Parameter(torch.zeros_like(g, device=g.device))
        p.grad = g
        params.append(p)
    return params


def clone_params(params: Sequence[Tensor]) -> list[Tensor]:
    """An exact, independent copy of a parameter list, keeping its aliasing structure.

    ``copy.deepcopy`` of a Parameter does not copy ``.grad`` here, so parameter and grad are
    cloned by hand. A parameter listed twice maps to one clone listed twice, and parameters
    that share one grad tensor get clones that share one cloned grad.
    """
    return _remap(params, lambda p: p.detach().clone(), clone_exact)


def _remap(params: Sequence[Tensor], data: Callable[[Tensor], Tensor],
           grad: Callable[[Tensor], Tensor]) -> list[Tensor]:
    """New parameters ``data(p)`` with gradients ``grad(p.grad)``, keeping the aliasing
    structure: a parameter listed twice maps to one new one listed twice, and parameters that
    share one grad tensor get new ones that share one new grad."""
    param_memo: dict[int, Tensor] = {}
    grad_memo: dict[int, Tensor] = {}
    out = []
    for p in params:
        if id(p) not in param_memo:
            values = data(p)
            q = (
                torch.nn.Parameter(values, requires_grad=p.requires_grad)
                if isinstance(p, torch.nn.Parameter)
                else values.requires_grad_(p.requires_grad)
            )
            if p.grad is not None:
                if id(p.grad) not in grad_memo:
                    grad_memo[id(p.grad)] = grad(p.grad)
                q.grad = grad_memo[id(p.grad)]
            param_memo[id(p)] = q
        out.append(param_memo[id(p)])
    return out


def clone_exact(t: Tensor) -> Tensor:
    """A copy with the same values, dtype, device, strides and tensor subclass (version 0)."""
    copy = t.detach().clone(memory_format=torch.preserve_format)
    assert copy.stride() == t.stride() and type(copy) is type(t)
    return copy


def grads_of(params: Iterable[Tensor]) -> list[Tensor]:
    return [p.grad for p in params if p.grad is not None]


# ---------------------------------------------------------------------------------------
# snapshots: "nothing changed"


class Snapshot:
    """Values and version counters of every gradient, to prove a call changed nothing."""

    def __init__(self, params: Iterable[Tensor]):
        self.params = list(params)
        self.grads = [p.grad for p in self.params]
        self.values = [None if g is None else g.detach().clone() for g in self.grads]
        self.versions = [None if g is None else g._version for g in self.grads]

    def assert_unchanged(self) -> None:
        for i, p in enumerate(self.params):
            assert p.grad is self.grads[i], f"grad {i} was replaced"
            if self.grads[i] is None:
                continue
            assert p.grad._version == self.versions[i], f"grad {i} was written"
            assert_bitwise_equal(p.grad, self.values[i])


def assert_bitwise_equal(a: Tensor, b: Tensor) -> None:
    assert a.dtype == b.dtype and a.shape == b.shape
    if a.device.type == "meta":
        return
    torch.testing.assert_close(a, b, rtol=0, atol=0, equal_nan=True)


# ---------------------------------------------------------------------------------------
# references


def float64_total(tensors: Sequence[Tensor], p: float) -> float:
    """torch's definition of the total norm, evaluated exactly enough (float64/complex128)."""
    if not tensors:
        return 0.0
    wide = [t.detach().to("cpu", torch.complex128 if t.is_complex() else torch.float64)
            for t in tensors]  # on the CPU: the tensors may sit on several devices
    per_tensor = torch.stack([torch.linalg.vector_norm(t, p) for t in wide])
    return torch.linalg.vector_norm(per_tensor, p).item()


def lowest_precision(dtypes: Iterable[torch.dtype]) -> torch.dtype:
    """The dtype in a set whose rounding dominates a comparison."""
    return max(dtypes, key=lambda d: RTOL[d])


def assert_total_like(
    ours: Tensor, theirs: Tensor, tensors: Sequence[Tensor], p: float, *, rtol: float | None = None
) -> None:
    """Our total norm against torch's: type, dtype, device, shape, value; accuracy vs float64.

    Values must agree to ``rtol`` (default: the tolerance of the lowest-precision tensor);
    when they differ, ours must be at least as close to the float64 reference as torch's, or
    within half an ulp of the lowest input precision (float16/bfloat16 inputs) or 4e-6
    (float32/float64 inputs) of it.
    """
    assert type(ours) is type(theirs)
    assert ours.dtype == theirs.dtype
    assert ours.device == theirs.device
    assert ours.shape == theirs.shape == torch.Size([])
    assert not ours.requires_grad
    if ours.device.type == "meta":
        return
    p = float(p)
    if rtol is None:
        rtol = RTOL[lowest_precision(t.dtype for t in tensors)] if tensors else 0.0
    a, b = ours.item(), theirs.item()
    if math.isnan(b) or math.isinf(b):
        assert a == b or (math.isnan(a) and math.isnan(b)), (a, b)
        return
    if a == b or not any(t.dtype not in (torch.float64, torch.complex128) for t in tensors):
        assert math.isclose(a, b, rel_tol=rtol, abs_tol=1e-300), (a, b, rtol)
        return
    # A float64 reference adjudicates when some input is less precise than float64.
    ref = float64_total(tensors, p)
    # Per case, float32 sums of a few thousand terms may land either side; ours must be no
    # worse than torch's or within 4e-6 (row-wise float32 sums of 30k+ terms reach ~3e-6).
    # Large half-precision tensors are measured as rows whose norms are rounded to the
    # tensor's dtype: at most half an ulp (eps / 2) relative, averaged over the rows.
    lowest = lowest_precision(t.dtype for t in tensors)
    bound = torch.finfo(lowest).eps / 2 if lowest in LOW_PRECISION else 4e-6
    assert abs(a - ref) <= max(abs(b - ref), bound * abs(ref)), (
        f"ours {a!r} is further from float64 {ref!r} than torch's {b!r}"
    )
    # Beyond rtol of torch only where torch is the one that drifted (its single float32
    # accumulator loses ~1e-5 at 1M elements for p != 2).
    assert math.isclose(a, b, rel_tol=rtol, abs_tol=1e-300) or abs(a - ref) < abs(b - ref), (
        a, b, ref, rtol
    )


def assert_grads_like(ours: Sequence[Tensor], theirs: Sequence[Tensor], *, rtol: float) -> None:
    """Gradients after clipping: same dtype/shape, values within ``rtol`` of each tensor's scale
    plus two ulp of the element (the coefficients differ by at most ``rtol`` relative)."""
    assert len(ours) == len(theirs)
    for a, b in zip(ours, theirs, strict=True):
        assert a.dtype == b.dtype and a.shape == b.shape and a.device == b.device
        if a.device.type == "meta" or a.numel() == 0:
            continue
        both_nan = a.isnan() & b.isnan()
        assert torch.equal(a.isnan(), b.isnan()), "NaN positions differ"
        wide_a = torch.where(both_nan, 0, a).to(
            torch.complex128 if a.is_complex() else torch.float64
        )
        wide_b = torch.where(both_nan, 0, b).to(wide_a.dtype)
        finite = torch.isfinite(wide_b)
        assert torch.equal(wide_a[~finite], wide_b[~finite]), "infinite entries differ"
        wide_a, wide_b = wide_a[finite], wide_b[finite]
        if wide_b.numel() == 0:
            continue
        eps = torch.finfo(a.dtype).eps
        scale = wide_b.abs().max().item()
        tol = rtol * scale + 2 * eps * wide_b.abs() + torch.finfo(a.dtype).smallest_normal
        diff = (wide_a - wide_b).abs()
        assert bool((diff <= tol).all()), (
            f"max diff {diff.max().item():.3g} at scale {scale:.3g} ({a.dtype})"
        )


def run_both(
    ours: Callable[..., object],
    theirs: Callable[..., object],
    params: Sequence[Tensor],
    *args: object,
    **kwargs: object,
) -> tuple[object, list[Tensor], object, list[Tensor]]:
    """Call ours and torch's on independent exact clones of ``params``."""
    mine, ref = clone_params(params), clone_params(params)
    return ours(mine, *args, **kwargs), mine, theirs(ref, *args, **kwargs), ref


def well_conditioned(grads: list[torch.Tensor], p: float) -> bool:
    """No overflow/underflow in float32 (float64) accumulation of p-th powers, and every
    low-precision per-tensor norm inside its dtype's normal range (torch rounds each one to
    its dtype, so an overflow there is difference #2, and a subnormal one loses precision)."""
    if math.isnan(p):
        return True
    per_tensor = []
    for g in grads:
        wide = g.detach().to(torch.complex128 if g.is_complex() else torch.float64).abs()
        wide64 = g.dtype in (torch.float64, torch.complex128)
        acc = torch.finfo(torch.float64 if wide64 else torch.float32)
        if g.numel() and p not in (0.0, INF, -INF):
            nonzero = wide[wide != 0]
            if nonzero.numel():
                powers = nonzero.pow(p)
                if powers.max() * g.numel() > acc.max / 16 or powers.max() < acc.tiny * 1e12:
                    return False
        norm = torch.linalg.vector_norm(wide, p).item() if (g.numel() or 0 <= p < INF) else 0.0
        real = g.dtype.to_real()
        if (
            real in LOW_PRECISION
            and norm != 0
            and not (torch.finfo(real).smallest_normal <= norm <= torch.finfo(real).max / 4)
        ):
            return False
        per_tensor.append(norm)
    if not grads:
        return True
    result = functools.reduce(torch.promote_types, [g.dtype.to_real() for g in grads])
    if result in LOW_PRECISION:
        # torch's low-precision coefficient max_norm / (total + 1e-6) overflows for a total
        # below ~1.5e-5 (float16), which is also difference #2.
        total = torch.linalg.vector_norm(torch.tensor(per_tensor, dtype=torch.float64), p).item()
        if not torch.finfo(result).smallest_normal <= total <= torch.finfo(result).max / 4:
            return False
    return True


# ---------------------------------------------------------------------------------------
# devices: the same test on the CPU and, when one is present, on a CUDA device

DEVICES = ["cpu", *(["cuda"] if torch.cuda.is_available() else [])]
"""Where device-parametrised tests run: the CPU always, CUDA when torch sees a GPU (the test
ids end in ``-cpu`` / ``-cuda``; ``pytest -k cuda`` runs the GPU half)."""


@pytest.fixture(params=DEVICES)
def device(request: pytest.FixtureRequest) -> torch.device:
    """Each device of :data:`DEVICES` in turn: a test that takes ``device`` runs once per
    device, its inputs built on the CPU (same values everywhere) and moved with :func:`on_device`."""
    return torch.device(request.param)


@pytest.fixture
def accelerator_path(monkeypatch: pytest.MonkeyPatch) -> None:
    """The accelerator code path on CPU tensors (``_foreach.is_host_device`` answers False):
    what gradclip does only off the CPU (the fused fold, no host reads) runs here too."""
    import gradclip

    monkeypatch.setattr(gradclip._foreach, "is_host_device", lambda device: False)


def on_device(params: Sequence[Tensor], device: torch.device | str) -> list[Tensor]:
    """``params`` (with their gradients) on ``device``, keeping the aliasing structure (see
    :func:`clone_params`); on the CPU the very same list, so CPU runs are unchanged."""
    device = torch.device(device)
    if device.type == "cpu":
        return list(params)
    return _remap(params, lambda p: p.detach().to(device), lambda g: g.detach().to(device))


@pytest.fixture(scope="module")
def one_thread():
    """Run a module with one intra-op thread, then restore the setting.

    On this 2-core machine, shared with other jobs, two OpenMP threads that spin-wait for a
    descheduled partner make thousands of small kernels up to 10x slower; the comparisons
    with torch do not depend on the thread count. Opt in with
    ``pytestmark = pytest.mark.usefixtures("one_thread")``.
    """
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture
def two_threads():
    """Run a test with two intra-op threads (inside a ``one_thread`` module too), then restore
    the setting: the CPU norm measures large float32 tensors by rows only with several."""
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    yield
    torch.set_num_threads(before)


@pytest.fixture
def restore_default_dtype():
    before = torch.get_default_dtype()
    yield
    torch.set_default_dtype(before)
