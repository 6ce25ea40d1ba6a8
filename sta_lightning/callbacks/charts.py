"""Matplotlib charts of evaluation curves, confusion matrices, per-class bars and histograms, rendered to
(H, W, 3) uint8 RGB numpy images.

No Lightning and no logger here (the callbacks decide what to draw and where it goes). Figures are drawn with
the Agg canvas directly, so nothing touches pyplot's global state or a GUI backend.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

LABELLED_CLASSES = 20  # above this many classes, per-class lines go unlabelled and cells unannotated
DPI = 100


def figure_image(figure: Figure) -> np.ndarray:
    """Render ``figure`` -> (H, W, 3) uint8 RGB."""
    canvas = FigureCanvasAgg(figure)
    canvas.draw()
    return np.asarray(canvas.buffer_rgba())[..., :3].copy()


def curves_chart(
    x: np.ndarray,
    per_class: np.ndarray,
    names: Sequence[str],
    mean: np.ndarray,
    mean_label: str,
    xlabel: str,
    ylabel: str,
    title: str,
    marker: tuple[float, float, str] | None = None,
) -> np.ndarray:
    """Per-class curves (thin) and their mean (bold) against ``x``.

    x: (N,); per_class: (N, K), columns of NaN are left out; names: (K,) labels; mean: (N,);
    marker: optional (x, y, text) point drawn on the mean curve.
    """
    figure = Figure(figsize=(7, 5), dpi=DPI, layout="constrained")
    axes = figure.add_subplot()
    shown = [k for k in range(per_class.shape[1]) if not np.isnan(per_class[:, k]).all()]
    labelled = len(shown) <= LABELLED_CLASSES
    for k in shown:
        if labelled:
            axes.plot(x, per_class[:, k], linewidth=1, label=names[k])
        else:
            axes.plot(x, per_class[:, k], linewidth=0.5, color="grey", alpha=0.5)
    axes.plot(x, mean, linewidth=3, color="tab:blue", label=mean_label)
    if marker is not None:
        axes.plot([marker[0]], [marker[1]], "o", color="tab:red", markersize=9, label=marker[2])
    axes.set(xlim=(0, 1), ylim=(0, 1.02), xlabel=xlabel, ylabel=ylabel, title=title)
    axes.grid(alpha=0.3)
    axes.legend(loc="upper left", bbox_to_anchor=(1.01, 1), fontsize="small", frameon=False)
    return figure_image(figure)


def confusion_chart(matrix: np.ndarray, names: Sequence[str], title: str, normalized: bool) -> np.ndarray:
    """Heatmap of a (K + 1, K + 1) confusion matrix, rows true class, columns predicted class; ``names``
    (K + 1,) includes the background. Cells show counts, or shares with ``normalized``."""
    size = min(4 + 0.45 * len(names), 24)
    figure = Figure(figsize=(size + 1.5, size), dpi=DPI, layout="constrained")
    axes = figure.add_subplot()
    image = axes.imshow(matrix, cmap="Blues", vmin=0, vmax=1 if normalized else max(1, matrix.max()))
    figure.colorbar(image, ax=axes, shrink=0.8)
    ticks = np.arange(len(names))
    fontsize = "small" if len(names) <= LABELLED_CLASSES + 1 else 5
    axes.set_xticks(ticks, names, rotation=90, fontsize=fontsize)
    axes.set_yticks(ticks, names, fontsize=fontsize)
    axes.set(xlabel="predicted", ylabel="true", title=title)
    if len(names) <= LABELLED_CLASSES + 1:
        threshold = (1 if normalized else max(1, matrix.max())) / 2
        for (row, column), value in np.ndenumerate(matrix):
            if value:
                text = f"{value:.2f}" if normalized else str(int(value))
                color = "white" if value > threshold else "black"
                axes.text(column, row, text, ha="center", va="center", fontsize="small", color=color)
    return figure_image(figure)


def bar_chart(
    names: Sequence[str], series: dict[str, np.ndarray], ylabel: str, title: str, ylim: float | None = None
) -> np.ndarray:
    """Grouped bars: one group per name, one bar per series ({label: (K,) values})."""
    width = min(max(6.0, 0.35 * len(names) * len(series) + 2), 30)
    figure = Figure(figsize=(width, 4.5), dpi=DPI, layout="constrained")
    axes = figure.add_subplot()
    positions = np.arange(len(names))
    bar_width = 0.8 / len(series)
    for index, (label, values) in enumerate(series.items()):
        offset = (index - (len(series) - 1) / 2) * bar_width
        axes.bar(positions + offset, values, bar_width, label=label)
    axes.set_xticks(positions, names, rotation=90 if len(names) > 10 else 0)
    axes.set(ylabel=ylabel, title=title, xlim=(-0.6, len(names) - 0.4))
    if ylim is not None:
        axes.set_ylim(0, ylim)
    axes.grid(axis="y", alpha=0.3)
    axes.legend(fontsize="small")
    return figure_image(figure)


def histograms_chart(
    panels: Sequence[tuple[str, np.ndarray, dict[str, np.ndarray], bool]], title: str
) -> np.ndarray:
    """Histograms side by side; each panel is (x label, bin edges (B + 1,), {label: (B,) counts}, log-x)."""
    figure = Figure(figsize=(5 * len(panels), 4), dpi=DPI, layout="constrained")
    figure.suptitle(title)
    all_axes = figure.subplots(1, len(panels), squeeze=False)[0]
    for axes, (xlabel, edges, counts, log_x) in zip(all_axes, panels, strict=True):
        for label, values in counts.items():
            axes.stairs(values, edges, label=label, linewidth=1.5)
        if log_x:
            axes.set_xscale("log", base=2)
        axes.set(xlabel=xlabel, ylabel="boxes", xlim=(edges[0], edges[-1]))
        axes.grid(alpha=0.3)
        axes.legend(fontsize="small")
    return figure_image(figure)
