"""``write_report``: compare runs over one domain sequence; tables, figures and one ``report.md``.

Output directory::

    report.md                  tables (markdown), figures and sign conventions, relative links
    metrics.json               every metric of every run + the sign conventions (always)
    metrics.md | metrics.tex   summary + per-domain + harness tables in the chosen format
    metrics.csv                (--format csv) the summary table; metrics_<metric>.csv the per-domain ones
    figures/heatmap_<run>.png  PPL change vs base per stage and domain, one per run, all on one colour scale
    figures/<task>_curve.png   per-stage accuracy of each harness task, one line per run
    figures/<task>_acc_norm_curve.png   the same for lm-eval's acc_norm, for the tasks that report it
    figures/*.svg, *.pdf       every figure also as SVG and PDF (``figure_formats``), next to its PNG

The heatmaps share one symmetric colour scale, ±max |PPL change| over every run of the report
(``figures.symmetric_limits``); ``metrics.json`` records it under ``figures.heatmap_colour_limits_pct``.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import asdict
from datetime import datetime
from pathlib import Path

import numpy as np

from gain_cli.errors import GainError
from gain_cli.io import atomic_write_json, atomic_write_text, file_slug
from gain_cli.reporting import figures
from gain_cli.reporting.matrices import RunResult, load_run
from gain_cli.reporting.metrics import (
    SIGN_CONVENTIONS,
    jsonable,
    relative_change_matrix,
)
from gain_cli.reporting.study_report import groups_of_runs, interval_section
from gain_cli.reporting.tables import (
    DOMAIN_METRICS,
    domain_table,
    domain_table_title,
    downstream_table,
    harness_metrics,
    harness_table,
    harness_tasks,
    metric_table,
    run_harness_drops,
    run_labels,
    to_csv,
    to_latex,
    to_markdown,
)

FORMATS = {"md": "md", "markdown": "md", "latex": "tex", "tex": "tex", "csv": "csv"}


def check_same_domains(runs: Sequence[RunResult]) -> None:
    """GainError naming the first run whose domain sequence differs from the first run's."""
    ref = runs[0]
    for r in runs[1:]:
        if r.domains != ref.domains:
            raise GainError(f"runs differ in their domain sequence: {ref.path} has {ref.domains}, {r.path} has "
                            f"{r.domains}; a report compares methods over the same sequence")


def sign_conventions_md() -> str:
    lines = ["## Sign conventions", "",
             "P = validation perplexity, row 0 = base model, row k = after stage k (trained on domain k); "
             "T = last finished stage; ln = natural log.", ""]
    lines += [f"- **{k}**: {v}" for k, v in SIGN_CONVENTIONS.items()]
    lines += ["", "Column arrows: ↓ lower is better, ↑ higher is better. Undefined values (e.g. no earlier domain "
              "when T = 1) are shown as –. Full definitions: `gain_cli/reporting/metrics.py`.", ""]
    return "\n".join(lines)


def _tables(runs: Sequence[RunResult]):
    """(title, key, table) for the summary, each per-domain metric and each harness task."""
    out = [("Summary (methods as rows)", "summary", metric_table(runs))]
    if harness_tasks(runs):
        out.append(("Downstream change vs base at the last stage (accuracy points; every lm-eval task)",
                    "downstream_change", downstream_table(runs)))
    out += [(domain_table_title(k), k, domain_table(runs, k)) for k in DOMAIN_METRICS]
    titles = {"acc": "accuracy", "acc_stderr": "accuracy, lm-eval's standard error",
              "acc_norm": "length-normalised accuracy", "acc_norm_stderr": "length-normalised accuracy, standard error"}
    for t in harness_tasks(runs):
        out += [(f"{t} {titles[m]} per stage (%)", f"{file_slug(t, 'run')}_per_stage" + ("" if m == "acc" else f"_{m}"),
                 harness_table(runs, t, m)) for m in harness_metrics(runs, t)]
    return out


