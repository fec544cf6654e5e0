"""benchmarks/bench_gpu.py and benchmarks/gpu/: the sets are the published models, a run yields
every op, mode and variant, and the targets are read from the rows.

The GPU figures themselves come from a GPU machine (benchmarks/gpu/run.sh); here the script runs
its CPU smoke on toy sets, the same code path short of CUDA events and the device profiler.
"""

from __future__ import annotations

import doctest
import json
import math
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))
import bench_gpu
from gpu import report, sets, tests_summary


@pytest.mark.parametrize("module", [sets, report, tests_summary, bench_gpu])
def test_docstring_examples(module):
    result = doctest.testmod(module, optionflags=doctest.ELLIPSIS)
    assert result.failed == 0


@pytest.mark.parametrize(("config", "count"), [(sets.LLAMA_3_2_1B, 1_235_814_400),
                                               (sets.LLAMA_3_8B, 8_030_261_248)],
                         ids=["llama-3.2-1b", "llama-3-8b"])
def test_llama_shapes_are_transformers_llama(config, count):
    """Names, order and shapes against transformers' own LlamaForCausalLM (built on the meta
    device: no memory, no download); the counts are the model cards' 1.24B and 8.03B."""
    transformers = pytest.importorskip("transformers")
    hf = transformers.LlamaConfig(
        vocab_size=config["vocab"], hidden_size=config["hidden"],
        intermediate_size=config["intermediate"], num_hidden_layers=2,
        num_attention_heads=config["heads"], num_key_value_heads=config["kv_heads"],
        head_dim=config["head_dim"], tie_word_embeddings=config["tied"])
    with torch.device("meta"):
        model = transformers.LlamaForCausalLM(hf)
    theirs = [(n, tuple(p.shape)) for n, p in model.named_parameters()]
    assert sets.llama_shapes(**{**config, "layers": 2}) == theirs
    assert sum(math.prod(s) for _, s in sets.llama_shapes(**config)) == count


def test_moe_set_is_ten_thousand_small_tensors():
    shapes = sets.moe_shapes()
    assert len(shapes) == 10_000 and max(math.prod(s) for _, s in shapes) == 8192


def test_smoke_run_yields_every_op_mode_and_variant(tmp_path):
    """A CPU run on toy sets (eager variants; compile is tested below): every row measured,
    the files written, each target present with a verdict saying it is no GPU figure."""
    args = bench_gpu.parse_args(["--smoke", "--sets", "gpt2", "moe10k", "--moe-tensors", "40",
                                 "--reps", "2", "--step-reps", "1", "--no-compile",
                                 "--copy-mib", "4", "--out", str(tmp_path)])
    result = bench_gpu.run(args)
    rows = result["rows"]
    assert not [r for r in rows if r["error"]]
    got = {(r["set"], r["op"], r["mode"], r["variant"]) for r in rows}
    for name, ops in (("gpt2", ("norm", "clip", "step")), ("moe10k", ("norm", "clip"))):
        for op in ops:
            for mode in (["-"] if op == "norm" else ["noclip", "clip"]):
                for variant in ("torch", "gradclip"):
                    assert (name, op, mode, variant) in got
    for r in rows:
        assert r["median_ms"] > 0 and r["reps"] >= 1 and r["bytes"] > 0 and r["kernels"] > 0
    saved = json.loads((tmp_path / "bench_gpu.json").read_text())
    assert saved["smoke"] is True and len(saved["rows"]) == len(rows)
    text = (tmp_path / "bench_gpu.txt").read_text()
    assert text.startswith(report.SMOKE) and "targets (issue 14)" in text
    targets = result["targets"]
    assert {t["target"] for t in targets} >= {
        "norm pass >= 85% of copy bandwidth", "clip + fused AdamW <= 0.85x torch eager",
        "small tensors: launches below torch's", "small tensors: time below torch's"}
    assert all("CPU smoke, not a GPU figure" in t["verdict"] for t in targets)


def test_compiled_variants_run_and_count_their_graphs(tmp_path):
    """Each compiled variant (dynamo only: the backend "eager") runs and reports its graphs."""
    args = bench_gpu.parse_args(["--smoke", "--sets", "gpt2", "--reps", "1", "--step-reps", "1",
                                 "--ops", "step", "--modes", "clip", "--compile-backend", "eager",
                                 "--copy-mib", "4"])
    rows = {r["variant"]: r for r in bench_gpu.run(args)["rows"]}
    assert set(rows) == {"torch", "torch-compile", "torch-compile-one", "gradclip",
                         "gradclip-compile"}
    for variant in ("torch-compile", "torch-compile-one", "gradclip-compile"):
        assert rows[variant]["error"] == "" and rows[variant]["graphs"] >= 1, rows[variant]


def _row(variant, op="step", mode="clip", **values):
    return {"set": "s", "op": op, "mode": mode, "variant": variant, "error": "", **values}


def test_targets_read_from_rows():
    result = {"smoke": False, "skipped": {"big": "time budget of 300 s spent"}, "rows": [
        _row("gradclip", ratio=0.8, median_ms=8.0), _row("torch", median_ms=10.0),
        _row("torch-compile", median_ms=7.0), _row("torch-compile-one", error="Unsupported: x"),
    ], "sets": {"s": {"large": False, "step": True}}}
    checks = {(c["target"], c["mode"]): c for c in report.check_targets(result)}
    assert checks[("clip + fused AdamW <= 0.85x torch eager", "clip")]["verdict"] == "met"
    assert checks[("clip + fused AdamW <= torch-compile", "clip")]["verdict"] == "missed"
    assert checks[("clip + fused AdamW <= torch-compile", "clip")]["measured"] == pytest.approx(8 / 7)
    assert checks[("clip + fused AdamW <= torch-compile-one", "clip")]["verdict"] == "not measured"
    assert "Unsupported" in checks[("clip + fused AdamW <= torch-compile-one", "clip")]["detail"]
    assert checks[("clip + fused AdamW <= 0.85x torch eager", "noclip")]["verdict"] == "not measured"
    assert checks[("(set not measured)", "-")]["set"] == "big"
