"""gradclip.grad_norms: per-tensor norms and the total, in one pass, against float64.

Exercises each internal path of the CPU engine (small tensors concatenated in chunks, large
tensors measured as rows, non-contiguous tensors, the plan cache, float16 overflow) through
the public function only; the module constants size the inputs.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.utils as tnu

import gradclip
from conftest import make_grad, make_params, params_with_grads
from gradclip.norms import _host as norms  # the CPU fast path and its sizes

pytestmark = pytest.mark.usefixtures("one_thread")

INF = math.inf
P_VALUES = [2.0, 1.0, INF, 0.5, 3.0, 0.0, -1.0, -INF]


def rtol_for(dtype, p):
    """Per-tensor norm vs float64: float64 to 1e-12; float32 accumulation (float32, complex64
    gradients) to 1e-6 for p = 2 and the exact norms (inf, 0), and 2e-5 for p = 1, 0.5, 3, ...
    whose float32 runs of up to 32k terms drift further. float16/bfloat16: a large tensor's
    row norms are rounded to its dtype (at most half an ulp each) and averaged over many
    rows, which stays within eps / 8 (torch's own per-tensor norm: up to eps / 2)."""
    if dtype in (torch.float64, torch.complex128):
        return 1e-12
    if dtype in (torch.float16, torch.bfloat16):
        return max(torch.finfo(dtype).eps / 8, 2e-5)
    return 1e-6 if p in (2.0, INF, -INF, 0.0) else 2e-5


def f64_norm(t, p):
    wide = t.detach().to(torch.complex128 if t.is_complex() else torch.float64)
    return torch.linalg.vector_norm(wide, p).item()


def assert_per_tensor(result, grads, p, rtol=None):
    assert len(result.tensors) == len(grads)
    assert all(a is b for a, b in zip(result.tensors, grads, strict=True))
    assert result.per_tensor.shape == (len(grads),)
    for i, (norm, g) in enumerate(zip(result.per_tensor.tolist(), grads, strict=True)):
        expected = f64_norm(g, p)
        tol = rtol_for(g.dtype, p) if rtol is None else rtol
        assert math.isclose(norm, expected, rel_tol=tol, abs_tol=1e-300), (
            f"tensor {i} {tuple(g.shape)} {g.dtype}: {norm!r} vs float64 {expected!r}"
        )


def with_plan(grads):
    """``grads`` and enough tiny tensors after them for a plan (fewer are measured without one)."""
    count = max(norms.MIN_CONCAT, math.ceil(sum(g.numel() for g in grads) / norms.CONCAT_SPAN) + 1)
    pad = [make_grad((9 + i % 3,), torch.float32, seed=900 + i) for i in range(count)]
    assert norms.concatenates(count, sum(g.numel() for g in grads + pad))
    return grads + pad


def planned(grads, p=2.0):
    """Whether measuring ``grads`` goes through a plan (else without one)."""
    calls = []
    real = norms.norms

    def spy(*args):
        calls.append(args)
        return real(*args)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(norms, "norms", spy)
        gradclip.grad_norms(params_with_grads(grads), p)
    return bool(calls)


def assert_total_is_norm_of_per_tensor(result, p):
    expected = torch.linalg.vector_norm(result.per_tensor.double(), p).item()
    assert math.isclose(result.total.item(), expected, rel_tol=1e-6, abs_tol=1e-300)


# ---------------------------------------------------------------------------------------
# basic contract


@pytest.mark.parametrize("p", P_VALUES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16, torch.bfloat16])
def test_per_tensor_matches_float64(dtype, p):
    shapes = [(7, 3), (100,), (), (norms.SMALL_NUMEL + 5,), (3, 4, 5)]
    params = make_params([(s, dtype) for s in shapes], seed=11)
    result = gradclip.grad_norms(params, p)
    assert_per_tensor(result, [q.grad for q in params], p)
    assert_total_is_norm_of_per_tensor(result, p)


