"""The study's report: the paper's forgetting table in miniature, every number with its 95 % interval, verdicts.

``write_study_report`` groups a study's runs by method (one run per seed), bootstraps every metric over seeds,
validation blocks and downstream items (``gain_cli.reporting.uncertainty``) and writes ``<out>/``::

    report.md       protocol, the main table with intervals, the paper's claims side by side with a verdict each,
                    differences between methods, per-method PPL matrices with intervals, figures
    study.json      every point estimate and interval, per method; the verdicts
    figures/        earlier/in-domain change bars with error bars, downstream curves with error bars, heatmaps on
                    one symmetric colour scale (its limits in study.json, ``figures``), and the paper's Figures 1, 3
                    and 4 from the study's runs (Figure 2: the lora-lr sweep's report); each as PNG, SVG and PDF

Verdict rules (fixed before any result was seen; recipes/smollm2_study.yaml states them too):
``reproduced`` when the intervals say the paper's direction, ``not reproduced`` when they say the opposite,
``inconclusive`` when they cannot tell (an interval holds 0, or two methods' intervals overlap).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from datetime import datetime
from pathlib import Path
from typing import Any

import numpy as np

from gain_cli.config import config_hash
from gain_cli.errors import GainError
from gain_cli.io import atomic_write_json, atomic_write_text, file_slug
from gain_cli.reporting import figures
from gain_cli.reporting.matrices import RunResult, load_run
from gain_cli.reporting.metrics import SIGN_CONVENTIONS, relative_change_matrix
from gain_cli.reporting.pareto import write_pareto
from gain_cli.reporting.uncertainty import (
    GroupIntervals,
    Interval,
    group_intervals,
    mark_differences,
)
from gain_cli.rundir import RunDir

REFERENCE = "lora"   # the additive baseline the paper contrasts GAIN with; table cells are marked against it
MULTIPLICATIVE = ("gain_attn", "gain_ffn", "ia3")
ADDITIVE = ("lora", "full_ft")

#: (metric, column title, display scale, lower is better)
COLUMNS: list[tuple[str, str, float, bool]] = [
    ("in_domain_change_mean", "In-domain ΔPPL % ↓", 100.0, True),
    ("earlier_change_vs_own_mean", "Earlier ΔPPL vs own stage % ↓", 100.0, True),
    ("earlier_change_vs_base_mean", "Earlier ΔPPL vs base % ↓", 100.0, True),
    ("bwt", "BWT ↑", 1.0, False),
    ("fwt", "FWT ↑", 1.0, False),
    ("max_forgetting_mean", "Max forgetting ↓", 1.0, True),
]

#: the paper's headline numbers (arXiv 2604.04516 as summarised in docs; how they were computed is not public)
PAPER = {
    "gain_ffn_earlier": "−7 … −13 % (earlier-trained domains, GAIN-FFN)",
    "lora_earlier": "+18 … +36 % (earlier-trained domains, LoRA)",
    "in_domain": "GAIN-FFN ≈ LoRA in-domain",
    "boolq": "BoolQ −0.8 (GAIN-FFN) vs −14.9 (LoRA) after 7 adaptations of Qwen2.5-7B",
    "multiplicative": "v2: every additive method degrades earlier domains, all multiplicative ones improve them",
}


# --------------------------------------------------------------------------------------------- groups


class MethodGroup:
    """The finished runs of one method (its seeds) and their intervals."""

    def __init__(self, name: str, runs: Sequence[RunResult], replicates: int, level: float):
        self.name, self.runs = name, list(runs)
        samples = [r.samples for r in self.runs]
        if any(s is None for s in samples):
            bad = next(r.path for r, s in zip(self.runs, samples) if s is None)
            raise GainError(f"{bad}: its rows have no per-block NLLs, so the study cannot give intervals "
                            "(re-run it with this version of gain)")
        self.iv: GroupIntervals = group_intervals(samples, replicates=replicates, level=level)
        self.stages_done = min(r.stages_done for r in self.runs)

    def train_info(self) -> dict[str, float]:
        """Trainable parameters, training minutes per run (mean over seeds) and training tokens/s."""
        secs, tps, params = [], [], None
        for r in self.runs:
            total = 0.0
            for m in RunDir(r.path).rows()[1: r.stages_done + 1]:
                total += float(m.get("train", {}).get("seconds", 0.0))
                tps.append(float(m.get("train", {}).get("tokens_per_s", 0.0)))
                params = m.get("trainable_params", params)
            secs.append(total)
        return {"trainable_params": params, "train_minutes": float(np.mean(secs)) / 60 if secs else None,
                "tokens_per_s": float(np.mean(tps)) if tps else None}


def _setting_key(r: RunResult) -> str:
    """What determines a run's results except its seed (config_hash leaves out where a run goes and how it logs)."""
    from omegaconf import OmegaConf

    return config_hash(OmegaConf.create({k: v for k, v in (r.config or {}).items() if k != "seed"}))


