"""Per-group policies on every clipper (``groups=``, ``policy=``, ``orthogonal=``) and the
optimizer-aware default of ``Clipper.step(model, optimizer)``.

References: the same clipper run separately on each group (a fresh instance per group), one
clipper on the union of groups that share a norm, ``torch.nn.utils.clip_grad_norm_`` /
``clip_grad_value_`` on each group; never a number from a previous run.
"""

from __future__ import annotations

import io
import math
import warnings

import pytest
import torch
import torch.nn.utils as tnu

import gradclip
from conftest import Snapshot
from gradclip import _foreach
from host_reads import HostReadDetector

from .registry import ENTRIES, Entry

# Clippers with a spike detector are left out of the parity tests: the detector judges the
# whole model's norm (and the loss), where one clipper per group would judge each group's.
BY_NORM = [e for e in ENTRIES if e.name not in ("AGC", "ValueClip") and e.spikes is None]


def _model() -> torch.nn.Sequential:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(6, 16), torch.nn.Linear(16, 16),
                               torch.nn.Linear(16, 3))


def _set_grads(model: torch.nn.Module, step: int) -> None:
    """Random gradients whose per-layer scales differ and spike now and then."""
    gen = torch.Generator().manual_seed(1000 + step)
    for i, layer in enumerate(model):
        spike = 30.0 if torch.rand((), generator=gen) < 0.15 else 1.0
        scale = (0.1, 3.0, 0.5)[i] * spike * math.exp(0.3 * float(torch.randn((), generator=gen)))
        for q in layer.parameters():
            q.grad = torch.randn(q.shape, generator=gen) * scale / math.sqrt(q.numel())


def _named(layer_index: int, model: torch.nn.Sequential) -> dict[str, torch.nn.Parameter]:
    return {f"{layer_index}.{n}": q for n, q in model[layer_index].named_parameters()}


def _layers(model: torch.nn.Sequential) -> list[list[torch.nn.Parameter]]:
    return [list(layer.parameters()) for layer in model]


def _close(a: torch.Tensor, b: torch.Tensor) -> None:
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-12)


# ---------------------------------------------------------------------------------------
# parity


@pytest.mark.parametrize("entry", BY_NORM, ids=[e.label or e.name for e in BY_NORM])
def test_own_groups_equal_one_clipper_per_group(entry: Entry) -> None:
    mine, ref = _model(), _model()
    grouped = entry.make(groups=_layers(mine))
    separate = [entry.make() for _ in range(3)]
    for step in range(2 * entry.warmup + 25):
        _set_grads(mine, step)
        _set_grads(ref, step)
        stats = grouped(mine)
        expected = [c(_named(i, ref)) for i, c in enumerate(separate)]
        for a, b in zip(mine.parameters(), ref.parameters(), strict=True):
            _close(a.grad, b.grad)
        _close(stats.groups.norm, torch.stack([s.norm for s in expected]))
        _close(stats.groups.threshold, torch.stack([s.threshold for s in expected]).to(
            stats.groups.threshold.dtype))
    assert int(grouped.steps) == 2 * entry.warmup + 25


@pytest.mark.parametrize("entry", BY_NORM, ids=[e.label or e.name for e in BY_NORM])
def test_shared_groups_equal_one_clipper_on_their_union(entry: Entry) -> None:
    mine, ref = _model(), _model()
    grouped = entry.make(groups=_layers(mine), policy=["shared", "exclude", "shared"])
    union = entry.make()
    for step in range(2 * entry.warmup + 20):
        _set_grads(mine, step)
        _set_grads(ref, step)
        middle = Snapshot(mine[1].parameters())
        stats = grouped(mine)
        middle.assert_unchanged()
        expected = union({**_named(0, ref), **_named(2, ref)})
        for i in (0, 2):
            for a, b in zip(mine[i].parameters(), ref[i].parameters(), strict=True):
                _close(a.grad, b.grad)
        _close(stats.threshold, expected.threshold)  # one domain: its threshold
    # the shared domain keeps the clipper's own state: the same as the union clipper's
    for key, value in union.state_dict()["state"].items():
        _close(grouped.state_dict()["state"][key].double(), value.double())