@pytest.mark.parametrize("p", [2.0, INF, 1.0])
def test_order_skips_none_and_duplicates(p):
    params = make_params(
        [
            ((5,), torch.float32),
            None,
            ((300,), torch.float64),
            ((2, 2), torch.float16),
            None,
            ((40_000,), torch.float32),
        ],
        seed=3,
    )
    shared = torch.nn.Parameter(torch.zeros(2, 2, dtype=torch.float16))
    shared.grad = params[3].grad
    listed = [params[5], params[0], params[1], params[0], shared, params[2], params[3], params[4]]
    result = gradclip.grad_norms(listed, p)
    expected = [params[5].grad, params[0].grad, shared.grad, params[2].grad]
    assert_per_tensor(result, expected, p)
    assert result.per_tensor.dtype == torch.float64  # float64 when any gradient is 64-bit
    assert_total_is_norm_of_per_tensor(result, p)


@pytest.mark.parametrize(
    "dtypes",
    [
        [torch.float32],
        [torch.float16, torch.bfloat16],
        [torch.float32, torch.float64],
        [torch.complex64],
    ],
)
def test_dtypes_and_result(dtypes):
    params = make_params([((4, 4), d) for d in dtypes] * 2, seed=2)
    result = gradclip.grad_norms(params)
    acc = torch.float64 if torch.float64 in dtypes else torch.float32
    assert result.per_tensor.dtype == result.total.dtype == acc
    assert result.norm_type == 2.0
    torch_total = tnu.get_total_norm([q.grad for q in params])
    assert result.result().dtype == result.dtype == torch_total.dtype
    assert math.isclose(result.result().item(), torch_total.item(), rel_tol=1e-2)
    assert_per_tensor(result, [q.grad for q in params], 2.0, rtol=1e-6)


def test_no_grads():
    result = gradclip.grad_norms(make_params([None, None]))
    assert result.tensors == [] and result.per_tensor.numel() == 0
    assert torch.equal(result.total, torch.tensor(0.0))
    assert torch.equal(result.result(), tnu.get_total_norm([]))


def test_norm_type_forms():
    params = make_params([((6,), torch.float32)], seed=1)
    for norm_type, p in [("inf", INF), (True, 1.0), (torch.tensor(3.0), 3.0), ("2", 2.0)]:
        result = gradclip.grad_norms(params, norm_type)
        assert result.norm_type == p
        assert_per_tensor(result, [params[0].grad], p)


def test_does_not_modify_or_track_grads():
    params = make_params([((6, 5), torch.float32), ((40_000,), torch.float32)], seed=1)
    versions = [q.grad._version for q in params]
    result = gradclip.grad_norms(params)
    assert [q.grad._version for q in params] == versions
    assert not result.per_tensor.requires_grad and not result.total.requires_grad


# ---------------------------------------------------------------------------------------
# internal paths, through the public function


@pytest.mark.parametrize("offset", [0.0, 1e-3])  # centred, and all of one sign (a worse case)
@pytest.mark.parametrize("numel", [norms.ROWS_NUMEL - 1, norms.ROWS_NUMEL, 4 * norms.ROWS_NUMEL + 5])
@pytest.mark.usefixtures("two_threads")
def test_float32_norms_are_never_less_accurate_than_torch(numel, offset):
    """Under ROWS_NUMEL torch's own kernel measures a float32 tensor (within 2e-6 there); from
    it on, with several threads, short rows (within 1e-6): either way no worse than torch's
    ``vector_norm`` against float64."""
    grad = make_grad((numel,), torch.float32, scale=1e-3, seed=numel) + offset
    ours = gradclip.grad_norms(params_with_grads([grad, make_grad((7,), torch.float32)])).per_tensor[0]
    exact = f64_norm(grad, 2.0)
    error = abs(ours.item() - exact) / exact
    torch_error = abs(torch.linalg.vector_norm(grad).item() - exact) / exact
    assert error <= max(torch_error, 1e-7) and error <= 2e-6, (error, torch_error)
    if numel >= norms.ROWS_NUMEL:
        assert error <= 1e-6

