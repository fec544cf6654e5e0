"""AGC against the paper's formula (a per-unit float64 loop) and against timm's implementation.

The reference below is written from Brock et al. 2021, §4.1, in PyTorch's layout: for each
row i along dim 0 of a weight (each whole 0-dim/1-D tensor), if ‖G_i‖ > λ·max(‖W_i‖, ε) then
G_i ← G_i · λ·max(‖W_i‖, ε) / ‖G_i‖.
"""

from __future__ import annotations

import importlib.util
import io
import math
import warnings
from pathlib import Path
from types import ModuleType

import pytest
import torch
from torch import nn

import gradclip
from gradclip.clippers.agc import AGC, LAST_LINEAR
from host_reads import HostReadDetector


def reference_agc(
    named: list[tuple[str, nn.Parameter]], clipping: float, eps: float, exclude: set[str] = frozenset()
) -> dict[str, torch.Tensor]:
    """The paper's rule, one unit at a time, in float64."""
    out = {}
    for name, p in named:
        g = p.grad.detach().double().clone()
        w = p.detach().double()
        if name in exclude:
            out[name] = g
            continue
        units = [(g, w)] if g.dim() <= 1 else [(g[i], w[i]) for i in range(g.shape[0])]
        for gi, wi in units:
            max_norm = clipping * max(float(wi.norm()), eps)
            norm = float(gi.norm())
            if norm > max_norm:
                gi.mul_(max_norm / norm)
        out[name] = g
    return out


class Net(nn.Module):
    """Every kind of unit: Linear rows, Conv2d channels, Embedding rows, biases, norm gains."""

    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(40, 12)
        self.conv = nn.Conv2d(3, 16, 3, padding=1)
        self.bn = nn.BatchNorm2d(16)
        self.big = nn.Linear(16 * 4 * 4, 300)  # 76,800 elements: measured on its own
        self.mix = nn.Linear(300 + 12, 24)
        self.ln = nn.LayerNorm(24)
        self.gain = nn.Parameter(torch.tensor(0.5))  # 0-dim
        self.head = nn.Linear(24, 5)

    def forward(self, image: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.bn(self.conv(image))).flatten(1)
        x = torch.cat([torch.relu(self.big(x)), self.emb(tokens).mean(1)], dim=1)
        return self.head(self.ln(self.mix(x)) * self.gain)


def _net_with_grads(seed: int = 0, dtype: torch.dtype = torch.float32, scale: float = 1.0) -> Net:
    torch.manual_seed(seed)
    net = Net()
    image, tokens = torch.randn(4, 3, 4, 4), torch.randint(0, 40, (4, 5))
    (net(image, tokens).square().sum() * scale).backward()
    # Some units with large gradients and some with tiny weights, so that both branches of
    # the rule and the eps floor are exercised.
    with torch.no_grad():
        net.big.weight.grad[:7] *= 50
        net.mix.weight[3].zero_()
        net.conv.weight[2] *= 1e-5
    return net.to(dtype)


def _named(net: nn.Module) -> list[tuple[str, nn.Parameter]]:
    return list(net.named_parameters())


def _assert_grads_close(
    net: nn.Module, expected: dict[str, torch.Tensor], rtol: float, atol: float = 1e-30
) -> None:
    """Each gradient within ``rtol`` of its largest reference element (plus ``atol``)."""
    for name, p in net.named_parameters():
        ref = expected[name]
        scale = ref.abs().max().item() or 1.0
        diff = (p.grad.double() - ref).abs().max().item()
        assert diff <= rtol * scale + atol, (name, diff, scale)


# -- the formula ---------------------------------------------------------------------------


