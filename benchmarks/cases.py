"""Gradient sets for the benchmarks: real model shapes, built without downloads.

GPT-2 small (fp32 and bf16), ResNet-50, 2,000 tiny tensors, one 100M-element tensor
(:data:`CASES`, :func:`make_grad_set`), plus MLP shapes for the small-model ladder
(:func:`mlp_shapes`). Gradients are random normal, std 1e-3, on ``nn.Parameter``\\ s, with a
fixed seed; :func:`reference_norm` is the float64 norm they are checked against.

The scripts of this folder import it by name (``python benchmarks/bench_clip.py`` puts this
folder first on ``sys.path``).

Example:
    >>> import cases
    >>> gs = cases.make_grad_set("demo", [("w", (64, 64)), ("b", (64,))])
    >>> gs.n_tensors, gs.numel
    (2, 4160)
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

__all__ = [
    "CASES",
    "QUICK_CASES",
    "Case",
    "GradSet",
    "NamedShapes",
    "Shape",
    "gpt2_shapes",
    "make_grad_set",
    "mlp_shapes",
    "reference_norm",
    "resnet50_shapes",
]

Shape = tuple[int, ...]
NamedShapes = list[tuple[str, Shape]]


def gpt2_shapes(
    vocab_size: int = 50257, n_positions: int = 1024, n_embd: int = 768, n_layer: int = 12
) -> NamedShapes:
    """Parameter names and shapes of GPT-2 (defaults: GPT-2 small), in module order.

    The layout of Hugging Face's ``GPT2Model``: the attention and MLP projections are
    ``Conv1D`` layers, whose weights are stored ``(in, out)``. The LM head is tied to
    ``wte`` and is not a separate tensor. GPT-2 small: 148 tensors, 124,439,808 elements.

    References:
        Radford et al., "Language Models are Unsupervised Multitask Learners", 2019.

    Example:
        >>> import cases
        >>> len(cases.gpt2_shapes()), cases.gpt2_shapes()[0]
        (148, ('wte.weight', (50257, 768)))
    """
    d = n_embd
    shapes: NamedShapes = [("wte.weight", (vocab_size, d)), ("wpe.weight", (n_positions, d))]
    for i in range(n_layer):
        h = f"h.{i}."
        shapes += [
            (h + "ln_1.weight", (d,)),
            (h + "ln_1.bias", (d,)),
            (h + "attn.c_attn.weight", (d, 3 * d)),
            (h + "attn.c_attn.bias", (3 * d,)),
            (h + "attn.c_proj.weight", (d, d)),
            (h + "attn.c_proj.bias", (d,)),
            (h + "ln_2.weight", (d,)),
            (h + "ln_2.bias", (d,)),
            (h + "mlp.c_fc.weight", (d, 4 * d)),
            (h + "mlp.c_fc.bias", (4 * d,)),
            (h + "mlp.c_proj.weight", (4 * d, d)),
            (h + "mlp.c_proj.bias", (d,)),
        ]
    return [*shapes, ("ln_f.weight", (d,)), ("ln_f.bias", (d,))]


def _batch_norm(name: str, channels: int) -> NamedShapes:
    return [(name + ".weight", (channels,)), (name + ".bias", (channels,))]


def resnet50_shapes(layers: Sequence[int] = (3, 4, 6, 3), num_classes: int = 1000) -> NamedShapes:
    """Parameter names and shapes of a bottleneck ResNet (defaults: ResNet-50), in module order.

    The layout of torchvision's ``resnet50``: a 7x7 stem, four stages of bottleneck blocks
    (1x1, 3x3, 1x1 convolutions without bias, each followed by batch norm; expansion 4), a
    1x1 projection shortcut in each stage's first block, and a ``fc`` head. ResNet-50:
    161 tensors, 25,557,032 elements. ``layers=(3, 4, 23, 3)`` gives ResNet-101.

    References:
        He et al., "Deep Residual Learning for Image Recognition", CVPR 2016.

    Example:
        >>> import cases
        >>> len(cases.resnet50_shapes()), cases.resnet50_shapes()[-2]
        (161, ('fc.weight', (1000, 2048)))
    """
    expansion = 4
    shapes: NamedShapes = [("conv1.weight", (64, 3, 7, 7)), *_batch_norm("bn1", 64)]
    inplanes = 64
    for stage, (planes, blocks) in enumerate(zip((64, 128, 256, 512), layers, strict=True), 1):
        width = planes * expansion
        for b in range(blocks):
            pre = f"layer{stage}.{b}."
            shapes += [
                (pre + "conv1.weight", (planes, inplanes, 1, 1)),
                *_batch_norm(pre + "bn1", planes),
                (pre + "conv2.weight", (planes, planes, 3, 3)),
                *_batch_norm(pre + "bn2", planes),
                (pre + "conv3.weight", (width, planes, 1, 1)),
                *_batch_norm(pre + "bn3", width),
            ]
            if b == 0:  # the channel count (and the stride) changes: projection shortcut
                shapes += [
                    (pre + "downsample.0.weight", (width, inplanes, 1, 1)),
                    *_batch_norm(pre + "downsample.1", width),
                ]
            inplanes = width
    return [*shapes, ("fc.weight", (num_classes, inplanes)), ("fc.bias", (num_classes,))]


def mlp_shapes(*sizes: int) -> NamedShapes:
    """Parameter names and shapes of ``nn.Sequential`` of ``nn.Linear(sizes[i], sizes[i+1])``.

    The names are those of ``nn.Sequential(Linear, ReLU, Linear, ...)``: an activation sits
    between two linear layers, so the linear layers are modules 0, 2, 4, ...

    Example:
        >>> import cases
        >>> cases.mlp_shapes(4, 4, 1)
        [('0.weight', (4, 4)), ('0.bias', (4,)), ('2.weight', (1, 4)), ('2.bias', (1,))]
    """
    if len(sizes) < 2:
        raise ValueError(f"`sizes` needs at least an input and an output size, got {sizes}")
    shapes: NamedShapes = []
    for i, (fan_in, fan_out) in enumerate(itertools.pairwise(sizes)):
        shapes += [(f"{2 * i}.weight", (fan_out, fan_in)), (f"{2 * i}.bias", (fan_out,))]
    return shapes


def _tiny2000_shapes() -> NamedShapes:
    return [(f"t{i}", (1000,)) for i in range(2000)]


def _huge100m_shapes() -> NamedShapes:
    return [("huge", (100_000_000,))]


@dataclass(frozen=True)
class Case:
    """A standard gradient set: how to get its shapes, its dtype and a one-line description."""

    name: str
    shapes: Callable[[], NamedShapes]
    dtype: torch.dtype
    description: str


CASES: dict[str, Case] = {
    c.name: c
    for c in (
        Case("gpt2", gpt2_shapes, torch.float32, "GPT-2 small, 148 tensors, 124.4M fp32"),
        Case("gpt2-bf16", gpt2_shapes, torch.bfloat16, "GPT-2 small, 148 tensors, 124.4M bf16"),
        Case("resnet50", resnet50_shapes, torch.float32, "ResNet-50, 161 tensors, 25.6M fp32"),
        Case("tiny2000", _tiny2000_shapes, torch.float32, "2,000 tensors of 1,000 fp32"),
        Case("huge100M", _huge100m_shapes, torch.float32, "one tensor of 100M fp32"),
    )
}
"""The standard gradient sets, by name."""

QUICK_CASES = ("gpt2", "resnet50", "tiny2000")
"""The cases a quick run (``harness.config(quick=True)``) measures."""


@dataclass(frozen=True)
class GradSet:
    """Parameters with random ``.grad``: the input of one benchmark case.

    Attributes:
        name: the case name.
        params: the parameters; ``p.grad`` is random normal, ``p``'s own data is
            uninitialised (clipping never reads it, and untouched memory costs no RAM).
        dtype: dtype of every gradient.

    Example:
        >>> import cases
        >>> gs = cases.make_grad_set("demo", [("w", (3, 4))])
        >>> gs.numel, gs.n_tensors, gs.params[0].grad.shape
        (12, 1, torch.Size([3, 4]))
    """

    name: str
    params: list[torch.nn.Parameter]
    dtype: torch.dtype

    @property
    def n_tensors(self) -> int:
        """Number of gradient tensors."""
        return len(self.params)

    @property
    def numel(self) -> int:
        """Total number of gradient elements."""
        return sum(p.numel() for p in self.params)


def make_grad_set(
    name: str,
    shapes: NamedShapes | None = None,
    dtype: torch.dtype | None = None,
    *,
    std: float = 1e-3,
    seed: int = 0,
) -> GradSet:
    """Build a :class:`GradSet`: one ``nn.Parameter`` per shape, ``.grad`` ~ N(0, std²).

    Args:
        name: a key of :data:`CASES`, or any label when ``shapes`` is given.
        shapes: ``(name, shape)`` pairs; default: the case's own shapes.
        dtype: gradient dtype; default: the case's dtype, else float32.
        std: standard deviation of the gradients.
        seed: seed of the generator, so a case is the same in every run.

    Example:
        >>> import cases
        >>> cases.make_grad_set("resnet50").n_tensors
        161
    """
    case = CASES.get(name)
    if shapes is None:
        if case is None:
            raise ValueError(f"unknown case {name!r}; pass one of {sorted(CASES)} or give `shapes`")
        shapes = case.shapes()
    if dtype is None:
        dtype = case.dtype if case is not None else torch.float32
    generator = torch.Generator().manual_seed(seed)
    params = []
    for _, shape in shapes:
        param = torch.nn.Parameter(torch.empty(shape, dtype=dtype))
        param.grad = torch.empty(shape, dtype=dtype).normal_(0.0, std, generator=generator)
        params.append(param)
    return GradSet(name, params, dtype)


def reference_norm(tensors: Sequence[Tensor], norm_type: float, chunk: int = 1 << 20) -> float:
    """The ``norm_type``-norm of all elements of ``tensors``, accumulated in float64.

    Each tensor is read in chunks of ``chunk`` elements, so no full-size float64 copy is
    made. For ``p > 0`` the norm of the per-tensor norms (torch's total) equals the norm of
    all elements, which is what this computes.

    Example:
        >>> import torch, cases
        >>> cases.reference_norm([torch.tensor([3.0]), torch.tensor([4.0])], 2.0)
        5.0
    """
    if not norm_type > 0:
        raise ValueError(f"`norm_type` must be > 0 for a reference norm, got {norm_type}")
    total = 0.0
    for t in tensors:
        flat = t.detach().reshape(-1)
        for start in range(0, flat.numel(), chunk):
            part = flat[start : start + chunk].to(torch.float64).abs()
            if math.isinf(norm_type):
                total = max(total, part.max().item())
            else:
                total += part.pow(norm_type).sum().item()
    return total if math.isinf(norm_type) else total ** (1.0 / norm_type)
