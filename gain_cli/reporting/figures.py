"""Report figures: pure functions ``(data, path) -> path``, each written as PNG, SVG and PDF.

Built on ``matplotlib.figure.Figure`` with the Agg canvas directly (no pyplot, no global backend
switch, no display needed); every file is written atomically by :func:`save_figure`, the one save
helper of the reports (``gain report``, ``gain report pareto``, the study report and the paper's figures):
the path given (``.png``, the one the Markdown embeds) and the same name as ``.svg`` and ``.pdf`` for papers
(``formats``; default :data:`FORMATS`).

Comparable figures: heatmaps of one metric share one symmetric colour scale (:func:`symmetric_limits` over all
of a report's matrices, passed as ``vmax``); curves of several runs get distinct markers, line styles and widths
(:func:`curve_styles`), and a curve equal to an earlier one says so in the legend ("(identical to X)").
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from gain_cli.io import atomic_write_with

DPI = 120
#: formats every figure is written in (the path's own suffix first; the others next to it, same name)
FORMATS: tuple[str, ...] = ("png", "svg", "pdf")
#: curves closer than this (accuracy fractions) count as identical
IDENTICAL_ATOL = 1e-9
# fonts embedded as TrueType in PDF (journals refuse Type 3), no dates and fixed ids: a re-run writes the same bytes
_RC = {"pdf.fonttype": 42, "svg.fonttype": "path", "svg.hashsalt": "gain"}
_METADATA = {"pdf": {"CreationDate": None}, "svg": {"Date": None}}


def _new_figure(width: float, height: float):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), dpi=DPI)
    FigureCanvasAgg(fig)
    return fig


def save_figure(fig, path: str | os.PathLike, formats: Sequence[str] | None = None, dpi: float = DPI,
                bbox_inches: str | None = "tight") -> Path:
    """Write ``fig`` to ``path`` (format from its suffix, normally ``.png``) and, for every other format in
    ``formats`` (default :data:`FORMATS`), to the same name with that suffix; each file atomically. Returns ``path``."""
    import matplotlib

    path = Path(path)
    primary = path.suffix.lstrip(".").lower() or "png"
    wanted = [primary] + [f.lower().lstrip(".") for f in (FORMATS if formats is None else formats)
                          if f.lower().lstrip(".") != primary]
    with matplotlib.rc_context(_RC):
        for fmt in dict.fromkeys(wanted):
            target = path if fmt == primary else path.with_suffix(f".{fmt}")
            atomic_write_with(target, lambda p, fmt=fmt: fig.savefig(p, format=fmt, dpi=dpi, bbox_inches=bbox_inches,
                                                                     metadata=_METADATA.get(fmt)))
    return path



def symmetric_limits(matrices: Iterable[Any], scale: float = 100.0) -> tuple[float, float]:
    """The one colour scale of several heatmaps of one metric: ``(-m, m)`` with m = max |finite value| · ``scale``
    over all ``matrices`` (default: fractions shown in %); ``(-1, 1)`` when there is no non-zero finite value."""
    m = 0.0
    for a in matrices:
        a = np.abs(scale * np.asarray(a, dtype=float))
        a = a[np.isfinite(a)]
        if a.size:
            m = max(m, float(a.max()))
    m = m if m > 0 else 1.0
    return -m, m


def format_limit(v: float) -> str:
    """A colour-scale end in % as the heatmaps annotate their cells (1 decimal from 10 %, else 2)."""
    return f"{v:.{1 if abs(v) >= 10 else 2}f}"


def curve_styles(curves: Mapping[str, Sequence[float]]) -> list[dict[str, Any]]:
    """Matplotlib keyword arguments for each curve, in order: a distinct marker and line style per curve, later
    curves drawn thinner with smaller markers on top of earlier ones (so equal curves all stay visible), and the
    label of a curve equal to an earlier one ending in "(identical to <earlier label>)"."""
    markers, lines = "osD^v<>ph*", ("-", "--", "-.", ":")
    names = list(curves)
    values = [np.asarray(curves[n], dtype=float) for n in names]
    out = []
    for i, name in enumerate(names):
        twin = next((names[j] for j in range(i) if values[j].shape == values[i].shape
                     and np.allclose(values[j], values[i], rtol=0.0, atol=IDENTICAL_ATOL, equal_nan=True)), None)
        out.append({"label": name if twin is None else f"{name} (identical to {twin})",
                    "marker": markers[i % len(markers)], "linestyle": lines[i % len(lines)],
                    "linewidth": max(0.8, 2.4 - 0.5 * i), "markersize": max(3.5, 8.0 - 2.0 * i), "zorder": 2 + i})
    return out


def relative_change_heatmap(rel: np.ndarray, row_labels: Sequence[str], col_labels: Sequence[str],
                            path: str | os.PathLike, title: str = "",
                            outline: Sequence[tuple[int, int]] = (), vmax: float | None = None,
                            formats: Sequence[str] | None = None) -> Path:
    """Heatmap of a relative-change matrix (fractions; shown as annotated %), diverging colormap centred at 0.

    Blue = lower PPL than the reference (better), red = higher (worse); rows = stages, columns = domains.
    ``outline``: (row, column) cells framed in black, e.g. each stage's own domain. ``vmax``: the colour scale's
    end in %, the scale being −vmax … +vmax (give several heatmaps the same one, ``symmetric_limits(all)[1]``, to
    compare their colours); default: this matrix's own largest |value|.
    """
    from matplotlib.colors import TwoSlopeNorm
    from matplotlib.patches import Rectangle

    rel = np.asarray(rel, dtype=float)
    if rel.ndim != 2 or rel.shape != (len(row_labels), len(col_labels)) or rel.size == 0:
        raise ValueError(f"heatmap data of shape {rel.shape} does not match {len(row_labels)} row and "
                         f"{len(col_labels)} column labels")
    pct = 100.0 * rel
    vmax = symmetric_limits([rel])[1] if vmax is None else (float(vmax) if vmax > 0 else 1.0)
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
    return save_figure(fig, path, formats)


#: how the curves name lm-eval's accuracy metrics
METRIC_LABELS = {"acc": "accuracy", "acc_norm": "length-normalised accuracy"}


def harness_curve(curves: Mapping[str, Sequence[float]], path: str | os.PathLike, task: str = "boolq",
                  stage_labels: Sequence[str] | None = None,
                  errors: Mapping[str, tuple[Sequence[float], Sequence[float]]] | None = None,
                  formats: Sequence[str] | None = None, metric: str = "acc") -> Path:
    """Per-stage accuracy of one harness task, one line per method (x = 0 base, 1..T stages; y in %); ``metric``
    names the lm-eval metric drawn (acc, acc_norm) in the labels.

    Styles from :func:`curve_styles`: equal curves stay visible (the later one thinner and dashed on top) and say
    so in the legend. ``errors``: per method the (lower, upper) ends of each point's interval, as fractions like
    ``curves``: drawn as error bars, and the methods are then spread a little along x."""
    if not curves:
        raise ValueError("no curves to plot")
    n = max(len(c) for c in curves.values())
    labels = list(stage_labels) if stage_labels is not None else ["base", *(str(k) for k in range(1, n))]
    fig = _new_figure(max(4.5, 1.5 + 0.6 * n), 3.2)
    ax = fig.add_subplot(1, 1, 1)
    spread = 0.08 if errors else 0.0
    for i, ((name, curve), style) in enumerate(zip(curves.items(), curve_styles(curves))):
        y = 100.0 * np.asarray(curve, dtype=float)
        x = np.arange(len(y)) + spread * (i - (len(curves) - 1) / 2)
        if errors and name in errors:
            lo, hi = (100.0 * np.asarray(e, dtype=float)[: len(y)] for e in errors[name])
            ax.errorbar(x, y, yerr=[y - lo, hi - y], capsize=3, **style)
        else:
            ax.plot(x, y, **style)
    ax.set_xticks(range(n), labels=labels[:n], rotation=35 if n > 6 else 0, ha="right" if n > 6 else "center")
    ax.set_xlabel("after stage")
    what = METRIC_LABELS.get(metric, metric)
    ax.set_ylabel(f"{task} {what} (%)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    ax.set_title(f"{task} {what} after each stage", fontsize=10)
    return save_figure(fig, path, formats)


def interval_bars(values: Mapping[str, Mapping[str, tuple[float, float, float]]], path: str | os.PathLike,
                  ylabel: str, title: str = "", formats: Sequence[str] | None = None) -> Path:
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
    return save_figure(fig, path, formats)
