"""The embedded demo tasks: the registry, determinism, and the phenomena each task shows.

References are torch itself (``gradclip.clip_grad_norm_`` is torch's algorithm, checked
elsewhere against ``torch.nn.utils``); no number from a previous run of these tasks is
asserted.
"""

from __future__ import annotations

import pytest
import torch

import gradclip
from gradclip.demo.runner import RunResult, run
from gradclip.demo.tasks import REFERENCES, TASKS, Task, resolve

SHORT = {"rnn-addition/violent": 15, "rnn-addition/moderate": 15, "adam-spikes": 30,
         "sgd-heavy-tail": 40, "muon-adamw": 10, "sgd-label-noise": 40, "lm-transformer": 4,
         "lstm-text": 4, "cnn-digits/sgd": 6, "cnn-digits/adamw": 6}


def fixed(max_norm: float):
    return lambda model: gradclip.clip_grad_norm_(model.parameters(), max_norm)


def per_step_lengths(result: RunResult) -> set[int]:
    return {len(getattr(result, f)) for f in
            ("losses", "pre_norms", "post_norms", "thresholds", "update_norms", "clipped")}


def test_registry_keys_and_fields():
    assert set(TASKS) == set(SHORT)
    for key, task in TASKS.items():
        assert task.key == key
        assert 0 < task.quick_steps < task.steps
        assert task.failure_level > 0 and task.metric_name and task.description
    assert REFERENCES["adam-spikes"].config.glitch_at == ()


@pytest.mark.parametrize("key", sorted(SHORT))
def test_same_seed_same_run_and_global_rng_untouched(key):
    rng_before = torch.get_rng_state()
    a = run(key, fixed(1.0), seed=3, steps=SHORT[key])
    b = run(key, fixed(1.0), seed=3, steps=SHORT[key])
    assert torch.equal(torch.get_rng_state(), rng_before)
    assert a.losses == b.losses
    assert a.pre_norms == b.pre_norms and a.update_norms == b.update_norms
    assert a.metric == b.metric
    assert a.steps == a.planned_steps == SHORT[key]
    assert per_step_lengths(a) == {SHORT[key]}


@pytest.mark.parametrize("key", sorted(SHORT))
def test_different_seeds_differ(key):
    a = run(key, None, seed=0, steps=SHORT[key])
    b = run(key, None, seed=1, steps=SHORT[key])
    assert a.losses != b.losses


def test_global_rng_does_not_change_a_run():
    torch.manual_seed(0)
    a = run("adam-spikes", None, seed=0, steps=10)
    torch.manual_seed(12345)
    torch.rand(7)
    b = run("adam-spikes", None, seed=0, steps=10)
    assert a.losses == b.losses


def test_quick_rnn_violent_no_clip_diverges_fixed_one_does_not():
    none = run("rnn-addition/violent", None, quick=True)
    good = run("rnn-addition/violent", fixed(1.0), quick=True)
    assert none.diverged and none.nonfinite_steps > 0
    assert not good.diverged and good.nonfinite_steps == 0
    assert good.steps == TASKS["rnn-addition/violent"].quick_steps
    assert good.metric < none.metric


def test_quick_heavy_tail_clipping_beats_no_clipping():
    none = run("sgd-heavy-tail", None, quick=True)
    good = run("sgd-heavy-tail", fixed(0.5), quick=True)
    assert good.metric < 0.5 * none.metric


def test_glitch_batches_only_in_the_spiky_task():
    steps = 60
    glitches = {round(f * steps) for f in TASKS["adam-spikes"].config.glitch_at}
    spiky = run("adam-spikes", None, steps=steps)
    clean = run(REFERENCES["adam-spikes"], None, steps=steps)
    typical = sorted(clean.losses)[steps // 2]
    for i in range(steps):
        assert (spiky.losses[i] > 1000 * typical) == (i in glitches)
    assert max(clean.losses[5:]) < 1000 * typical


def test_resolve_names_the_keys_and_refuses_other_types():
    assert resolve("adam-spikes") is TASKS["adam-spikes"]
    assert resolve(TASKS["adam-spikes"]) is TASKS["adam-spikes"]
    assert isinstance(REFERENCES["adam-spikes"], Task)
    with pytest.raises(KeyError, match="choose one of: rnn-addition/violent"):
        resolve("rnn")
    with pytest.raises(TypeError, match="`task` must be a task key"):
        resolve(3)


def test_quick_muon_default_policy_trains_as_no_clipping_a_global_clip_does_worse():
    """The mechanism of NVIDIA/Megatron-LM#5394 on the embedded Muon task: a global
    coefficient (total norm ~1e7) starves the classifier; gradclip's default policy (Muon
    groups left out, the AdamW groups clipped on their own norm) does not."""
    none = run("muon-adamw", None, quick=True)
    with pytest.warns(UserWarning, match=r"leaves the parameter group\(s\) \['0'\] \(MuonAdamW\)"):
        default = run("muon-adamw", gradclip.NormClip(1.0), quick=True)
    global_ = run("muon-adamw", gradclip.NormClip(1.0, orthogonal=None), quick=True)
    assert min(global_.pre_norms) > 1e6  # the imbalance is there from the first step
    assert default.metric < 1.1 * none.metric
    assert global_.metric > 1.2 * none.metric
    assert all(global_.clipped) and sum(default.clipped) < len(default.clipped)


def test_label_noise_corrupted_batches_hurt_and_skipping_them_is_the_clean_run():
    """Six late batches with label noise x1000: without clipping the weights end far from w*;
    a spike detector skips exactly those batches and ends where the clean run ends (the clean
    run takes a step on the same batches with ordinary noise)."""
    task = TASKS["sgd-label-noise"]
    # Long enough for the corrupted batches to come after the weights converged: while the
    # norms still fall by decades, their window's spread hides even a x1000 batch.
    steps = 1000
    clean = run(REFERENCES["sgd-label-noise"], None, steps=steps)
    none = run(task, None, steps=steps)
    skip = run(task, gradclip.NormClip(float("inf"), spikes="skip"), steps=steps)
    corrupted = {round(f * steps) for f in task.config.corrupt_at}
    assert skip.skipped_steps == len(corrupted)
    assert {i for i, u in enumerate(skip.update_norms) if u == 0.0} == corrupted
    assert none.metric > 10 * clean.metric
    assert skip.metric < 1.5 * clean.metric
    assert REFERENCES["sgd-label-noise"].config.corrupt_at == ()
