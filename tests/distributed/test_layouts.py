"""Global gradient norms under every parallel layout, on 2 and 4 gloo processes (CPU).

Two launches (one per world size) run every check of tests/distributed/cases.py; the
tests below assert on what the ranks recorded. Each layout is compared with the
single-process norm and clipped gradients of the same full batch, and each records what
``torch.nn.utils.clip_grad_norm_`` does there (../shared/research/distributed.md): the
assertions on torch document where it is wrong, raises or is rank-local.
"""

from __future__ import annotations

import math
import sys
import time
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))
import dist_cases as cases
import dist_launcher as launcher

from gradclip import _foreach

RTOL = 1e-5  # float32 totals: torch's own summation error reaches 2e-6
GRAD_RTOL = 1e-5

pytestmark = pytest.mark.skipif(
    sys.platform == "win32", reason="gloo on 127.0.0.1 with spawn is tested on Linux"
)


def _launch(suite, world: int) -> list[list[dict]]:
    start = time.monotonic()
    ranks = launcher.launch(suite, world, deadline=150)
    print(f"\n{world}-rank launch: {time.monotonic() - start:.1f} s")
    return ranks


@pytest.fixture(scope="module")
def two() -> list[list[dict]]:
    return _launch(cases.suite_two, 2)


@pytest.fixture(scope="module")
def four() -> list[list[dict]]:
    return _launch(cases.suite_four, 4)


def records(ranks: list[list[dict]], case: str) -> list[list[dict]]:
    """Per rank, the records of ``case`` (in order)."""
    out = [[e for e in rank if e["case"] == case] for rank in ranks]
    assert all(out), f"no records for {case}"
    return out


def close(a: float, b: float, rtol: float = RTOL) -> bool:
    return math.isclose(a, b, rel_tol=rtol, abs_tol=1e-12)


def assert_ours_exact(ranks: list[list[dict]], case: str) -> list[list[dict]]:
    """gradclip: the reference norm, bit-identical on every rank, and the reference clip;
    the per-tensor norms of whole tensors, bit-identical on every rank holding them."""
    per_rank = records(ranks, case)
    expected = {1.0, 2.0, 3.0} | ({math.inf} if case != "fsdp2_empty_torch_p" else set())
    assert {e["p"] for e in per_rank[0]} == expected
    for entries in zip(*per_rank, strict=True):
        for key in ("ours", "measured", "clipper_total"):
            values = {e[key] for e in entries}
            assert len(values) == 1, f"{case} p={entries[0]['p']}: ranks disagree on {key} {values}"
        for e in entries:
            assert e["ours_type"] == "Tensor"
            assert close(e["ours"], e["ref"]), f"{case} p={e['p']}: {e['ours']} != {e['ref']}"
            # grad_norms and the clippers add whole-tensor norms, the drop-ins one partial
            # sum per group: the same total up to float32 rounding
            assert close(e["measured"], e["ours"], 1e-6), f"{case} p={e['p']}: grad_norms differs"
            assert close(e["clipper_total"], e["measured"], 1e-6), f"{case} p={e['p']}: a clipper's"
            assert e["grad_err"] <= GRAD_RTOL, f"{case} p={e['p']}: clipped grads off {e['grad_err']}"
            assert_per_tensor(e, f"{case} p={e['p']}")
        same_stage: dict[tuple, list[dict]] = {}
        for e in entries:  # pipeline stages hold different tensors
            same_stage.setdefault(tuple(e["names"]), []).append(e["per_tensor"])
        for norms in same_stage.values():
            assert all(n == norms[0] for n in norms), f"{case}: per-tensor norms differ by rank"
    return per_rank


def assert_per_tensor(e: dict, what: str) -> None:
    """Per-tensor norms (grad_norms and a clipper's) are those of the reference's whole
    tensors, one for every tensor this rank's model holds (a part of, or none of)."""
    per_tensor = e["per_tensor"]
    assert sorted(per_tensor) == e["names"], f"{what}: rows {per_tensor}"
    assert e["clipper_per_tensor"] == per_tensor, f"{what}: the clipper's differ"
    for name, value in per_tensor.items():
        want = e["ref_per_tensor"][name]
        assert close(value, want), f"{what} {name}: {value} != {want}"


