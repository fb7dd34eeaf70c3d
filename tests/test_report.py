"""`write_report` on two hand-made run directories (gain_ffn, lora): files, tables, figures, errors."""

import csv
import json
import re
from math import log
from pathlib import Path

import pytest

from gain_cli.errors import GainError
from gain_cli.io import atomic_write_json, atomic_write_text
from gain_cli.reporting.matrices import load_run, write_matrix
from gain_cli.reporting.metrics import compute_metrics
from gain_cli.reporting.report import write_report
from gain_cli.reporting.tables import format_cell, metric_table, print_run, to_latex, to_markdown
from test_figures import drawn  # noqa: F401  (the fixture: the figures a report saves)

DOMAINS = ["med", "law", "code"]
GAIN = [[10.0, 20.0, 40.0],
        [7.0, 19.0, 39.0],
        [6.5, 15.0, 38.0],
        [6.0, 14.0, 30.0]]      # earlier domains keep improving
LORA = [[10.0, 20.0, 40.0],
        [6.0, 24.0, 44.0],
        [9.0, 14.0, 46.0],
        [12.0, 26.0, 29.0]]     # earlier domains forgotten
BOOLQ = {"gain_ffn": [0.70, 0.70, 0.69, 0.69], "lora": [0.70, 0.62, 0.60, 0.55]}


def make_run(root: Path, method: str, ppl, domains=DOMAINS, boolq=None) -> Path:
    rd = root / method
    rows = ["base", *(f"stage_{k}:{d}" for k, d in enumerate(domains, 1))][: len(ppl)]
    write_matrix(rd, "ppl_matrix", "ppl", domains, rows, ppl)
    if boolq is not None:
        write_matrix(rd, "harness_matrix", "acc", ["boolq"], rows, [[a] for a in boolq])
    atomic_write_text(rd / "config.yaml", f"recipe: tiny_test\nmethod:\n  name: {method}\nmodel:\n  name: tiny-llama\n"
                                          f"domains:\n  sequence: {list(domains)}\n")
    atomic_write_json(rd / "run_info.json", {"recipe": "tiny_test", "method": method, "model": "tiny-llama",
                                             "seed": 0, "status": "complete"})
    return rd


@pytest.fixture()
def runs(tmp_path):
    return [make_run(tmp_path / "runs", "gain_ffn", GAIN, boolq=BOOLQ["gain_ffn"]),
            make_run(tmp_path / "runs", "lora", LORA, boolq=BOOLQ["lora"])]


def _is_png(p: Path) -> bool:
    return p.is_file() and p.stat().st_size > 100 and p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.parametrize("fmt,table_file", [("md", "metrics.md"), ("latex", "metrics.tex"), ("csv", "metrics.csv")])
def test_report_files(runs, tmp_path, fmt, table_file):
    out = tmp_path / f"report_{fmt}"
    path = write_report(runs, out, fmt)
    assert path == out / "report.md"
    for f in ("report.md", "metrics.json", table_file):
        assert (out / f).is_file() and (out / f).stat().st_size > 0, f
    text = path.read_text()
    pngs = re.findall(r"!\[[^\]]*\]\(([^)]+\.png)\)", text)
    assert set(pngs) == {"figures/heatmap_gain_ffn.png", "figures/heatmap_lora.png", "figures/boolq_curve.png"}
    assert all(_is_png(out / p) for p in pngs)
    for p in pngs:   # every figure also for papers, next to its PNG
        assert (out / p).with_suffix(".pdf").read_bytes()[:5] == b"%PDF-", p
        assert b"<svg" in (out / p).with_suffix(".svg").read_bytes()[:500], p
    assert "## Sign conventions" in text and f"({table_file})" in text
    assert not list(out.rglob("*.tmp"))
    if fmt == "latex":
        tex = (out / "metrics.tex").read_text()
        assert r"\toprule" in tex and r"\bottomrule" in tex and r"gain\_ffn" in tex
    if fmt == "csv":
        assert (out / "metrics_max_forgetting.csv").stat().st_size > 0