@pytest.mark.parametrize("p", [2.0, 1.0, INF, 0.5])
@pytest.mark.parametrize(
    "numel",
    [
        norms.SMALL_NUMEL - 1,
        norms.SMALL_NUMEL,
        norms.SMALL_NUMEL + 1,
        5 * norms.ROW_LENGTH,
        5 * norms.ROW_LENGTH + 17,
        norms.ROW_LENGTH - 1,
    ],
)
def test_around_small_numel_and_row_length(numel, p):
    params = make_params([((numel,), torch.float32), ((numel,), torch.float16)], seed=numel)
    assert_per_tensor(gradclip.grad_norms(params, p), [q.grad for q in params], p)


@pytest.mark.parametrize("p", [2.0, 1.0, INF, 3.0])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("rows", [50, 400])  # small (concatenated) and large (rows view)
def test_non_contiguous_grads(rows, dtype, p):
    grads = [
        make_grad((300, rows), dtype, seed=1).t(),
        make_grad((rows, 300), dtype, seed=2)[:, ::2],
        make_grad((4, 9), dtype, seed=3).t(),
    ]
    assert not any(g.is_contiguous() for g in grads)
    params = []
    for g in grads:
        q = torch.nn.Parameter(torch.zeros(g.shape, dtype=dtype))
        q.grad = g
        assert q.grad is g and not q.grad.is_contiguous()
        params.append(q)
    assert_per_tensor(gradclip.grad_norms(params, p), grads, p)


@pytest.mark.usefixtures("two_threads")
def test_non_contiguous_large_tensor_as_accurate_as_contiguous():
    grad = torch.randn(1500, 1500, generator=torch.Generator().manual_seed(0)) * 1e-3
    for g in (grad, grad.t(), grad[:, ::2]):
        norm = gradclip.grad_norms(params_with_grads([g])).per_tensor.item()
        exact = f64_norm(g, 2.0)
        assert abs(norm - exact) / exact <= 1e-6, f"strides {g.stride()}: {norm!r} vs {exact!r}"


