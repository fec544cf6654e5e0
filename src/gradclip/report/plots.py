"""Plot functions on plain arrays: each draws on a matplotlib ``Axes`` you give it.

They take 1-D sequences (lists, NumPy arrays or CPU tensors) and know nothing of monitors or
logs, so a report, the demo or a notebook can put several runs on one figure or side by side.
Needs matplotlib (``pip install 'gradclip[plot]'``).

Example:
    >>> from gradclip.report import plots
    >>> runs = {"run a": [1.0, 3.0, 2.0, 0.5], "run b": [2.0, 0.5, 4.0, 1.0]}
    >>> fig, axes = plots.new_figure(1, 2, width=4.0)
    >>> for ax, (name, norms) in zip(axes, runs.items()):
    ...     plots.plot_norms(ax, range(len(norms)), norms, threshold=1.5, title=name)
    >>> plots.save_png(fig)[:4]  # also written to a file when given a path
    b'\x89PNG'
"""

from __future__ import annotations

import io
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal

__all__ = [
    "COLORS",
    "Legend",
    "new_figure",
    "plot_clip_rate",
    "plot_histogram",
    "plot_layer_heatmap",
    "plot_nonfinite",
    "plot_norms",
    "plot_series",
    "require_matplotlib",
    "save_png",
]

COLORS = {"norm": "#1f77b4", "post": "#9ecae1", "threshold": "#222222", "clipped": "#d62728",
          "recommended": "#2ca02c", "skipped": "#ff7f0e", "spike": "#9467bd"}  # fmt: skip
"""The colours of each kind of line, shared so that every plot reads the same way."""

Axes = Any  # matplotlib.axes.Axes, not imported at module import time


def require_matplotlib() -> Any:
    """The ``matplotlib.figure`` module, or ImportError with the install hint."""
    try:
        import matplotlib.figure
    except ImportError as exc:
        raise ImportError(
            "plots need matplotlib: pip install 'gradclip[plot]' (or pip install matplotlib)"
        ) from exc
    return matplotlib.figure


def _np() -> Any:
    require_matplotlib()
    import numpy  # a dependency of matplotlib

    return numpy


def _array(values: Any, dtype: Any = float) -> Any:
    np = _np()
    if hasattr(values, "detach"):  # a torch tensor
        values = values.detach().cpu().numpy()
    return np.asarray(values, dtype=dtype)


def new_figure(
    nrows: int = 1, ncols: int = 1, *, width: float = 10.0, height: float = 3.2, **kwargs: Any
) -> tuple[Any, Any]:
    """A ``(Figure, axes)`` pair without pyplot (no GUI, no global state); ``axes`` as
    ``Figure.subplots`` returns it (one Axes, or an array of them)."""
    figure = require_matplotlib()
    fig = figure.Figure(figsize=(width * ncols if ncols > 1 else width, height * nrows),
                        layout="constrained")  # fmt: skip
    kwargs.setdefault("squeeze", True)
    return fig, fig.subplots(nrows, ncols, **kwargs)


def save_png(fig: Any, path: str | os.PathLike[str] | None = None, *, dpi: int = 100) -> bytes:
    """Render ``fig`` as PNG bytes; also write them to ``path`` when given."""
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=dpi)
    data = buffer.getvalue()
    if path is not None:
        Path(path).write_bytes(data)
    return data


Legend = Literal["outside", "inside"] | None
"""Where a plot puts its legend: ``"outside"`` the axes on the right (it never covers the
data; the figure's constrained layout makes room), ``"inside"`` at matplotlib's best spot
(compact, may cover some data), or None (no legend: put one on the figure yourself, e.g.
one legend for a grid of small panels)."""


def _finish(
    ax: Axes, title: str | None, xlabel: str | None, ylabel: str | None, legend: Legend
) -> None:
    if legend not in ("outside", "inside", None):
        raise ValueError(f"`legend` must be 'outside', 'inside' or None, got {legend!r}")
    if title:
        ax.set_title(title, fontsize=10)
    if xlabel:
        ax.set_xlabel(xlabel)
    if ylabel:
        ax.set_ylabel(ylabel)
    if legend is not None and ax.get_legend_handles_labels()[0]:
        if legend == "outside":
            ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0), borderaxespad=0)
        else:
            ax.legend(fontsize=8, loc="best")
    ax.grid(alpha=0.3)