def groups_of_runs(runs: Sequence[RunResult], replicates: int = 1000, level: float = 0.95) -> dict[str, MethodGroup] | None:
    """Runs that differ only in their seed pooled into one group per setting (labelled by method, with the run name
    where one method has several settings); None when a run kept no per-block NLLs."""
    if any(r.samples is None for r in runs):
        return None
    by: dict[str, list[RunResult]] = {}
    for r in runs:
        by.setdefault(_setting_key(r), []).append(r)
    methods = [rs[0].method for rs in by.values()]
    groups = {}
    for rs in by.values():
        label = rs[0].method if methods.count(rs[0].method) == 1 else f"{rs[0].method} [{rs[0].name}]"
        groups[label] = MethodGroup(label, rs, replicates, level)
    return groups


def interval_section(groups: dict[str, MethodGroup], tasks: Sequence[str], fig_dir: Path, out_dir: Path,
                     formats: Sequence[str] | None = None) -> list[str]:
    """Markdown of the summary with intervals, the differences and the error-bar figures (for ``gain report``)."""
    header, rows = main_table(groups, tasks)
    domains = next(iter(groups.values())).runs[0].domains
    md = ["## Summary with 95 % intervals", "",
          "Point estimate (mean over the runs of a setting, i.e. its seeds) [95 % bootstrap interval over seeds, "
          "validation blocks and downstream items]; † = does not overlap LoRA's interval.", "", _md_table(header, rows),
          "### Differences (non-overlapping intervals)", "", *differences(groups, tasks), ""]
    for title, p in _figures(groups, tasks, domains, fig_dir, heatmaps=False, formats=formats):
        md += [f"![{title}]({p.relative_to(out_dir).as_posix()})", ""]
    return md


def print_intervals(groups: dict[str, MethodGroup], console) -> None:
    """The headline metrics with their 95 % intervals in the terminal: a row per metric, a column per setting."""
    from rich.table import Table

    t = Table(title="with 95 % intervals (bootstrap over seeds, validation blocks and items)", title_justify="left")
    t.add_column("metric", overflow="fold")
    for n in groups:
        t.add_column(n, justify="right", overflow="fold")
    tasks = sorted({k.split(":", 1)[1] for g in groups.values() for k in g.iv.metrics if k.startswith("drop:")})
    for metric, title, scale, _lower in COLUMNS:
        t.add_row(title, *(g.iv.get(metric).scaled(scale).format(1 if scale == 100.0 else 3) for g in groups.values()))
    for task in tasks:
        t.add_row(f"{task} Δ vs base pts ↑", *(g.iv.get(f"drop:{task}").format(1) for g in groups.values()))
    console.print(t)


def load_groups(runs: Sequence[Any], replicates: int, level: float) -> dict[str, MethodGroup]:
    """Finished runs grouped by their ``group`` (the method) in study order; unfinished ones are left out."""
    by: dict[str, list[RunResult]] = {}
    for r in runs:
        if RunDir(r.run_dir).has_matrix():
            res = load_run(r.run_dir)
            if res.complete:
                by.setdefault(r.group, []).append(res)
    if not by:
        raise GainError("no finished run to report on (run the study first)")
    return {g: MethodGroup(g, rs, replicates, level) for g, rs in by.items()}


# --------------------------------------------------------------------------------------------- verdicts