def write_report(run_dirs: Sequence[str | os.PathLike], out_dir: str | os.PathLike, fmt: str = "md",
                 figure_formats: Sequence[str] | None = None) -> Path:
    """Load the runs, write tables (``fmt``: md, latex or csv), metrics.json, figures and report.md; return report.md.

    ``figure_formats``: the formats of every figure (default ``figures.FORMATS``: png, svg, pdf; the PNG is the one
    report.md embeds)."""
    if fmt not in FORMATS:
        raise GainError(f"unknown report format '{fmt}' (valid: md, latex, csv)")
    ext = FORMATS[fmt]
    if not run_dirs:
        raise GainError("no run directories given")
    runs = [load_run(rd) for rd in run_dirs]
    check_same_domains(runs)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    labels = run_labels(runs)
    tables = _tables(runs)
    # one colour scale for every heatmap of the report (the same metric: PPL change vs base)
    rels = {lab: relative_change_matrix(r.ppl)[1:] for lab, r in zip(labels, runs) if r.stages_done > 0}
    limits = figures.symmetric_limits(rels.values())

    # metrics.json: always
    atomic_write_json(out_dir / "metrics.json", {
        "domains": runs[0].domains,
        "sign_conventions": SIGN_CONVENTIONS,
        "runs": [{"label": lab, "name": r.name, "path": str(r.path), "method": r.method, "model": r.model,
                  "recipe": r.recipe, "status": r.status, "rows": r.rows, "metrics": r.metrics.to_dict(),
                  # every lm-eval task's curve and change vs base: acc (= metrics.harness) and acc_norm where reported
                  "harness_drops": jsonable({m: {t: asdict(h) for t, h in d.items()}
                                              for m, d in run_harness_drops(r).items()})}
                 for lab, r in zip(labels, runs)],
        "figures": {"heatmap_colour_limits_pct": list(limits) if rels else None,
                    "formats": list(figures.FORMATS if figure_formats is None else figure_formats)},
    })

    # tables in the chosen format
    table_files: list[str] = []
    if ext == "md":
        text = "\n".join(f"## {title}\n\n{to_markdown(tab)}" for title, _, tab in tables)
        atomic_write_text(out_dir / "metrics.md", "# Forgetting metrics\n\n" + text + "\n" + sign_conventions_md())
        table_files.append("metrics.md")
    elif ext == "tex":
        conv = "\n".join(f"% {k}: {v}" for k, v in SIGN_CONVENTIONS.items())
        text = "\n".join(to_latex(tab, caption=title, label=f"tab:{file_slug(key, 'run')}") for title, key, tab in tables)
        atomic_write_text(out_dir / "metrics.tex",
                          "% Forgetting metrics (needs \\usepackage{booktabs}). Sign conventions:\n" + conv + "\n\n" + text)
        table_files.append("metrics.tex")
    else:
        atomic_write_text(out_dir / "metrics.csv", to_csv(tables[0][2]))
        table_files.append("metrics.csv")
        for _, key, tab in tables[1:]:
            atomic_write_text(out_dir / f"metrics_{key}.csv", to_csv(tab))
            table_files.append(f"metrics_{key}.csv")

    # figures
    fig_dir = out_dir / "figures"
    heatmaps: list[tuple[str, str]] = []
    for lab, r in zip(labels, runs):
        if lab not in rels:
            continue
        rows = [f"{k}: {r.domains[k - 1]}" for k in range(1, r.stages_done + 1)]
        p = figures.relative_change_heatmap(rels[lab], rows, r.domains, fig_dir / f"heatmap_{file_slug(lab, 'run')}.png",
                                            title=f"{lab}: PPL change vs base (%)",
                                            outline=[(i, i) for i in range(r.stages_done)], vmax=limits[1],
                                            formats=figure_formats)
        heatmaps.append((lab, p.relative_to(out_dir).as_posix()))
    curves: list[tuple[str, str]] = []
    n_rows = max(len(r.rows) for r in runs)
    stage_labels = ["base", *(f"{k}: {runs[0].domains[k - 1]}" for k in range(1, n_rows))]
    for task in harness_tasks(runs):  # one figure per task and accuracy metric it reports (acc, acc_norm)
        for metric in [m for m in ("acc", "acc_norm") if m in harness_metrics(runs, task)]:
            data = {}
            for lab, r in zip(labels, runs):
                curve = r.harness if metric == "acc" else r.harness_extra.get(metric)
                if curve and task in curve and not np.all(np.isnan(curve[task][: len(r.rows)])):
                    data[lab] = curve[task][: len(r.rows)]
            if not data:
                continue
            name = f"{file_slug(task, 'run')}_curve.png" if metric == "acc" else f"{file_slug(task, 'run')}_{metric}_curve.png"
            p = figures.harness_curve(data, fig_dir / name, task=task, stage_labels=stage_labels,
                                      formats=figure_formats, metric=metric)
            curves.append((f"{task} {figures.METRIC_LABELS[metric]}", p.relative_to(out_dir).as_posix()))

    # report.md
    md = [f"# gain report: {', '.join(labels)}", "",
          f"Generated {datetime.now().isoformat(timespec='seconds')}. Domain sequence (training order): "
          + " → ".join(f"`{d}`" for d in runs[0].domains) + ".", "",
          "| Run | Method | Model | Recipe | Stages | Status | Directory |", "|:---|:---|:---|:---|---:|:---|:---|"]
    md += [f"| {lab} | {r.method} | {r.model} | {r.recipe} | {r.stages_done}/{len(r.domains)} | {r.status} | "
           f"`{r.path}` |" for lab, r in zip(labels, runs)]
    if any(not r.complete for r in runs):
        md += ["", "Partial runs: their metrics use their last finished stage as the final one."]
    md += ["", "Tables: " + ", ".join(f"[{f}]({f})" for f in table_files) + ", [metrics.json](metrics.json).", ""]
    others = [f for f in (figures.FORMATS if figure_formats is None else figure_formats) if f.lower() != "png"]
    if others and (heatmaps or curves):
        md += ["Every figure is also in `figures/` as " + " and ".join(f".{f}" for f in others) + " (same name).", ""]
    for title, _, tab in tables:
        md += [f"## {title}", "", to_markdown(tab)]
    if heatmaps:
        md += ["## PPL change vs base (heatmaps)", "",
               "Rows: after stage k (trained on the named domain); columns: evaluated domain; "
               "blue = lower PPL than the base model (better), red = higher (worse); framed cells: each stage's own domain. "
               f"One colour scale for all runs: ±{figures.format_limit(limits[1])} %.", ""]
        md += [f"### {lab}\n\n![{lab}: PPL change vs base]({rel})\n" for lab, rel in heatmaps]
    if curves:
        md += ["## Downstream accuracy per stage", ""]
        md += [f"![{what} per stage]({rel})\n" for what, rel in curves]

    groups = groups_of_runs(runs)
    if groups is not None:
        tasks = [t for t in harness_tasks(runs) if all(f"drop:{t}" in g.iv.metrics for g in groups.values())]
        md += interval_section(groups, tasks, fig_dir, out_dir, formats=figure_formats)
    else:
        md += ["Runs made before per-block NLLs were kept have no confidence intervals.", ""]
    md += [sign_conventions_md()]
    return atomic_write_text(out_dir / "report.md", "\n".join(md))
