"""The real-data problems: the text and the digits as shipped, splits, schedules, models."""

from __future__ import annotations

import math

import pytest
import torch

from gradclip.demo.real_problems import (
    DigitsConfig,
    DigitsProblem,
    TextConfig,
    TextProblem,
    corpus,
)

CPU = torch.device("cpu")


def test_corpus_is_the_python_docs_in_printable_ascii():
    from pydoc_data.topics import topics

    ids, alphabet = corpus()
    assert len(ids) > 400_000 and ids.dtype == torch.long
    assert all(ch == "\n" or 32 <= ord(ch) < 127 for ch in alphabet)
    text = "".join(alphabet[i] for i in ids[:2000].tolist())
    first = topics[sorted(topics)[0]]
    assert text[:200] == "".join(c if c == "\n" or 32 <= ord(c) < 127 else "?" for c in first[:200])


@pytest.mark.parametrize("model", ["transformer", "lstm"])
def test_text_problem_untrained_scores_about_log_vocabulary(model):
    problem = TextProblem(TextConfig(model=model), seed=0, steps=10, device=CPU)
    _, alphabet = corpus()
    # an untrained model predicts near-uniformly: cross-entropy near log(vocabulary)
    assert abs(problem.metric() - math.log(len(alphabet))) < 0.5
    loss = problem.loss(0)
    assert loss.shape == () and torch.isfinite(loss)
    split = round(len(corpus()[0]) * 0.9)
    assert problem.train.shape[0] == split  # held-out text is never trained on


def test_transformer_schedule_is_linear_warmup_then_cosine():
    cfg = TextConfig(lr=1e-2, warmup=0.1, min_lr=0.1)
    problem = TextProblem(cfg, seed=0, steps=100, device=CPU)
    lrs = []
    for step in range(100):
        lrs.append(problem.optimizer.param_groups[0]["lr"])
        problem.optimizer.step()
        problem.after_step(step)
    ramp = 10
    for step, lr in enumerate(lrs):
        if step < ramp:
            expected = 1e-2 * (step + 1) / ramp
        else:
            progress = (step - ramp) / (100 - ramp)
            expected = 1e-2 * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))
        assert lr == pytest.approx(expected, rel=1e-12)


def test_digits_split_is_fixed_and_disjoint():
    a = DigitsProblem(DigitsConfig(), seed=0, steps=10, device=CPU)
    b = DigitsProblem(DigitsConfig(), seed=5, steps=10, device=CPU)
    assert torch.equal(a.test_x, b.test_x)  # the split does not depend on the run seed
    assert len(a.test_y) == round(0.25 * 1797) and len(a.train_y) == 1797 - len(a.test_y)
    train = {tuple(x.flatten().tolist()) for x in a.train_x}
    overlap = sum(tuple(x.flatten().tolist()) in train for x in a.test_x)
    assert overlap < 0.05 * len(a.test_y)  # the UCI set has a few duplicate images, no more
    assert float(a.train_x.max()) == 1.0 and float(a.train_x.min()) == 0.0
    assert abs(a.metric() - math.log(10)) < 0.5


def test_digits_adamw_has_a_schedule_and_sgd_has_none():
    adamw = DigitsProblem(DigitsConfig(optimizer="adamw", lr=1e-2), seed=0, steps=50, device=CPU)
    sgd = DigitsProblem(DigitsConfig(), seed=0, steps=50, device=CPU)
    assert isinstance(adamw.optimizer, torch.optim.AdamW) and adamw.scheduler is not None
    assert isinstance(sgd.optimizer, torch.optim.SGD) and sgd.scheduler is None
    assert sgd.optimizer.param_groups[0]["momentum"] == 0.9