def _compare(a: Interval, b: Interval, lower_is_better: bool = True) -> int:
    """+1 if a is better than b with non-overlapping intervals, -1 if worse, 0 if they overlap."""
    if a.below(b):
        return 1 if lower_is_better else -1
    if b.below(a):
        return -1 if lower_is_better else 1
    return 0


def verdicts(groups: dict[str, MethodGroup], tasks: Sequence[str]) -> list[dict[str, str]]:
    """Each of the paper's claims that the study's methods can test, with our figure and a verdict."""
    out: list[dict[str, str]] = []
    g, lora, ft = groups.get("gain_ffn"), groups.get("lora"), groups.get("full_ft")

    def iv(group: MethodGroup, metric: str, scale: float = 100.0) -> Interval:
        return group.iv.get(metric).scaled(scale)

    def add(claim: str, paper: str, ours: str, verdict: str) -> None:
        out.append({"claim": claim, "paper": paper, "ours": ours, "verdict": verdict})

    if g and lora:
        a, b = iv(g, "in_domain_change_mean"), iv(lora, "in_domain_change_mean")
        c = _compare(a, b)
        add("GAIN-FFN adapts in-domain about as well as LoRA", PAPER["in_domain"],
            f"GAIN-FFN {a.format(1, ' %')} vs LoRA {b.format(1, ' %')}",
            "reproduced (GAIN-FFN better)" if c > 0 else ("not reproduced (GAIN-FFN worse)" if c < 0
                                                          else "reproduced (no difference detected)"))
    for name, key, want in (("gain_ffn", "gain_ffn_earlier", -1), ("lora", "lora_earlier", +1)):
        grp = groups.get(name)
        if grp is None:
            continue
        own, base = iv(grp, "earlier_change_vs_own_mean"), iv(grp, "earlier_change_vs_base_mean")
        s = own.sign()
        word = "improve" if want < 0 else "degrade"
        add(f"{name}: earlier domains {word} (final vs own stage)", PAPER[key],
            f"{own.format(1, ' %')} vs own stage; {base.format(1, ' %')} vs base",
            "inconclusive (interval holds 0)" if s == 0 else ("reproduced" if s == want else "not reproduced"))
    if g:
        for other in (lora, ft):
            if other is None:
                continue
            a, b = iv(g, "earlier_change_vs_own_mean"), iv(other, "earlier_change_vs_own_mean")
            c = _compare(a, b)
            add(f"GAIN-FFN forgets less than {other.name}", "GAIN-FFN's earlier-domain change below the additive "
                "methods'", f"GAIN-FFN {a.format(1, ' %')} vs {other.name} {b.format(1, ' %')}",
                "reproduced" if c > 0 else ("not reproduced" if c < 0 else "inconclusive (intervals overlap)"))
    if g and lora:
        for t in tasks:
            a, b = g.iv.get(f"drop:{t}"), lora.iv.get(f"drop:{t}")
            if not (a.defined and b.defined):
                continue
            c = _compare(a, b, lower_is_better=False)
            add(f"{t}: GAIN-FFN's downstream drop smaller than LoRA's", PAPER["boolq"],
                f"GAIN-FFN {a.format(1, ' pts')} vs LoRA {b.format(1, ' pts')}",
                "reproduced" if c > 0 else ("not reproduced" if c < 0 else "inconclusive (intervals overlap)"))
    signs = {m: iv(groups[m], "earlier_change_vs_own_mean").sign() for m in (*MULTIPLICATIVE, *ADDITIVE) if m in groups}
    if len(signs) >= 2:
        expected = {m: (-1 if m in MULTIPLICATIVE else 1) for m in signs}
        wrong = [m for m in signs if signs[m] == -expected[m]]
        open_ = [m for m in signs if signs[m] == 0]
        verdict = ("not reproduced (" + ", ".join(wrong) + " opposite)" if wrong else
                   ("inconclusive (" + ", ".join(open_) + ": interval holds 0)" if open_ else "reproduced"))
        add("multiplicative methods improve earlier domains, additive ones degrade them", PAPER["multiplicative"],
            "; ".join(f"{m} {iv(groups[m], 'earlier_change_vs_own_mean').format(1, ' %')}" for m in signs), verdict)
    return out


# --------------------------------------------------------------------------------------------- tables


def _md_table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join(":---" if i == 0 else "---:" for i in range(len(header))) + "|"]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines) + "\n"


