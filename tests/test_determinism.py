"""Sums in a fixed order: a step adds the same numbers in the same order on every run.

``index_add_``, ``scatter_add_`` and their kin add with atomics on CUDA: values landing in one
output are added in whatever order the threads arrive, so a float sum changes in its last bits
from run to run, and a resumed run stops being bitwise equal to an uninterrupted one. Off the
CPU, gradclip sums per tensor (AGC) and per slot (``get_total_norm`` under a distributed layout)
with :class:`gradclip.norms.units.SegmentSums` instead: a gather and a row sum. Nothing here has
a GPU, so the accelerator code path is forced onto CPU tensors (``_foreach.is_host_device``
patched, as in test_host_sync.py) and a dispatch mode records every order-dependent op; the
sums are checked against float64 references. (The monitor's per-layer sums still use
``index_add_``: README, "GPU", says where the bitwise promise stops.)
"""

from __future__ import annotations

import math
import random

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import gradclip
from clippers.registry import ENTRIES, Entry
from clippers.steps import grads_with_norm, make_params, set_grads
from gradclip import _foreach
from gradclip.distributed.reduction import Reduction
from gradclip.norms.units import SegmentSums

aten = torch.ops.aten
ATOMIC = {aten.index_add.default, aten.index_add_.default, aten.index_add.out,
          aten.scatter_add.default, aten.scatter_add_.default, aten.bincount.default,
          aten.histc.default, aten.index_reduce.default, aten.index_reduce_.default}
ACCUMULATING = {aten.index_put, aten.index_put_, aten._index_put_impl_, aten.put, aten.put_}
SCATTER_REDUCE = {aten.scatter_reduce, aten.scatter_reduce_}


class OrderDependentOps(TorchDispatchMode):
    """Records every op whose float result depends on the order of atomic additions on CUDA."""

    def __init__(self):
        super().__init__()
        self.ops: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        packet = func.overloadpacket
        if func in ATOMIC:
            self.ops.append(str(func))
        elif packet in ACCUMULATING and (kwargs.get("accumulate") or any(a is True for a in args[2:])):
            self.ops.append(f"{func} (accumulate=True)")
        elif packet in SCATTER_REDUCE and {"sum", "mean"} & {*args[3:], kwargs.get("reduce")}:
            self.ops.append(f"{func} (sum)")
        return func(*args, **kwargs)


def test_the_detector_sees_index_add():
    with OrderDependentOps() as mode:
        torch.zeros(3).index_add_(0, torch.tensor([0, 0]), torch.ones(2))
        torch.zeros(3).index_put_((torch.tensor([1, 1]),), torch.ones(2), accumulate=True)
        torch.zeros(3).scatter_reduce_(0, torch.tensor([2, 2]), torch.ones(2), "sum")
    assert len(mode.ops) == 3, mode.ops


def _reference(values: torch.Tensor, segments: list[int], count: int) -> list[float]:
    out = [0.0] * count
    for v, s in zip(values.double().tolist(), segments, strict=True):
        out[s] += v
    return out


@pytest.mark.parametrize("path", ["host", "accelerator"])
@pytest.mark.parametrize("layout", ["mixed", "unique", "one segment", "empty segments"])
def test_segment_sums_equal_float64_sums(layout, path, monkeypatch):
    rng = random.Random(4)
    if layout == "mixed":  # sizes 1 .. 5000, interleaved, as units of a model's tensors
        count = 40
        sizes = [rng.choice([1, 3, 64, 768, 5000]) for _ in range(count)]
        segments = [s for s, n in enumerate(sizes) for _ in range(n)]
        rng.shuffle(segments)
    elif layout == "unique":
        count, segments = 50, rng.sample(range(60), 50)
        count = 60
    elif layout == "one segment":
        count, segments = 1, [0] * 10_000
    else:
        count, segments = 9, [2, 7, 2, 2, 7, 0]
    if path == "accelerator":
        monkeypatch.setattr(_foreach, "is_host_device", lambda device: False)
    values = torch.randn(len(segments), generator=torch.Generator().manual_seed(1),
                         dtype=torch.float64).abs()
    sums = SegmentSums(segments, count)
    with OrderDependentOps() as mode:
        got = sums(values)
    assert got.dtype == values.dtype and got.shape == (count,)
    assert got.tolist() == pytest.approx(_reference(values, segments, count), rel=1e-13, abs=0)
    if path == "accelerator" and layout != "unique":
        assert mode.ops == []
    assert torch.equal(sums(values), got)  # built once, the same bits again