# What torch's own norm of sharded DTensor gradients is, by release. torch < 2.10: unreduced, a
# lazy `_NormPartial` DTensor whose local value (what `.item()` shows) is this rank's part of the
# norm, for every p. From 2.10: p-norms reduced, a `Replicate` DTensor holding the whole norm on
# every rank. The inf-norm: reduced too in 2.10 only (right on every rank); from 2.11 a
# `Partial(max)` again, whose local value is the rank-local max.
TORCH_NORM_REDUCED = _foreach.TORCH_VERSION >= (2, 10)
TORCH_INF_REDUCED = _foreach.TORCH_VERSION == (2, 10)
TORCH_INF_NORM = ("DTensor(Replicate)" if TORCH_INF_REDUCED else
                  "DTensor(Partial)" if TORCH_NORM_REDUCED else "DTensor(_NormPartial)")


def kinds(entry: dict) -> set[str]:
    """The placement types of the DTensor torch returned (``describe`` in dist_cases)."""
    return set(entry["torch_type"].removeprefix("DTensor(").removesuffix(")").split(","))


def assert_torch_p_norms(per_rank: list[list[dict]], shard_groups: list[list[int]]) -> None:
    """torch's finite-p norms on a layout where they are right: reduced, or on older torch
    partial, with the parts of each shard group's ranks combining to the reference norm."""
    for entries in zip(*per_rank, strict=True):
        p, ref = entries[0]["p"], entries[0]["ref"]
        if math.isinf(p):
            continue
        if TORCH_NORM_REDUCED:
            assert all(kinds(e) == {"Replicate"} for e in entries), entries
            assert all(close(e["torch"], ref) for e in entries), (p, entries)
            continue
        assert all("_NormPartial" in kinds(e) for e in entries), entries
        for group in shard_groups:
            combined = sum(entries[r]["torch"] ** p for r in group) ** (1 / p)
            assert close(combined, ref), (p, group, combined, ref)


def torch_wrong_somewhere(per_rank: list[list[dict]], p: float) -> bool:
    entries = [e for rank in per_rank for e in rank if e["p"] == p]
    return any(not close(e["torch"], e["ref"], 1e-3) for e in entries)


# ---------------------------------------------------------------------------------------
# 2 ranks


def test_ddp(two):
    per_rank = assert_ours_exact(two, "ddp")
    for e in (e for rank in per_rank for e in rank):  # torch is right under DDP
        assert close(e["torch"], e["ref"]) and e["torch_grad_err"] <= GRAD_RTOL


def test_fsdp1_orig_params_with_shard_group(two):
    missing = records(two, "fsdp1_orig_missing")
    assert any(r[0]["grads"] for r in missing)  # some grads are None/empty on a rank
    per_rank = assert_ours_exact(two, "fsdp1_orig")
    for p in cases.P_VALUES:  # torch: each rank clips by its own shard's norm
        assert torch_wrong_somewhere(per_rank, p)
    assert any(e["torch_grad_err"] > 0.1 for rank in per_rank for e in rank)


def test_fsdp1_flat_params_with_shard_group(two):
    per_rank = records(two, "fsdp1_flat")
    for entries in zip(*per_rank, strict=True):
        assert len({e["ours"] for e in entries}) == 1
        for e in entries:
            assert close(e["ours"], e["ref"]) and close(e["fsdp_method"], e["ref"])
            assert close(e["post"], e["want_post"], 1e-5)  # the gathered clipped shards
            assert len(e["per_tensor"]) == 1 and close(e["per_tensor"][0], e["whole"])
    for p in cases.P_VALUES:  # torch: each rank's own shard norm (right only where the
        assert torch_wrong_somewhere(per_rank, p)  # inf norm's max happens to live)
    assert any(not close(e["torch_post"], e["want_post"], 1e-3) for r in per_rank for e in r)


def test_fsdp2(two):
    per_rank = assert_ours_exact(two, "fsdp2")
    for e in (e for rank in per_rank for e in rank):
        if math.isinf(e["p"]):  # torch >= 2.11: Partial(max); .item() is the rank-local max
            assert e["torch_type"] == TORCH_INF_NORM
    assert_torch_p_norms(per_rank, [[0, 1]])
    assert torch_wrong_somewhere(per_rank, math.inf) is not TORCH_INF_REDUCED