def test_summary_table_numbers_equal_metrics(runs, tmp_path):
    out = tmp_path / "rep"
    write_report(runs, out, "csv")
    with open(out / "metrics.csv", newline="") as f:
        table = list(csv.DictReader(f))
    assert [r["Method"] for r in table] == ["gain_ffn", "lora"]      # one row per method
    for row, ppl, method in zip(table, (GAIN, LORA), ("gain_ffn", "lora")):
        m = compute_metrics(ppl, DOMAINS, {"boolq": BOOLQ[method]})
        assert row["Stages"] == "3/3"
        assert float(row["In-domain ΔPPL % ↓"]) == pytest.approx(100 * m.in_domain_change_mean, rel=1e-12)
        assert float(row["Earlier ΔPPL vs own stage % ↓"]) == pytest.approx(100 * m.earlier_change_vs_own_mean, rel=1e-12)
        assert float(row["Earlier ΔPPL vs base % ↓"]) == pytest.approx(100 * m.earlier_change_vs_base_mean, rel=1e-12)
        assert float(row["BWT ↑"]) == pytest.approx(m.bwt, rel=1e-12)
        assert float(row["FWT ↑"]) == pytest.approx(m.fwt, rel=1e-12)
        assert float(row["Max forgetting ↓"]) == pytest.approx(m.max_forgetting_mean, rel=1e-12)
        assert float(row["Avg final log-PPL ↓"]) == pytest.approx(m.avg_final_log_ppl, rel=1e-12)
        assert float(row["Avg final PPL ↓"]) == pytest.approx(m.avg_final_ppl, rel=1e-12)
        assert float(row["boolq Δ vs base pts ↑"]) == pytest.approx(m.harness["boolq"].drop_points, rel=1e-12)
    # hand check of the LoRA row: earlier vs base = mean((12-10)/10, (26-20)/20) = +25 %; BoolQ 55 - 70 = -15 pts
    lora = table[1]
    assert float(lora["Earlier ΔPPL vs base % ↓"]) == pytest.approx(25.0)
    assert float(lora["boolq Δ vs base pts ↑"]) == pytest.approx(-15.0)
    # GAIN: BWT = mean(ln7 - ln6, ln15 - ln14) > 0 (earlier domains improved)
    assert float(table[0]["BWT ↑"]) == pytest.approx((log(7 / 6) + log(15 / 14)) / 2)

    js = json.loads((out / "metrics.json").read_text())
    assert [r["method"] for r in js["runs"]] == ["gain_ffn", "lora"] and js["domains"] == DOMAINS
    assert js["runs"][1]["metrics"]["bwt"] == pytest.approx(compute_metrics(LORA, DOMAINS).bwt, rel=1e-12)
    assert "bwt" in js["sign_conventions"]


def test_markdown_and_latex_show_the_metric_values(runs):
    loaded = [load_run(r) for r in runs]
    header, rows = metric_table(loaded)
    assert len(rows) == 2 and [r[0] for r in rows] == ["gain_ffn", "lora"]
    md, tex = to_markdown((header, rows)), to_latex((header, rows), caption="Summary")
    for run in loaded:
        for v in (100 * run.metrics.earlier_change_vs_base_mean, run.metrics.bwt, run.metrics.avg_final_ppl):
            assert format_cell(v) in md and format_cell(v).replace("-", "$-$") in tex
    assert md.count("\n") == 2 + 2


def test_partial_and_single_domain_runs(tmp_path):
    partial = make_run(tmp_path, "lora", LORA[:2], boolq=BOOLQ["lora"][:2])
    path = write_report([partial], tmp_path / "rep", "md")
    text = path.read_text()
    assert "1/3" in text and "Partial runs" in text
    single = make_run(tmp_path / "one", "gain_ffn", [[10.0], [8.0]], domains=["med"])
    text = write_report([single], tmp_path / "rep1", "md").read_text()
    assert "| gain_ffn | 1/1 | -20.000 | – | – | – | – |" in text   # undefined earlier-domain metrics


def test_mismatched_domain_sequences(tmp_path):
    a = make_run(tmp_path / "a", "gain_ffn", GAIN)
    b = make_run(tmp_path / "b", "lora", [[10.0, 20.0, 40.0]], domains=["med", "code", "law"])
    with pytest.raises(GainError, match=r"domain sequence.*\['med', 'law', 'code'\].*\['med', 'code', 'law'\]"):
        write_report([a, b], tmp_path / "rep", "md")


def test_missing_matrix_names_the_path(tmp_path, runs):
    empty = tmp_path / "empty_run"
    empty.mkdir()
    with pytest.raises(GainError, match=re.escape(str(empty / "ppl_matrix.json"))):
        write_report([runs[0], empty], tmp_path / "rep", "md")
    with pytest.raises(GainError, match="format"):
        write_report(runs, tmp_path / "rep", "html")


