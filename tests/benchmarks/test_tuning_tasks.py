"""benchmarks/adamw_mlp.py and spikes_warmup.py: the generated and altered tasks issue 18's
Adam rules were chosen on."""

from __future__ import annotations

import dataclasses
import math
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))
import adamw_mlp
import gradclip
import spikes_warmup
from gradclip.demo.real_problems import _warmup_cosine


def test_the_memorising_schedule_is_the_digits_cnns() -> None:
    cnn = _warmup_cosine(adamw_mlp.STEPS, 0.1, 0.1)
    assert [adamw_mlp._warmup_cosine(s) for s in range(adamw_mlp.STEPS)] == pytest.approx(
        [cnn(s) for s in range(adamw_mlp.STEPS)]
    )


@pytest.mark.parametrize("memorise", [False, True])
def test_a_threshold_that_never_binds_trains_as_no_clipping(monkeypatch, memorise: bool) -> None:
    monkeypatch.setattr(adamw_mlp, "STEPS", 40)
    torch.set_num_threads(1)
    free = adamw_mlp.train(0, lambda o: None, memorise)
    assert adamw_mlp.train(0, lambda o: gradclip.NormClip(1e9), memorise) == free
    clipped = adamw_mlp.train(0, lambda o: gradclip.NormClip(0.01), memorise)
    assert math.isfinite(clipped[0]) and clipped[0] != free[0]


def test_memorising_draws_from_the_fixed_set(monkeypatch) -> None:
    # fresh draws: every batch new; memorising: batches of 32 from the same 640 points
    seen: list[torch.Tensor] = []
    draw = adamw_mlp._draw
    monkeypatch.setattr(adamw_mlp, "STEPS", 20)
    monkeypatch.setattr(adamw_mlp, "_draw", lambda n, gen, noise: seen.append(n) or draw(n, gen, noise))
    adamw_mlp.train(0, lambda o: None, memorise=True)
    assert seen == [adamw_mlp.MEMORISE, 4000]  # the training set and the held-out points
    seen.clear()
    adamw_mlp.train(0, lambda o: None, memorise=False)
    assert seen == [*[adamw_mlp.BATCH] * 20, 4000]


def test_spikes_with_a_warm_up_train_the_demo_task_under_its_schedule(monkeypatch) -> None:
    steps = 30
    monkeypatch.setattr(spikes_warmup, "TASK", dataclasses.replace(spikes_warmup.TASK, steps=steps))
    torch.set_num_threads(1)
    free = spikes_warmup.train(("no clipping", 0))
    assert spikes_warmup.train(("fixed 1e9", 0))[2] == free[2]
    default = spikes_warmup.train(("default", 0))
    assert spikes_warmup.train(("{}", 0))[2] == default[2] != free[2]  # {}: the default
    # the learning rate each step sees: a linear warm-up over the first tenth
    lrs: list[float] = []

    class Recording:
        def step(self, model, optimizer, loss):
            lrs.append(optimizer.param_groups[0]["lr"])
            optimizer.step()

    monkeypatch.setattr(spikes_warmup, "_clipper", lambda strategy, optimizer: Recording())
    spikes_warmup.train(("recorded", 0))
    ramp = round(spikes_warmup.WARMUP * steps)
    lr = spikes_warmup.TASK.config.lr
    assert lrs == pytest.approx([lr * min(1.0, (s + 1) / ramp) for s in range(steps)])