@pytest.mark.parametrize("p", [1.0, 2.0, math.inf])
def test_normclip_thresholds_per_group_equal_torch_on_each(p: float) -> None:
    mine, ref = _model(), _model()
    clipper = gradclip.NormClip(1.0, p, groups={"a": mine[0], "b": mine[1], "c": mine[2]},
                                policy={"a": 0.01, "c": 0.2})
    for step in range(5):
        _set_grads(mine, step)
        _set_grads(ref, step)
        clipper(mine)
        for layer, t in zip(ref, (0.01, 1.0, 0.2), strict=True):
            tnu.clip_grad_norm_(layer.parameters(), t, p)
        for a, b in zip(mine.parameters(), ref.parameters(), strict=True):
            torch.testing.assert_close(a.grad, b.grad, rtol=2e-6, atol=0)


def test_valueclip_per_group_values_equal_clip_grad_value_on_each() -> None:
    mine, ref = _model(), _model()
    clipper = gradclip.ValueClip(0.05, groups=_layers(mine), policy=[0.01, "exclude", "own"])
    _set_grads(mine, 0)
    _set_grads(ref, 0)
    stats = clipper(mine)
    tnu.clip_grad_value_(ref[0].parameters(), 0.01)
    tnu.clip_grad_value_(ref[2].parameters(), 0.05)
    for a, b in zip(mine.parameters(), ref.parameters(), strict=True):
        assert torch.equal(a.grad, b.grad)
    peaks = torch.stack([torch.cat([q.grad.abs().flatten() for q in layer.parameters()]).max()
                         for layer in ref])
    torch.testing.assert_close(stats.groups.post_norm, peaks)
    assert bool(stats.clipped)


def test_agc_leaves_excluded_groups_alone_and_clips_the_rest_as_usual() -> None:
    mine, ref = _model(), _model()
    _set_grads(mine, 0)
    _set_grads(ref, 0)
    middle = Snapshot(mine[1].parameters())
    stats = gradclip.AGC(0.01, exclude=None, groups=_layers(mine),
                         policy={"1": "exclude"})(mine)
    middle.assert_unchanged()
    gradclip.AGC(0.01, exclude=("1.*",))(ref)
    for a, b in zip(mine.parameters(), ref.parameters(), strict=True):
        assert torch.equal(a.grad, b.grad)
    assert stats.groups.excluded == (False, True, False)
    assert stats.groups.coef[1] == 1


def test_a_group_with_its_own_clipper_keeps_its_own_state() -> None:
    mine, ref = _model(), _model()
    head = gradclip.AdaptiveClip(window=4, warmup_start=0.5)
    clipper = gradclip.NormClip(1.0, groups={"body": [*mine[0].parameters(), *mine[1].parameters()],
                                             "head": mine[2]}, policy={"head": head})
    alone = gradclip.AdaptiveClip(window=4, warmup_start=0.5)
    for step in range(12):
        _set_grads(mine, step)
        _set_grads(ref, step)
        clipper(mine)
        alone(_named(2, ref))
        tnu.clip_grad_norm_([*ref[0].parameters(), *ref[1].parameters()], 1.0)
        for a, b in zip(mine.parameters(), ref.parameters(), strict=True):
            _close(a.grad, b.grad)
    _close(head.state.history, alone.state.history)
    saved = clipper.state_dict()["groups"]["clippers"]["head"]
    assert saved["type"] == "AdaptiveClip"
    _close(saved["state"]["threshold"], alone.state_dict()["state"]["threshold"])


