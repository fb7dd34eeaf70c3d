"""Tables of runs' metrics (methods as rows, the paper's layout) and their renderers.

A table is ``(header, rows)``: ``header`` a list of column titles, ``rows`` lists whose first
cells are text (method, stages) and the rest numbers in display units (percent / points / nats)
or ``None`` where undefined. Renderers: :func:`to_markdown`, :func:`to_latex` (booktabs),
:func:`to_csv`; :func:`print_run` shows one run's matrices in the terminal with ``rich``.
"""

from __future__ import annotations

import csv
import io
import math
from collections.abc import Sequence
from typing import Any

import numpy as np

from gain_cli.reporting.matrices import HARNESS_METRICS, RunResult
from gain_cli.reporting.metrics import (
    METRIC_TITLES,
    SIGN_CONVENTIONS,
    harness_drops,
    mean_drop_points,
    relative_change_matrix,
)

Table = tuple[list[str], list[list[Any]]]

# (ForgettingMetrics attribute, column title, scale to display units)
SUMMARY_COLUMNS: list[tuple[str, str, float]] = [
    ("in_domain_change_mean", "In-domain ΔPPL % ↓", 100.0),
    ("earlier_change_vs_own_mean", "Earlier ΔPPL vs own stage % ↓", 100.0),
    ("earlier_change_vs_base_mean", "Earlier ΔPPL vs base % ↓", 100.0),
    ("bwt", "BWT ↑", 1.0),
    ("fwt", "FWT ↑", 1.0),
    ("max_forgetting_mean", "Max forgetting ↓", 1.0),
    ("avg_final_log_ppl", "Avg final log-PPL ↓", 1.0),
    ("avg_final_ppl", "Avg final PPL ↓", 1.0),
]
# per-domain metrics: attribute -> scale
DOMAIN_METRICS: dict[str, float] = {
    "in_domain_change": 100.0,
    "earlier_change_vs_own": 100.0,
    "earlier_change_vs_base": 100.0,
    "bwt_per_domain": 1.0,
    "fwt_per_domain": 1.0,
    "max_forgetting": 1.0,
}


def _scaled(v: float | None, scale: float) -> float | None:
    return None if v is None else float(v) * scale


def run_labels(runs: Sequence[RunResult]) -> list[str]:
    """Row label per run: its method, with the run name added where two runs share a method."""
    methods = [r.method for r in runs]
    return [r.method if methods.count(r.method) == 1 else f"{r.method} [{r.name}]" for r in runs]


def harness_tasks(runs: Sequence[RunResult]) -> list[str]:
    """Harness tasks present in any run, in first-seen order."""
    tasks: list[str] = []
    for r in runs:
        for t in r.harness or {}:
            if t not in tasks:
                tasks.append(t)
    return tasks


def metric_table(runs: Sequence[RunResult]) -> Table:
    """Summary table: one row per run (method), one column per metric (display units in the titles).

    Columns: Method, Stages (done/T), the :data:`SUMMARY_COLUMNS` (percentages ×100), then for every
    harness task its final accuracy (%) and its change vs base (points).
    """
    tasks = harness_tasks(runs)
    header = ["Method", "Stages"] + [title for _, title, _ in SUMMARY_COLUMNS]
    for t in tasks:
        header += [f"{t} final acc % ↑", f"{t} Δ vs base pts ↑"]
    rows = []
    for label, r in zip(run_labels(runs), runs):
        m = r.metrics
        row: list[Any] = [label, f"{m.stages_done}/{m.num_domains}"]
        row += [_scaled(getattr(m, key), scale) for key, _, scale in SUMMARY_COLUMNS]
        for t in tasks:
            h = m.harness.get(t)
            row += [None, None] if h is None else [100.0 * h.curve[-1], h.drop_points]
        rows.append(row)
    return header, rows