def plot_series(
    ax: Axes,
    steps: Sequence[float],
    values: Sequence[float],
    *,
    label: str | None = None,
    logy: bool = False,
    title: str | None = None,
    xlabel: str | None = "step",
    ylabel: str | None = None,
    legend: Legend = "outside",
    **line_kwargs: Any,
) -> None:
    """One line of ``values`` over ``steps`` (loss, update size, ...); call again to overlay
    runs (give each a ``label``). Non-finite values leave gaps."""
    ax.plot(_array(steps), _array(values), label=label, lw=1.0, **line_kwargs)
    if logy:
        ax.set_yscale("log")
    _finish(ax, title, xlabel, ylabel, legend)


def plot_norms(
    ax: Axes,
    steps: Sequence[float],
    norm: Sequence[float],
    *,
    threshold: Sequence[float] | float | None = None,
    clipped: Sequence[bool] | None = None,
    post_norm: Sequence[float] | None = None,
    recommended: float | None = None,
    spike_bound: Sequence[float] | None = None,
    spikes: Sequence[bool] | None = None,
    label: str = "pre-clip norm",
    title: str | None = None,
    logy: bool = True,
    legend: Legend = "outside",
) -> None:
    """The total gradient norm over time, with the threshold and the clipped steps marked.

    Args:
        steps, norm: (N,) step numbers and pre-clip total norms.
        threshold: the threshold per step (N,) or one number; drawn dashed.
        clipped: (N,) bool; clipped steps get a red mark on their norm.
        post_norm: (N,) post-clip norms, drawn faintly.
        recommended: a recommended ``max_norm``, drawn as a green dotted line.
        spike_bound: (N,) a spike detector's bound, drawn dotted where finite.
        spikes: (N,) bool; steps the detector called spikes get a cross.
        legend: where the legend goes (see :data:`Legend`).

    Draw only thresholds on the norm itself here (a ratio such as AGC's is not a norm).
    """
    np = _np()
    x, y = _array(steps), _array(norm)
    ax.plot(x, y, color=COLORS["norm"], lw=0.8, label=label)
    if post_norm is not None:
        ax.plot(x, _array(post_norm), color=COLORS["post"], lw=0.8, label="post-clip norm")
    if threshold is not None:
        thr = np.broadcast_to(_array(threshold), x.shape)
        if np.isfinite(thr).any():
            ax.plot(x, thr, color=COLORS["threshold"], ls="--", lw=1.0, label="threshold")
    if clipped is not None:
        mask = _array(clipped, bool)
        if mask.any():
            ax.scatter(x[mask], y[mask], s=6, color=COLORS["clipped"], zorder=3,
                       label=f"clipped ({mask.mean():.0%} of steps)")  # fmt: skip
    if spike_bound is not None:
        bound = _array(spike_bound)
        if np.isfinite(bound).any():
            ax.plot(x, np.where(np.isfinite(bound), bound, np.nan), color=COLORS["spike"], ls=":",
                    lw=1.0, label="spike bound")  # fmt: skip
    if spikes is not None:
        mask = _array(spikes, bool)
        if mask.any():
            shown = np.where(np.isfinite(y[mask]), y[mask], np.nanmax(np.where(np.isfinite(y), y, np.nan), initial=1.0))
            ax.scatter(x[mask], shown, s=30, marker="x", color=COLORS["spike"], zorder=4,
                       label=f"spikes ({int(mask.sum())})")  # fmt: skip
    if recommended is not None:
        ax.axhline(recommended, color=COLORS["recommended"], ls=":", lw=1.5,
                   label=f"recommended max_norm {recommended:.3g}")  # fmt: skip
    if logy and (y[np.isfinite(y)] > 0).any():
        ax.set_yscale("log")
    _finish(ax, title, "step", "gradient norm", legend)


def plot_clip_rate(
    ax: Axes,
    steps: Sequence[float],
    rate: Sequence[float],
    *,
    window: int | None = None,
    label: str | None = None,
    title: str | None = None,
    legend: Legend = "outside",
) -> None:
    """The fraction of steps clipped over time (``rate`` in [0, 1], e.g. a rolling mean)."""
    ax.plot(_array(steps), 100 * _array(rate), lw=1.0, label=label)
    ax.set_ylim(-3, 103)
    ylabel = "% steps clipped" + (f" (last {window})" if window else "")
    _finish(ax, title, "step", ylabel, legend)


