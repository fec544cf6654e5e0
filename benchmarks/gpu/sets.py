"""Gradient sets of the GPU benchmark: shapes from the published model configs, no downloads.

* ``gpt2``: GPT-2 small (``cases.gpt2_shapes``), fp32.
* ``llama1b-bf16`` / ``-fp32``: Llama-3.2-1B (16 layers, tied head), 146 tensors, 1.236B.
* ``llama8b-bf16`` / ``-fp32``: a Llama-3-8B layer stack: embeddings, ``layers`` decoder
  layers (all 32 by default), final norm and LM head; 291 tensors and 8.03B with 32 layers.
* ``moe10k``: 10,000 small tensors, 2,500 MoE-like experts of (w1, b1, w2, b2), fp32, 41.4M.

``smoke=True`` gives each set the same layout at toy sizes, for the CPU run that proves the
script works end to end.

Example:
    >>> from gpu import sets
    >>> spec = sets.SETS["llama1b-bf16"]
    >>> len(spec.shapes()), sum(math.prod(s) for _, s in spec.shapes())
    (146, 1235814400)
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

import cases

__all__ = ["LLAMA_3_2_1B", "LLAMA_3_8B", "SETS", "SetSpec", "llama_shapes", "make_params", "moe_shapes",
           "set_specs"]

NamedShapes = list[tuple[str, tuple[int, ...]]]

# config.json of meta-llama/Llama-3.2-1B and meta-llama/Meta-Llama-3-8B
LLAMA_3_2_1B = {"vocab": 128256, "hidden": 2048, "intermediate": 8192, "layers": 16,
                "heads": 32, "kv_heads": 8, "head_dim": 64, "tied": True}
LLAMA_3_8B = {"vocab": 128256, "hidden": 4096, "intermediate": 14336, "layers": 32,
              "heads": 32, "kv_heads": 8, "head_dim": 128, "tied": False}


def llama_shapes(vocab: int, hidden: int, intermediate: int, layers: int, heads: int,
                 kv_heads: int, head_dim: int, tied: bool) -> NamedShapes:
    """Parameter names and shapes of a Llama decoder (Hugging Face ``LlamaForCausalLM``
    layout, module order); ``tied``: the LM head is the embedding (no tensor of its own).

    Example:
        >>> from gpu import sets
        >>> len(sets.llama_shapes(**sets.LLAMA_3_8B))
        291
    """
    q, kv = heads * head_dim, kv_heads * head_dim
    shapes: NamedShapes = [("model.embed_tokens.weight", (vocab, hidden))]
    for i in range(layers):
        pre = f"model.layers.{i}."
        shapes += [
            (pre + "self_attn.q_proj.weight", (q, hidden)),
            (pre + "self_attn.k_proj.weight", (kv, hidden)),
            (pre + "self_attn.v_proj.weight", (kv, hidden)),
            (pre + "self_attn.o_proj.weight", (hidden, q)),
            (pre + "mlp.gate_proj.weight", (intermediate, hidden)),
            (pre + "mlp.up_proj.weight", (intermediate, hidden)),
            (pre + "mlp.down_proj.weight", (hidden, intermediate)),
            (pre + "input_layernorm.weight", (hidden,)),
            (pre + "post_attention_layernorm.weight", (hidden,)),
        ]
    shapes.append(("model.norm.weight", (hidden,)))
    if not tied:
        shapes.append(("lm_head.weight", (vocab, hidden)))
    return shapes


def moe_shapes(experts: int = 2500, d_model: int = 64, d_ff: int = 128) -> NamedShapes:
    """``4 * experts`` small tensors: each expert's ``w1 (d_ff, d_model)``, ``b1``,
    ``w2 (d_model, d_ff)``, ``b2`` (the per-tensor overhead case).

    Example:
        >>> from gpu import sets
        >>> len(sets.moe_shapes()), sum(math.prod(s) for _, s in sets.moe_shapes())
        (10000, 41440000)
    """
    shapes: NamedShapes = []
    for e in range(experts):
        pre = f"experts.{e}."
        shapes += [(pre + "w1", (d_ff, d_model)), (pre + "b1", (d_ff,)),
                   (pre + "w2", (d_model, d_ff)), (pre + "b2", (d_model,))]
    return shapes


@dataclass(frozen=True)
class SetSpec:
    """One gradient set: its shapes, gradient dtype, whether the clip + AdamW step is
    measured on it, and a one-line description (with the real element count)."""

    name: str
    shapes: Callable[[], NamedShapes]
    dtype: torch.dtype
    step: bool
    description: str
    large: bool = field(default=True)  # a bandwidth set (the >= 85% of copy target)


def set_specs(*, smoke: bool = False, llama8b_layers: int = 32, moe_tensors: int = 10_000
              ) -> dict[str, SetSpec]:
    """The benchmark's sets, in the order they run (the targets' sets first)."""
    if smoke:  # the same layouts at toy sizes
        gpt2 = {"vocab_size": 1000, "n_positions": 64, "n_embd": 64, "n_layer": 1}
        small = {"vocab": 1000, "hidden": 64, "intermediate": 256, "layers": 1,
                 "heads": 4, "kv_heads": 2, "head_dim": 16, "tied": True}
        big = {**small, "hidden": 128, "intermediate": 448, "head_dim": 32, "tied": False}
        experts, d_model, d_ff = max(1, moe_tensors // 4), 8, 16
    else:
        gpt2, small = {}, LLAMA_3_2_1B
        big = {**LLAMA_3_8B, "layers": llama8b_layers}
        experts, d_model, d_ff = moe_tensors // 4, 64, 128

    def count(shapes: NamedShapes) -> str:
        n = sum(math.prod(s) for _, s in shapes)
        return f"{len(shapes)} tensors, {n / 1e6:,.1f}M"

    g, s, b = (lambda: cases.gpt2_shapes(**gpt2)), (lambda: llama_shapes(**small)), (
        lambda: llama_shapes(**big))
    m = lambda: moe_shapes(experts, d_model, d_ff)  # noqa: E731
    layers = f"{big['layers']} of 32 layers" if not smoke else "toy"
    specs = [
        SetSpec("gpt2", g, torch.float32, True, f"GPT-2 small, {count(g())}, fp32"),
        SetSpec("llama1b-bf16", s, torch.bfloat16, True, f"Llama-3.2-1B, {count(s())}, bf16"),
        SetSpec("moe10k", m, torch.float32, False, f"MoE-like experts, {count(m())}, fp32",
                large=False),
        SetSpec("llama1b-fp32", s, torch.float32, False, f"Llama-3.2-1B, {count(s())}, fp32"),
        SetSpec("llama8b-bf16", b, torch.bfloat16, False,
                f"Llama-3-8B stack ({layers}), {count(b())}, bf16"),
        SetSpec("llama8b-fp32", b, torch.float32, False,
                f"Llama-3-8B stack ({layers}), {count(b())}, fp32"),
    ]
    return {spec.name: spec for spec in specs}


SETS = set_specs()
"""The full-size sets (all 32 layers of the 8B stack)."""


def make_params(spec: SetSpec, device: torch.device, seed: int) -> list[torch.nn.Parameter]:
    """The set's parameters (N(0, 0.02)) with gradients (N(0, 1e-3)), drawn on ``device``."""
    gen = torch.Generator(device=device).manual_seed(seed)
    params = []
    for _, shape in spec.shapes():
        p = torch.nn.Parameter(torch.empty(shape, dtype=spec.dtype, device=device).normal_(
            0.0, 0.02, generator=gen))
        p.grad = torch.empty(shape, dtype=spec.dtype, device=device).normal_(0.0, 1e-3, generator=gen)
        params.append(p)
    return params
