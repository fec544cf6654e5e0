"""On a CUDA device: no host sync in any step path (checked by CUDA itself), every clipper equal
to the CPU, captured CUDA graphs of clip + fused AdamW equal to eager, capture misuse refused,
and a compiled clip compiled once. Skipped without a GPU.

Parity with torch on CUDA tensors (fp32, bf16, fp16, gradients on two devices), the fused fold
and AMP with a real ``GradScaler`` are the CPU tests themselves, run again on CUDA through the
``device`` fixture (conftest.py): test_functional.py, clippers/test_fold.py, clippers/test_amp.py.

``torch.cuda.set_sync_debug_mode("error")`` makes torch raise on any CUDA call that blocks the
host until the device is done (``.item()``, ``nonzero``, a blocking copy to or from the host):
the "no host sync" claim is then checked by torch's CUDA layer, not by gradclip's own detector
(tests/host_reads.py). torch's docs call the mode experimental: it covers the copies and
synchronizations of its CUDA allocator and streams, not torch.distributed.

Graph capture follows torch's "whole network capture" recipe: warm-up iterations on a side
stream (they build the optimizer state, move the clipper's state and build its index tensors:
host-to-device copies a capture cannot contain), gradients at fixed addresses
(``zero_grad(set_to_none=False)``), and ``capturable=True`` on the fused optimizer (torch's
``Optimizer._accelerator_graph_capture_health_check`` refuses to capture ``step()`` otherwise,
fused or not).
"""

from __future__ import annotations

import copy
import math
import warnings

import pytest
import torch
import torch.nn.utils as tnu

import gradclip
from clippers.registry import ENTRIES, Entry

pytestmark = [
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
    # capturable=True warns on the eager warm-up steps, as torch intends
    pytest.mark.filterwarnings("ignore:This instance was constructed with capturable=True"),
]

CUDA = torch.device("cuda")
DTYPES = [torch.float32, torch.bfloat16, torch.float16]
RTOL = {torch.float32: 1e-5, torch.bfloat16: 1e-2, torch.float16: 2e-3}


def _model(dtype: torch.dtype = torch.float32, device: torch.device = CUDA) -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(
        torch.nn.Linear(32, 64), torch.nn.Tanh(), torch.nn.Linear(64, 64), torch.nn.Linear(64, 8)
    ).to(device=device, dtype=dtype)


def _backward(model: torch.nn.Module, step: int, scale: float, set_to_none: bool = True) -> None:
    model.zero_grad(set_to_none=set_to_none)
    p = next(model.parameters())
    x = torch.randn(16, 32, generator=torch.Generator().manual_seed(step)).to(p.device, p.dtype)
    (model(x).float().pow(2).sum() * scale).backward()


class no_sync:
    """torch raises on any synchronizing CUDA call inside (the previous mode is restored)."""

    def __enter__(self):
        torch.cuda.synchronize()
        self.before = torch.cuda.get_sync_debug_mode()
        torch.cuda.set_sync_debug_mode("error")

    def __exit__(self, *exc):
        torch.cuda.set_sync_debug_mode(self.before)


def test_sync_debug_mode_catches_a_host_read():
    """The check is live on this torch: a read of a device value raises inside ``no_sync``."""
    x = torch.ones(3, device=CUDA)
    with pytest.raises(RuntimeError, match="synchroniz"), no_sync():
        x.sum().item()
    with pytest.raises(RuntimeError, match="synchroniz"), no_sync():
        x.nonzero()


def test_sync_debug_mode_catches_a_blocking_host_to_device_copy():
    """And a tensor built from host data: so "no host-to-device copy after the first call" is
    checked by the same mode."""
    with pytest.raises(RuntimeError, match="synchroniz"), no_sync():
        torch.tensor([1.0, 2.0], device=CUDA)


# ---------------------------------------------------------------------------------------
# no host sync: drop-ins, clippers, clipper.step, the monitor


@pytest.mark.parametrize("dtypes", [[torch.float32], [torch.bfloat16], [torch.float16],
                                    [torch.float32, torch.bfloat16, torch.float16]],
                         ids=["f32", "bf16", "f16", "mixed"])