def run_harness_drops(run: RunResult) -> dict:
    """``metric -> task -> HarnessMetrics`` (acc, and acc_norm where the task reports it) of one run, cut to its PPL
    rows (:func:`~gain_cli.reporting.metrics.harness_drops`)."""
    return harness_drops({"acc": run.harness, "acc_norm": (run.harness_extra or {}).get("acc_norm")}, len(run.rows))


def downstream_table(runs: Sequence[RunResult]) -> Table:
    """Every lm-eval task's change vs base at the last finished stage, in accuracy points: methods as rows; per task
    ``acc`` and, where some run has it, ``acc_norm``; then the mean over tasks of the acc changes (2+ tasks)."""
    drops = [run_harness_drops(r) for r in runs]
    tasks = harness_tasks(runs)
    columns: list[tuple[str, str]] = []
    for t in tasks:
        columns += [("acc", t)] + ([("acc_norm", t)] if any(t in d.get("acc_norm", {}) for d in drops) else [])
    header = ["Method", "Stages"] + [f"{t} Δ {m} pts ↑" for m, t in columns]
    if len(tasks) > 1:
        header.append("mean Δ acc pts ↑")
    rows = []
    for label, r, d in zip(run_labels(runs), runs, drops):
        row: list[Any] = [label, f"{r.stages_done}/{len(r.domains)}"]
        row += [d[m][t].drop_points if t in d.get(m, {}) else None for m, t in columns]
        if len(tasks) > 1:
            row.append(mean_drop_points(d.get("acc", {})) if len(d.get("acc", {})) == len(tasks) else None)
        rows.append(row)
    return header, rows


def domain_table(runs: Sequence[RunResult], key: str) -> Table:
    """One per-domain metric (``key`` in :data:`DOMAIN_METRICS`): methods as rows, domains as columns."""
    if key not in DOMAIN_METRICS:
        raise KeyError(f"unknown per-domain metric {key!r} (valid: {', '.join(DOMAIN_METRICS)})")
    scale = DOMAIN_METRICS[key]
    domains = runs[0].domains if runs else []
    header = ["Method", *domains]
    rows = []
    for label, r in zip(run_labels(runs), runs):
        values = getattr(r.metrics, key)
        rows.append([label, *(_scaled(values.get(d), scale) for d in domains)])
    return header, rows


def harness_curve(run: RunResult, task: str, metric: str = "acc"):
    """One run's per-row values of an lm-eval metric (acc, acc_stderr, acc_norm, acc_norm_stderr) of a task."""
    source = run.harness if metric == "acc" else run.harness_extra.get(metric)
    return (source or {}).get(task)


def harness_metrics(runs: Sequence[RunResult], task: str) -> list[str]:
    """The lm-eval metrics of ``task`` that some run kept (acc first)."""
    def kept(r: RunResult, m: str) -> bool:
        curve = harness_curve(r, task, m)
        return curve is not None and not np.all(np.isnan(np.asarray(curve, dtype=float)))

    return [m for m in HARNESS_METRICS if any(kept(r, m) for r in runs)]


def harness_table(runs: Sequence[RunResult], task: str, metric: str = "acc") -> Table:
    """One lm-eval metric (%) of one harness task per row (base, stage 1, ...): methods as rows."""
    n = max((len(r.rows) for r in runs), default=1)
    header = ["Method", "base", *(f"stage {k}" for k in range(1, n))]
    rows = []
    for label, r in zip(run_labels(runs), runs):
        curve = harness_curve(r, task, metric)
        cells = [None] * (n)
        if curve is not None:
            for k, v in enumerate(curve[: len(r.rows)]):
                cells[k] = 100.0 * float(v)
        rows.append([label, *cells])
    return header, rows


def domain_table_title(key: str) -> str:
    return METRIC_TITLES[key]


# --- renderers ---------------------------------------------------------------------------------

