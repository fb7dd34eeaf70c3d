"""Report figures (PNG): pure functions ``(data, path) -> path``.

Built on ``matplotlib.figure.Figure`` with the Agg canvas directly (no pyplot, no global backend
switch, no display needed); every file is written atomically.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np

from gain_cli.io import atomic_write_with

DPI = 120


def _new_figure(width: float, height: float):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), dpi=DPI)
    FigureCanvasAgg(fig)
    return fig


def _save(fig, path: str | os.PathLike) -> Path:
    return atomic_write_with(path, lambda p: fig.savefig(p, format="png", dpi=DPI, bbox_inches="tight"))


def relative_change_heatmap(rel: np.ndarray, row_labels: Sequence[str], col_labels: Sequence[str],
                            path: str | os.PathLike, title: str = "",
                            outline: Sequence[tuple[int, int]] = (), vmax: float | None = None) -> Path:
    """Heatmap of a relative-change matrix (fractions; shown as annotated %), diverging colormap centred at 0.

    Blue = lower PPL than the reference (better), red = higher (worse); rows = stages, columns = domains.
    ``outline``: (row, column) cells framed in black, e.g. each stage's own domain. ``vmax``: the colour scale's
    end in % (give several heatmaps the same one to compare their colours); default: this matrix's largest |value|.
    """
    from matplotlib.colors import TwoSlopeNorm
    from matplotlib.patches import Rectangle

    rel = np.asarray(rel, dtype=float)
    if rel.ndim != 2 or rel.shape != (len(row_labels), len(col_labels)) or rel.size == 0:
        raise ValueError(f"heatmap data of shape {rel.shape} does not match {len(row_labels)} row and "
                         f"{len(col_labels)} column labels")
    pct = 100.0 * rel
    finite = pct[np.isfinite(pct)]
    if vmax is None:
        vmax = float(np.max(np.abs(finite))) if finite.size else 1.0
    vmax = vmax if vmax > 0 else 1.0
    decimals = 1 if vmax >= 10 else 2
    n_rows, n_cols = pct.shape
    fig = _new_figure(max(4.0, 1.0 + 0.9 * n_cols), max(2.2, 1.0 + 0.5 * n_rows))
    ax = fig.add_subplot(1, 1, 1)
    masked = np.ma.masked_invalid(pct)
    im = ax.imshow(masked, cmap="RdBu_r", norm=TwoSlopeNorm(vcenter=0.0, vmin=-vmax, vmax=vmax), aspect="auto")
    ax.set_xticks(range(n_cols), labels=list(col_labels), rotation=35, ha="right")
    ax.set_yticks(range(n_rows), labels=list(row_labels))
    ax.set_xlabel("evaluated domain")
    ax.set_ylabel("after stage")
    for i in range(n_rows):
        for j in range(n_cols):
            v = pct[i, j]
            text = "nan" if math.isnan(v) else ("inf" if math.isinf(v) else f"{v:+.{decimals}f}%")
            dark = math.isfinite(v) and abs(v) > 0.6 * vmax
            ax.text(j, i, text, ha="center", va="center", fontsize=7, color="white" if dark else "black")
    for i, j in outline:
        ax.add_patch(Rectangle((j - 0.5, i - 0.5), 1, 1, fill=False, edgecolor="black", linewidth=1.5))
    cbar = fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04)
    cbar.set_label("PPL change vs base, % (negative = better)", fontsize=8)
    if title:
        ax.set_title(title, fontsize=10)
    return _save(fig, path)


def harness_curve(curves: Mapping[str, Sequence[float]], path: str | os.PathLike, task: str = "boolq",
                  stage_labels: Sequence[str] | None = None,
                  errors: Mapping[str, tuple[Sequence[float], Sequence[float]]] | None = None) -> Path:
    """Per-stage accuracy of one harness task, one line per method (x = 0 base, 1..T stages; y in %).

    ``errors``: per method the (lower, upper) ends of each point's interval, as fractions like ``curves``: drawn as
    error bars, and the methods are then spread a little along x so that equal curves stay visible."""
    if not curves:
        raise ValueError("no curves to plot")
    n = max(len(c) for c in curves.values())
    labels = list(stage_labels) if stage_labels is not None else ["base", *(str(k) for k in range(1, n))]
    fig = _new_figure(max(4.5, 1.5 + 0.6 * n), 3.2)
    ax = fig.add_subplot(1, 1, 1)
    markers = "osD^v<>ph*"
    spread = 0.08 if errors else 0.0
    for i, (label, curve) in enumerate(curves.items()):
        y = 100.0 * np.asarray(curve, dtype=float)
        x = np.arange(len(y)) + spread * (i - (len(curves) - 1) / 2)
        if errors and label in errors:
            lo, hi = (100.0 * np.asarray(e, dtype=float)[: len(y)] for e in errors[label])
            ax.errorbar(x, y, yerr=[y - lo, hi - y], marker=markers[i % len(markers)], label=label, capsize=3)
        else:
            ax.plot(x, y, marker=markers[i % len(markers)], label=label)
    ax.set_xticks(range(n), labels=labels[:n], rotation=35 if n > 6 else 0, ha="right" if n > 6 else "center")
    ax.set_xlabel("after stage")
    ax.set_ylabel(f"{task} accuracy (%)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    ax.set_title(f"{task} accuracy after each stage", fontsize=10)
    return _save(fig, path)


def interval_bars(values: Mapping[str, Mapping[str, tuple[float, float, float]]], path: str | os.PathLike,
                  ylabel: str, title: str = "") -> Path:
    """Grouped bars with 95 % error bars: ``values[group][series] = (value, lo, hi)`` (e.g. group = metric,
    series = method); a line at 0."""
    if not values:
        raise ValueError("no values to plot")
    groups = list(values)
    series: list[str] = []
    for g in groups:
        series += [s for s in values[g] if s not in series]
    width = 0.8 / max(len(series), 1)
    fig = _new_figure(max(5.0, 1.5 + 1.4 * len(groups)), 3.4)
    ax = fig.add_subplot(1, 1, 1)
    for i, s in enumerate(series):
        x = np.arange(len(groups)) - 0.4 + width * (i + 0.5)
        v = np.array([values[g][s][0] if s in values[g] else np.nan for g in groups], dtype=float)
        lo = np.array([values[g][s][1] if s in values[g] else np.nan for g in groups], dtype=float)
        hi = np.array([values[g][s][2] if s in values[g] else np.nan for g in groups], dtype=float)
        ax.bar(x, v, width, label=s)
        ax.errorbar(x, v, yerr=[np.nan_to_num(v - lo), np.nan_to_num(hi - v)], fmt="none", ecolor="black", capsize=3)
    ax.axhline(0.0, color="black", linewidth=0.8)
    ax.set_xticks(range(len(groups)), labels=groups, fontsize=8)
    ax.set_ylabel(ylabel)
    ax.grid(axis="y", alpha=0.3)
    ax.legend(fontsize=8)
    if title:
        ax.set_title(title, fontsize=10)
    return _save(fig, path)