def plot_layer_heatmap(
    ax: Axes,
    steps: Sequence[float],
    values: Any,
    names: Sequence[str],
    *,
    title: str | None = None,
    colorbar: bool = True,
) -> None:
    """Per-layer norms over time as a heatmap of log10(norm).

    Args:
        steps: (B,) the step of each column.
        values: (G, B) layer norms, one row per name; non-finite cells are drawn red.
        names: (G,) the layer names, top to bottom.
    """
    np = _np()
    import matplotlib

    v = _array(values)
    x = _array(steps)
    with np.errstate(divide="ignore", invalid="ignore"):
        logv = np.log10(v)
    bad = ~np.isfinite(v)
    shown = np.ma.masked_where(bad | ~np.isfinite(logv), logv)
    cmap = matplotlib.colormaps["viridis"].with_extremes(bad="#d62728")
    # absent cells (NaN in a row that has values elsewhere) and non-finite ones are both
    # "bad"; finite zeros are shown at the bottom of the scale
    finite = logv[np.isfinite(logv)]
    vmin, vmax = (finite.min(), finite.max()) if finite.size else (0.0, 1.0)
    x0, x1 = (x[0], x[-1]) if x.size else (0, 1)
    image = ax.imshow(shown, aspect="auto", interpolation="nearest", cmap=cmap, vmin=vmin,
                      vmax=vmax, extent=(x0, x1 if x1 > x0 else x0 + 1, len(names) - 0.5, -0.5))  # fmt: skip
    every = max(1, len(names) // 40)
    ax.set_yticks(range(0, len(names), every))
    ax.set_yticklabels(list(names)[::every], fontsize=7)
    if colorbar:
        ax.figure.colorbar(image, ax=ax, label="log10 layer norm", pad=0.01)
    _finish(ax, title, "step", None, None)
    ax.grid(False)


def plot_histogram(
    ax: Axes,
    norm: Sequence[float],
    *,
    threshold: float | None = None,
    recommended: float | None = None,
    bins: int = 60,
    label: str | None = None,
    title: str | None = None,
    legend: Legend = "outside",
) -> None:
    """Histogram of the finite, positive norms on log-spaced bins (log x axis), with the
    threshold (dashed) and the recommended ``max_norm`` (green dotted) as vertical lines."""
    np = _np()
    y = _array(norm)
    y = y[np.isfinite(y) & (y > 0)]
    if y.size:
        lo, hi = y.min(), y.max()
        edges = np.logspace(np.log10(lo), np.log10(hi if hi > lo else lo * 1.01), bins + 1)
        ax.hist(y, bins=edges, color=COLORS["norm"], alpha=0.8, label=label)
        ax.set_xscale("log")
    if threshold is not None and np.isfinite(threshold) and threshold > 0:
        ax.axvline(threshold, color=COLORS["threshold"], ls="--", label=f"threshold {threshold:.3g}")
    if recommended is not None:
        ax.axvline(recommended, color=COLORS["recommended"], ls=":", lw=1.5,
                   label=f"recommended {recommended:.3g}")  # fmt: skip
    _finish(ax, title, "pre-clip norm", "steps", legend)


def plot_nonfinite(
    ax: Axes,
    steps: Sequence[float],
    finite: Sequence[bool],
    skipped: Sequence[bool] | None = None,
    *,
    title: str | None = None,
    legend: Legend = "outside",
) -> None:
    """Steps with NaN/inf gradients as vertical marks (orange: skipped, red: applied)."""
    np = _np()
    x = _array(steps)
    bad = ~_array(finite, bool)
    skip = _array(skipped, bool) if skipped is not None else np.zeros_like(bad)
    for mask, color, label in (
        (bad & ~skip, COLORS["clipped"], "non-finite, applied"),
        (bad & skip, COLORS["skipped"], "non-finite, skipped"),
    ):
        if mask.any():
            ax.vlines(x[mask], 0, 1, color=color, lw=1.5, label=f"{label} ({mask.sum()})")
    if x.size:
        ax.set_xlim(x[0], x[-1] if x[-1] > x[0] else x[0] + 1)
    ax.set_yticks([])
    _finish(ax, title, "step", None, legend)