def format_cell(v: Any, decimals: int = 3, none: str = "–") -> str:
    """Text of one cell: numbers with ``decimals`` decimals, ``none`` for None, nan/inf spelled out."""
    if v is None:
        return none
    if _is_number(v):
        f = float(v)
        if math.isnan(f):
            return "nan"
        if math.isinf(f):
            return "inf" if f > 0 else "-inf"
        return f"{f:.{decimals}f}"
    return str(v)


def _is_number(v: Any) -> bool:
    return isinstance(v, (float, int, np.floating, np.integer)) and not isinstance(v, bool)


def numeric_columns(table: Table) -> list[bool]:
    """Which columns hold only numbers (or None): those are right-aligned."""
    header, rows = table
    return [i > 0 and all(row[i] is None or _is_number(row[i]) for row in rows) for i in range(len(header))]


def _md_escape(s: str) -> str:
    return s.replace("|", "\\|")


def to_markdown(table: Table, decimals: int = 3) -> str:
    """GitHub-flavoured markdown table (text columns left-aligned, numbers right-aligned)."""
    header, rows = table
    numeric = numeric_columns(table)
    lines = ["| " + " | ".join(_md_escape(h) for h in header) + " |",
             "|" + "|".join("---:" if n else ":---" for n in numeric) + "|"]
    lines += ["| " + " | ".join(_md_escape(format_cell(c, decimals)) for c in row) + " |" for row in rows]
    return "\n".join(lines) + "\n"


_TEX_SPECIAL = {"\\": r"\textbackslash{}", "&": r"\&", "%": r"\%", "$": r"\$", "#": r"\#", "_": r"\_",
                "{": r"\{", "}": r"\}", "~": r"\textasciitilde{}", "^": r"\textasciicircum{}"}
_TEX_SYMBOLS = {"Δ": r"$\Delta$", "↓": r"$\downarrow$", "↑": r"$\uparrow$", "–": "--", "−": "-", "×": r"$\times$"}


def tex_escape(s: str) -> str:
    out = "".join(_TEX_SPECIAL.get(ch, ch) for ch in s)
    for k, v in _TEX_SYMBOLS.items():
        out = out.replace(k, v)
    return out


def _tex_cell(v: Any, decimals: int) -> str:
    text = format_cell(v, decimals, none="--")
    if _is_number(v) and text.startswith("-"):
        return "$-$" + text[1:]  # a real minus sign
    return tex_escape(text)


def to_latex(table: Table, decimals: int = 3, caption: str | None = None, label: str | None = None) -> str:
    """A booktabs ``tabular`` (inside a ``table`` float when a caption is given); needs ``\\usepackage{booktabs}``."""
    header, rows = table
    spec = "".join("r" if n else "l" for n in numeric_columns(table))
    lines = [rf"\begin{{tabular}}{{{spec}}}", r"\toprule",
             " & ".join(tex_escape(h) for h in header) + r" \\", r"\midrule"]
    lines += [" & ".join(_tex_cell(c, decimals) for c in row) + r" \\" for row in rows]
    lines += [r"\bottomrule", r"\end{tabular}"]
    body = "\n".join(lines)
    if caption is None:
        return body + "\n"
    parts = [r"\begin{table}[t]", r"\centering", r"\small", body, rf"\caption{{{tex_escape(caption)}}}"]
    if label:
        parts.append(rf"\label{{{label}}}")
    parts.append(r"\end{table}")
    return "\n".join(parts) + "\n"


def to_csv(table: Table) -> str:
    """CSV with full-precision numbers (empty cell for None)."""
    header, rows = table
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(header)
    for row in rows:
        w.writerow(["" if c is None else (repr(float(c)) if isinstance(c, (float, np.floating)) else c)
                    for c in row])
    return buf.getvalue()


# --- terminal ------------------------------------------------------------------------------------

def _short_row(label: str) -> str:
    return label.split(":", 1)[0].replace("stage_", "stage ") if label.startswith("stage_") else label


def _rich_table(title: str):
    from rich.table import Table as RichTable

    return RichTable(title=title, title_justify="left", min_width=len(title))