def test_duplicate_methods_get_distinct_labels(tmp_path):
    a = make_run(tmp_path / "x", "lora", LORA)
    b = make_run(tmp_path / "y", "lora", GAIN)
    (b.parent / "lora").rename(b.parent / "lora_lr1e-3")
    header, rows = metric_table([load_run(a), load_run(b.parent / "lora_lr1e-3")])
    assert [r[0] for r in rows] == ["lora [lora]", "lora [lora_lr1e-3]"]


def test_print_run(runs):
    from rich.console import Console

    console = Console(record=True, width=200, color_system=None)
    print_run(load_run(runs[1]), console)
    out = console.export_text()
    assert "validation PPL" in out and "PPL change vs base" in out and "harness acc" in out
    # PPL of code after stage 2 = 46.00; its change vs base (46-40)/40 = 15.0 %; BoolQ at stage 3: 55.0 (-15.0 pts)
    assert "46.00" in out and "15.0" in out and "55.0 (-15.0)" in out
    assert "BWT" in out and "signs:" in out


def test_comparison_in_an_80_column_terminal_keeps_every_number_whole(runs):
    """Runs as columns, a row per metric: at 80 columns no value is cut short with an ellipsis."""
    from rich.console import Console

    from gain_cli.reporting.tables import print_metric_table

    loaded = [load_run(r) for r in runs]
    console = Console(record=True, width=80, color_system=None)
    print_metric_table(loaded, console)
    out = console.export_text()
    assert "…" not in out and max(len(line) for line in out.splitlines()) <= 80
    header, rows = metric_table(loaded)
    bwt = header.index("BWT ↑")
    line = next(x for x in out.splitlines() if "BWT" in x)
    assert [c.strip() for c in line.strip("│ ").split("│")[1:]] == [format_cell(r[bwt], 3) for r in rows]


# LoRA with a wider range: code after stage 3 at 18.8 vs 10 → +88 % (GAIN's largest |change| is 40 %)
LORA_WIDE = [row[:] for row in LORA[:3]] + [[18.8, 26.0, 29.0]]


def test_two_methods_share_one_symmetric_colour_scale(tmp_path, drawn):
    runs = [make_run(tmp_path / "runs", "gain_ffn", GAIN), make_run(tmp_path / "runs", "lora", LORA_WIDE)]
    out = tmp_path / "rep"
    text = write_report(runs, out, "md").read_text()
    norms = {n: drawn[f"heatmap_{n}.png"].axes[0].images[0].norm for n in ("gain_ffn", "lora")}
    for n, norm in norms.items():   # the limits the images were drawn with: the same, ±max over both runs
        assert (norm.vmin, norm.vcenter, norm.vmax) == pytest.approx((-88.0, 0.0, 88.0)), n
    cbars = [fig.axes[1].get_ylim() for n, fig in drawn.items() if n.startswith("heatmap_")]
    assert len(cbars) == 2 and all(c == pytest.approx((-88.0, 88.0)) for c in cbars)   # and their colour bars
    assert json.loads((out / "metrics.json").read_text())["figures"]["heatmap_colour_limits_pct"] == \
        pytest.approx([-88.0, 88.0])
    assert "One colour scale for all runs: ±88.0 %" in text


def test_identical_curves_stay_visible_in_the_report(tmp_path, drawn):
    same = [0.70, 0.70, 0.69, 0.69]
    runs = [make_run(tmp_path / "runs", "gain_ffn", GAIN, boolq=same), make_run(tmp_path / "runs", "lora", LORA, boolq=same)]
    write_report(runs, tmp_path / "rep", "md")
    ax = drawn["boolq_curve.png"].axes[0]
    assert [t.get_text() for t in ax.get_legend().get_texts()] == ["gain_ffn", "lora (identical to gain_ffn)"]
    a, b = ax.get_lines()
    assert (a.get_linestyle(), a.get_marker()) != (b.get_linestyle(), b.get_marker())
    assert a.get_linewidth() > b.get_linewidth()


def test_figure_formats_can_be_chosen(runs, tmp_path):
    out = tmp_path / "rep"
    text = write_report(runs, out, "md", figure_formats=("png",)).read_text()
    assert sorted(p.suffix for p in (out / "figures").iterdir()) == [".png"] * 3
    assert "as .svg" not in text
    assert json.loads((out / "metrics.json").read_text())["figures"]["formats"] == ["png"]