def test_fsdp2_empty_local_shards(two):
    shards = records(two, "fsdp2_empty_shards")
    assert shards[0][0]["empty"] == [] and shards[1][0]["empty"] == ["2.weight", "2.bias"]
    # torch's inf norm raises on the empty rank alone (its peer would hang in the collective)
    assert "empty tensor" in shards[1][0]["torch_local_inf"]
    assert_ours_exact(two, "fsdp2_empty")
    per_rank = assert_ours_exact(two, "fsdp2_empty_torch_p")
    assert_torch_p_norms(per_rank, [[0, 1]])  # torch's p-norms are right here


def test_dtensor_grad_missing_on_one_rank(two):
    per_rank = records(two, "dtensor_grad_missing_on_rank1")
    for (e,) in per_rank:
        assert close(e["ours"], e["ref"])
        assert set(e["per_tensor"]) == set(e["ref_per_tensor"])  # 2.bias on rank 1 too
        for name, value in e["per_tensor"].items():
            assert close(value, e["ref_per_tensor"][name]), name
    assert per_rank[0][0]["per_tensor"] == per_rank[1][0]["per_tensor"]


def test_tensor_parallel(two):
    (placements,) = records(two, "tp_placements")[0]
    assert placements["placements"]["2.bias"] == "(Replicate(),)"  # counted once, not twice
    per_rank = assert_ours_exact(two, "tp")
    for e in (e for rank in per_rank for e in rank if math.isinf(e["p"])):
        assert e["torch_type"] == TORCH_INF_NORM and close(e["torch"], e["ref"])
    assert_torch_p_norms(per_rank, [[0, 1]])


def test_mixed_tensor_and_dtensor(two):
    per_rank = assert_ours_exact(two, "mixed")
    for e in (e for rank in per_rank for e in rank):
        assert "mixed torch.Tensor and DTensor" in e["torch_error"]


def test_pipeline_stages_with_extra_groups(two):
    per_rank = assert_ours_exact(two, "pp")
    for p in (1.0, 2.0, 3.0, math.inf):  # torch: each stage clips by its own norm
        assert torch_wrong_somewhere(per_rank, p)


def test_nan_on_one_rank(two):
    per_rank = records(two, "nan_rank1")
    for rank in per_rank:
        for e in rank:
            assert math.isnan(e["ours"])  # NaN on every rank, also for inf (MAX drops NaN)
            per_tensor = e["per_tensor"]  # and in the whole tensor's norm only
            assert math.isnan(per_tensor.pop("0.weight")), e["p"]
            assert all(math.isfinite(v) for v in per_tensor.values()), e["p"]
    for entries in zip(*per_rank, strict=True):
        assert entries[0]["per_tensor"] == entries[1]["per_tensor"]
    inf = [e for rank in per_rank for e in rank if math.isinf(e["p"])]
    assert any(not math.isnan(e["torch"]) for e in inf)  # torch's MAX lost it on a rank
    assert not any(e["torch_error_if_nonfinite"] for e in inf)  # and error_if_nonfinite misses it
    for (e,) in records(two, "nan_policies"):
        assert e["skipped"] and e["untouched"]  # the same skip decision on every rank
        assert "0.weight" in e["error"]  # nonfinite="error" raises on every rank, naming it


def test_adaptive_clippers_identical_state_on_every_rank(two):
    per_rank = records(two, "adaptive")
    (reference,) = records(two, "adaptive_reference")[0]
    for entries in zip(*per_rank, strict=True):
        first = entries[0]
        assert len(first["norms"]) == 50
        assert close(first["norms"][0], reference["first_norm"])
        for other in entries[1:]:
            assert other["state"] == first["state"], f"{first['layout']} {first['clipper']}"
            assert other["norms"] == first["norms"] and other["clipped"] == first["clipped"]
    by = {(e["layout"], e["clipper"]): e for e in per_rank[0]}
    assert by["ddp", "AutoClip"]["clipped"] > 0 and by["fsdp2", "ZClip"]["clipped"] > 0
    for name in ("NormClip", "AutoClip", "ZClip", "AdaptiveClip"):  # DDP and FSDP2 agree
        ddp, fsdp = by["ddp", name]["norms"], by["fsdp2", name]["norms"]
        assert all(close(a, b, 1e-4) for a, b in zip(ddp, fsdp, strict=True))