def main_table(groups: dict[str, MethodGroup], tasks: Sequence[str]) -> tuple[list[str], list[list[str]]]:
    """Per method: seeds, trainable params, every headline metric and downstream drop with its interval, training
    time. A † marks an interval that does not overlap the reference method's (LoRA)."""
    header = ["Method", "Seeds", "Trainable params"] + [c[1] for c in COLUMNS]
    header += [f"{t} final acc %" for t in tasks] + [f"{t} Δ vs base pts ↑" for t in tasks]
    header += ["Train min / run"]
    ref = groups.get(REFERENCE)
    rows = []
    for name, grp in groups.items():
        info = grp.train_info()
        row = [name, str(grp.iv.seeds), f"{info['trainable_params']:,}" if info["trainable_params"] else "–"]
        for metric, _title, scale, _lower in COLUMNS:
            a = grp.iv.get(metric).scaled(scale)
            mark = ""
            if ref is not None and name != REFERENCE and not a.overlaps(ref.iv.get(metric).scaled(scale)):
                mark = " †"
            row.append(a.format(1 if scale == 100.0 else 3) + mark)
        for t in tasks:
            row.append(grp.iv.get(f"final_acc:{t}").format(1))
        for t in tasks:
            a = grp.iv.get(f"drop:{t}")
            mark = " †" if ref is not None and name != REFERENCE and not a.overlaps(ref.iv.get(f"drop:{t}")) else ""
            row.append(a.format(1) + mark)
        row.append(f"{info['train_minutes']:.2f}" if info["train_minutes"] is not None else "–")
        rows.append(row)
    return header, rows


def differences(groups: dict[str, MethodGroup], tasks: Sequence[str]) -> list[str]:
    """``metric: a better than b`` for every pair of methods whose intervals do not overlap."""
    lines = []
    metrics = [(m, t, lower) for m, t, _s, lower in COLUMNS] + [(f"drop:{t}", f"{t} Δ vs base", False) for t in tasks]
    ivs = {n: g.iv for n, g in groups.items()}
    for metric, title, lower in metrics:
        marks = mark_differences(ivs, metric, lower_is_better=lower)
        pairs = [f"{a} better than {b}" for a, bs in marks.items() for b in bs.split(", ") if bs]
        lines.append(f"- **{title}**: " + ("; ".join(pairs) if pairs else "no difference (every pair of intervals overlaps)"))
    return lines


def ppl_table(grp: MethodGroup, domains: Sequence[str]) -> str:
    rows = []
    for k, cells in enumerate(grp.iv.ppl):
        label = "base" if k == 0 else f"{k}: {domains[k - 1]}"
        rows.append([label] + [f"{c.value:.2f} [{c.lo:.2f}, {c.hi:.2f}]" if c.defined else "–" for c in cells])
    return _md_table(["after stage", *domains], rows)


# --------------------------------------------------------------------------------------------- figures


def mean_relative_changes(groups: dict[str, MethodGroup]) -> dict[str, np.ndarray]:
    """Per group: the PPL change vs base of its mean PPL matrix (rows 1..T), the data of its heatmap."""
    return {n: relative_change_matrix(np.array([[c.value for c in row] for row in g.iv.ppl]))[1:]
            for n, g in groups.items()}


