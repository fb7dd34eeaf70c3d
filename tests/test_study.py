"""`gain study --size tiny` end to end through the CLI: runs, shared base row, report structure, resume, sweeps."""

import json
import re

import pytest
from typer.testing import CliRunner

from gain_cli.cli import app
from gain_cli.config import compose_config
from gain_cli.study import plan_runs, study_spec

runner = CliRunner()
METHODS = ["gain_ffn", "lora", "full_ft", "gain_attn", "ia3"]


@pytest.fixture(scope="module")
def tiny_study(tmp_path_factory):
    root = tmp_path_factory.mktemp("study")
    res = runner.invoke(app, ["study", "--size", "tiny", "--output-root", str(root)])
    assert res.exit_code == 0, res.output
    return root / "tiny_study", res.output


def test_every_run_finished_and_shares_one_base_row(tiny_study):
    root, output = tiny_study
    dirs = sorted(p.parent for p in root.glob("*/seed*/run_info.json"))
    assert [f"{d.parent.name}/{d.name}" for d in dirs] == sorted(
        ["gain_ffn/seed0", "gain_ffn/seed1", "lora/seed0", "lora/seed1", "full_ft/seed0", "gain_attn/seed0",
         "ia3/seed0"])
    bases = [json.loads((d / "base" / "metrics.json").read_text()) for d in dirs]
    assert all(b["block_nll"] == bases[0]["block_nll"] and b["harness"] == bases[0]["harness"] for b in bases)
    assert output.count("evaluating the base model on every domain") == 1
    assert output.count("row 0 (base model) taken from") == 6
    for d in dirs:
        assert json.loads((d / "run_info.json").read_text())["status"] == "complete"
        last = json.loads((d / "stages" / "stage_3" / "metrics.json").read_text())
        assert len(last["block_nll"]["code"]) == 16
        assert len(last["harness"]["cloze"]["per_item"]) == 16 and len(last["harness"]["boolq"]["per_item"]) == 24
    assert re.search(r"study \[█+\] 28/28 rows", output)


def test_report_has_intervals_verdicts_and_figures(tiny_study):
    root, _ = tiny_study
    report = (root / "report" / "report.md").read_text()
    for section in ("## Protocol", "## Results", "## The paper's claims, side by side",
                    "## Differences between methods", "## Validation PPL per stage and domain, with intervals",
                    "## Figures"):
        assert section in report
    # every method's row in the main table carries intervals: "+1.2 [+0.3, +2.0]"
    for m in METHODS:
        row = next(line for line in report.splitlines() if line.startswith(f"| {m} |"))
        assert len(re.findall(r"[+-]\d+\.\d+ \[[+-]\d+\.\d+, [+-]\d+\.\d+\]", row)) >= 9
    verdict_lines = [line for line in report.splitlines() if "**reproduced" in line or "**not reproduced" in line
                     or "**inconclusive" in line]
    assert len(verdict_lines) == 8
    study = json.loads((root / "report" / "study.json").read_text())
    assert list(study["methods"]) == METHODS
    assert study["methods"]["gain_ffn"]["seeds"] == 2 and study["methods"]["ia3"]["seeds"] == 1
    for m in METHODS:
        iv = study["methods"][m]["metrics"]["earlier_change_vs_own_mean"]
        assert iv["lo"] <= iv["value"] <= iv["hi"]
        assert len(study["methods"][m]["ppl"]) == 4 and len(study["methods"][m]["ppl"][0]) == 3
    figs = {p.name for p in (root / "report").rglob("*.png")}
    assert {"ppl_change_bars.png", "cloze_curve.png", "boolq_curve.png", "token_shift.png", "interpolation.png",
            "combination.png"} <= figs
    assert {f"heatmap_{m}.png" for m in METHODS} <= figs


def test_a_second_study_resumes_without_running_again(tiny_study):
    root, _ = tiny_study
    res = runner.invoke(app, ["study", "--size", "tiny", "--output-root", str(root.parent)])
    assert res.exit_code == 0, res.output
    assert "28 rows, 28 already done" in " ".join(res.output.split())
    assert "stage 1/3" not in res.output