@pytest.mark.parametrize("p", [2.0, math.inf, 1.0])
def test_drop_ins_without_a_sync(dtypes, p):
    """Every drop-in, after one call that builds what it caches (a mixed-dtype set needs an
    index tensor: one host-to-device copy), runs with no sync and equals torch's result."""
    def grads() -> list[torch.Tensor]:
        gen = torch.Generator().manual_seed(1)
        shapes = [(64, 32), (64,), (300, 7), (5,), (40_000,)]
        # scale 0.5: the 1-norm of 40,000 float16 values stays inside float16 (torch's
        # per-tensor float16 norm would overflow to inf otherwise: README difference #2)
        return [torch.randn(s, generator=gen).mul(0.5).to(CUDA, dtypes[i % len(dtypes)])
                for i, s in enumerate(shapes)]

    def params() -> list[torch.nn.Parameter]:
        out = []
        for g in grads():
            q = torch.nn.Parameter(torch.zeros_like(g))
            q.grad = g
            out.append(q)
        return out

    ours, theirs = params(), params()
    gradclip.clip_grad_norm_(params(), 0.5, p)  # the warm-up call, on another set of equal shapes
    with no_sync():
        total = gradclip.clip_grad_norm_(ours, 0.5, p)
        norm = gradclip.get_total_norm([q.grad for q in ours], p)
        gradclip.clip_grads_with_norm_(ours, 1e6, norm)
        gradclip.clip_grad_value_(ours, 1e3)  # fits float16; changes nothing here
        gradclip.grad_norms(ours, p)
    expected = tnu.clip_grad_norm_(theirs, 0.5, p)
    rtol = max(RTOL[d] for d in dtypes)
    assert total.device == expected.device and total.dtype == expected.dtype
    torch.testing.assert_close(total.float(), expected.float(), rtol=rtol, atol=0)
    for a, b in zip(ours, theirs, strict=True):
        torch.testing.assert_close(a.grad, b.grad, rtol=rtol, atol=1e-6)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_a_small_coefficient_is_kept_for_half_precision(dtype):
    """A norm of about 2e6 clipped to 1: the coefficient (about 5e-7) is a float16 subnormal.
    The clipped norm is still 1 (to the dtype's rounding): the scale is not rounded to
    float16 on the way (bfloat16 takes it in its own dtype: float32's exponent range)."""
    gen = torch.Generator().manual_seed(3)
    params = []
    for shape in [(40_000,), (50,)]:
        p = torch.nn.Parameter(torch.zeros(shape, device=CUDA, dtype=dtype))
        p.grad = (torch.randn(shape, generator=gen) * 1e4).to(CUDA, dtype)
        params.append(p)
    with no_sync():
        gradclip.clip_grad_norm_(params, 1.0)
    after = torch.linalg.vector_norm(torch.cat([p.grad.double().flatten() for p in params]))
    assert float(after) == pytest.approx(1.0, rel=4 * torch.finfo(dtype).eps)


@pytest.mark.parametrize("entry", ENTRIES, ids=[e.label or e.name for e in ENTRIES])
def test_clipper_on_cuda_equals_cpu_without_a_sync(entry: Entry):
    """The same gradients clipped on the GPU and on the CPU give the same decisions, gradients
    and state; after the first call (which moves the state), no GPU step synchronizes with
    the host. The CPU clipper is handed the GPU's gradients: a backward pass on each device
    would differ by the matmul's rounding, which elements left unscaled (ValueClip, AGC)
    keep at full size."""
    on_gpu, on_cpu = entry.make(), entry.make()
    gpu, cpu = _model(), _model(device=torch.device("cpu"))
    for step, scale in enumerate([1.0, 0.5, 30.0, 1.2, 0.1, 50.0, 1.0] * 2):
        _backward(gpu, step, scale)
        for a, b in zip(gpu.parameters(), cpu.parameters(), strict=True):
            b.grad = a.grad.cpu()
        if step == 0:
            got = on_gpu(gpu)
        else:
            with no_sync():
                got = on_gpu(gpu)
        want = on_cpu(cpu)
        for key, value in want.to_dict().items():
            assert got.to_dict()[key] == pytest.approx(value, rel=1e-4, nan_ok=True), (step, key)
        for a, b in zip(gpu.parameters(), cpu.parameters(), strict=True):
            torch.testing.assert_close(a.grad.cpu(), b.grad, rtol=1e-4, atol=1e-6)
    _assert_same_state(on_gpu, on_cpu, rtol=1e-4, atol=1e-6)