def _figures(groups: dict[str, MethodGroup], tasks: Sequence[str], domains: Sequence[str], fig_dir: Path,
             heatmaps: bool = True, formats: Sequence[str] | None = None) -> list[tuple[str, Path]]:
    out: list[tuple[str, Path]] = []
    bars = {}
    for metric, title, _scale, _lower in COLUMNS[:3]:
        bars[title.replace(" ↓", "")] = {n: (lambda i: (i.value, i.lo, i.hi))(g.iv.get(metric).scaled(100.0))
                                          for n, g in groups.items() if g.iv.get(metric).defined}
    out.append(("PPL change per method (95 % intervals)",
                figures.interval_bars(bars, fig_dir / "ppl_change_bars.png", "PPL change (%)",
                                      "Mean PPL change: negative = better (95 % intervals over seeds and blocks)",
                                      formats=formats)))
    stage_labels = ["base", *(f"{k}: {d}" for k, d in enumerate(domains, 1))]
    for t in tasks:
        curves = {n: [i.value / 100.0 for i in g.iv.accuracy[t]] for n, g in groups.items() if t in g.iv.accuracy}
        errors = {n: ([i.lo / 100.0 for i in g.iv.accuracy[t]], [i.hi / 100.0 for i in g.iv.accuracy[t]])
                  for n, g in groups.items() if t in g.iv.accuracy}
        if curves:
            out.append((f"{t} accuracy per stage (95 % intervals over seeds and items)",
                        figures.harness_curve(curves, fig_dir / f"{file_slug(t)}_curve{'' if heatmaps else '_intervals'}.png",
                                              task=t, stage_labels=stage_labels, errors=errors, formats=formats)))
    if not heatmaps:
        return out
    rels = mean_relative_changes(groups)
    _, hi = figures.symmetric_limits(rels.values())
    for n, rel in rels.items():
        rows = [f"{k}: {domains[k - 1]}" for k in range(1, rel.shape[0] + 1)]
        out.append((f"{n}: PPL change vs base (mean over seeds; one colour scale for all methods, "
                    f"±{figures.format_limit(hi)} %)",
                    figures.relative_change_heatmap(rel, rows, list(domains), fig_dir / f"heatmap_{file_slug(n)}.png",
                                                    title=f"{n}: PPL change vs base (%)",
                                                    outline=[(i, i) for i in range(rel.shape[0])], vmax=hi,
                                                    formats=formats)))
    return out


# --------------------------------------------------------------------------------------------- the report


def _shots(num_fewshot) -> str:
    """``eval.harness.num_fewshot`` in words: ``0-shot``, or per task ``boolq 0-shot, hellaswag 10-shot``."""
    if isinstance(num_fewshot, Mapping):
        return ", ".join(f"{t} {n}-shot" for t, n in num_fewshot.items()) or "0-shot"
    return f"{num_fewshot}-shot"


def _protocol_md(base_cfg, spec, groups: dict[str, MethodGroup]) -> list[str]:
    t = base_cfg.train
    per_stage = int(t.steps) * int(t.batch_size) * int(t.get("grad_accum", 1)) * int(t.seq_len)
    h = base_cfg.eval.get("harness") or {}
    lines = ["## Protocol (fixed in the recipe before any result was seen)", "",
             f"- model `{base_cfg.model.name}`; domains in training order: "
             + " → ".join(f"`{d}`" for d in base_cfg.domains.sequence),
             f"- budget per stage: {t.steps} steps × {t.batch_size} × {t.seq_len} tokens = {per_stage:,} tokens "
             f"({t.schedule} schedule, warm-up {t.warmup_ratio})",
             f"- validation: {base_cfg.eval.max_blocks} blocks × {base_cfg.eval.block_size} tokens per domain; "
             f"downstream: {', '.join(h.get('tasks') or []) or 'none'} (limit {h.get('limit')}, "
             f"{_shots(h.get('num_fewshot'))})",
             "- methods, learning rates (rule: lowest in-domain validation PPL on the first domain over the grid "
             "`study.lr_grid`, `gain study --sweep lr-select`) and seeds: "
             + "; ".join(f"`{m}` lr {float(s['lr']):g}, seeds {s['seeds']}" for m, s in spec.methods.items()),
             f"- intervals: {int(spec.level * 100)} % percentile bootstrap, {spec.replicates} replicates, over seeds "
             "(where a method has several), validation blocks and downstream items "
             "(`gain_cli/reporting/uncertainty.py`)", ""]
    return lines


