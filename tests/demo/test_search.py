"""The finder on the embedded tasks, the one with two optimizers included."""

from __future__ import annotations

import pytest
import torch

from gradclip.demo.search import search_task


@pytest.mark.filterwarnings("ignore:.*out of the norm and the clip")
def test_the_task_with_two_optimizers_is_searched_with_both():
    search = search_task("muon-adamw", horizon=3, candidates=[0.1, 1.0])
    assert [len(r.trials) for r in search.rounds] == [4, 3]   # round 2: the three fixed ones (none counts)
    assert search.cost.steps == 4 * 3 + 3 * 2
    muon, adamw = search.adaptive["optimizer"]
    assert isinstance(muon, torch.optim.Muon) and isinstance(adamw, torch.optim.AdamW)
    assert all(len(t.losses) == 3 and all(map(torch.isfinite, map(torch.tensor, t.losses)))
               for t in search.rounds[0].trials)  # fmt: skip

