"""The clipper registry: how to build each clipper and which arguments it must refuse.

One entry per public clipper drives the whole conformance suite (test_conformance.py):
adding a clipper here runs it through every shared test.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass, field
from typing import Any

import gradclip


@dataclass(frozen=True)
class Entry:
    """A clipper under test.

    Attributes:
        name: the public class name (``gradclip.<name>``).
        kwargs: constructor arguments for the shared tests (chosen so the clipper is
            active after ``warmup`` steps of norms near 1).
        bad: ``(kwargs, exception type, argument name the message must contain)``.
        warmup: steps before the adaptive statistics act.
        scales_globally: one coefficient for every gradient (foldable into fused optimizers).
        label: the test id when one class has several entries (a mode of it).
    """

    name: str
    kwargs: dict[str, Any] = field(default_factory=dict)
    bad: tuple[tuple[dict[str, Any], type[Exception], str], ...] = ()
    warmup: int = 0
    scales_globally: bool = True
    label: str = ""

    def cls(self) -> type[gradclip.Clipper]:
        cls = getattr(gradclip, self.name, None)
        if cls is None:  # not exported yet: look in gradclip.clippers.<module>
            module = importlib.import_module(f"gradclip.clippers.{self.name.lower()}")
            cls = getattr(module, self.name)
        return cls

    def make(self, **overrides: Any) -> gradclip.Clipper:
        return self.cls()(**{**self.kwargs, **overrides})


ENTRIES: tuple[Entry, ...] = (
    Entry(
        "NormClip",
        {"max_norm": 1.0},
        (
            ({"max_norm": -1.0}, ValueError, "max_norm"),
            ({"max_norm": float("nan")}, ValueError, "max_norm"),
            ({"max_norm": "one"}, ValueError, "max_norm"),
            ({"max_norm": 1.0, "norm_type": "fro"}, ValueError, "norm_type"),
            ({"max_norm": 1.0, "nonfinite": "ignore"}, ValueError, "nonfinite"),
        ),
    ),
    Entry(
        "ValueClip",
        {"clip_value": 0.05},
        (
            ({"clip_value": -0.1}, ValueError, "clip_value"),
            ({"clip_value": float("nan")}, ValueError, "clip_value"),
            ({"clip_value": 0.1, "nonfinite": "ignore"}, ValueError, "nonfinite"),
        ),
        scales_globally=False,
    ),
    Entry(
        "AutoClip",
        {"percentile": 50.0, "window": 16},
        (
            ({"percentile": 0.0}, ValueError, "percentile"),
            ({"percentile": 101.0}, ValueError, "percentile"),
            ({"window": 0}, ValueError, "window"),
            ({"nonfinite": "ignore"}, ValueError, "nonfinite"),
        ),
        warmup=1,
    ),
    Entry(
        "ZClip",
        {"warmup_steps": 5},
        (
            ({"alpha": 1.0}, ValueError, "alpha"),
            ({"alpha": 0.0}, ValueError, "alpha"),
            ({"z_threshold": -1.0}, ValueError, "z_threshold"),
            ({"warmup_steps": 0}, ValueError, "warmup_steps"),
            ({"mode": "mean"}, ValueError, "mode"),
            ({"max_norm": -1.0}, ValueError, "max_norm"),
        ),
        warmup=5,
    ),
    Entry(
        "AGC",
        # Explicit patterns: the default LAST_LINEAR rule needs a module target, and
        # test_parameter_targets_agree compares a module with name/param pairs.
        {"clipping": 0.05, "exclude": ("3.*",)},
        (
            ({"clipping": 0.0}, ValueError, "clipping"),
            ({"clipping": -1.0}, ValueError, "clipping"),
            ({"clipping": float("nan")}, ValueError, "clipping"),
            ({"eps": -1e-3}, ValueError, "eps"),
            ({"exclude": 3}, TypeError, "exclude"),
            ({"nonfinite": "ignore"}, ValueError, "nonfinite"),
        ),
        scales_globally=False,
    ),
    Entry(
        "AdaGC",
        {"warmup_steps": 10},
        (
            ({"relative": 0.0}, ValueError, "relative"),
            ({"beta": 0.0}, ValueError, "beta"),
            ({"beta": 1.0}, ValueError, "beta"),
            ({"warmup_steps": -1}, ValueError, "warmup_steps"),
            ({"warmup_max_norm": 0.0}, ValueError, "warmup_max_norm"),
            ({"nonfinite": "ignore"}, ValueError, "nonfinite"),
        ),
        warmup=10,
        scales_globally=False,
    ),
    Entry(
        "AdaptiveClip",
        # A short window so that spikes are looked for after `warmup` steps; a warm-up ramp
        # starting at half the first norm, so that the first steps are already clipped.
        {"window": 8, "warmup_start": 0.5},
        (
            ({"relative": 0.0}, ValueError, "relative"),
            ({"window": 0}, ValueError, "window"),
            ({"growth": -1e-3}, ValueError, "growth"),
            ({"warmup_start": 0.0}, ValueError, "warmup_start"),
            ({"spike": 1.0}, ValueError, "spike"),
            ({"backoff": 0.0}, ValueError, "backoff"),
            ({"min_relative": 4.0}, ValueError, "min_relative"),
            ({"max_norm": -1.0}, ValueError, "max_norm"),
            ({"nonfinite": "ignore"}, ValueError, "nonfinite"),
        ),
        warmup=8,
    ),
    Entry(
        "AdaptiveClip",
        # hold mode (AdaptiveClip(optimizer=Adam) picks it): one threshold, set by the first
        # norm and held; active from the first step
        {"hold": 0.5},
        (
            ({"hold": 0.0}, ValueError, "hold"),
            ({"hold": float("inf")}, ValueError, "hold"),
            ({"hold": "0.5"}, TypeError, "hold"),
        ),
        label="AdaptiveClip(hold)",
    ),
)