def write_study_report(runs: Sequence[Any], spec, out_dir: Path, base_cfg, paper_figures=None) -> Path:
    """The study's report.md, study.json and figures (see the module docstring). ``paper_figures(run_dirs,
    settings, out_dir)`` draws the paper's Figures 1, 3 and 4 from the first seed of GAIN-FFN and LoRA
    (``gain_cli.analysis.paper_figures``: the analyses reload models, which reports never do themselves)."""
    out_dir = Path(out_dir)
    groups = load_groups(runs, spec.replicates, spec.level)
    reported = {res.path.resolve() for g in groups.values() for res in g.runs}
    unfinished = [r for r in runs if Path(r.run_dir).resolve() not in reported]
    first = next(iter(groups.values())).runs[0]
    domains = first.domains
    tasks = [t for t in (first.harness or {}) if all(f"drop:{t}" in g.iv.metrics for g in groups.values())]
    header, rows = main_table(groups, tasks)
    verdict_rows = verdicts(groups, tasks)
    fig_dir = out_dir / "figures"
    figs = _figures(groups, tasks, domains, fig_dir)
    paper_figs: list[tuple[str, Path]] = []
    firsts = [groups[m].runs[0].path for m in ("gain_ffn", "lora") if m in groups]
    if paper_figures is not None and spec.figures.enabled and firsts:
        paper_figs = paper_figures(firsts, spec.figures, out_dir)

    atomic_write_json(out_dir / "study.json", {
        "study": spec.name, "recipe": spec.recipe, "domains": domains, "level": spec.level,
        "replicates": spec.replicates, "sign_conventions": SIGN_CONVENTIONS,
        "methods": {n: {"seeds": g.iv.seeds, "runs": [str(r.path) for r in g.runs], **g.train_info(),
                        "metrics": {k: v.to_dict() for k, v in g.iv.metrics.items()},
                        "ppl": [[c.to_dict() for c in row] for row in g.iv.ppl],
                        "accuracy": {t: [c.to_dict() for c in a] for t, a in g.iv.accuracy.items()}}
                    for n, g in groups.items()},
        "verdicts": verdict_rows,
        "unfinished": [str(r.run_dir) for r in unfinished],
        "figures": {"heatmap_colour_limits_pct": list(figures.symmetric_limits(mean_relative_changes(groups).values())),
                    "formats": list(figures.FORMATS)},
    })
    md = [f"# Study `{spec.name}`: does GAIN forget less than LoRA and full fine-tuning?", "",
          f"Generated {datetime.now().isoformat(timespec='seconds')} from {sum(len(g.runs) for g in groups.values())} "
          "runs. Every number: point estimate (mean over seeds) [95 % interval].", ""]
    missing = [f"{r.method} seed {r.seed}" for r in unfinished]
    if missing:
        md += [f"**Partial study**: not finished yet, so not in this report: {', '.join(missing)} "
               "(`make study` resumes them).", ""]
    md += _protocol_md(base_cfg, spec, groups)
    md += ["## Results", "", "† = the interval does not overlap LoRA's (a difference).", "", _md_table(header, rows)]
    md += ["## The paper's claims, side by side", "",
           "Verdicts: *reproduced* when the intervals show the paper's direction, *not reproduced* when they show "
           "the opposite, *inconclusive* when they cannot tell. The paper does not say whether its percentages are "
           "vs the base model or vs each domain's own stage: both are shown.", "",
           _md_table(["Claim", "Paper", "Ours", "Verdict"],
                     [[v["claim"], v["paper"], v["ours"], f"**{v['verdict']}**"] for v in verdict_rows])]
    md += ["## Differences between methods (non-overlapping intervals)", "", *differences(groups, tasks), ""]
    md += ["## Validation PPL per stage and domain, with intervals", ""]
    for n, g in groups.items():
        md += [f"### {n} ({g.iv.seeds} seed{'s' if g.iv.seeds > 1 else ''})", "", ppl_table(g, domains)]
    md += ["## Figures", ""]
    md += [f"### {title}\n\n![{title}]({p.relative_to(out_dir).as_posix()})\n" for title, p in figs]
    for title, p in paper_figs:
        rel = Path(p).relative_to(out_dir).as_posix()
        md += [f"### {title}\n\n" + (f"![{title}]({rel})" if rel.endswith(".png") else f"[{rel}]({rel})") + "\n"]
    md += ["## Sign conventions", "", *(f"- **{k}**: {v}" for k, v in SIGN_CONVENTIONS.items()), ""]
    return atomic_write_text(out_dir / "report.md", "\n".join(md))