def test_a_groups_own_clipper_is_checkpointed_by_group_name() -> None:
    model = _model()
    groups = {"body": [*model[0].parameters(), *model[1].parameters()], "head": model[2]}
    first = gradclip.NormClip(1.0, groups=groups, policy={"head": gradclip.AdaptiveClip(window=4)})
    for step in range(6):
        _set_grads(model, step)
        first(model)
    fresh = gradclip.AdaptiveClip(window=4)
    second = gradclip.NormClip(1.0, groups=groups, policy={"head": fresh})
    second.load_state_dict(first.state_dict())
    for key, value in first.state_dict()["groups"]["clippers"]["head"]["state"].items():
        assert torch.equal(fresh.state_dict()["state"][key], value)
    corrupt = first.state_dict()
    corrupt["groups"]["clippers"]["head"]["state"]["threshold"] = torch.tensor(math.nan)
    with pytest.raises(ValueError, match="NaN"):
        gradclip.NormClip(1.0, groups=groups,
                          policy={"head": gradclip.AdaptiveClip(window=4)}).load_state_dict(corrupt)


def test_a_copied_clipper_clips_the_same_groups_with_its_own_state() -> None:
    import copy
    import pickle

    mine, ref = _model(), _model()
    opt = torch.optim.SGD([{"params": layer.parameters()} for layer in mine], lr=0.1)
    clipper = gradclip.AdaptiveClip(window=4, groups=opt, policy={"1": gradclip.NormClip(0.5)})
    _set_grads(mine, 0)
    clipper(mine)
    twin = copy.deepcopy(clipper)
    assert twin._grouping.raw is opt  # the live groups, not a copy of the optimizer
    for step in range(1, 6):
        _set_grads(mine, step)
        a = clipper(mine).groups.threshold
        _set_grads(mine, step)
        b = twin(mine).groups.threshold
        assert torch.equal(a, b)
    assert pickle.loads(pickle.dumps(gradclip.NormClip(1.0, groups=_layers(ref)))).norm_type == 2.0


def test_group_stats_are_each_groups_norms_and_factors() -> None:
    model = _model()
    _set_grads(model, 3)
    before = [tnu.get_total_norm([q.grad for q in layer.parameters()]) for layer in model]
    stats = gradclip.NormClip(0.5, groups=_layers(model))(model)
    after = [tnu.get_total_norm([q.grad for q in layer.parameters()]) for layer in model]
    assert stats.groups.names == ("0", "1", "2")
    _close(stats.groups.norm, torch.stack(before))
    _close(stats.groups.post_norm, torch.stack(after))
    _close(stats.groups.coef, torch.stack(after) / torch.stack(before))
    assert torch.equal(stats.groups.threshold, torch.full((3,), 0.5))
    assert math.isnan(stats.threshold)  # several domains: no single threshold
    _close(stats.norm, tnu.get_total_norm(before))
    as_dict = stats.groups.to_dict()
    assert as_dict["1"]["norm"] == pytest.approx(float(before[1]))


@pytest.mark.parametrize("entry", BY_NORM, ids=[e.label or e.name for e in BY_NORM])
def test_resume_with_groups_equals_uninterrupted(entry: Entry) -> None:
    def make(model):
        return entry.make(groups=_layers(model), policy=["own", "shared", "shared"])

    steps = 2 * entry.warmup + 20
    ref_model, model = _model(), _model()
    reference = make(ref_model)
    first = make(model)
    for step in range(steps):
        _set_grads(ref_model, step)
        reference(ref_model)
        if step == steps // 2:
            buffer = io.BytesIO()
            torch.save(first.state_dict(), buffer)
            buffer.seek(0)
            first = make(model)
            first.load_state_dict(torch.load(buffer))
        _set_grads(model, step)
        first(model)
        for a, b in zip(model.parameters(), ref_model.parameters(), strict=True):
            assert torch.equal(a.grad, b.grad)


def test_a_checkpoint_with_groups_needs_a_clipper_with_groups() -> None:
    model = _model()
    _set_grads(model, 0)
    grouped = gradclip.AdaptiveClip(groups=_layers(model))
    grouped(model)
    with pytest.raises(ValueError, match="saved with groups="):
        gradclip.AdaptiveClip().load_state_dict(grouped.state_dict())
    with pytest.raises(ValueError, match="saved without groups="):
        gradclip.AdaptiveClip(groups=_layers(model)).load_state_dict(gradclip.AdaptiveClip().state_dict())
    with pytest.raises(ValueError, match="other group policies"):
        gradclip.AdaptiveClip(groups=_layers(model), policy="shared").load_state_dict(
            grouped.state_dict())