@pytest.mark.parametrize("clipping", [0.01, 0.1, 1.0])
def test_matches_the_per_unit_reference(clipping: float) -> None:
    net = _net_with_grads()
    expected = reference_agc(_named(net), clipping, 1e-3)
    before = {n: p.grad.double().norm().item() for n, p in net.named_parameters()}
    stats = AGC(clipping, exclude=None)(net)
    _assert_grads_close(net, expected, rtol=2e-6)
    pre = math.sqrt(sum(v * v for v in before.values()))
    post = math.sqrt(sum(float(g.square().sum()) for g in expected.values()))
    assert float(stats.norm) == pytest.approx(pre, rel=1e-5)
    assert float(stats.post_norm) == pytest.approx(post, rel=1e-5)
    assert float(stats.coef) == pytest.approx(post / pre, rel=1e-5)
    assert float(stats.threshold) == pytest.approx(clipping, rel=1e-7)
    assert bool(stats.clipped)


def test_eps_floors_the_weight_norm() -> None:
    net = _net_with_grads()
    expected = reference_agc(_named(net), 0.05, 0.5)
    AGC(0.05, eps=0.5, exclude=None)(net)
    _assert_grads_close(net, expected, rtol=2e-6)


def test_default_excludes_the_last_linear_of_the_module() -> None:
    net = _net_with_grads()
    head = {"head.weight": net.head.weight.grad.clone(), "head.bias": net.head.bias.grad.clone()}
    expected = reference_agc(_named(net), 0.01, 1e-3, exclude=set(head))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        AGC()(net)
    _assert_grads_close(net, expected, rtol=2e-6)
    assert all(torch.equal(getattr(net.head, k.split(".")[1]).grad, v) for k, v in head.items())
    assert repr(AGC().exclude) == "LAST_LINEAR" and AGC().exclude is LAST_LINEAR


def test_default_excludes_a_tied_head_by_identity() -> None:
    torch.manual_seed(0)
    emb, body, head = nn.Embedding(30, 8), nn.Linear(8, 8), nn.Linear(8, 30, bias=False)
    head.weight = emb.weight  # tied: named_parameters() lists it once, as "0.weight"
    model = nn.Sequential(emb, body, head)
    model(torch.randint(0, 30, (4, 3))).square().sum().backward()
    tied = emb.weight.grad.clone()
    expected = reference_agc(_named(model), 0.01, 1e-3, exclude={"0.weight"})
    AGC()(model)
    assert torch.equal(emb.weight.grad, tied)
    _assert_grads_close(model, expected, rtol=2e-6)


@pytest.mark.parametrize(
    "exclude",
    [("head.*",), "head.*", ["head.weight", "head.bias"], lambda name, p: name.startswith("head.")],
    ids=["patterns", "one-pattern", "names", "callable"],
)
def test_exclusion_rules(exclude: object) -> None:
    net = _net_with_grads()
    expected = reference_agc(_named(net), 0.01, 1e-3, exclude={"head.weight", "head.bias"})
    AGC(exclude=exclude)(dict(net.named_parameters()))
    _assert_grads_close(net, expected, rtol=2e-6)


def test_without_a_module_nothing_is_excluded_and_it_warns_once() -> None:
    net = _net_with_grads()
    expected = reference_agc(_named(net), 0.01, 1e-3)
    clipper = AGC()
    with pytest.warns(UserWarning, match="excluded nothing.*on parameters"):
        clipper(list(net.parameters()))
    _assert_grads_close(net, expected, rtol=2e-6)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        clipper(list(net.parameters()))
        AGC(exclude=None)(list(net.parameters()))
    model = nn.Sequential(nn.Conv2d(2, 3, 1))
    model(torch.randn(1, 2, 2, 2)).sum().backward()
    with pytest.warns(UserWarning, match="no nn.Linear"):
        AGC()(model)


# -- timm ------------------------------------------------------------------------------------


def _timm_agc() -> ModuleType:
    """timm's ``timm/utils/agc.py``, loaded from its file.

    ``import timm.utils`` imports torchvision (through ``timm.layers``), which is not
    installed here; the AGC module itself only imports torch, so it is loaded on its own.
    """
    spec = importlib.util.find_spec("timm")
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("timm is not installed (pip install timm --no-deps)")
    path = Path(next(iter(spec.submodule_search_locations))) / "utils" / "agc.py"
    if not path.exists():
        pytest.skip(f"this timm has no {path}")
    module_spec = importlib.util.spec_from_file_location("_timm_utils_agc", path)
    assert module_spec is not None and module_spec.loader is not None
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("clipping", [0.01, 0.2])
def test_matches_timm(clipping: float) -> None:
    timm_agc = _timm_agc()
    ours, theirs = _net_with_grads(), _net_with_grads()
    AGC(clipping, exclude=None)(ours)
    timm_agc.adaptive_clip_grad(list(theirs.parameters()), clip_factor=clipping, eps=1e-3)
    for (name, p), q in zip(ours.named_parameters(), theirs.parameters(), strict=True):
        torch.testing.assert_close(p.grad, q.grad, rtol=2e-6, atol=1e-12, msg=name)


