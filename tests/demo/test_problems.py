"""The embedded problems: built from their config type, seeded locally, scored as documented."""

from __future__ import annotations

import pytest
import torch

from gradclip.demo.problems import (
    AdditionConfig,
    HeavyTailConfig,
    MuonAdamW,
    MuonConfig,
    SpikesConfig,
    build_problem,
)

CPU = torch.device("cpu")


@pytest.mark.parametrize("config", [AdditionConfig(lr=0.05, rho=1.2), SpikesConfig(),
                                    HeavyTailConfig(), MuonConfig()])  # fmt: skip
def test_a_problem_is_its_configs_and_leaves_the_global_rng_alone(config):
    rng = torch.get_rng_state()
    a, b = (build_problem(config, seed=1, steps=20, device=CPU) for _ in range(2))
    assert torch.equal(torch.get_rng_state(), rng)
    for pa, pb in zip(a.model.parameters(), b.model.parameters(), strict=True):
        assert torch.equal(pa, pb)
    assert torch.equal(a.loss(0), b.loss(0))


def test_addition_targets_are_the_sum_of_the_marked_values():
    from gradclip.demo.problems import _addition_batch

    x, y = _addition_batch(50, 30, torch.Generator().manual_seed(0))
    values, markers = x[..., 0], x[..., 1]
    assert torch.equal(markers.sum(dim=1), torch.full((50,), 2.0))
    torch.testing.assert_close((values * markers).sum(dim=1), y)


def test_heavy_tail_starts_at_w_zero_one_away_from_w_star():
    problem = build_problem(HeavyTailConfig(), seed=0, steps=10, device=CPU)
    assert torch.count_nonzero(problem.model.weight) == 0
    assert problem.metric() == pytest.approx(1.0, rel=1e-6)  # ||0 - w*|| with ||w*|| = 1


def test_a_config_of_another_type_is_refused():
    with pytest.raises(TypeError, match=r"`config` must be a task config: .*LabelNoiseConfig, got dict"):
        build_problem({"lr": 0.1}, seed=0, steps=5, device=CPU)


def test_muon_problem_splits_the_optimizers_as_the_recipe_does():
    problem = build_problem(MuonConfig(), seed=0, steps=5, device=CPU)
    model, opt = problem.model, problem.optimizer
    assert isinstance(opt, MuonAdamW)
    muon, adamw = opt.optimizers
    assert isinstance(muon, torch.optim.Muon) and isinstance(adamw, torch.optim.AdamW)
    in_muon = {id(q) for g in muon.param_groups for q in g["params"]}
    assert in_muon == {id(model.hidden.weight), id(model.reg_in.weight), id(model.reg_out.weight)}
    assert {id(q) for g in opt.param_groups for q in g["params"]} == {id(q) for q in model.parameters()}
    problem.loss(0).backward()
    reg = torch.linalg.vector_norm(model.reg_out.weight.grad)
    cls = torch.linalg.vector_norm(model.head.weight.grad)
    assert reg > 1e5 * cls  # the imbalance the task is about
    opt.step()
    opt.zero_grad()
    assert all(q.grad is None for q in model.parameters())
