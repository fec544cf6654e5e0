"""The finder on the embedded tasks: which tasks it runs on."""

from __future__ import annotations

import pytest

from gradclip.demo.search import SEARCHABLE, search_task
from gradclip.demo.tasks import TASKS


def test_every_task_with_one_optimizer_is_searchable():
    assert [k for k in TASKS if k not in SEARCHABLE] == ["muon-adamw"]


def test_a_task_with_two_optimizers_is_refused_before_anything_runs():
    with pytest.raises(ValueError, match=r"'muon-adamw' steps two optimizers.*one of rnn-addition"):
        search_task("muon-adamw", horizon=2, candidates=[1.0])