def test_lr_select_sweep_picks_the_lowest_in_domain_ppl(tmp_path):
    res = runner.invoke(app, ["study", "--size", "tiny", "--sweep", "lr-select", "--output-root", str(tmp_path)])
    assert res.exit_code == 0, res.output
    table = json.loads((tmp_path / "tiny_study" / "lr_select" / "lr_select.json").read_text())
    for method, entries in table["grid"].items():
        best = min(entries, key=lambda e: e["ppl"]["value"])
        assert table["chosen"][method] == best["lr"]
        assert all(e["ppl"]["lo"] <= e["ppl"]["value"] <= e["ppl"]["hi"] for e in entries)
    runs = sorted(p.parent for p in (tmp_path / "tiny_study" / "lr_select").glob("*/*/run_info.json"))
    assert len(runs) == 4
    assert all(json.loads((r / "ppl_matrix.json").read_text())["domains"] == ["arithmetic"] for r in runs)


def test_study_plan_and_bad_input():
    cfg = compose_config([], "tiny_study")
    spec = study_spec(cfg)
    runs = plan_runs(spec, root=__import__("pathlib").Path("/r"), sweep=None, overrides=[], first_domain="arithmetic")
    assert [(r.method, r.seed) for r in runs][:3] == [("gain_ffn", 0), ("gain_ffn", 1), ("lora", 0)]
    assert "base_row=/r/gain_ffn/seed0" in runs[3].overrides and "method.lr=0.003" in runs[3].overrides
    res = runner.invoke(app, ["study", "--size", "huge"])
    assert res.exit_code == 2 and "--size" in res.output and "tiny" in res.output
    res = runner.invoke(app, ["study", "--size", "tiny", "--sweep", "everything"])
    assert res.exit_code == 2 and "lr-select" in res.output
    res = runner.invoke(app, ["study", "--size", "tiny", "study.methods.gain_ffn.seeds=[0,0]"])
    assert res.exit_code == 2 and "distinct integers" in res.output


def test_gain_report_pools_seeds_and_shows_intervals(tiny_study, tmp_path):
    root, _ = tiny_study
    runs = [str(root / "gain_ffn" / "seed0"), str(root / "gain_ffn" / "seed1"), str(root / "lora" / "seed0")]
    res = runner.invoke(app, ["report", *runs, "--out", str(tmp_path / "rep")], env={"COLUMNS": "200"})
    assert res.exit_code == 0, res.output
    assert "with 95 % intervals" in res.output
    assert re.search(r"Earlier ΔPPL vs own stage % ↓\s*│\s*[+-]\d+\.\d \[[+-]\d+\.\d, [+-]\d+\.\d\]", res.output)
    report = (tmp_path / "rep" / "report.md").read_text()
    assert "## Summary with 95 % intervals" in report
    gain_row = next(line for line in report.splitlines() if line.startswith("| gain_ffn | 2 |"))  # two seeds pooled
    assert re.search(r"[+-]\d+\.\d \[[+-]\d+\.\d, [+-]\d+\.\d\]", gain_row)
    assert (tmp_path / "rep" / "figures" / "ppl_change_bars.png").is_file()


def test_lora_lr_sweep_is_figure_2_with_the_study_gain_runs(tiny_study):
    root, _ = tiny_study
    res = runner.invoke(app, ["study", "--size", "tiny", "--sweep", "lora-lr", "--output-root", str(root.parent)])
    assert res.exit_code == 0, res.output
    md = (root / "lora_lr" / "lora_lr.md").read_text()
    rows = [line.split(" | ")[0].lstrip("| ") for line in md.splitlines() if line.startswith("| ") and "[" in line]
    assert rows == ["lora@0.001", "lora@0.003", "gain_ffn", "gain_attn"]
    assert (root / "lora_lr" / "pareto.png").is_file() and (root / "lora_lr" / "lora_lr_bars.png").is_file()
    # the study's LoRA seed-0 run (lr 0.003) is the sweep's run at that lr: not trained twice
    assert not (root / "lora_lr" / "lr0.003").exists()
    assert "run 1/2 · lora lr 0.001" in res.output and "run 2/2" not in res.output
    # its runs reuse the study's base row
    base = json.loads((root / "lora_lr" / "lr0.001" / "base" / "metrics.json").read_text())
    assert base == json.loads((root / "gain_ffn" / "seed0" / "base" / "metrics.json").read_text())
