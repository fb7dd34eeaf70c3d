"""lm-eval's own results kept per row (lm-eval's files), the harness matrices of acc, acc_norm and their stderrs,
and the report's tables of them: on a tiny run with the packaged BoolQ set and the hand-made 4-choice task of
tests/data (its lm-eval task YAML from test_mc_tasks)."""

import json

import pytest
from test_mc_tasks import mc4_yaml
from typer.testing import CliRunner

from gain_cli.cli import app

runner = CliRunner()


@pytest.fixture(scope="module")
def harness_run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("lmeval")
    rd = tmp / "run"
    res = runner.invoke(app, ["run", "recipe=tiny_8domains", "method=gain_ffn", "domains.sequence=[dna,code]",
                              "train.steps=4", "eval.max_blocks=2", f"eval.harness.tasks=[boolq,{mc4_yaml(tmp)}]",
                              "eval.harness.limit=12", "eval.harness.save_samples=true", f"run_dir={rd}"])
    assert res.exit_code == 0, res.output
    return rd


def test_each_row_keeps_lm_evals_own_results_files(harness_run):
    for row_dir in (harness_run / "base", harness_run / "stages" / "stage_1", harness_run / "stages" / "stage_2"):
        files = list((row_dir / "lm_eval").rglob("results_*.json"))
        assert len(files) == 1, list(row_dir.rglob("*"))
        res = json.loads(files[0].read_text())
        for key in ("results", "configs", "versions", "n-shot", "n-samples", "higher_is_better", "task_hashes"):
            assert key in res, key
        assert set(res["results"]) == {"boolq", "tiny_mc4"}
        assert {"acc,none", "acc_stderr,none", "acc_norm,none", "acc_norm_stderr,none"} <= set(res["results"]["tiny_mc4"])
        assert res["n-samples"]["tiny_mc4"]["effective"] == 12
        # the row's own metrics are lm-eval's numbers
        metrics = json.loads((row_dir / "metrics.json").read_text())
        assert metrics["harness"]["tiny_mc4"]["acc_norm"] == res["results"]["tiny_mc4"]["acc_norm,none"]
        samples = {p.name.split("_2")[0] for p in (row_dir / "lm_eval").rglob("samples_*.jsonl")}
        assert samples == {"samples_boolq", "samples_tiny_mc4"}


def test_harness_matrices_keep_acc_norm_and_stderr(harness_run):
    from gain_cli.reporting.matrices import load_run

    acc = json.loads((harness_run / "harness_matrix.json").read_text())
    assert acc["metric"] == "acc" and acc["tasks"] == ["boolq", "tiny_mc4"] and len(acc["rows"]) == 3
    norm = json.loads((harness_run / "harness_matrix_acc_norm.json").read_text())
    assert norm["values"][0][0] == "nan"  # boolq defines no acc_norm
    run = load_run(harness_run)
    stage2 = json.loads((harness_run / "stages" / "stage_2" / "metrics.json").read_text())["harness"]
    assert run.harness_extra["acc_stderr"]["boolq"][2] == pytest.approx(stage2["boolq"]["acc_stderr"])
    assert run.harness_extra["acc_norm"]["tiny_mc4"][2] == pytest.approx(stage2["tiny_mc4"]["acc_norm"])


def test_report_shows_every_lm_eval_metric(harness_run, tmp_path):
    res = runner.invoke(app, ["report", str(harness_run), "--out", str(tmp_path / "rep")])
    assert res.exit_code == 0, res.output
    text = (tmp_path / "rep" / "metrics.md").read_text()
    for title in ("boolq accuracy per stage", "boolq accuracy, lm-eval's standard error per stage",
                  "tiny_mc4 length-normalised accuracy per stage", "tiny_mc4 length-normalised accuracy, standard error"):
        assert title in text, title
    assert "boolq length-normalised" not in text
