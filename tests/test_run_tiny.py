"""End to end: the tiny recipe through the CLI, its matrices, resume, merge and eval."""

import json
import math

import pytest
from typer.testing import CliRunner

from gain_cli.cli import app

runner = CliRunner()
FAST = ["recipe=tiny_8domains", "train.steps=12", "eval.max_blocks=8", "eval.harness.enabled=false"]


def _matrix(run_dir):
    return json.loads((run_dir / "ppl_matrix.json").read_text())


@pytest.fixture(scope="module")
def gain_run(tmp_path_factory):
    rd = tmp_path_factory.mktemp("runs") / "gain_ffn"
    res = runner.invoke(app, ["run", *FAST, "method=gain_ffn", f"run_dir={rd}"])
    assert res.exit_code == 0, res.output
    return rd


def test_run_dir_contents(gain_run):
    for f in ("config.yaml", "run_info.json", "ppl_matrix.json", "ppl_matrix.csv", "train_log.jsonl", "base/metrics.json"):
        assert (gain_run / f).is_file(), f
    for k in range(1, 9):
        assert (gain_run / "stages" / f"stage_{k}" / "method_state.safetensors").is_file()
        assert (gain_run / "stages" / f"stage_{k}" / "metrics.json").is_file()
    info = json.loads((gain_run / "run_info.json").read_text())
    assert info["started"] < info["updated"]  # the start of the run (8 stages take seconds), not its end
    info = json.loads((gain_run / "run_info.json").read_text())
    assert info["status"] == "complete" and info["num_processes"] == 1
    assert info["versions"]["torch"] and len(info["config_hash"]) == 16
    assert not list(gain_run.rglob("*.tmp"))


def test_matrix_shape_finite_and_in_domain_improves(gain_run):
    m = _matrix(gain_run)
    assert m["rows"][0] == "base" and len(m["rows"]) == 9 and len(m["domains"]) == 8
    vals = m["values"]
    assert all(math.isfinite(v) and v > 1 for row in vals for v in row)
    for k, d in enumerate(m["domains"], 1):
        assert vals[k][k - 1] < vals[k - 1][k - 1], f"stage {k} did not improve its own domain {d}"


def test_gain_state_is_the_gain_vectors(gain_run):
    from safetensors.torch import load_file

    state = load_file(str(gain_run / "stages" / "stage_1" / "method_state.safetensors"))
    # tiny-llama: 2 layers × (o_proj input 64 + down_proj input 176)
    assert sum(v.numel() for v in state.values()) == 2 * (64 + 176)
    assert all(k.endswith(".gain") for k in state)


def test_resume_after_interruption_gives_same_matrix(gain_run, tmp_path, monkeypatch):
    import gain_cli.runner as runner_mod

    rd = tmp_path / "interrupted"
    real_write = runner_mod.write_matrices
    calls = {"n": 0}

    def crash_after_stage_3(run_dir, domains):
        real_write(run_dir, domains)
        calls["n"] += 1
        if calls["n"] == 4:  # base row + stages 1..3 written
            raise KeyboardInterrupt

    monkeypatch.setattr(runner_mod, "write_matrices", crash_after_stage_3)
    res = runner.invoke(app, ["run", *FAST, "method=gain_ffn", f"run_dir={rd}"])
    assert res.exit_code == 130, res.output
    assert len(_matrix(rd)["rows"]) == 4
    monkeypatch.setattr(runner_mod, "write_matrices", real_write)

    res = runner.invoke(app, ["run", *FAST, "method=gain_ffn", f"run_dir={rd}"])
    assert res.exit_code == 2 and "resume=true" in res.output  # never overwrites silently
    res = runner.invoke(app, ["run", *FAST, "method=gain_ffn", f"run_dir={rd}", "resume=true"])
    assert res.exit_code == 0, res.output
    assert _matrix(rd)["values"] == _matrix(gain_run)["values"]


def test_resume_refuses_a_different_config_and_names_what_differs(gain_run):
    res = runner.invoke(app, ["run", *FAST, "method=gain_ffn", "train.steps=13", f"run_dir={gain_run}", "resume=true"])
    assert res.exit_code == 2 and "config differs" in res.output
    assert "train.steps: 12 → 13" in " ".join(res.output.split())


def test_resume_may_change_how_often_it_logs_and_checkpoints(gain_run):
    before = _matrix(gain_run)
    res = runner.invoke(app, ["run", *FAST, "method=gain_ffn", "train.checkpoint_every=5", "train.log_every=1",
                              f"run_dir={gain_run}", "resume=true"])
    assert res.exit_code == 0, res.output
    assert _matrix(gain_run) == before  # a finished run: nothing to redo


def test_merge_then_eval_reproduces_last_row(gain_run, tmp_path):
    out = tmp_path / "merged"
    res = runner.invoke(app, ["merge", str(gain_run), "--out", str(out)])
    assert res.exit_code == 0, res.output
    assert (out / "model.safetensors").is_file() and (out / "tokenizer.json").is_file()

    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(out)
    assert not any("gain" in n for n, _ in model.named_parameters())

    res = runner.invoke(app, ["eval", f"model={out}", "domains=tiny8", "eval.max_blocks=8"])
    assert res.exit_code == 0, res.output
    last = _matrix(gain_run)["values"][-1]
    m = _matrix(gain_run)
    for d, v in zip(m["domains"], last):
        assert f"{v:.3f}" in res.output, (d, v)


