"""Per-group clipping on the drop-in path (``clip_grad_norm_(..., groups=...)``) and the
group machinery of :mod:`gradclip.grouping`.

References: ``torch.nn.utils.clip_grad_norm_`` called on each group separately (and on the
union of groups that share a norm), ``torch.linalg.vector_norm`` of the concatenated
gradients; never a number from a previous run.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.utils as tnu

import gradclip
from conftest import Snapshot, assert_bitwise_equal
from gradclip.grouping import Planner, group_norms
from gradclip.paramgroups import as_groups, muon_like

P_VALUES = [1.0, 2.0, math.inf]


def _model(seed: int = 0, scale: float = 1.0) -> torch.nn.Sequential:
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(5, 8), torch.nn.Linear(8, 8), torch.nn.Linear(8, 3))
    (model(torch.randn(4, 5)).pow(2).sum() * scale).backward()
    return model


def _layers(model: torch.nn.Sequential) -> list[list[torch.nn.Parameter]]:
    return [list(layer.parameters()) for layer in model]


def _grads(model: torch.nn.Module) -> list[torch.Tensor]:
    return [p.grad for p in model.parameters()]


def _assert_grads_close(a: torch.nn.Module, b: torch.nn.Module) -> None:
    for x, y in zip(_grads(a), _grads(b), strict=True):
        torch.testing.assert_close(x, y, rtol=2e-6, atol=0)


# ---------------------------------------------------------------------------------------
# parity with torch


@pytest.mark.parametrize("p", P_VALUES)
def test_own_norm_per_group_equals_clip_grad_norm_on_each_group(p):
    mine, ref = _model(), _model()
    opt = torch.optim.SGD([{"params": ps} for ps in _layers(mine)], lr=0.1)
    norms = gradclip.clip_grad_norm_(mine.parameters(), 0.5, p, groups=opt.param_groups)
    expected = torch.stack([tnu.clip_grad_norm_(ps, 0.5, p) for ps in _layers(ref)])
    torch.testing.assert_close(norms, expected, rtol=1e-6, atol=0)
    _assert_grads_close(mine, ref)


@pytest.mark.parametrize("p", P_VALUES)
def test_per_group_thresholds_equal_clip_grad_norm_with_each(p):
    mine, ref = _model(), _model()
    thresholds = [0.05, 100.0, 0.3]
    gradclip.clip_grad_norm_(mine.parameters(), thresholds, p, groups=_layers(mine))
    for ps, t in zip(_layers(ref), thresholds, strict=True):
        tnu.clip_grad_norm_(ps, t, p)
    _assert_grads_close(mine, ref)
    # the same thresholds by name
    named = _model()
    groups = {f"layer{i}": ps for i, ps in enumerate(_layers(named))}
    gradclip.clip_grad_norm_(named.parameters(), {f"layer{i}": t for i, t in enumerate(thresholds)},
                             p, groups=groups)
    _assert_grads_close(named, ref)


@pytest.mark.parametrize("p", P_VALUES)
def test_shared_groups_equal_one_clip_over_their_union(p):
    mine, ref = _model(), _model()
    layers = _layers(mine)
    gradclip.clip_grad_norm_(mine.parameters(), 0.2, p, groups=layers,
                             policy=["shared", "own", "shared"])
    ref_layers = _layers(ref)
    tnu.clip_grad_norm_(ref_layers[0] + ref_layers[2], 0.2, p)
    tnu.clip_grad_norm_(ref_layers[1], 0.2, p)
    _assert_grads_close(mine, ref)


def test_two_shared_keys_are_two_norms():
    mine, ref = _model(), _model()
    gradclip.clip_grad_norm_(mine.parameters(), 0.2, groups=_layers(mine),
                             policy=["shared:a", "shared:b", "shared:a"])
    ref_layers = _layers(ref)
    tnu.clip_grad_norm_(ref_layers[0] + ref_layers[2], 0.2)
    tnu.clip_grad_norm_(ref_layers[1], 0.2)
    _assert_grads_close(mine, ref)


def test_excluded_group_is_untouched_and_still_measured():
    mine, ref = _model(), _model()
    layers = _layers(mine)
    untouched = Snapshot(layers[1])
    norms = gradclip.clip_grad_norm_(mine.parameters(), 0.01, groups=layers,
                                     policy={"1": "exclude"})
    untouched.assert_unchanged()
    expected = torch.stack([tnu.get_total_norm([q.grad for q in ps]) for ps in _layers(ref)])
    torch.testing.assert_close(norms, expected, rtol=1e-6, atol=0)
    tnu.clip_grad_norm_(_layers(ref)[0], 0.01)
    tnu.clip_grad_norm_(_layers(ref)[2], 0.01)
    _assert_grads_close(mine, ref)


def test_a_number_as_a_policy_is_that_groups_threshold():
    mine, ref = _model(), _model()
    gradclip.clip_grad_norm_(mine.parameters(), 1.0, groups=_layers(mine), policy={"0": 0.01})
    ref_layers = _layers(ref)
    tnu.clip_grad_norm_(ref_layers[0], 0.01)
    for ps in ref_layers[1:]:
        tnu.clip_grad_norm_(ps, 1.0)
    _assert_grads_close(mine, ref)


def test_without_groups_the_drop_in_is_unchanged():
    mine, ref = _model(), _model()
    total = gradclip.clip_grad_norm_(mine.parameters(), 0.3)
    expected = tnu.clip_grad_norm_(ref.parameters(), 0.3)
    assert_bitwise_equal(total, expected)
    for a, b in zip(_grads(mine), _grads(ref), strict=True):
        assert_bitwise_equal(a, b)


def test_error_if_nonfinite_names_the_group_and_changes_nothing():
    model = _model()
    layers = _layers(model)
    layers[2][0].grad[0, 0] = math.nan
    snap = Snapshot(model.parameters())
    with pytest.raises(RuntimeError, match=r"group\(s\) \['2'\] is non-finite"):
        gradclip.clip_grad_norm_(model.parameters(), 0.1, groups=layers, error_if_nonfinite=True)
    snap.assert_unchanged()


# ---------------------------------------------------------------------------------------
# Muon: the orthogonalising rule on the drop-in path


def _muon_adamw(model: torch.nn.Sequential) -> tuple[torch.optim.Optimizer, torch.optim.Optimizer]:
    matrices = [model[1].weight]
    rest = [q for q in model.parameters() if q is not model[1].weight]
    return torch.optim.Muon(matrices, lr=0.02), torch.optim.AdamW(rest, lr=1e-3)


def test_muon_groups_are_left_out_of_the_drop_in():
    mine, ref = _model(scale=100.0), _model(scale=100.0)
    muon, adamw = _muon_adamw(mine)
    snap = Snapshot([mine[1].weight])
    norms = gradclip.clip_grad_norm_(mine.parameters(), 1.0, groups=[muon, adamw])
    snap.assert_unchanged()
    assert norms.shape == (2,)
    rest = [q for q in ref.parameters() if q is not ref[1].weight]
    tnu.clip_grad_norm_(rest, 1.0)
    _assert_grads_close(mine, ref)


def test_orthogonal_none_clips_muon_groups_too():
    mine, ref = _model(scale=100.0), _model(scale=100.0)
    muon, adamw = _muon_adamw(mine)
    gradclip.clip_grad_norm_(mine.parameters(), 1.0, groups=[muon, adamw], orthogonal=None,
                             policy="shared")
    tnu.clip_grad_norm_(ref.parameters(), 1.0)
    _assert_grads_close(mine, ref)


def test_muon_like_rule():
    w = torch.nn.Parameter(torch.zeros(3, 3))
    b = torch.nn.Parameter(torch.zeros(3))
    muon = torch.optim.Muon([w])
    assert muon_like(muon.param_groups[0], muon)
    assert muon_like(muon.param_groups[0], None)  # the Newton–Schulz entries alone
    assert not muon_like(torch.optim.AdamW([b]).param_groups[0], None)
    assert muon_like({"params": [w], "use_muon": True}, None)
    assert not muon_like({"params": [w], "use_muon": False, "ns_steps": 5}, None)

    class DistMuon:  # a port with its own class name and Adam groups beside
        param_groups = ()

    assert muon_like({"params": [w]}, DistMuon())
    assert not muon_like({"params": [b], "betas": (0.9, 0.95)}, DistMuon())


def test_a_custom_rule_decides():
    mine, ref = _model(), _model()
    layers = _layers(mine)
    groups = [{"params": layers[0], "kind": "ortho"}, {"params": layers[1]},
              {"params": layers[2]}]
    snap = Snapshot(layers[0])
    gradclip.clip_grad_norm_(mine.parameters(), 0.1, groups=groups,
                             orthogonal=lambda group, opt: group.get("kind") == "ortho")
    snap.assert_unchanged()
    for ps in _layers(ref)[1:]:
        tnu.clip_grad_norm_(ps, 0.1)
    _assert_grads_close(mine, ref)


def test_a_group_clip_entry_is_its_policy():
    mine, ref = _model(), _model()
    layers = _layers(mine)
    groups = [{"params": layers[0], "clip": "exclude"}, {"params": layers[1]},
              {"params": layers[2]}]
    snap = Snapshot(layers[0])
    gradclip.clip_grad_norm_(mine.parameters(), 0.1, groups=groups)
    snap.assert_unchanged()
    for ps in _layers(ref)[1:]:
        tnu.clip_grad_norm_(ps, 0.1)
    _assert_grads_close(mine, ref)


# ---------------------------------------------------------------------------------------
# groups and norms


def test_group_names_from_every_form():
    model = _model()
    layers = _layers(model)
    opt_a = torch.optim.SGD([{"params": layers[0], "name": "embed"}, {"params": layers[1]}], lr=1)
    opt_b = torch.optim.SGD(layers[2], lr=1)
    assert [g.name for g in as_groups(opt_a)] == ["embed", "1"]
    assert [g.name for g in as_groups([opt_a, opt_b])] == ["embed", "1", "2"]
    assert [g.optimizer for g in as_groups([opt_a, opt_b])] == [opt_a, opt_a, opt_b]
    assert [g.name for g in as_groups({"a": layers[0], "b": model[1]})] == ["a", "b"]
    assert [g.name for g in as_groups(layers)] == ["0", "1", "2"]
    assert as_groups({"b": model[1]})[0].params == tuple(model[1].parameters())


@pytest.mark.parametrize("p", [1.0, 2.0, 3.0, math.inf, 0.0])
def test_group_norms_equal_the_norm_of_the_concatenation(p):
    gen = torch.Generator().manual_seed(0)
    tensors = [torch.randn(n, generator=gen) for n in (5, 1, 7, 3, 2)]
    tensors[3].zero_()
    index = torch.tensor([0, 2, 0, 2, 1])
    per_tensor = torch.stack([torch.linalg.vector_norm(t, p) for t in tensors])
    out = group_norms(per_tensor, index, 4, p)
    for g in range(4):
        members = [t for t, i in zip(tensors, index.tolist(), strict=True) if i == g]
        expected = (torch.linalg.vector_norm(torch.stack(
            [torch.linalg.vector_norm(t, p) for t in members]), p) if members else torch.tensor(0.0))
        torch.testing.assert_close(out[g], expected, rtol=1e-6, atol=0)


def test_group_norms_keep_nan_for_the_max_norm():
    out = group_norms(torch.tensor([1.0, math.nan, 3.0]), torch.tensor([0, 0, 1]), 2, math.inf)
    assert math.isnan(out[0]) and out[1] == 3.0


def test_group_norms_of_huge_float32_norms_do_not_overflow():
    out = group_norms(torch.tensor([3e30, 4e30]), torch.tensor([0, 0]), 1, 2.0)
    torch.testing.assert_close(out, torch.tensor([5e30]))


# ---------------------------------------------------------------------------------------
# bad input: a clear error naming the group and the fix; nothing clipped


def _refused(match: str, *args, **kwargs) -> None:
    model = kwargs.pop("model")
    snap = Snapshot(model.parameters())
    with pytest.raises((ValueError, TypeError), match=match):
        gradclip.clip_grad_norm_(model.parameters(), *args, **kwargs)
    snap.assert_unchanged()


def test_policy_for_a_group_not_in_the_optimizer():
    model = _model()
    opt = torch.optim.SGD(model.parameters(), lr=1)
    _refused(r"names \['head'\], which is not among the groups \['0'\]", 1.0,
             groups=opt.param_groups, policy={"head": "exclude"}, model=model)


def test_a_parameter_in_two_groups():
    model = _model()
    layers = _layers(model)
    _refused(r"'?0\.weight'?.*in two groups, '0' and '1'|in two groups, '0' and '1'", 1.0,
             groups=[layers[0], layers[0][:1] + layers[1], layers[2]], model=model)


def test_a_group_with_no_gradients():
    model = _model()
    frozen = torch.nn.Linear(2, 2)
    _refused(r"group\(s\) \['3'\] hold no parameter with a gradient.*'exclude'", 1.0,
             groups=[*_layers(model), list(frozen.parameters())], model=model)


def test_thresholds_of_the_wrong_length():
    model = _model()
    _refused(r"`max_norm` has 2 entries for 3 groups \['0', '1', '2'\]", [1.0, 2.0],
             groups=_layers(model), model=model)


def test_policies_of_the_wrong_length():
    model = _model()
    _refused(r"`policy` has 1 entries for 3 groups", 1.0, groups=_layers(model),
             policy=["own"], model=model)


def test_a_threshold_missing_from_a_mapping():
    model = _model()
    _refused(r"no threshold for the group\(s\) \['2'\]", {"0": 1.0, "1": 1.0},
             groups=_layers(model), model=model)


def test_shared_groups_with_two_thresholds():
    model = _model()
    _refused(r"share the norm 'shared' but not one threshold", [1.0, 2.0, 1.0],
             groups=_layers(model), policy="shared", model=model)


def test_parameters_in_no_group():
    model = _model()
    _refused(r"2 parameter\(s\) with a gradient are in no group: \['parameters\[4\]', "
             r"'parameters\[5\]'\]", 1.0, groups=_layers(model)[:2], model=model)


@pytest.mark.parametrize("policy, match", [
    ("clip", "not one of 'exclude', 'own', 'shared'"),
    ("shared:", "not one of"),
    (-1.0, r"threshold -1.0 must be >= 0"),
    (True, "is not a policy"),
])
def test_bad_policies(policy, match):
    model = _model()
    _refused(match, 1.0, groups=_layers(model), policy=policy, model=model)


def test_a_negative_group_threshold():
    model = _model()
    _refused(r"`max_norm\['1'\]` must be >= 0", [1.0, -1.0, 1.0], groups=_layers(model),
             model=model)


def test_groups_of_the_wrong_type_and_duplicate_names():
    model = _model()
    _refused("`groups` must be an optimizer", 1.0, groups=3, model=model)
    layers = _layers(model)
    _refused(r"two groups are named \['x'\]", 1.0,
             groups=[{"params": layers[0], "name": "x"}, {"params": layers[1] + layers[2],
                                                          "name": "x"}], model=model)
    _refused("policy` needs `groups`", 1.0, policy="own", model=model)


def test_planner_refuses_a_rule_that_is_not_callable():
    with pytest.raises(TypeError, match="`orthogonal` must be a callable"):
        Planner(None, orthogonal="muon")
