"""The distributed arguments without a process group: defaults are a no-op, extras are refused."""

from __future__ import annotations

import inspect

import pytest
import torch

import gradclip
from gradclip import distributed


def _params():
    p = torch.nn.Parameter(torch.zeros(2))
    p.grad = torch.tensor([3.0, 4.0])
    return [p]


def test_not_initialised_is_the_single_process_path(monkeypatch):
    assert not distributed.is_active()
    calls = []
    monkeypatch.setattr(distributed, "plan", lambda *a, **k: calls.append(a))
    assert float(gradclip.clip_grad_norm_(_params(), 1.0)) == 5.0
    assert float(gradclip.get_total_norm([torch.tensor([3.0, 4.0])])) == 5.0
    assert float(gradclip.grad_norms(_params()).total) == 5.0
    gradclip.NormClip(1.0)(_params())
    assert calls == []  # nothing distributed ran


@pytest.mark.parametrize(
    "call",
    [
        lambda: gradclip.clip_grad_norm_(_params(), 1.0, shard_group=object()),
        lambda: gradclip.get_total_norm([torch.ones(2)], extra_groups=[object()]),
        lambda: gradclip.grad_norms(_params(), shard_group=object()),
        lambda: gradclip.NormClip(1.0, extra_groups=[object()])(_params()),
    ],
)
def test_groups_without_init_process_group_raise(call):
    with pytest.raises(ValueError, match=r"not initialised.*init_process_group"):
        call()


@pytest.mark.parametrize("name", ["NormClip", "ValueClip", "AutoClip", "ZClip", "AGC", "AdaGC",
                                  "AdaptiveClip"])
def test_every_clipper_takes_the_keywords(name):
    parameters = inspect.signature(getattr(gradclip, name)).parameters
    for keyword in ("shard_group", "extra_groups"):
        assert parameters[keyword].kind is inspect.Parameter.KEYWORD_ONLY


def test_drop_ins_take_the_keywords():
    for fn in (gradclip.clip_grad_norm_, gradclip.clip_grad_norm, gradclip.get_total_norm,
               gradclip.grad_norms):
        parameters = inspect.signature(fn).parameters
        assert parameters["shard_group"].default is None
        assert parameters["extra_groups"].default == ()