def write_lr_selection(runs: Sequence[Any], spec, out_dir: Path) -> Path:
    """The learning-rate rule's table: each method × grid value's in-domain PPL on the first domain, the winner."""
    table: dict[str, list[dict[str, Any]]] = {}
    for r in runs:
        if not RunDir(r.run_dir).has_matrix():
            continue
        res = load_run(r.run_dir)
        if res.stages_done < 1:
            continue
        s = res.samples
        iv = group_intervals([s], replicates=spec.replicates, level=spec.level) if s is not None else None
        cell = iv.ppl[1][0] if iv else Interval(float(res.ppl[1, 0]), None, None)
        table.setdefault(r.method, []).append({"lr": r.lr, "ppl": cell.to_dict(), "base": float(res.ppl[0, 0])})
    if not table:
        raise GainError("no finished lr-selection run to report on")
    chosen = {m: min(v, key=lambda e: e["ppl"]["value"])["lr"] for m, v in table.items()}
    atomic_write_json(out_dir / "lr_select.json", {"rule": "lowest in-domain validation PPL on the first domain",
                                                    "grid": table, "chosen": chosen})
    rows = []
    for m, entries in table.items():
        for e in entries:
            p = e["ppl"]
            ci = f" [{p['lo']:.3f}, {p['hi']:.3f}]" if p.get("lo") is not None else ""
            rows.append([m, f"{e['lr']:g}", f"{p['value']:.3f}{ci}", f"{e['base']:.3f}",
                         "**chosen**" if e["lr"] == chosen[m] else ""])
    md = ["# Learning-rate selection", "",
          "Rule (fixed before the study ran): each method trains the first domain for one stage of the study's "
          "budget (seed 0) at every value of its grid; the value with the lowest in-domain validation PPL wins. "
          "Forgetting plays no part in the choice.", "",
          _md_table(["Method", "lr", "in-domain PPL [95 % interval over blocks]", "base PPL", ""], rows),
          "Chosen (for the recipe's `study.methods`): " + ", ".join(f"`{m}` {lr:g}" for m, lr in chosen.items()), ""]
    return atomic_write_text(out_dir / "lr_select.md", "\n".join(md))


def write_lora_lr_sweep(runs: Sequence[Any], gain_runs: Sequence[Any], spec, out_dir: Path) -> Path:
    """The paper's Figure 2: LoRA at every lr of the sweep (and the study's GAIN runs) on the forgetting-adaptation
    plane, with intervals."""
    dirs = [r.run_dir for r in runs if RunDir(r.run_dir).has_matrix()]
    dirs += [r.run_dir for r in gain_runs]
    if not dirs:
        raise GainError("no finished lora-lr run to report on")
    write_pareto(dirs, out_dir)  # the figure and its table, beside this report
    groups = load_groups([*runs, *gain_runs], spec.replicates, spec.level)
    rows = []
    for n, g in groups.items():
        rows.append([n, g.iv.get("in_domain_change_mean").scaled(100).format(1),
                     g.iv.get("earlier_change_vs_own_mean").scaled(100).format(1),
                     g.iv.get("earlier_change_vs_base_mean").scaled(100).format(1)])
    bars = {"In-domain ΔPPL %": {}, "Earlier ΔPPL vs own %": {}}
    for n, g in groups.items():
        for title, metric in (("In-domain ΔPPL %", "in_domain_change_mean"),
                              ("Earlier ΔPPL vs own %", "earlier_change_vs_own_mean")):
            i = g.iv.get(metric).scaled(100)
            if i.defined:
                bars[title][n] = (i.value, i.lo, i.hi)
    fig = figures.interval_bars(bars, out_dir / "lora_lr_bars.png", "PPL change (%)",
                                "LoRA learning rates vs GAIN (95 % intervals)")
    md = ["# LoRA learning-rate sweep (the paper's Figure 2)", "",
          "Does any LoRA learning rate adapt without forgetting? Each row: one lr (seed 0) over the study's whole "
          "sequence; GAIN rows: the study's runs.", "",
          _md_table(["Run", "In-domain ΔPPL %", "Earlier ΔPPL vs own %", "Earlier ΔPPL vs base %"], rows),
          f"![bars]({fig.relative_to(out_dir).as_posix()})", "",
          "Pareto plot and table of the same runs (x: in-domain improvement, y: earlier-domain change): "
          "[pareto.md](pareto.md), ![pareto](pareto.png)", ""]
    return atomic_write_text(out_dir / "lora_lr.md", "\n".join(md))