def test_per_tensor_clippers(two):
    for entries in zip(*records(two, "per_tensor_ddp"), strict=True):
        assert entries[0]["state"] == entries[1]["state"]
    ddp = {e["clipper"]: e for e in records(two, "per_tensor_ddp")[0]}
    per_rank = records(two, "per_tensor_fsdp2")
    for entries in zip(*per_rank, strict=True):
        for e in entries:
            # whole tensors' (AdaGC) and whole rows' (AGC) norms: the DDP run, on every rank
            name = e["clipper"]
            assert e["error"] is None and e["state"] == entries[0]["state"], name
            assert all(close(a, b, 1e-4)
                       for a, b in zip(e["state"], ddp[name]["state"], strict=True)), name
            assert all(close(a, b, 1e-5)
                       for a, b in zip(e["norms"], ddp[name]["norms"], strict=True)), name
            assert e["clipped"] == ddp[name]["clipped"], name
    for (e,) in records(two, "agc_shard_group"):  # flat shards: rows cannot be told apart
        assert "shard_group" in e["error"] and "AGC" in e["error"] and "flat" in e["error"]


def assert_like_reference(ranks: list[list[dict]], layouts: set[str], tag: str = "adagc") -> None:
    """AdaGC (or the clipper of ``tag``): the single-process run's clipped gradients and
    state, bit-identical state on every rank."""
    per_rank = records(ranks, tag)
    assert {e["layout"] for e in per_rank[0]} == layouts
    for entries in zip(*per_rank, strict=True):
        for e in entries:
            what = e["layout"]
            assert e["grad_err"] <= 1e-5, f"{what}: clipped grads off {e['grad_err']}"
            assert e["count"] == e["ref_count"] and e["count"] > 3, what
            assert set(e["state"]) == set(e["ref_state"]), what
            for name, (gamma, steps) in e["state"].items():
                ref_gamma, ref_steps = e["ref_state"][name]
                assert steps == ref_steps and close(gamma, ref_gamma), f"{what} {name}"
            assert e["bits"] == entries[0]["bits"], f"{what}: state differs by rank"


def test_adagc_matches_single_process(two):
    assert_like_reference(two, {"fsdp2", "tp", "fsdp1_orig", "fsdp2_empty"})


def test_agc_matches_single_process(two):
    assert_like_reference(two, {"fsdp2", "fsdp2_empty", "tp"}, "agc")
    for (e,) in records(two, "replicated"):  # Replicate DTensors: plain local tensors
        for name, (error, clipped) in e["errors"].items():
            assert error <= 1e-6 and clipped, name
    for (e,) in records(two, "agc_passes"):  # gradients once (rows), weights once
        assert (e["grad_passes"], e["passes"]) == (1, 2), e


def test_more_clippers_under_fsdp2_and_tp(two):
    """ValueClip, clip_grad_value_, the skip policy, and Clipper.step with fused and foreach
    AdamW (4 steps): the single-process run's gradients and parameters."""
    for rank in records(two, "more_clippers"):
        assert len(rank) == 14
        for e in rank:
            assert e["err"] <= 1e-5, f"{e['what']}: off by {e['err']}"


def test_monitor_layers_are_whole_tensors_under_fsdp2(two):
    per_rank = [[e for e in rank if e["layout"] == "fsdp2"] for rank in records(two, "adagc")]
    for ((e,), other) in zip(per_rank, per_rank[::-1], strict=True):
        assert e["layers"] == other[0]["layers"]  # the same on every rank
        assert len(e["layers"]) == len(e["ref_layers"]) == cases.CLIP_STEPS
        for got, want in zip(e["layers"], e["ref_layers"], strict=True):
            assert set(got) == set(want) == {"0", "2"}
            for layer, value in got.items():
                assert close(value, want[layer], 1e-5), layer


