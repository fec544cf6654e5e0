"""accelerate keeps process-wide state; each test starts without it."""

from __future__ import annotations

import sys

import pytest


@pytest.fixture(autouse=True)
def _fresh_accelerate_state():
    """accelerate keeps process-wide state (mixed precision, device): reset it per test."""
    yield
    if "accelerate.state" not in sys.modules:
        return
    from accelerate.state import AcceleratorState, GradientState

    AcceleratorState._reset_state(True)
    GradientState._reset_state()
