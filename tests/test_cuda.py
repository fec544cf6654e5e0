"""On a CUDA device: parity with torch, every clipper, no host sync (checked by CUDA itself),
and a captured CUDA graph of clip + fused AdamW equal to eager. Skipped without a GPU.

``torch.cuda.set_sync_debug_mode("error")`` makes CUDA raise on any operation that
synchronizes the host with the device (``.item()``, ``nonzero``, a blocking copy): the
"no host sync" claim is then checked by CUDA, not by gradclip's own detector.
"""

from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn.utils as tnu

import gradclip
from clippers.registry import ENTRIES, Entry

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")

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
    """CUDA raises on any synchronizing operation inside."""

    def __enter__(self):
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")

    def __exit__(self, *exc):
        torch.cuda.set_sync_debug_mode("default")


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("p", [2.0, math.inf, 1.0])
@pytest.mark.parametrize("max_norm", [0.01, 1e6])
def test_clip_grad_norm_parity_on_cuda(dtype, p, max_norm):
    ours, theirs = _model(dtype), _model(dtype)
    _backward(ours, 0, 3.0)
    _backward(theirs, 0, 3.0)
    with no_sync():
        total = gradclip.clip_grad_norm_(ours.parameters(), max_norm, p)
    expected = tnu.clip_grad_norm_(theirs.parameters(), max_norm, p)
    assert total.device == expected.device and total.dtype == expected.dtype
    torch.testing.assert_close(total.float(), expected.float(), rtol=RTOL[dtype], atol=0)
    for a, b in zip(ours.parameters(), theirs.parameters(), strict=True):
        torch.testing.assert_close(a.grad, b.grad, rtol=RTOL[dtype], atol=1e-7)


def test_mixed_devices_as_torch():
    """Gradients on the GPU and the CPU: norms gathered on the first gradient's device."""
    grads = [torch.randn(5, device=CUDA), torch.randn(7), torch.randn(3, device=CUDA)]
    params = [torch.nn.Parameter(torch.zeros_like(g)) for g in grads]
    theirs = [torch.nn.Parameter(torch.zeros_like(g)) for g in grads]
    for p, q, g in zip(params, theirs, grads, strict=True):
        p.grad, q.grad = g.clone(), g.clone()
    ours = gradclip.clip_grad_norm_(params, 0.5)
    expected = tnu.clip_grad_norm_(theirs, 0.5)
    assert ours.device == expected.device
    torch.testing.assert_close(ours, expected, rtol=1e-6, atol=0)
    for p, q in zip(params, theirs, strict=True):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-6, atol=0)


@pytest.mark.parametrize("entry", ENTRIES, ids=[e.name for e in ENTRIES])
def test_clipper_on_cuda_equals_cpu_without_a_sync(entry: Entry):
    """The same steps on the GPU and on the CPU give the same decisions and state; after the
    first call (which moves the state), no GPU step synchronizes with the host."""
    on_gpu, on_cpu = entry.make(), entry.make()
    gpu, cpu = _model(), _model(device=torch.device("cpu"))
    for step, scale in enumerate([1.0, 0.5, 30.0, 1.2, 0.1, 50.0, 1.0] * 2):
        _backward(gpu, step, scale)
        _backward(cpu, step, scale)
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


@pytest.mark.parametrize("optimizer", ["fused", "foreach"])
@pytest.mark.parametrize("name", ["NormClip", "AdaptiveClip", "AdaGC"])
def test_clipper_step_without_a_sync(name, optimizer):
    clipper, model = getattr(gradclip, name)(**({"max_norm": 0.5} if name == "NormClip" else {})), _model()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, **{optimizer: True})
    _backward(model, 0, 1.0)
    clipper.step(model, opt)
    for step in range(1, 6):
        _backward(model, step, 10.0 * step)
        with no_sync():
            clipper.step(model, opt)


@pytest.mark.parametrize("name", ["NormClip", "AdaptiveClip"])
def test_captured_clip_and_fused_adamw_step_replays_as_eager(name):
    """Warm up, capture backward + clip + fused AdamW step in one CUDA graph, replay it on new
    batches: the parameters equal an eager run's."""
    make = (lambda: gradclip.NormClip(0.5)) if name == "NormClip" else gradclip.AdaptiveClip
    eager_model, graph_model = _model(), _model()
    eager_opt = torch.optim.AdamW(eager_model.parameters(), lr=1e-3, fused=True, capturable=True)
    graph_opt = torch.optim.AdamW(graph_model.parameters(), lr=1e-3, fused=True, capturable=True)
    eager_clip, graph_clip = make(), make()
    batches = [torch.randn(16, 32, generator=torch.Generator().manual_seed(i)).to(CUDA) * (1 + 9 * (i % 3))
               for i in range(12)]
    static_x = batches[0].clone()

    def train_step(model, opt, clipper, x):
        opt.zero_grad(set_to_none=False)
        model(x).pow(2).sum().backward()
        clipper.step(model, opt)

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm-up: state, constants and index tensors on the device
        for x in batches[:3]:
            static_x.copy_(x)
            train_step(graph_model, graph_opt, graph_clip, static_x)
    torch.cuda.current_stream().wait_stream(side)
    for x in batches[:3]:
        train_step(eager_model, eager_opt, eager_clip, x)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        train_step(graph_model, graph_opt, graph_clip, static_x)
    for x in batches[3:]:
        static_x.copy_(x)
        graph.replay()
        train_step(eager_model, eager_opt, eager_clip, x)
    torch.cuda.synchronize()
    for a, b in zip(graph_model.parameters(), eager_model.parameters(), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    for key, value in eager_clip.state_dict()["state"].items():
        torch.testing.assert_close(graph_clip.state_dict()["state"][key], value, rtol=1e-5, atol=1e-6)


def test_capture_before_the_first_call_is_refused():
    clipper, model = gradclip.AdaptiveClip(), _model()
    _backward(model, 0, 1.0, set_to_none=False)
    graph = torch.cuda.CUDAGraph()
    with pytest.raises(RuntimeError, match="before its first call"), torch.cuda.graph(graph):
        clipper(model)


def test_skip_with_a_non_fused_optimizer_inside_a_capture_is_refused():
    clipper, model = gradclip.NormClip(1.0, nonfinite="skip"), _model()
    opt = torch.optim.SGD(model.parameters(), lr=0.1, foreach=True)
    _backward(model, 0, 1.0, set_to_none=False)
    clipper.step(model, opt)
    graph = torch.cuda.CUDAGraph()
    with pytest.raises(RuntimeError, match="fused"), torch.cuda.graph(graph):
        clipper.step(model, opt)


def test_compiled_clip_on_cuda_compiles_once():
    clipper, model = gradclip.AdaptiveClip(), _model()
    _backward(model, 0, 1.0)
    clipper(model)
    reference = copy.deepcopy(clipper)
    ref_model = copy.deepcopy(model)
    from torch._dynamo.testing import CompileCounterWithBackend

    counter = CompileCounterWithBackend("inductor")
    call = torch.compile(lambda: clipper(model), backend=counter, fullgraph=True)
    for step in range(1, 6):
        _backward(model, step, 5.0 * step)
        _backward(ref_model, step, 5.0 * step)
        got, want = call(), reference(ref_model)
        assert float(got.norm) == pytest.approx(float(want.norm), rel=1e-5)
    assert counter.frame_count == 1