def test_eval_of_a_merged_model_scores_boolq_like_the_runs_last_row(tmp_path):
    rd, out = tmp_path / "run", tmp_path / "merged"
    res = runner.invoke(app, ["run", "recipe=tiny_8domains", "domains.sequence=[dna]", "train.steps=4",
                              "eval.max_blocks=4", f"run_dir={rd}"])
    assert res.exit_code == 0, res.output
    assert runner.invoke(app, ["merge", str(rd), "--out", str(out)]).exit_code == 0
    res = runner.invoke(app, ["eval", f"model={out}", "domains=tiny8", "domains.sequence=[dna]", "eval.max_blocks=4"])
    assert res.exit_code == 0, res.output
    harness = json.loads((rd / "harness_matrix.json").read_text())
    acc = 100 * harness["values"][-1][harness["tasks"].index("boolq")]
    line = next(x for x in res.output.splitlines() if "boolq" in x)
    assert [c.strip() for c in line.strip("│ ").split("│")][1] == f"{acc:.1f}"
    assert str(out) in " ".join(res.output.split()) or out.name in res.output  # labelled with the merged directory
    res = runner.invoke(app, ["eval", f"model={out}", "domains=tiny8", "eval.max_blocks=4", "eval.harness.enabled=false"])
    assert res.exit_code == 0 and "boolq" not in res.output


def test_eval_of_a_run_stage(gain_run):
    res = runner.invoke(app, ["eval", "--run", str(gain_run), "--stage", "2"])
    assert res.exit_code == 0, res.output
    row = _matrix(gain_run)["values"][2]
    assert f"{row[0]:.3f}" in res.output
    res = runner.invoke(app, ["eval", "--run", str(gain_run), "--stage", "9"])
    assert res.exit_code == 2 and "stages are numbered 1..8" in res.output
    res = runner.invoke(app, ["eval", "--run", str(gain_run), "--stage", "-1"])
    assert res.exit_code == 2 and "stages are numbered 1..8" in res.output and "Traceback" not in res.output


@pytest.mark.parametrize("method", ["lora", "dora", "full_ft", "gain_attn"])
def test_other_methods_run_and_adapt(method, tmp_path):
    rd = tmp_path / method
    res = runner.invoke(app, ["run", *FAST, f"method={method}", f"run_dir={rd}", "domains.sequence=[dna,code]"])
    assert res.exit_code == 0, res.output
    vals = _matrix(rd)["values"]
    assert len(vals) == 3
    assert vals[1][0] < vals[0][0] and vals[2][1] < vals[1][1]


def test_merge_lora_run(tmp_path):
    rd = tmp_path / "lora"
    res = runner.invoke(app, ["run", *FAST, "method=lora", f"run_dir={rd}", "domains.sequence=[dna,code]"])
    assert res.exit_code == 0, res.output
    res = runner.invoke(app, ["merge", str(rd), "--out", str(tmp_path / "m"), "--stage", "1"])
    assert res.exit_code == 0, res.output
    res = runner.invoke(app, ["eval", f"model={tmp_path / 'm'}", "domains=tiny8", "domains.sequence=[dna,code]",
                              "eval.max_blocks=8"])
    assert res.exit_code == 0, res.output
    assert f"{_matrix(rd)['values'][1][0]:.3f}" in res.output


def test_merge_never_destroys_a_users_files(gain_run, tmp_path, monkeypatch):
    """--out refuses a file and a non-empty directory gain did not write (both left as they were, no temporary
    directory behind), replaces its own earlier output, and with --overwrite does what it is told."""
    import stat

    from omegaconf import OmegaConf

    from gain_cli.io import _FILE_MODE

    total = len(OmegaConf.load(gain_run / "config.yaml").domains.sequence)
    important = tmp_path / "important"
    important.mkdir()
    (important / "thesis.txt").write_text("x")
    afile = tmp_path / "notes.txt"
    afile.write_text("y")
    for out, needle in ((important, "non-empty directory that gain did not write"), (afile, "is a file")):
        res = runner.invoke(app, ["merge", str(gain_run), "--out", str(out)])
        assert res.exit_code == 2 and needle in res.output and "Traceback" not in res.output, res.output
        assert len(res.output.strip().splitlines()) == 1
    assert (important / "thesis.txt").read_text() == "x" and afile.read_text() == "y"
    monkeypatch.chdir(important)  # `--out .` in a directory of one's own
    res = runner.invoke(app, ["merge", str(gain_run), "--out", "."])
    assert res.exit_code == 2 and "did not write" in res.output
    monkeypatch.chdir(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["important", "notes.txt"]  # no .tmp left anywhere
    res = runner.invoke(app, ["merge", str(gain_run), "--stage", "-1", "--out", str(tmp_path / "m")])
    assert res.exit_code == 2 and f"stages are numbered 1..{total}" in res.output

    out = tmp_path / "merged"
    for _ in range(2):  # a second merge replaces gain's own output
        res = runner.invoke(app, ["merge", str(gain_run), "--out", str(out)])
        assert res.exit_code == 0, res.output
        assert f"merged stage {total} of {total}" in res.output and "unfinished" not in res.output
    assert json.loads((out / ".gain-output.json").read_text())["stage"] == total
    assert stat.S_IMODE((out / "model.safetensors").stat().st_mode) == _FILE_MODE
    res = runner.invoke(app, ["merge", str(gain_run), "--out", str(important), "--overwrite"])
    assert res.exit_code == 0 and not (important / "thesis.txt").exists() and (important / "model.safetensors").is_file()