# -- layouts, dtypes, edge cases -------------------------------------------------------------


def test_any_memory_layout_and_degenerate_shapes() -> None:
    torch.manual_seed(1)
    shapes = {"cl": (8, 4, 3, 3), "scalar": (), "empty_rows": (0, 5), "empty_cols": (4, 0),
              "small": (6, 5), "same_row_length": (3, 5), "vector": (7,)}
    params = {n: nn.Parameter(torch.randn(s) * 0.1) for n, s in shapes.items()}
    for p in params.values():
        p.grad = torch.randn(p.shape)
    # channels_last weight and gradient: non-contiguous in the row view.
    cl = params["cl"]
    cl.data = cl.data.to(memory_format=torch.channels_last)
    cl.grad = cl.grad.to(memory_format=torch.channels_last)
    assert not cl.grad.is_contiguous()
    expected = reference_agc(list(params.items()), 0.05, 1e-3)
    AGC(0.05, exclude=None)(params)
    for name, p in params.items():
        torch.testing.assert_close(p.grad.double(), expected[name], rtol=2e-6, atol=1e-12, msg=name)
    assert not cl.grad.is_contiguous()  # scaled in place, layout kept


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_low_precision_gradients(dtype: torch.dtype) -> None:
    net = _net_with_grads(dtype=dtype)
    expected = reference_agc(_named(net), 0.01, 1e-3)
    weights = {n: p.detach().double() for n, p in net.named_parameters()}
    stats = AGC(exclude=None)(net)
    assert bool(stats.finite) and stats.norm.dtype == torch.float32
    # Unit norms are measured to the dtype's precision; the result is rounded once more
    # (float16 subnormals below 6e-5 have a fixed spacing of 6e-8).
    info = torch.finfo(dtype)
    _assert_grads_close(net, expected, rtol=4 * info.eps, atol=2 * info.smallest_normal * info.eps)
    for name, p in net.named_parameters():
        assert p.grad.dtype == dtype
        g = p.grad.double()
        units = [(g, weights[name])] if g.dim() <= 1 else list(zip(g, weights[name], strict=True))
        for gi, wi in units:  # rounding never lifts a unit above its max_norm (to its dtype)
            limit = 0.01 * max(float(wi.norm()), 1e-3)
            assert float(gi.norm()) <= limit * (1 + 2 * torch.finfo(dtype).eps) or float(
                gi.norm()
            ) <= float(expected[name].norm()) * (1 + 1e-6)


def test_unclipped_gradients_are_not_rewritten_on_cpu() -> None:
    net = _net_with_grads()
    AGC(1e6, exclude=None)(net)  # nothing can reach a ratio of 1e6
    versions = {n: p.grad._version for n, p in net.named_parameters()}
    values = {n: p.grad.clone() for n, p in net.named_parameters()}
    stats = AGC(1e6, exclude=None)(net)
    assert not bool(stats.clipped) and float(stats.coef) == 1.0
    for n, p in net.named_parameters():
        assert p.grad._version == versions[n] and torch.equal(p.grad, values[n])
    AGC(0.01, exclude=None)(net)
    assert net.big.weight.grad._version > versions["big.weight"]


