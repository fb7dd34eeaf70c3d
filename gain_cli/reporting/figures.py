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
                            outline: Sequence[tuple[int, int]] = ()) -> Path:
    """Heatmap of a relative-change matrix (fractions; shown as annotated %), diverging colormap centred at 0.

    Blue = lower PPL than the reference (better), red = higher (worse); rows = stages, columns = domains.
    ``outline``: (row, column) cells framed in black, e.g. each stage's own domain.
    """
    from matplotlib.colors import TwoSlopeNorm
    from matplotlib.patches import Rectangle

    rel = np.asarray(rel, dtype=float)
    if rel.ndim != 2 or rel.shape != (len(row_labels), len(col_labels)) or rel.size == 0:
        raise ValueError(f"heatmap data of shape {rel.shape} does not match {len(row_labels)} row and "
                         f"{len(col_labels)} column labels")
    pct = 100.0 * rel
    finite = pct[np.isfinite(pct)]
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
                  stage_labels: Sequence[str] | None = None) -> Path:
    """Per-stage accuracy of one harness task, one line per method (x = 0 base, 1..T stages; y in %)."""
    if not curves:
        raise ValueError("no curves to plot")
    n = max(len(c) for c in curves.values())
    labels = list(stage_labels) if stage_labels is not None else ["base", *(str(k) for k in range(1, n))]
    fig = _new_figure(max(4.5, 1.5 + 0.6 * n), 3.2)
    ax = fig.add_subplot(1, 1, 1)
    markers = "osD^v<>ph*"
    for i, (label, curve) in enumerate(curves.items()):
        y = 100.0 * np.asarray(curve, dtype=float)
        ax.plot(range(len(y)), y, marker=markers[i % len(markers)], label=label)
    ax.set_xticks(range(n), labels=labels[:n], rotation=35 if n > 6 else 0, ha="right" if n > 6 else "center")
    ax.set_xlabel("after stage")
    ax.set_ylabel(f"{task} accuracy (%)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    ax.set_title(f"{task} accuracy after each stage", fontsize=10)
    return _save(fig, path)