def print_run(run: RunResult, console) -> None:
    """Print one run's PPL matrix, its relative change vs base, the harness matrix and the metrics."""
    state = "complete" if run.complete else f"partial: {run.stages_done}/{len(run.domains)} stages"
    console.print(f"[bold]{run.method}[/bold] · {run.model} · {run.recipe} · {state} · {run.path}", highlight=False)

    t = _rich_table("validation PPL (row k = after stage k; bold: own stage)")
    t.add_column("row", no_wrap=True)
    for d in run.domains:
        t.add_column(d, justify="right", overflow="fold")
    for k, label in enumerate(run.rows):
        cells = []
        for j in range(len(run.domains)):
            s = format_cell(run.ppl[k, j], 2)
            cells.append(f"[bold]{s}[/bold]" if k == j + 1 else s)
        t.add_row(_short_row(label), *cells)
    console.print(t)

    if run.stages_done:
        rel = relative_change_matrix(run.ppl)
        t = _rich_table("PPL change vs base, % (- = better)")
        t.add_column("row", no_wrap=True)
        for d in run.domains:
            t.add_column(d, justify="right", overflow="fold")
        finite = np.abs(rel[np.isfinite(rel)])
        decimals = 1 if finite.size and finite.max() >= 0.1 else 2
        for k in range(1, len(run.rows)):
            cells = []
            for j in range(len(run.domains)):
                v = 100.0 * rel[k, j]
                s = format_cell(v, decimals)
                colour = "green" if v < 0 else ("red" if v > 0 else "")
                cells.append(f"[{colour}]{s}[/{colour}]" if colour else s)
            t.add_row(_short_row(run.rows[k]), *cells)
        console.print(t)

    if run.harness:
        norm = run_harness_drops(run).get("acc_norm", {})
        curves = [(task, accs) for task, accs in run.harness.items()]
        curves += [(f"{task} norm", run.harness_extra["acc_norm"][task]) for task in run.harness if task in norm]
        t = _rich_table("harness acc % (Δ pts vs base)" + ("; norm: acc_norm" if norm else ""))
        t.add_column("row", no_wrap=True)
        for task, _ in curves:
            t.add_column(task, justify="right")
        for k, label in enumerate(run.rows):
            cells = []
            for task, accs in curves:
                a = accs[k]
                s = format_cell(100.0 * a, 1)
                if k and not math.isnan(a) and not math.isnan(accs[0]):
                    s += f" ({100.0 * (a - accs[0]):+.1f})"
                cells.append(s)
            t.add_row(_short_row(label), *cells)
        console.print(t)

    print_metric_table([run], console)
    console.print("signs: ΔPPL % negative = better; BWT > 0 = earlier domains improved; FWT > 0 = earlier stages "
                  "helped; max forgetting ≥ 0, larger = worse; harness Δ negative = drop (full definitions in "
                  "gain_cli/reporting/metrics.py)", highlight=False, style="dim")


def print_metric_table(runs: Sequence[RunResult], console) -> None:
    """Print the summary of several runs in the terminal: one column per run and a row per metric (the written
    report has the paper's layout, methods as rows: a dozen metric columns do not fit a terminal's width, and rich
    would cut their numbers short). A value that still does not fit wraps onto the next line instead of being cut."""
    header, rows = metric_table(runs)
    t = _rich_table("forgetting metrics" + (" (runs as columns)" if len(runs) > 1 else ""))
    t.add_column("metric", overflow="fold")
    for label in run_labels(runs):
        t.add_column(label, justify="right", overflow="fold")
    for i, h in enumerate(header[1:], 1):
        t.add_row(h, *(format_cell(row[i], 3) for row in rows))
    console.print(t)


__all__ = ["SIGN_CONVENTIONS", "Table", "metric_table", "domain_table", "downstream_table", "harness_table",
           "harness_metrics", "run_harness_drops", "run_labels",
           "harness_tasks", "to_markdown", "to_latex", "to_csv", "format_cell", "print_run", "print_metric_table"]
