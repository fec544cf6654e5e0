"""Smoke tests of gradclip.bench: gradient sets, the harness's records, rendering.

No timing assertions: the machine is shared, and the harness is tested for well-formed data.
"""

from __future__ import annotations

import json
import math

import pytest
import torch
from torch import nn

from gradclip import bench

# --- GPT-2 small -----------------------------------------------------------------------


def gpt2_param_count(vocab: int, positions: int, d: int, layers: int) -> int:
    """Closed form from the architecture: embeddings, per block 12d² + 13d, final LayerNorm.

    Per block: c_attn 3d² + 3d, attn c_proj d² + d, c_fc 4d² + 4d, mlp c_proj 4d² + d, two
    LayerNorms 4d.
    """
    return vocab * d + positions * d + layers * (12 * d * d + 13 * d) + 2 * d


def test_gpt2_shapes_match_the_architecture():
    shapes = bench.gpt2_shapes()
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
    shapes = bench.gpt2_shapes(vocab_size=100, n_positions=16, n_embd=8, n_layer=2)
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
    assert bench.resnet50_shapes(layers) == expected


def test_resnet50_counts():
    with torch.device("meta"):
        model = ResNet((3, 4, 6, 3))
    shapes = bench.resnet50_shapes()
    numel = sum(math.prod(s) for _, s in shapes)
    assert len(shapes) == len(list(model.parameters())) == 161
    assert numel == sum(p.numel() for p in model.parameters()) == 25_557_032


# --- gradient sets ---------------------------------------------------------------------


def test_case_registry_and_quick_cases():
    assert set(bench.CASES) == {"gpt2", "gpt2-bf16", "resnet50", "tiny2000", "huge100M"}
    assert bench.CASES["gpt2-bf16"].dtype == torch.bfloat16
    assert set(bench.QUICK_CASES) <= set(bench.CASES)
    assert [math.prod(s) for _, s in bench.CASES["huge100M"].shapes()] == [100_000_000]


def test_make_grad_set_tiny2000():
    gs = bench.make_grad_set("tiny2000")
    assert (gs.n_tensors, gs.numel, gs.dtype) == (2000, 2_000_000, torch.float32)
    assert all(isinstance(p, nn.Parameter) and p.grad.shape == p.shape for p in gs.params)
    std = torch.cat([p.grad for p in gs.params]).std().item()
    assert std == pytest.approx(1e-3, rel=0.01)


def test_make_grad_set_custom_and_seeded():
    shapes = [("w", (5, 7)), ("b", (7,))]
    a = bench.make_grad_set("x", shapes, torch.bfloat16, seed=3)
    b = bench.make_grad_set("x", shapes, torch.bfloat16, seed=3)
    assert [p.grad.dtype for p in a.params] == [torch.bfloat16] * 2
    assert [tuple(p.shape) for p in a.params] == [(5, 7), (7,)]
    assert all(torch.equal(p.grad, q.grad) for p, q in zip(a.params, b.params, strict=True))


def test_make_grad_set_unknown_case():
    with pytest.raises(ValueError, match="tiny2000"):
        bench.make_grad_set("gpt3")


@pytest.mark.parametrize("p", [1.0, 2.0, 3.0, math.inf])
def test_reference_norm_matches_float64(p):
    tensors = [torch.randn(1000), torch.randn(7, 13), torch.randn(3).to(torch.bfloat16)]
    expected = torch.linalg.vector_norm(torch.cat([t.double().flatten() for t in tensors]), p)
    got = bench.reference_norm(tensors, p, chunk=64)  # many chunks per tensor
    assert got == pytest.approx(expected.item(), rel=1e-12)


# --- the harness -----------------------------------------------------------------------


def small_config(**kwargs):
    return bench.BenchConfig(reps=2, min_rep_seconds=0.0, **kwargs)


def test_run_grad_set_records_are_well_formed():
    gs = bench.make_grad_set("small", [("w", (64, 48)), ("b", (48,)), ("e", (300,))])
    records, accuracy = bench.run_grad_set(gs, small_config())
    assert [(r.norm_type, r.mode) for r in records] == [
        (2.0, "noclip"),
        (2.0, "clip"),
        (math.inf, "noclip"),
        (math.inf, "clip"),
    ]
    for r in records:
        assert (r.case, r.dtype, r.n_tensors, r.numel) == ("small", "float32", 3, 3420)
        assert min(r.ours_ms, r.torch_ms, r.floor_ms) > 0
        assert r.ratio_min <= r.ratio <= r.ratio_max
        assert r.ours_x_floor > 0 and r.torch_x_floor > 0
        assert 1 <= r.reps_used <= r.reps_run <= 4  # max_reps defaults to 2 x reps
        assert r.calls_per_rep >= 1
        assert r.clipped == (1.0 if r.mode == "clip" else 0.0)
    assert [a.norm_type for a in accuracy] == [2.0, math.inf]
    for a in accuracy:
        assert a.ours_rel_err < 1e-5 and a.torch_rel_err < 1e-5
    # clip mode shrinks the gradients, but the harness keeps them in a sane range
    norm = bench.reference_norm([p.grad for p in gs.params], 2.0)
    assert accuracy[0].reference / 4 <= norm <= accuracy[0].reference