@pytest.mark.parametrize("with_a_plan", [False, True])
@pytest.mark.parametrize("p", [2.0, INF, 1.0, 0.5])
@pytest.mark.usefixtures("two_threads")
def test_large_tensors_with_or_without_a_plan(p, with_a_plan):
    """Fewer than MIN_CONCAT float32 tensors skip the plan; either way a large
    tensor, contiguous or not, is measured as accurately (the max norm by aminmax)."""
    large = make_grad((norms.ROWS_NUMEL // 512 + 1, 1024), torch.float32, seed=3, scale=7.0)
    grads = [make_grad((5, 7), torch.float32, seed=1), large, large.t(), large[:, ::2]]
    grads = with_plan(grads) if with_a_plan else grads
    assert planned(grads, p) is with_a_plan
    assert_per_tensor(gradclip.grad_norms(params_with_grads(grads), p), grads, p)


def test_tiny_tensors_are_concatenated_only_when_many_for_their_group():
    """A plan concatenates at least MIN_CONCAT tiny tensors, and at least one per CONCAT_SPAN
    elements of the group; other float32 groups skip the plan. The norms are the same."""
    tiny = [make_grad((100 + i,), torch.float32, seed=i) for i in range(norms.MIN_CONCAT)]
    bulk = norms.MIN_CONCAT * norms.CONCAT_SPAN
    fits = [*tiny, make_grad((bulk - 3000,), torch.float32, seed=98)]
    outweighs = [*tiny, make_grad((bulk,), torch.float32, seed=99)]
    too_few = tiny[1:] + [make_grad((5000,), torch.float32, seed=97 - i) for i in range(3)]
    assert planned(tiny) and planned(fits)
    assert not planned(outweighs) and not planned(too_few)
    for grads in (fits, outweighs):  # the 1.6M-element tensor: torch's kernel, at one thread
        assert_per_tensor(gradclip.grad_norms(params_with_grads(grads)), grads, 2.0, rtol=3e-5)


def test_one_thread_measures_float32_as_torch_does():
    """At one thread rows buy no parallelism: every float32 tensor, large ones included, goes
    through torch's own kernel, and the norms are torch's, bit for bit."""
    grads = [make_grad(shape, torch.float32, seed=i) for i, shape in
             enumerate([(3000, 700), (4 * norms.ROWS_NUMEL + 5,), (700, 3000), (64,), (5, 9)])]  # fmt: skip
    assert torch.get_num_threads() == 1
    result = gradclip.grad_norms(params_with_grads(grads))
    assert torch.equal(result.per_tensor, torch.stack(torch._foreach_norm(grads, 2.0)))
    assert torch.equal(gradclip.get_total_norm(grads), tnu.get_total_norm(grads))


@pytest.mark.parametrize("p", [2.0, INF, 1.0])
def test_many_tensors_span_several_chunks(p):
    sizes = [1 + (i * 7919) % 20_000 for i in range(60)]  # ~600k elements, several chunks
    assert sum(sizes) > 2 * norms.CHUNK_NUMEL and max(sizes) < norms.SMALL_NUMEL
    grads = [make_grad((n,), torch.float32, seed=i, scale=1 + i % 5) for i, n in enumerate(sizes)]
    result = gradclip.grad_norms(params_with_grads(grads), p)
    assert_per_tensor(result, grads, p)
    assert_total_is_norm_of_per_tensor(result, p)


@pytest.mark.parametrize("p", [2.0, INF, 0.5])
def test_mixed_1d_and_nd_small_tensors_in_one_chunk(p):
    shapes = [(12,), (3, 4), (2, 2, 3), (12,), (5,), (1, 5), (40,), (8, 5), (), (1,)] * 3
    assert len(shapes) >= norms.MIN_CONCAT  # else nothing is concatenated
    grads = [make_grad(s, torch.float32, seed=i, scale=i + 1) for i, s in enumerate(shapes)]
    assert_per_tensor(gradclip.grad_norms(params_with_grads(grads), p), grads, p)


def test_equal_sizes_become_rows_of_one_view():
    grads = [make_grad((64,), torch.float32, seed=i, scale=10.0 ** (i % 8)) for i in range(norms.MIN_CONCAT)]
    grads += [make_grad((8, 8), torch.float32, seed=50 + i) for i in range(3)]
    assert_per_tensor(gradclip.grad_norms(params_with_grads(grads)), grads, 2.0)


def test_plan_cache_same_shapes_new_values():
    shapes = [(30,), (5, 6), (norms.SMALL_NUMEL + 100,), (17,)]
    for seed in range(3):
        grads = with_plan([make_grad(s, torch.float32, seed=seed * 10 + i) for i, s in enumerate(shapes)])
        assert_per_tensor(gradclip.grad_norms(params_with_grads(grads)), grads, 2.0)


def test_plan_cache_invalidated_by_changed_shapes():
    runs = [
        [(100,), (200,), (300,)],
        [(10, 10), (200,), (300,)],  # same numels, other ndims
        [(200,), (100,), (300,)],  # same shapes, other order
        [(100,), (200,), (300,), (7,)],  # one more
        [(100,), (200,)],  # one fewer
        [(100,), (200,), (norms.SMALL_NUMEL + 1,)],  # one becomes large
    ]
    for run in runs * 2:
        grads = with_plan(
            [make_grad(s, torch.float32, seed=len(run) + i, scale=i + 1) for i, s in enumerate(run)]
        )
        assert_per_tensor(gradclip.grad_norms(params_with_grads(grads)), grads, 2.0)


@pytest.mark.usefixtures("two_threads")  # large rows only with several threads
def test_results_do_not_alias_scratch_buffers():
    shapes = [(50,), (70,), (norms.ROWS_NUMEL + 7,)]
    for with_a_plan in (True, False):  # the plan's buffers, then a few tensors' (no plan)
        grads = [make_grad(s, torch.float32, seed=i) for i, s in enumerate(shapes)]
        result = gradclip.grad_norms(params_with_grads(with_plan(grads) if with_a_plan else grads))
        kept = (result.per_tensor.clone(), result.total.clone())
        again = [make_grad(s, torch.float32, seed=10 + i) * 100 for i, s in enumerate(shapes)]
        gradclip.grad_norms(params_with_grads(with_plan(again) if with_a_plan else again))
        assert torch.equal(result.per_tensor, kept[0]) and torch.equal(result.total, kept[1])


@pytest.mark.parametrize("p", [2.0, 3.0, 1.0])
def test_float16_row_norms_overflowing_float16(p):
    # every element is finite, ~6e4; any row norm over 8192 of them exceeds 65504
    grad = (
        torch.rand(4 * norms.ROW_LENGTH + 3, generator=torch.Generator().manual_seed(0)) * 5e3 + 6e4
    ).to(torch.float16)
    grads = [grad, torch.full((10,), 6e4, dtype=torch.float16)]
    assert all(bool(g.isfinite().all()) for g in grads)
    result = gradclip.grad_norms(params_with_grads(grads), p)
    assert result.per_tensor.dtype == torch.float32
    assert bool(result.per_tensor.isfinite().all())
    assert_per_tensor(result, grads, p)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_low_precision_large_tensor_accuracy(dtype):
    # float32 accumulation over rows; each row norm rounded once to the half dtype
    grads = [make_grad((100_000,), dtype, seed=s) for s in range(3)]
    result = gradclip.grad_norms(params_with_grads(grads))
    assert_per_tensor(result, grads, 2.0)
    ours = [abs(n / f64_norm(g, 2.0) - 1) for n, g in zip(result.per_tensor.tolist(), grads, strict=True)]
    theirs = [abs(tnu.get_total_norm([g]).item() / f64_norm(g, 2.0) - 1) for g in grads]
    assert sum(ours) < sum(theirs), (ours, theirs)


@pytest.mark.parametrize("p", [-1.0, 0.0, -INF])
def test_zero_entries_for_p_le_0(p):
    grads = [torch.tensor([0.0, 2.0, -3.0]), torch.zeros(4), torch.tensor([1.0, -1.0])]
    assert_per_tensor(gradclip.grad_norms(params_with_grads(grads), p), grads, p)


# ---------------------------------------------------------------------------------------
# accuracy


@pytest.mark.usefixtures("two_threads")
def test_accuracy_ten_million_float32():
    grad = torch.randn(10_000_000, generator=torch.Generator().manual_seed(0)) * 1e-3
    exact = f64_norm(grad, 2.0)
    ours = gradclip.grad_norms(params_with_grads([grad])).total.item()
    theirs = tnu.get_total_norm([grad]).item()
    ours_err, theirs_err = abs(ours - exact) / exact, abs(theirs - exact) / exact
    print(f"relative error vs float64: gradclip {ours_err:.2e}, torch {theirs_err:.2e}")
    assert ours_err <= 1e-5
    assert ours_err < theirs_err


@pytest.mark.usefixtures("two_threads")  # large rows only with several threads
def test_threads_measuring_the_same_shapes_keep_their_own_row_buffers():
    """The large tensors' row norms go to a buffer per plan and per thread: two threads
    measuring different gradients of the same shapes at once never see each other's rows."""
    import concurrent.futures
    import sys

    shapes = [(norms.ROWS_NUMEL + 3,), (600, 700), *[(40 + i,) for i in range(norms.MIN_CONCAT)]]
    sets = [[make_grad(s, torch.float32, seed=10 * k + i, scale=10.0**k) for i, s in enumerate(shapes)]
            for k in range(2)]
    expected = [gradclip.grad_norms(params_with_grads(grads)).per_tensor.clone() for grads in sets]

    def measure(k):
        params = params_with_grads(sets[k])
        return all(torch.equal(gradclip.grad_norms(params).per_tensor, expected[k]) for _ in range(200))

    interval = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)  # switch threads between any two ops
    try:
        with concurrent.futures.ThreadPoolExecutor(2) as pool:
            assert all(pool.map(measure, [0, 1, 0, 1]))
    finally:
        sys.setswitchinterval(interval)
