"""benchmarks/cases.py: the gradient sets match the architectures they are named after.

GPT-2 against a closed form of its parameter count, ResNet against an independent
``nn.Module`` definition (torchvision's layout) built on the meta device, MLPs against
``nn.Sequential``; the float64 reference norm against ``torch.linalg.vector_norm``.
"""

from __future__ import annotations

import itertools
import math
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))
import cases

# --- GPT-2 small -----------------------------------------------------------------------


def gpt2_param_count(vocab: int, positions: int, d: int, layers: int) -> int:
    """Closed form from the architecture: embeddings, per block 12d² + 13d, final LayerNorm.

    Per block: c_attn 3d² + 3d, attn c_proj d² + d, c_fc 4d² + 4d, mlp c_proj 4d² + d, two
    LayerNorms 4d.
    """
    return vocab * d + positions * d + layers * (12 * d * d + 13 * d) + 2 * d


def test_gpt2_shapes_match_the_architecture():
    shapes = cases.gpt2_shapes()
    numel = sum(math.prod(s) for _, s in shapes)
    assert len(shapes) == 2 + 12 * 12 + 2 == 148
    assert numel == gpt2_param_count(50257, 1024, 768, 12)
    assert numel == 124_439_808  # the published GPT-2 small count (lm_head tied to wte)
    named = dict(shapes)
    assert len(named) == len(shapes)  # names are unique
    assert named["wte.weight"] == (50257, 768)
    assert named["h.11.attn.c_attn.weight"] == (768, 2304)  # Conv1D layout: (in, out)
    assert named["h.0.mlp.c_proj.weight"] == (3072, 768)
    assert "lm_head.weight" not in named


def test_gpt2_shapes_scale_with_the_config():
    shapes = cases.gpt2_shapes(vocab_size=100, n_positions=16, n_embd=8, n_layer=2)
    assert len(shapes) == 2 + 2 * 12 + 2
    assert sum(math.prod(s) for _, s in shapes) == gpt2_param_count(100, 16, 8, 2)


# --- ResNet-50: an independent nn.Module definition (torchvision's), built on "meta" ------


class Bottleneck(nn.Module):
    expansion = 4

    def __init__(self, inplanes: int, planes: int, stride: int, downsample: bool) -> None:
        super().__init__()
        width = planes * self.expansion
        self.conv1 = nn.Conv2d(inplanes, planes, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv3 = nn.Conv2d(planes, width, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(width)
        self.downsample = (
            nn.Sequential(nn.Conv2d(inplanes, width, 1, stride, bias=False), nn.BatchNorm2d(width))
            if downsample
            else None
        )


class ResNet(nn.Module):
    def __init__(self, layers: tuple[int, ...], num_classes: int = 1000) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 64, 7, 2, 3, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        inplanes = 64
        for i, (planes, blocks) in enumerate(zip((64, 128, 256, 512), layers, strict=True)):
            stride = 1 if i == 0 else 2
            stage = []
            for b in range(blocks):
                downsample = b == 0 and (stride != 1 or inplanes != planes * 4)
                stage.append(Bottleneck(inplanes, planes, stride if b == 0 else 1, downsample))
                inplanes = planes * 4
            setattr(self, f"layer{i + 1}", nn.Sequential(*stage))
        self.fc = nn.Linear(512 * 4, num_classes)


@pytest.mark.parametrize("layers", [(3, 4, 6, 3), (3, 4, 23, 3), (1, 1, 1, 1)])
def test_resnet_shapes_match_the_module(layers):
    with torch.device("meta"):
        model = ResNet(layers)
    expected = [(name, tuple(p.shape)) for name, p in model.named_parameters()]
    assert cases.resnet50_shapes(layers) == expected


def test_resnet50_counts():
    with torch.device("meta"):
        model = ResNet((3, 4, 6, 3))
    shapes = cases.resnet50_shapes()
    numel = sum(math.prod(s) for _, s in shapes)
    assert len(shapes) == len(list(model.parameters())) == 161
    assert numel == sum(p.numel() for p in model.parameters()) == 25_557_032


# --- MLPs: nn.Sequential(Linear, ReLU, Linear, ...) --------------------------------------


@pytest.mark.parametrize("sizes", [(4, 4, 1), (784, 256, 10), (128,) * 7, (3, 5)])
def test_mlp_shapes_match_nn_sequential(sizes):
    layers: list[nn.Module] = []
    for fan_in, fan_out in itertools.pairwise(sizes):
        layers += [nn.Linear(fan_in, fan_out), nn.ReLU()]
    with torch.device("meta"):
        model = nn.Sequential(*layers[:-1])
    expected = [(name, tuple(p.shape)) for name, p in model.named_parameters()]
    assert cases.mlp_shapes(*sizes) == expected


def test_mlp_shapes_need_two_sizes():
    with pytest.raises(ValueError, match="at least an input and an output size"):
        cases.mlp_shapes(4)


# --- gradient sets ---------------------------------------------------------------------


def test_case_registry_and_quick_cases():
    assert set(cases.CASES) == {"gpt2", "gpt2-bf16", "resnet50", "tiny2000", "huge100M"}
    assert cases.CASES["gpt2-bf16"].dtype == torch.bfloat16
    assert set(cases.QUICK_CASES) <= set(cases.CASES)
    assert [math.prod(s) for _, s in cases.CASES["huge100M"].shapes()] == [100_000_000]


def test_make_grad_set_tiny2000():
    gs = cases.make_grad_set("tiny2000")
    assert (gs.n_tensors, gs.numel, gs.dtype) == (2000, 2_000_000, torch.float32)
    assert all(isinstance(p, nn.Parameter) and p.grad.shape == p.shape for p in gs.params)
    std = torch.cat([p.grad for p in gs.params]).std().item()
    assert std == pytest.approx(1e-3, rel=0.01)


def test_make_grad_set_custom_and_seeded():
    shapes = [("w", (5, 7)), ("b", (7,))]
    a = cases.make_grad_set("x", shapes, torch.bfloat16, seed=3)
    b = cases.make_grad_set("x", shapes, torch.bfloat16, seed=3)
    assert [p.grad.dtype for p in a.params] == [torch.bfloat16] * 2
    assert [tuple(p.shape) for p in a.params] == [(5, 7), (7,)]
    assert all(torch.equal(p.grad, q.grad) for p, q in zip(a.params, b.params, strict=True))


def test_make_grad_set_unknown_case():
    with pytest.raises(ValueError, match="tiny2000"):
        cases.make_grad_set("gpt3")


@pytest.mark.parametrize("p", [1.0, 2.0, 3.0, math.inf])
def test_reference_norm_matches_float64(p):
    tensors = [torch.randn(1000), torch.randn(7, 13), torch.randn(3).to(torch.bfloat16)]
    expected = torch.linalg.vector_norm(torch.cat([t.double().flatten() for t in tensors]), p)
    got = cases.reference_norm(tensors, p, chunk=64)  # many chunks per tensor
    assert got == pytest.approx(expected.item(), rel=1e-12)


def test_reference_norm_refuses_p_not_positive():
    with pytest.raises(ValueError, match="must be > 0"):
        cases.reference_norm([torch.ones(3)], 0.0)