@pytest.mark.parametrize(("max_seconds", "runs"), [(None, 8), (0.0, 3)])
def test_noisy_repetitions_are_retried_then_all_used(max_seconds, runs):
    cfg = bench.BenchConfig(
        norm_types=(2.0,),
        modes=("noclip",),
        reps=4,
        max_reps=8,
        max_seconds=max_seconds,
        min_rep_seconds=0.0,
        max_foreign_cores=-1.0,  # no repetition counts as quiet
    )
    gs = bench.make_grad_set("small", [("w", (8, 8))])
    (record,), _ = bench.run_grad_set(gs, cfg)
    assert (record.reps_run, record.reps_used, record.quiet) == (runs, runs, False)


def test_both_implementations_see_the_same_gradients():
    gs = bench.make_grad_set("small", [("w", (10, 10))] * 3)
    seen: dict[str, set[tuple[int, ...]]] = {"ours": set(), "torch": set()}

    def spy(name):
        def clip(params, max_norm, norm_type):
            seen[name].add(tuple(id(p.grad) for p in params))
            return torch.nn.utils.clip_grad_norm_(params, max_norm, norm_type)

        return clip

    cfg = small_config(norm_types=(2.0,), modes=("clip",))
    bench.run_grad_set(gs, cfg, ours=spy("ours"), theirs=spy("torch"))
    assert seen["ours"] == seen["torch"] == {tuple(id(p.grad) for p in gs.params)}


def test_run_with_progress(monkeypatch):
    monkeypatch.setitem(
        bench.CASES,
        "tiny2000",
        bench.Case("tiny2000", lambda: [("t", (100,))] * 5, torch.float32, "5 x 100"),
    )
    lines: list[str] = []
    cfg = small_config(cases=("tiny2000",), norm_types=(2.0,), modes=("noclip",))
    result = bench.run(cfg, progress=lines.append)
    assert [r.case for r in result.records] == ["tiny2000"]
    assert lines[0].startswith("building tiny2000") and "p=2 noclip" in lines[1]
    assert result.wall_seconds > 0 and result.env["torch"] == torch.__version__


def test_config():
    quick = bench.config(quick=True)
    assert quick.cases == bench.QUICK_CASES and "huge100M" not in quick.cases
    assert quick.max_seconds is not None
    full = bench.config()
    assert full.cases == tuple(bench.CASES) and full.reps > quick.reps
    custom = bench.config(quick=True, cases=["gpt2"], norm_types=[math.inf], reps=3)
    assert (custom.cases, custom.norm_types, custom.reps, custom.max_reps) == (
        ("gpt2",),
        (math.inf,),
        3,
        6,
    )


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"cases": ("gpt3",)}, "valid cases"),
        ({"modes": ("sometimes",)}, "valid modes"),
        ({"reps": 0}, "reps"),
        ({"reps": 5, "max_reps": 2}, "max_reps"),
    ],
)
def test_config_rejects_bad_values(kwargs, match):
    with pytest.raises(ValueError, match=match):
        bench.BenchConfig(**kwargs)


# --- targets and rendering ---------------------------------------------------------------


def fake_record(case, p, mode, ratio):
    return bench.BenchRecord(
        case=case, dtype="float32", n_tensors=1, numel=1, norm_type=p, mode=mode,
        ours_ms=1.0, torch_ms=1.0 / ratio, floor_ms=0.5, ratio=ratio, ratio_min=ratio,
        ratio_max=ratio, ours_x_floor=2.0, torch_x_floor=2.0 / ratio, reps_used=3,
        reps_run=3, calls_per_rep=1, quiet=True, clipped=float(mode == "clip"),
    )  # fmt: skip


def fake_result():
    records = [fake_record("gpt2", 2.0, "noclip", 0.4), fake_record("gpt2", 2.0, "clip", 0.95)]
    accuracy = [bench.AccuracyRecord("gpt2", "float32", 2.0, 1.0, 1.0, 1.001, 0.0, 1e-3)]
    return bench.BenchResult(records, accuracy, bench.BenchConfig(), {"torch": "x"}, 1.0)


def test_check_targets():
    checks = {
        (c.target.case, c.target.norm_type, c.target.mode, c.target.metric): c
        for c in bench.check_targets(fake_result())
    }
    assert checks["gpt2", 2.0, "noclip", "ratio"].met is True
    assert checks["gpt2", 2.0, "clip", "ratio"].met is False
    assert checks["gpt2", 2.0, None, "rel_err"].met is True
    assert checks["resnet50", 2.0, "noclip", "ratio"].met is None


def test_render_and_json():
    result = fake_result()
    text = bench.render(result)
    assert "gpt2" in text and "MISS gpt2 p=2 clip" in text
    data = json.loads(bench.to_json(result))
    assert data["records"][0]["ratio"] == 0.4
    assert data["config"]["norm_types"] == [2.0, "inf"]
    assert any(t["met"] is False for t in data["targets"])