def test_segment_sums_in_float32_are_as_close_as_a_float32_sum(monkeypatch):
    segments = [i % 7 for i in range(70_000)]
    values = torch.rand(70_000, generator=torch.Generator().manual_seed(2))
    want = torch.tensor(_reference(values, segments, 7), dtype=torch.float64)
    for host in (True, False):
        monkeypatch.setattr(_foreach, "is_host_device", lambda device, host=host: host)
        got = SegmentSums(segments, 7)(values)
        assert got.dtype == torch.float32
        torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=0)


def _steps(entry: Entry, monkeypatch) -> tuple[list, OrderDependentOps]:
    """Four steps of ``entry``'s clipper: the first on the CPU path, then the accelerator path."""
    clipper, params = entry.make(), make_params()
    stats = []
    mode = OrderDependentOps()
    for step, norm in enumerate([1.0, 0.5, 30.0, 2.0]):
        set_grads(params, grads_with_norm(norm, step))
        if step == 1:
            monkeypatch.setattr(_foreach, "is_host_device", lambda device: False)
        if step:
            with mode:
                stats.append(clipper(params).to_dict())
        else:
            stats.append(clipper(params).to_dict())
    return stats, mode


@pytest.mark.parametrize("entry", ENTRIES, ids=[e.label or e.name for e in ENTRIES])
def test_clipper_steps_off_the_cpu_use_no_order_dependent_op(entry, monkeypatch):
    _, mode = _steps(entry, monkeypatch)
    assert mode.ops == []


def test_agc_per_tensor_norms_off_the_cpu_equal_the_cpu_path(monkeypatch):
    """AGC's per-tensor norms are sums of its unit norms: the device formulation gives what
    the CPU's index_add_ gives, and both the float64 norms of the gradients."""
    gen = torch.Generator().manual_seed(0)
    shapes = [(300, 16), (64, 16), (64,), (64, 64), (64,), (8, 64), (8,)]
    grads = [torch.randn(s, generator=gen) * 3 for s in shapes]
    weights = [torch.randn(s, generator=gen) for s in shapes]
    reference = torch.stack([g.double().norm() for g in grads])
    results = []
    for host in (True, False):
        monkeypatch.setattr(_foreach, "is_host_device", lambda device, host=host: host)
        params = {f"p{i}": torch.nn.Parameter(w.clone()) for i, w in enumerate(weights)}
        set_grads(params, grads)
        stats = gradclip.AGC(clipping=0.05, exclude=("p6",))(params)
        assert bool(stats.clipped)
        results.append((stats.norms.per_tensor, stats.norm, stats.post_norm))
    (per_a, norm_a, post_a), (per_b, norm_b, post_b) = results
    torch.testing.assert_close(per_b.double(), reference, rtol=1e-6, atol=0)
    torch.testing.assert_close(per_a, per_b, rtol=1e-7, atol=0)
    torch.testing.assert_close(norm_a, norm_b, rtol=1e-7, atol=0)
    torch.testing.assert_close(post_a, post_b, rtol=1e-6, atol=0)  # _factors: three more sums


@pytest.mark.usefixtures("accelerator_path")
def test_slot_sums_of_a_distributed_layout_use_no_order_dependent_op():
    """get_total_norm under a layout: several tensors share a slot (one per process-group
    key); their p-th powers are added per slot in a fixed order."""
    slot = [0, 1, 0, -1, 1, 0, 2]
    reduction = Reduction(local=[], kept=[], slot=slot, schedule=[], extra=[], rows=[],
                          row_of=[], slot_rows=[], row_tensors=[], order={}, slots=3,
                          device=torch.device("cpu"))
    values = torch.rand(len(slot), generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    with OrderDependentOps() as mode:
        got = reduction._slot_values(values, is_max=False)
        top = reduction._slot_values(torch.where(values > 0.5, math.nan, values), is_max=True)
    assert mode.ops == []
    want = [sum(v for v, s in zip(values.tolist(), slot, strict=True) if s == k) for k in range(3)]
    assert got.tolist() == pytest.approx(want, rel=1e-15)
    assert top.shape == (3,)


def test_drop_ins_off_the_cpu_use_no_order_dependent_op(accelerator_path):
    grads = [torch.randn(40, 3), torch.randn(7).bfloat16(), torch.randn(5, dtype=torch.float64)]
    params = [torch.nn.Parameter(torch.zeros_like(g)) for g in grads]
    for p, g in zip(params, grads, strict=True):
        p.grad = g.clone()
    with OrderDependentOps() as mode:
        gradclip.clip_grad_norm_(params, 0.5)
        gradclip.get_total_norm(grads, math.inf)
        gradclip.clip_grad_value_(params, 0.01)
        gradclip.grad_norms(params)
    assert mode.ops == []