def test_grouped_step_reads_no_device_value(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(_foreach, "is_host_device", lambda device: False)
    model = _model()
    clipper = gradclip.AdaptiveClip(window=4, groups=_layers(model),
                                    policy=["own", "shared", gradclip.NormClip(0.1)])
    for step in range(8):
        _set_grads(model, step)
        with HostReadDetector() as mode:
            clipper(model)
        assert mode.reads == [], (step, mode.reads)


# ---------------------------------------------------------------------------------------
# Clipper.step with Muon


def _muon_model():
    model = _model()
    matrices = [model[1].weight]
    rest = [q for q in model.parameters() if q is not model[1].weight]
    return model, torch.optim.Muon(matrices, lr=0.02), torch.optim.AdamW(rest, lr=1e-3)


def test_step_leaves_muon_groups_out_and_warns_once() -> None:
    model, muon, adamw = _muon_model()
    ref, _, _ = _muon_model()
    clipper = gradclip.NormClip(0.1)
    with pytest.warns(UserWarning, match=r"leaves the parameter group\(s\) \['0'\] \(Muon\).*"
                                        r"orthogonal=None"):
        _set_grads(model, 0)
        # the clip happens inside step(): look at the gradients the optimizers saw
        muon_grad = model[1].weight.grad.clone()
        stats = clipper.step(model, [muon, adamw])
    assert torch.equal(model[1].weight.grad, muon_grad)
    _set_grads(ref, 0)
    rest = [q for q in ref.parameters() if q is not ref[1].weight]
    tnu.clip_grad_norm_(rest, 0.1)
    for a, b in zip(model.parameters(), ref.parameters(), strict=True):
        _close(a.grad, b.grad)
    assert stats.groups.excluded == (True, False)
    _close(stats.threshold, torch.tensor(0.1))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        _set_grads(model, 1)
        clipper.step(model, [muon, adamw])  # no second warning


def test_step_with_orthogonal_none_clips_everything_globally() -> None:
    model, muon, adamw = _muon_model()
    ref = _model()
    _set_grads(model, 0)
    _set_grads(ref, 0)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        gradclip.NormClip(0.1, orthogonal=None).step(model, [muon, adamw])
        gradclip.NormClip(0.1, orthogonal=None)  # builds silently
    tnu.clip_grad_norm_(ref.parameters(), 0.1)
    for a, b in zip(model.parameters(), ref.parameters(), strict=True):
        _close(a.grad, b.grad)


def test_step_without_muon_is_the_plain_step() -> None:
    model, ref = _model(), _model()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    ref_opt = torch.optim.SGD(ref.parameters(), lr=0.1)
    _set_grads(model, 0)
    _set_grads(ref, 0)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        stats = gradclip.NormClip(0.1).step(model, opt)
    tnu.clip_grad_norm_(ref.parameters(), 0.1)
    ref_opt.step()
    assert stats.groups is None
    for a, b in zip(model.parameters(), ref.parameters(), strict=True):
        assert torch.equal(a, b)


def test_step_with_muon_clipped_on_its_own_norm_by_policy() -> None:
    model, muon, adamw = _muon_model()
    ref = _model()
    clipper = gradclip.NormClip(0.1, groups=[muon, adamw], policy={"0": "own"})
    _set_grads(model, 0)
    _set_grads(ref, 0)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a policy names the Muon group: no warning
        clipper(model)
    tnu.clip_grad_norm_([ref[1].weight], 0.1)
    tnu.clip_grad_norm_([q for q in ref.parameters() if q is not ref[1].weight], 0.1)
    for a, b in zip(model.parameters(), ref.parameters(), strict=True):
        _close(a.grad, b.grad)


def test_the_demo_combined_optimizer_is_recognised() -> None:
    from gradclip.demo.problems import MuonAdamW

    model, muon, adamw = _muon_model()
    _set_grads(model, 0)
    muon_grad = model[1].weight.grad.clone()
    with pytest.warns(UserWarning, match="MuonAdamW"):
        stats = gradclip.AdaptiveClip().step(model, MuonAdamW(muon, adamw))
    assert stats.groups.excluded == (True, False)
    assert torch.equal(model[1].weight.grad, muon_grad)


# ---------------------------------------------------------------------------------------
# bad input


def test_a_group_not_in_the_optimizer_is_refused_before_anything_changes() -> None:
    model, muon, adamw = _muon_model()
    other = torch.nn.Linear(3, 3)
    clipper = gradclip.NormClip(0.1, groups={"main": model, "other": other})
    _set_grads(model, 0)
    for q in other.parameters():
        q.grad = torch.ones_like(q)
    snap = Snapshot([*model.parameters(), *other.parameters()])
    weights = [q.detach().clone() for q in model.parameters()]
    with pytest.raises(ValueError, match="group 'other' is not in the optimizer"):
        clipper.step({**dict(model.named_parameters()),
                      **{f"o.{n}": q for n, q in other.named_parameters()}}, [muon, adamw])
    snap.assert_unchanged()
    for q, w in zip(model.parameters(), weights, strict=True):
        assert torch.equal(q, w)


@pytest.mark.parametrize("kwargs, error, match", [
    ({"policy": {"head": "own"}}, ValueError, r"names \['head'\].*not among the groups"),
    ({"policy": ["own", "own"]}, ValueError, "2 entries for 3 groups"),
    ({"policy": ["own", "own", "sideways"]}, ValueError, "'sideways' is not one of"),
    ({"policy": ["own", "own", gradclip.AGC()]}, TypeError, "AGC clips units or elements"),
    ({"policy": ["own", "own", gradclip.NormClip(1.0, math.inf)]}, ValueError,
     "norm_type=inf"),
    ({"policy": ["own", "own", object()]}, TypeError, "is not a gradclip Clipper"),
    ({"orthogonal": "muon"}, TypeError, "`orthogonal` must be a callable"),
])
def test_bad_group_arguments_are_refused_at_construction(kwargs, error, match) -> None:
    model = _model()
    with pytest.raises(error, match=match):
        gradclip.NormClip(1.0, groups=_layers(model), **kwargs)


def test_a_threshold_policy_needs_a_clipper_with_one_threshold() -> None:
    model = _model()
    with pytest.raises(TypeError, match="AdaptiveClip has none"):
        gradclip.AdaptiveClip(groups=_layers(model), policy=[0.5, "own", "own"])
    with pytest.raises(TypeError, match="AGC"):
        gradclip.AGC(groups=_layers(model), policy=[0.5, "own", "own"])
    with pytest.raises(TypeError, match="its groups take 'exclude', 'own' or 'shared' only"):
        gradclip.AGC(groups=_layers(model), policy=["own", gradclip.NormClip(1.0), "own"])


@pytest.mark.parametrize("case", ["two groups", "no gradients", "in no group"])
def test_bad_groups_at_call_time_change_nothing(case: str) -> None:
    model = _model()
    _set_grads(model, 0)
    layers = _layers(model)
    frozen = torch.nn.Linear(2, 2)
    groups, match = {
        "two groups": ([layers[0], layers[0][:1] + layers[1], layers[2]],
                       r"'0\.weight' is in two groups, '0' and '1'"),
        "no gradients": ([*layers, list(frozen.parameters())],
                         r"group\(s\) \['3'\] hold no parameter with a gradient"),
        "in no group": (layers[:2], r"parameter\(s\) with a gradient are in no group: "
                                    r"\['2\.weight', '2\.bias'\]"),
    }[case]
    clipper = gradclip.AdaptiveClip(groups=groups)
    snap = Snapshot(model.parameters())
    with pytest.raises(ValueError, match=match):
        clipper(model)
    snap.assert_unchanged()
    assert int(clipper.steps) == 0


def _spiking_clipper(model: torch.nn.Sequential, policy: str) -> gradclip.Clipper:
    return gradclip.AdaptiveClip(
        window=8, groups=_layers(model), policy=["own", "exclude", "shared"],
        spikes=gradclip.SpikeDetector(policy, window=16, warmup=5, max_skips=None),
    )


def _spike(model: torch.nn.Sequential, step: int) -> list[torch.Tensor]:
    _set_grads(model, step)
    for q in model.parameters():
        q.grad *= 1000.0
    return [q.grad.clone() for q in model.parameters()]


def test_a_spike_detector_judges_the_whole_model_and_clips_only_the_clipped_groups() -> None:
    """With groups, the detector judges the whole model's norm. On a spike, "clip" scales
    the clipped groups down once more and leaves an excluded group alone; the post-clip norm
    it reports is the norm of the gradients it left."""
    model = _model()
    clipper = _spiking_clipper(model, "clip")
    for step in range(12):
        _set_grads(model, step)
        clipper(model)
    before = _spike(model, 12)
    stats = clipper(model)
    assert bool(stats.spike) and not bool(stats.skipped)
    after = list(model.parameters())
    assert all(torch.equal(a.grad, b) for a, b in zip(after[2:4], before[2:4], strict=True))
    assert not torch.equal(after[0].grad, before[0])
    _close(stats.post_norm, tnu.get_total_norm([q.grad for q in after]))
    groups = stats.groups
    assert groups.excluded == (False, True, False) and float(groups.coef[1]) == 1.0


def test_a_spike_skipped_with_groups_changes_nothing_and_resumes_exactly() -> None:
    """"skip" with groups: the spike step leaves every gradient as it was (no group's clipper
    scales it); a checkpoint holds the groups and the detector, and a clipper resumed from it
    goes on exactly as the uninterrupted one."""
    ref_model, model = _model(), _model()
    reference, first = _spiking_clipper(ref_model, "skip"), _spiking_clipper(model, "skip")
    for step in range(20):
        if step == 12:
            _spike(ref_model, step)
            before = _spike(model, step)
        else:
            _set_grads(ref_model, step)
            _set_grads(model, step)
        want = reference(ref_model)
        got = first(model)
        if step == 12:
            assert bool(got.skipped) and bool(got.spike)
            assert all(torch.equal(q.grad, b) for q, b in zip(model.parameters(), before, strict=True))
        if step == 14:
            buffer = io.BytesIO()
            torch.save(first.state_dict(), buffer)
            buffer.seek(0)
            first = _spiking_clipper(model, "skip")
            first.load_state_dict(torch.load(buffer))
        for a, b in zip(model.parameters(), ref_model.parameters(), strict=True):
            _close(a.grad, b.grad)
        torch.testing.assert_close(got.groups.threshold, want.groups.threshold, equal_nan=True)


def test_uses_loss_sees_the_rule_the_detector_and_every_groups_own_clipper() -> None:
    w = torch.nn.Parameter(torch.zeros(2))
    assert not gradclip.NormClip(1.0).uses_loss
    assert gradclip.AdaptiveClip().uses_loss and not gradclip.AdaptiveClip(follow_loss=False).uses_loss
    assert gradclip.NormClip(1.0, spikes="skip").uses_loss
    assert gradclip.NormClip(1.0, policy={"g": gradclip.AdaptiveClip()}).uses_loss
    assert not gradclip.NormClip(1.0, policy={"g": gradclip.AutoClip()}).uses_loss
    group = {"params": [w], "name": "g", "clip": gradclip.AdaptiveClip()}
    assert gradclip.NormClip(1.0, groups=[group]).uses_loss
    # the optimizer's live param_groups, as a step reads them: a policy set after the build
    opt = torch.optim.SGD([{"params": [w], "name": "g"}], lr=0.1)
    clipper = gradclip.NormClip(1.0, groups=opt.param_groups)
    assert not clipper.uses_loss
    opt.param_groups[0]["clip"] = gradclip.AdaptiveClip()
    assert clipper.uses_loss
