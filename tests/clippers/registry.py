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
        spikes: the arguments of a :class:`gradclip.SpikeDetector` built fresh for each
            clipper (None: no detector).
        label: the test id (default ``name``).
    """

    name: str
    kwargs: dict[str, Any] = field(default_factory=dict)
    bad: tuple[tuple[dict[str, Any], type[Exception], str], ...] = ()
    warmup: int = 0
    scales_globally: bool = True
    spikes: dict[str, Any] | None = None
    label: str = ""

    @property
    def id(self) -> str:
        return self.label or self.name

    @property
    def skips_spikes(self) -> bool:
        """A detector whose policy skips: a NaN/inf or spike step is skipped whatever the
        ``nonfinite`` policy says."""
        return self.spikes is not None and self.spikes.get("policy", "skip") == "skip"

    def cls(self) -> type[gradclip.Clipper]:
        cls = getattr(gradclip, self.name, None)
        if cls is None:  # not exported yet: look in gradclip.clippers.<module>
            module = importlib.import_module(f"gradclip.clippers.{self.name.lower()}")
            cls = getattr(module, self.name)
        return cls

    def make(self, **overrides: Any) -> gradclip.Clipper:
        kwargs = {**self.kwargs, **overrides}
        if self.spikes is not None and "spikes" not in overrides:
            kwargs["spikes"] = gradclip.SpikeDetector(**self.spikes)
        return self.cls()(**kwargs)


def _spikes_bad(**kwargs: Any) -> tuple[tuple[dict[str, Any], type[Exception], str], ...]:
    """What a clipper with a spike detector refuses, next to its own arguments."""
    return (
        ({**kwargs, "spikes": "later"}, ValueError, "spikes"),
        ({**kwargs, "spikes": 3}, TypeError, "spikes"),
        ({**kwargs, "spikes": {"window": 0}}, ValueError, "window"),
    )


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
    # The spike detector on clippers of every kind (a global coefficient with a statistic,
    # a global one without, per tensor, per row): every contract holds with it. Its warm-up
    # ends after the clipper's, so that the shared tests see spikes judged (the x30 steps of
    # the shared norm sequence), but not in the few-step tests that assume a plain clipper.
    Entry(
        "AdaptiveClip",
        {"window": 8, "warmup_start": 0.5},
        _spikes_bad(),
        warmup=8,
        spikes={"policy": "clip", "window": 16, "warmup": 13, "max_skips": None},
        label="AdaptiveClip+clip",
    ),
    Entry(
        "NormClip",
        {"max_norm": 1.0},
        _spikes_bad(max_norm=1.0),
        spikes={"policy": "skip", "window": 16, "warmup": 5, "max_skips": None},
        label="NormClip+skip",
    ),
    Entry(
        "AdaGC",
        {"warmup_steps": 10},
        _spikes_bad(),
        warmup=10,
        scales_globally=False,
        spikes={"policy": "clip", "window": 16, "warmup": 15, "max_skips": None},
        label="AdaGC+clip",
    ),
    Entry(
        "AGC",
        {"clipping": 0.05, "exclude": ("3.*",)},
        _spikes_bad(),
        scales_globally=False,
        spikes={"policy": "skip", "window": 16, "warmup": 5, "max_skips": None},
        label="AGC+skip",
    ),
    Entry(
        "ZClip",
        {"warmup_steps": 5},
        _spikes_bad(),
        warmup=5,
        spikes={"policy": "off", "window": 16, "warmup": 10},
        label="ZClip+off",
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