def _assert_same_state(ours: gradclip.Clipper, theirs: gradclip.Clipper, **tol: float) -> None:
    """Every statistic of two clippers (global and per parameter name) equal, on the CPU."""
    a, b = ours.state_dict(), theirs.state_dict()
    assert a["state"].keys() == b["state"].keys() and a["param_state"].keys() == b["param_state"].keys()
    for key, value in b["state"].items():
        torch.testing.assert_close(a["state"][key].cpu(), value.cpu(), **tol)
    for name, entry in b["param_state"].items():
        for key, value in entry.items():
            torch.testing.assert_close(a["param_state"][name][key].cpu(), value.cpu(), **tol)


@pytest.mark.parametrize("optimizer", ["fused", "foreach"])
@pytest.mark.parametrize("entry", ENTRIES, ids=[e.label or e.name for e in ENTRIES])
def test_clipper_step_without_a_sync(entry: Entry, optimizer):
    """clipper.step(model, AdamW): folded into the fused kernel where the clipper has one
    coefficient, scaled then stepped otherwise. The foreach AdamW is capturable (its step
    counts on the device), so that torch's own step is sync-free by design and any sync
    found here is gradclip's."""
    clipper, model = entry.make(), _model()
    kwargs = {"fused": True} if optimizer == "fused" else {"foreach": True, "capturable": True}
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, **kwargs)
    _backward(model, 0, 1.0)
    clipper.step(model, opt)
    for step in range(1, 6):
        _backward(model, step, 10.0 * step)
        with no_sync():
            clipper.step(model, opt)
    assert all(torch.isfinite(p).all() for p in model.parameters())


def test_skip_with_a_fused_optimizer_without_a_sync():
    """nonfinite="skip" with a fused optimizer: the kernel skips through found_inf."""
    clipper, model = gradclip.NormClip(1.0, nonfinite="skip"), _model()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, fused=True)
    _backward(model, 0, 1.0)
    clipper.step(model, opt)
    before = [p.detach().clone() for p in model.parameters()]
    _backward(model, 1, math.inf)
    with no_sync():
        stats = clipper.step(model, opt)
    assert bool(stats.skipped)
    for p, q in zip(model.parameters(), before, strict=True):
        assert torch.equal(p, q)


def test_monitor_records_without_a_sync():
    records = []
    model = _model()
    monitor = gradclip.GradMonitor(gradclip.AdaptiveClip(), model, sinks=records.append, every=8)
    _backward(model, 0, 1.0)
    monitor(loss=torch.ones((), device=CUDA))
    for step in range(1, 7):
        _backward(model, step, 3.0 * step)
        with no_sync():
            monitor(loss=torch.full((), float(step), device=CUDA))
    monitor.close()
    assert len(records) == 7


# ---------------------------------------------------------------------------------------
# CUDA graphs


def _capture_and_replay(make, steps: int = 12, change=None) -> tuple[list, list, object, object]:
    """Warm up, capture backward + clip + fused AdamW step in one graph, replay it on new
    batches; an eager run does the same steps. ``change(clipper, i)`` runs before step ``i``
    on both. Returns both models' parameters and both clippers."""
    eager_model, graph_model = _model(), _model()
    eager_opt = torch.optim.AdamW(eager_model.parameters(), lr=1e-3, fused=True, capturable=True)
    graph_opt = torch.optim.AdamW(graph_model.parameters(), lr=1e-3, fused=True, capturable=True)
    eager_clip, graph_clip = make(), make()
    batches = [torch.randn(16, 32, generator=torch.Generator().manual_seed(i)).to(CUDA)
               * (1 + 9 * (i % 3)) for i in range(steps)]
    static_x = batches[0].clone()

    def train_step(model, opt, clipper, x):
        opt.zero_grad(set_to_none=False)
        model(x).pow(2).sum().backward()
        clipper.step(model, opt)

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm-up: state, constants and index tensors on the device
        for i, x in enumerate(batches[:3]):
            if change is not None:
                change(graph_clip, i)
            static_x.copy_(x)
            train_step(graph_model, graph_opt, graph_clip, static_x)
    torch.cuda.current_stream().wait_stream(side)
    for i, x in enumerate(batches[:3]):
        if change is not None:
            change(eager_clip, i)
        train_step(eager_model, eager_opt, eager_clip, x)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):  # recorded, not run: the replays below take steps 3, 4, ...
        train_step(graph_model, graph_opt, graph_clip, static_x)
    for i, x in enumerate(batches[3:], start=3):
        if change is not None:
            change(graph_clip, i)
            change(eager_clip, i)
        static_x.copy_(x)
        graph.replay()
        train_step(eager_model, eager_opt, eager_clip, x)
    torch.cuda.synchronize()
    return list(graph_model.parameters()), list(eager_model.parameters()), graph_clip, eager_clip