def test_bad_input(two):
    non_member = records(two, "non_member")
    assert non_member[0][0]["error"] is None  # rank 0 is the group
    assert "not a member" in non_member[1][0]["error"] and "rank 1" in non_member[1][0]["error"]
    for (e,) in records(two, "disagree"):
        assert "rank 1 never reduces over it" in e["error"]
    for (e,) in records(two, "agree"):
        assert e["error"] is None
    for (e,) in records(two, "plain_grad_missing"):  # per-tensor: aligned by parameter
        assert close(e["ours"], e["ref"])
        assert all(map(close, e["per_tensor"], e["ref_per_tensor"]))
        assert e["per_tensor_inf"] == e["ref_per_tensor_inf"]
    for (e,) in records(two, "different_params"):
        assert "rank 0 all-reduces 2 tensor norm(s)" in e["error"] and "rank 1 1" in e["error"]
    for e in (r for rank in records(two, "zero_partitions") for r in rank):
        assert close(e["ours"], e["ref"])
    for (e,) in records(two, "norm_type_0"):
        assert "norm_type" in e["error"] and "positive" in e["error"]
    for (e,) in records(two, "bad_type"):
        assert "extra_groups[0]" in e["error"] and "'world'" in e["error"]


@pytest.mark.parametrize("suite", ["two", "four"])
def test_no_host_reads_on_the_first_call_of_any_layout(suite, request):
    """The reduction plan of a new layout (new meshes, nothing cached) reads no value on the
    host: DDP, FSDP1, FSDP2, TP, mixed, pipeline, FSDP x TP, HSDP, pipeline x FSDP2."""
    per_rank = records(request.getfixturevalue(suite), "first_call_reads")
    layouts = {e["layout"] for rank in per_rank for e in rank}
    expected = {"two": {"ddp", "fsdp2", "tp", "mixed", "pp"}, "four": {"fsdp_tp", "hsdp", "pp_fsdp"}}
    assert expected[suite] <= layouts, layouts
    for rank in per_rank:
        for e in rank:
            assert e["reads"] == [], f"{e['layout']}: {e['reads']}"


def test_no_host_reads_in_the_reduction(two):
    per_rank = records(two, "host_reads")
    assert {e["call"] for e in per_rank[0]} == {"dtensor", "shard_group", "extra_groups", "clipper",
                                                "adagc", "agc"}
    for rank in per_rank:
        for e in rank:
            assert e["reads"] == [], f"{e['call']} p={e['p']}: {e['reads']}"


# ---------------------------------------------------------------------------------------
# 4 ranks


def test_fsdp_x_tp_on_a_2d_mesh_and_a_second_mesh(four):
    (placements,) = records(four, "fsdp_tp_placements")[0]
    assert "_StridedShard" in placements["placements"]["0.weight"]
    assert placements["placements"]["2.bias"] == "(Shard(dim=0), Replicate())"
    per_rank = assert_ours_exact(four, "fsdp_tp")
    for e in (e for rank in per_rank for e in rank):  # torch raises (two meshes / empty)
        assert "torch_error" in e


def test_hsdp(four):
    per_rank = assert_ours_exact(four, "hsdp")
    assert_torch_p_norms(per_rank, [[0, 1], [2, 3]])  # mesh (replicate, shard) [[0, 1], [2, 3]]
    assert torch_wrong_somewhere(per_rank, math.inf) is not TORCH_INF_REDUCED


def test_pipeline_x_fsdp2(four):
    per_rank = assert_ours_exact(four, "pp_fsdp")
    for p in cases.P_VALUES:  # torch: a Replicate DTensor that looks global, per stage
        assert torch_wrong_somewhere(per_rank, p)


def test_adagc_matches_single_process_on_four_ranks(four):
    assert_like_reference(four, {"fsdp_tp", "hsdp"})


def test_agc_matches_single_process_on_four_ranks(four):
    assert_like_reference(four, {"fsdp_tp"}, "agc")


# ---------------------------------------------------------------------------------------
# per-group clipping


