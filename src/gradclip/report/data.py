"""The data step of a report: everything the page shows, computed from a :class:`History`.

No plotting here (and no matplotlib import): :func:`build_report` returns a :class:`Report`
of plain tensors and numbers, which :func:`gradclip.report.render_report` draws.
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor

from gradclip.history import History, MonitorSummary, NonFiniteEvent, SpikeEvent
from gradclip.readlog import read_log
from gradclip.recommend import Recommendation, recommend_max_norm
from gradclip.stalls import STALL_STEPS, Stall

__all__ = ["Report", "bin_max", "build_report", "rolling_mean"]

MAX_EVENTS = 50  # non-finite events, and spikes, listed one by one
MAX_UPDATE_LAYERS = 8  # update-ratio lines drawn (the largest median ratios), besides the total


@dataclass(frozen=True)
class Report:
    """What a report shows. Tensors are CPU, float64 unless said otherwise.

    Attributes:
        title: the page title.
        history: the run (see :class:`~gradclip.History`); its ``problems`` say what was
            wrong with the log.
        summary: clip rate, percentiles, top layers (:class:`~gradclip.MonitorSummary`).
        recommendation: the ``max_norm`` recommendation and its evidence.
        clip_rate: (N,) fraction of the last ``clip_rate_window`` steps that clipped.
        clip_rate_window: the window of ``clip_rate``.
        heatmap_steps: (B,) first step of each column of ``heatmap``.
        heatmap: (G, B) per-layer norms, the largest in each column's steps (NaN: none).
        heatmap_layers: (G,) the layers shown (at most ``max_layers``, the largest ones,
            in module order).
        nonfinite_events: the first non-finite steps with their layers.
        update_ratios: layer -> (N,) ``‖Δθ‖ / ‖θ‖`` (NaN on steps not measured): the
            ``total`` and the layers with the largest median ratio; empty when the run
            recorded no updates (the monitor's ``updates=``).
        group_norms, group_coefs: group -> (N,) the group's pre-clip norm and clip
            coefficient; empty when the clipper had no groups.
        stalls: the runs where clipping stalled the whole model or a group (see
            :class:`gradclip.stalls.StallDetector`).
        spike_events: the first steps a spike detector called spikes, with their forensics
            (:class:`~gradclip.history.SpikeEvent`).
    """

    title: str
    history: History
    summary: MonitorSummary
    recommendation: Recommendation
    clip_rate: Tensor
    clip_rate_window: int
    heatmap_steps: Tensor
    heatmap: Tensor
    heatmap_layers: tuple[str, ...]
    nonfinite_events: tuple[NonFiniteEvent, ...]
    update_ratios: dict[str, Tensor] = field(default_factory=dict)
    group_norms: dict[str, Tensor] = field(default_factory=dict)
    group_coefs: dict[str, Tensor] = field(default_factory=dict)
    stalls: tuple[Stall, ...] = ()
    spike_events: tuple[SpikeEvent, ...] = ()


def rolling_mean(values: Tensor, window: int) -> Tensor:
    """(N,) mean of the last ``window`` values at each position (fewer at the start).

    Example:
        >>> rolling_mean(torch.tensor([1.0, 0.0, 1.0, 1.0]), 2).tolist()
        [1.0, 0.5, 0.5, 1.0]
    """
    v = values.double()
    csum = torch.cat([v.new_zeros(1), v.cumsum(0)])
    end = torch.arange(1, v.numel() + 1)
    start = (end - window).clamp(min=0)
    return (csum[end] - csum[start]) / (end - start)


def bin_max(values: Tensor, bins: int) -> tuple[Tensor, Tensor]:
    """Columns of ``values`` (G, N) grouped into at most ``bins`` runs of equal length; each
    run's largest value per row, ignoring NaN (NaN where a run has none; +inf wins).

    Returns ``(first column index of each run, (G, B) maxima)``.

    Example:
        >>> starts, m = bin_max(torch.tensor([[1.0, 3.0, float("nan"), 2.0]]), 2)
        >>> starts.tolist(), m.tolist()
        ([0, 2], [[3.0, 2.0]])
    """
    g, n = values.shape
    width = max(1, math.ceil(n / bins))
    b = math.ceil(n / width) if n else 0
    padded = values.new_full((g, b * width), math.nan)
    padded[:, :n] = values
    blocks = padded.reshape(g, b, width)
    present = ~blocks.isnan()
    maxima = blocks.nan_to_num(nan=-math.inf, posinf=math.inf).amax(dim=2)
    maxima[~present.any(dim=2)] = math.nan
    return torch.arange(b) * width, maxima


def build_report(
    history: History | str | os.PathLike[str],
    *,
    title: str | None = None,
    max_layers: int = 40,
    max_columns: int = 800,
    stall_steps: int = STALL_STEPS,
    optimizer: torch.optim.Optimizer | Sequence[torch.optim.Optimizer] | str | None = None,
) -> Report:
    """Everything a report shows, from a run's :class:`~gradclip.History` or its log path.

    Args:
        history: the run, or the path of a GradMonitor JSON lines log.
        title: the page title (default: from the log's name).
        max_layers: the heatmap shows at most this many layers (those with the largest
            norms, in module order).
        max_columns: the heatmap merges steps into at most this many columns (the largest
            norm of each), so a spike on one step stays visible.
        stall_steps: steps below the stall floor that make a stall (see
            :class:`gradclip.stalls.StallDetector`).
        optimizer: the run's optimizer, for the recommendation (see
            :func:`gradclip.recommend_max_norm`).

    Raises:
        gradclip.LogError: the log cannot be used at all (see :func:`gradclip.read_log`).

    Example:
        >>> import gradclip
        >>> from gradclip.report import build_report
        >>> norms = [1.0, 1.5, 2.0] * 30 + [40.0]  # one spike
        >>> r = build_report(gradclip.History.from_norms(norms, threshold=1.5))
        >>> round(r.summary.clip_rate, 2), r.recommendation.max_norm, r.recommendation.spike_count
        (0.67, 2.1, 1)
    """
    h = history if isinstance(history, History) else read_log(history)
    n = len(h)
    if title is None:
        title = f"gradclip report: {os.path.basename(h.source)}" if h.source else "gradclip report"
    window = max(1, min(n, max(10, n // 50)))
    # A NaN layer norm on a non-finite step is a NaN gradient, not a missing value: make it
    # win its heatmap column (drawn red) instead of vanishing like an absent layer.
    layers = torch.where(h.layers.isnan() & ~h.finite[:, None], math.inf, h.layers)
    names = h.layer_names
    if len(names) > max_layers:
        peak = layers.nan_to_num(nan=-math.inf, posinf=math.inf).amax(dim=0)
        keep = sorted(peak.argsort(descending=True)[:max_layers].tolist())
        layers, names = layers[:, keep], tuple(names[i] for i in keep)
    starts, heat = bin_max(layers.T.contiguous(), max_columns) if n else (
        torch.zeros(0, dtype=torch.long), layers.T)  # fmt: skip
    return Report(
        title=title,
        history=h,
        summary=h.summary(),
        recommendation=recommend_max_norm(h, optimizer=optimizer),
        clip_rate=rolling_mean(h.clipped, window) if n else torch.zeros(0, dtype=torch.float64),
        clip_rate_window=window,
        heatmap_steps=h.steps[starts] if n else h.steps,
        heatmap=heat,
        heatmap_layers=names,
        nonfinite_events=tuple(h.nonfinite_events()[:MAX_EVENTS]),
        update_ratios=_top_update_ratios(h),
        group_norms=h.group_columns("norm"),
        group_coefs=h.group_columns("coef"),
        stalls=tuple(h.stalls(steps=stall_steps)),
        spike_events=tuple(h.spike_events()[:MAX_EVENTS]),
    )


def _top_update_ratios(h: History) -> dict[str, Tensor]:
    """``total`` first, then the layers with the largest median update ratio, in module order."""
    ratios = h.update_ratios()
    total = ratios.pop("total", None)
    def median(v: Tensor) -> float:
        ok = v[torch.isfinite(v)]
        return float(ok.median()) if ok.numel() else -math.inf

    keep = sorted(ratios, key=lambda k: -median(ratios[k]))[:MAX_UPDATE_LAYERS]
    out = {} if total is None else {"total": total}
    out.update({k: v for k, v in ratios.items() if k in keep})
    return out