@pytest.mark.parametrize("name", ["NormClip", "NormClip-skip", "AdaptiveClip", "ZClip"])
def test_captured_clip_and_fused_adamw_step_replays_as_eager(name):
    """The parameters and the clipper's state after replays equal an eager run's."""
    make = {
        "NormClip": lambda: gradclip.NormClip(0.5),
        "NormClip-skip": lambda: gradclip.NormClip(0.5, nonfinite="skip"),
        "AdaptiveClip": gradclip.AdaptiveClip,
        "ZClip": lambda: gradclip.ZClip(warmup_steps=3),
    }[name]
    graph_params, eager_params, graph_clip, eager_clip = _capture_and_replay(make)
    for a, b in zip(graph_params, eager_params, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    _assert_same_state(graph_clip, eager_clip, rtol=1e-5, atol=1e-6)


def test_a_threshold_changed_between_replays_is_followed():
    """NormClip.max_norm set between replays (a schedule) reaches the captured graph: the
    threshold is a device tensor updated in place, not a number baked into the capture."""
    def schedule(clipper, i):
        clipper.max_norm = 0.5 / (1 + i)

    graph_params, eager_params, graph_clip, _ = _capture_and_replay(
        lambda: gradclip.NormClip(0.5), change=schedule)
    for a, b in zip(graph_params, eager_params, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    assert graph_clip.max_norm == 0.5 / 12


def test_a_drop_in_captured_with_a_python_threshold_keeps_it():
    """clip_grad_norm_(params, max_norm) inside a capture: the number is a kernel argument of
    the recorded graph (as with torch's own clip), so replays keep the value of the capture;
    use NormClip for a threshold that changes."""
    model = _model()
    _backward(model, 0, 1.0, set_to_none=False)
    grads = [p.grad for p in model.parameters()]
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        gradclip.clip_grad_norm_(model.parameters(), 0.25)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        gradclip.clip_grad_norm_(model.parameters(), 0.25)
    for g in grads:
        g.mul_(100)
    graph.replay()
    torch.cuda.synchronize()
    total = math.sqrt(sum(float(g.double().square().sum()) for g in grads))
    assert total == pytest.approx(0.25, rel=1e-5)


def test_capture_before_the_first_call_is_refused():
    clipper, model = gradclip.AdaptiveClip(), _model()
    _backward(model, 0, 1.0, set_to_none=False)
    graph = torch.cuda.CUDAGraph()
    with pytest.raises(RuntimeError, match="before its first call"), torch.cuda.graph(graph):
        clipper(model)
    # nothing changed: the first eager call still works
    assert torch.isfinite(clipper(model).norm)


def test_skip_with_a_non_fused_optimizer_inside_a_capture_is_refused():
    clipper, model = gradclip.NormClip(1.0, nonfinite="skip"), _model()
    opt = torch.optim.SGD(model.parameters(), lr=0.1, foreach=True)
    _backward(model, 0, 1.0, set_to_none=False)
    clipper.step(model, opt)
    graph = torch.cuda.CUDAGraph()
    with pytest.raises(RuntimeError, match="fused"), torch.cuda.graph(graph):
        clipper.step(model, opt)


# ---------------------------------------------------------------------------------------
# torch.compile on CUDA (inductor: Triton kernels)


def test_compiled_clip_on_cuda_compiles_once():
    clipper, model = gradclip.AdaptiveClip(), _model()
    _backward(model, 0, 1.0)
    clipper(model)
    reference = copy.deepcopy(clipper)
    ref_model = copy.deepcopy(model)
    from torch._dynamo.testing import CompileCounterWithBackend

    counter = CompileCounterWithBackend("inductor")
    call = torch.compile(lambda: clipper(model), backend=counter, fullgraph=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # inductor's own notes about the host
        for step in range(1, 6):
            _backward(model, step, 5.0 * step)
            _backward(ref_model, step, 5.0 * step)
            got, want = call(), reference(ref_model)
            assert float(got.norm) == pytest.approx(float(want.norm), rel=1e-5)
            assert float(got.coef) == pytest.approx(float(want.coef), rel=1e-5)
    assert counter.frame_count == 1