def assert_groups_exact(ranks: list[list[dict]], case: str) -> None:
    """Per-group norms: the reference groups' norms, bit-identical on every rank; the
    gradients clipped group by group as the reference; the clipper's shared and excluded
    groups likewise."""
    per_rank = records(ranks, case)
    assert {e["p"] for e in per_rank[0]} == set(cases.P_VALUES)
    for entries in zip(*per_rank, strict=True):
        for key in ("ours", "clipper_norms", "clipper_coef", "clipper_threshold"):
            values = {tuple(e[key]) if isinstance(e[key], list) else e[key] for e in entries}
            assert len(values) == 1, f"{case} p={entries[0]['p']}: ranks disagree on {key}"
        for e in entries:
            where = f"{case} p={e['p']}"
            for ours, ref in zip(e["ours"], e["ref"], strict=True):
                assert close(ours, ref), f"{where}: group norm {ours} != {ref}"
            for ours, ref in zip(e["clipper_norms"], e["ref"], strict=True):
                assert close(ours, ref), f"{where}: the clipper's group norm {ours} != {ref}"
            assert e["grad_err"] <= GRAD_RTOL, f"{where}: drop-in grads off {e['grad_err']}"
            assert e["clipper_err"] <= GRAD_RTOL, f"{where}: clipper grads off {e['clipper_err']}"
            assert e["excluded"] == [False, True] and e["clipper_coef"][1] == 1.0
            assert close(e["clipper_threshold"], 0.5 * e["ref"][0])


@pytest.mark.parametrize("case", ["groups_ddp", "groups_mixed", "groups_tp", "groups_pp"])
def test_per_group_norms_on_two_ranks(two, case):
    assert_groups_exact(two, case)


def test_per_group_norms_under_fsdp_x_tp(four):
    assert_groups_exact(four, "groups_fsdp_tp")


def test_loss_gate_decides_the_same_on_every_rank(two):
    """Each rank passed its own loss; AdaptiveClip's gate read their mean: the same thresholds
    and state on every rank, equal to one process fed the global norm and the mean loss."""
    import torch

    import gradclip

    per_rank = records(two, "adaptive_loss")
    for entries in zip(*per_rank, strict=True):
        for key in ("threshold", "norm", "state"):
            values = [e[key] for e in entries]
            assert all(v == values[0] for v in values), f"ranks disagree on {key}"
        reference = gradclip.AdaptiveClip(window=8)
        p = torch.nn.Parameter(torch.zeros(1))
        want = []
        for step, norm in enumerate(entries[0]["norm"]):
            p.grad = torch.tensor([norm])
            mean = sum(e["loss"][step] for e in entries) / len(entries)
            want.append(float(reference({"w": p}, loss=torch.tensor(mean)).threshold))
        assert entries[0]["threshold"] == pytest.approx(want, rel=1e-5)
        assert int(reference.state.loss_mode) == 1  # the mean loss falls: the gate acted


def test_spike_decisions_are_identical_on_every_rank(two):
    """Each rank passed its own loss; the detector decided from the loss averaged over ranks
    and the global norm: the same decisions and state on every rank, equal to one process
    fed the mean loss and the global norm."""
    import torch

    import gradclip

    per_rank = records(two, "spikes")
    for entries in zip(*per_rank, strict=True):
        layout = entries[0]["layout"]
        for key in ("spike", "skipped", "bound", "norm", "state", "detector"):
            values = [e[key] for e in entries]
            assert all(v == values[0] for v in values), f"{layout}: ranks disagree on {key}"
        spike = entries[0]["spike"]
        assert spike[cases.SPIKE_LOSS_STEP], f"{layout}: rank 0's loss spike is every rank's"
        assert spike[7] and entries[0]["skipped"] == spike, layout  # a gradient spike
        # one process, fed what the ranks agreed on
        reference = gradclip.NormClip(math.inf, spikes=gradclip.SpikeDetector(window=8, warmup=4))
        p = torch.nn.Parameter(torch.zeros(1))
        for step, norm in enumerate(entries[0]["norm"]):
            p.grad = torch.tensor([norm])
            mean = sum(e["loss"][step] for e in entries) / len(entries)
            stats = reference({"w": p}, loss=torch.tensor(mean))
            assert bool(stats.spike) == spike[step], (layout, step)