def test_nonfinite_gradients() -> None:
    net = _net_with_grads()
    net.big.weight.grad[5, 0] = float("nan")
    clean = {n: p.grad.clone() for n, p in net.named_parameters()}
    stats = AGC(nonfinite="skip", exclude=None)(net)
    assert bool(stats.skipped) and not bool(stats.finite) and not bool(stats.clipped)
    for name, p in net.named_parameters():
        torch.testing.assert_close(p.grad, clean[name], rtol=0, atol=0, equal_nan=True)
    expected = reference_agc(_named(net), 0.01, 1e-3)  # NaN unit: NaN > x is False, kept
    stats = AGC(exclude=None)(net)
    assert not bool(stats.finite) and not bool(stats.skipped)
    for name, p in net.named_parameters():
        torch.testing.assert_close(p.grad.double(), expected[name], rtol=2e-6, atol=1e-12,
                                   equal_nan=True, msg=name)
    assert torch.isnan(net.big.weight.grad[5]).sum() == 1


def test_one_pass_gives_the_engine_norms() -> None:
    """AGC measures unit norms and derives the per-tensor norms from them (one pass): they
    equal the engine's, and so does the total (to the engine's float32 accuracy: under
    ROWS_NUMEL elements it is torch's kernel, within 2e-6)."""
    net = _net_with_grads()
    engine = gradclip.grad_norms(list(net.parameters()))
    measured = AGC(exclude=("head.*",))(net).norms
    torch.testing.assert_close(measured.per_tensor, engine.per_tensor, rtol=2e-6, atol=0)
    torch.testing.assert_close(measured.total, engine.total, rtol=2e-6, atol=0)
    assert measured.dtype == engine.dtype and measured.groups.keys() == engine.groups.keys()
    assert AGC(exclude=None)([]).norms.total == 0


# -- protocol --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kwargs", "name"),
    [
        ({"clipping": 0.0}, "clipping"),
        ({"clipping": -0.01}, "clipping"),
        ({"clipping": float("nan")}, "clipping"),
        ({"clipping": "0.01"}, "clipping"),
        ({"eps": -1e-3}, "eps"),
        ({"eps": float("nan")}, "eps"),
        ({"nonfinite": "ignore"}, "nonfinite"),
    ],
)
def test_bad_arguments_name_the_argument(kwargs: dict, name: str) -> None:
    with pytest.raises(ValueError, match=name):
        AGC(**kwargs)


@pytest.mark.parametrize("exclude", [3, ["fc.*", 1]])
def test_exclude_of_the_wrong_type_is_a_type_error(exclude: object) -> None:
    with pytest.raises(TypeError, match="exclude"):
        AGC(exclude=exclude)


def test_state_dict_round_trip_through_torch_save() -> None:
    for exclude in (LAST_LINEAR, ("b.*", "a.*"), None, lambda n, p: False):
        clipper = AGC(0.02, exclude=exclude)
        clipper(_net_with_grads())
        buffer = io.BytesIO()
        torch.save(clipper.state_dict(), buffer)
        buffer.seek(0)
        other = AGC(0.02, exclude=exclude)
        other.load_state_dict(torch.load(buffer, weights_only=True))
        assert int(other.steps) == 1
    assert AGC(exclude={"b.*", "a.*"}).config()["exclude"] == ("a.*", "b.*")
    with pytest.raises(ValueError, match="exclude"):
        AGC(exclude=None).load_state_dict(AGC().state_dict())
    assert "clipping=0.01" in repr(AGC()) and "LAST_LINEAR" in repr(AGC())


@pytest.mark.parametrize("nonfinite", ["propagate", "skip"])
def test_no_host_sync_on_accelerators(nonfinite: str, accelerator_path) -> None:
    net = _net_with_grads()
    expected = reference_agc(_named(net), 0.01, 1e-3, exclude={"head.weight", "head.bias"})
    clipper = AGC(nonfinite=nonfinite)
    with HostReadDetector() as mode:
        clipper(net)
    assert mode.reads == []
    _assert_grads_close(net, expected, rtol=2e-6)
    with HostReadDetector() as mode:  # a second call: cached plan
        clipper(net)
    assert mode.reads == []


def test_host_read_detector_is_not_vacuous() -> None:
    net = _net_with_grads()
    with HostReadDetector() as mode:
        AGC(exclude=None)(net)  # on the CPU, unclipped tensors are found by a (free) read
    assert mode.reads
