"""The CLI through Typer's runner: help of every command, config printing, one-line errors."""

import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from gain_cli.cli import app

runner = CliRunner()
COMMANDS = ["run", "eval", "merge", "export", "report", "data", "info"]


def test_help_lists_commands():
    res = runner.invoke(app, ["--help"])
    assert res.exit_code == 0
    for c in COMMANDS:
        assert c in res.output


@pytest.mark.parametrize("cmd", COMMANDS)
def test_each_command_has_help(cmd):
    res = runner.invoke(app, [cmd, "--help"])
    assert res.exit_code == 0, res.output
    assert "Usage" in res.output and len(res.output.splitlines()) > 3


def test_python_m_is_the_same_cli():
    out = subprocess.run([sys.executable, "-m", "gain_cli", "--help"], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0
    for c in COMMANDS:
        assert c in out.stdout


def test_info_prints_composed_config():
    res = runner.invoke(app, ["info", "recipe=tiny_8domains", "method=lora", "train.steps=7"])
    assert res.exit_code == 0, res.output
    assert "name: lora" in res.output and "steps: 7" in res.output and "recipe: tiny_8domains" in res.output


def test_data_list_shows_domains():
    res = runner.invoke(app, ["data", "list", "domains=tiny8"])
    assert res.exit_code == 0, res.output
    for d in ("arithmetic", "dna", "chess"):
        assert d in res.output


@pytest.mark.parametrize(
    "args, needle",
    [
        (["run", "recipe=tiny_8domains", "method=lorra"], "unknown method 'lorra'"),
        (["run", "recipe=nope"], "unknown recipe 'nope'"),
        (["run", "recipe=tiny_8domains", "train.nope=1"], "unknown config key 'train.nope'"),
        (["run", "recipe=tiny_8domains", "--lr", "3"], "unexpected option '--lr'"),
        (["info", "topic"], "unknown info topic 'topic'"),
        (["merge", "/nonexistent/run", "--out", "/tmp/x"], "is not a gain run directory"),
    ],
)
def test_bad_input_exit_2_one_line(args, needle):
    res = runner.invoke(app, args)
    assert res.exit_code == 2, res.output
    assert needle in res.output
    assert "Traceback" not in res.output
    assert len([ln for ln in res.output.splitlines() if ln.strip()]) == 1


def _record_runs(monkeypatch, fail_when=lambda cfg: False):
    """Replace the experiment by a recorder (the sweep logic is under test, not training)."""
    import gain_cli.runner as runner_mod
    from gain_cli.errors import GainError

    seen = []

    def ok_or_fail(cfg, console=None):
        seen.append(cfg.run_name)
        if fail_when(cfg):
            raise GainError(f"stage 1: loss became nan at step 2 (lr {cfg.method.lr})")
        return Path("/nonexistent-run-dir")

    monkeypatch.setattr(runner_mod, "run_experiment", ok_or_fail)
    monkeypatch.setattr("gain_cli.cli._print_run", lambda run_dir: None)
    return seen


def test_sweep_checks_every_combination_before_the_first_runs(monkeypatch):
    seen = _record_runs(monkeypatch)
    res = runner.invoke(app, ["run", "-m", "recipe=tiny_8domains", "method=gain_ffn,nope"])
    assert res.exit_code == 2 and "unknown method 'nope'" in res.output
    assert seen == []  # nothing ran: the bad value is found up front


def test_a_failed_sweep_run_does_not_stop_the_others(monkeypatch):
    seen = _record_runs(monkeypatch, fail_when=lambda cfg: float(cfg.method.lr) > 0.01)  # as if it diverged
    res = runner.invoke(app, ["run", "-m", "recipe=tiny_8domains", "method=gain_ffn", "method.lr=0.5,1e-3,3e-3"])
    out = " ".join(res.output.split())
    assert seen == ["lr-0.5", "lr-0.001", "lr-0.003"]  # the runs after the failed one still ran
    assert res.exit_code == 2
    assert "error in run lr-0.5: stage 1: loss became nan" in out and "1 of 3 runs failed: lr-0.5" in out
    assert "Traceback" not in res.output


def test_a_single_run_still_fails_at_once(monkeypatch):
    seen = _record_runs(monkeypatch, fail_when=lambda cfg: True)
    res = runner.invoke(app, ["run", "recipe=tiny_8domains"])
    assert res.exit_code == 2 and "loss became nan" in res.output and "runs failed" not in res.output
    assert len(seen) == 1


def test_report_and_bench_refuse_a_directory_gain_did_not_write(tmp_path):
    """The --out rule of gain merge holds for every command that writes a directory (gain_cli.outputs)."""
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "keep.txt").write_text("k")
    run = tmp_path / "run"
    (run / "stages").mkdir(parents=True)
    for args in (["report", str(run), "--out", str(mine)], ["report", "pareto", str(run), "--out", str(mine)],
                 ["bench", "--size", "tiny", "--out", str(mine)]):
        res = runner.invoke(app, args)
        assert res.exit_code == 2 and "did not write" in res.output and "--overwrite" in res.output, (args, res.output)
    assert [p.name for p in mine.iterdir()] == ["keep.txt"]
    res = runner.invoke(app, ["report", str(mine / "keep.txt")])
    assert res.exit_code == 2 and "is a file, not a run directory" in res.output


@pytest.mark.parametrize("override, needle", [
    ("method.lr=-1e-3", "method.lr must be a number in (0, 1], got -0.001"),
    ("method.lr=0", "method.lr must be a number in (0, 1], got 0"),
    ("method.lr=1e12", "method.lr must be a number in (0, 1]"),
    ("method.lr=nan", "method.lr must be a number in (0, 1], got nan"),
    ("train.warmup_ratio=5", "train.warmup_ratio must be a fraction of the stage's steps in [0, 1], got 5"),
    ("train.checkpoint_every=-1", "train.checkpoint_every must be a number of steps >= 0"),
    ("eval.max_blocks=0", "eval.max_blocks must be at least 1, or null"),
    ("train.max_grad_norm=0", "train.max_grad_norm must be a finite number > 0"),
    ("train.schedule=foo", "unknown train.schedule 'foo' (valid: constant, cosine, linear)"),
    ("domains.sequence=[]", "domains.sequence is empty"),
    ("domains.sequence=[dna,code,dna]", "domains.sequence names dna more than once"),
    ("run_name=../../../x", "run_name '../../../x' must be a plain name"),
    ("method=lora method.r=0", "method.r must be at least 1, got 0"),
    ("train.seq_len=2048", "train.seq_len=2048 is longer than model tiny-llama's 1024 positions (valid: 1..1024)"),
    ("eval.block_size=4096", "eval.block_size=4096 is longer than model tiny-llama's 1024 positions"),
    ("eval.harness.tasks=[cloze,hellaswagg]", "eval.harness.tasks: unknown task 'hellaswagg' (local: boolq, cloze"),
    ("method=lora method.dropout=1.5", "method.dropout must be a probability in [0, 1), got 1.5"),
])
def test_nonsense_values_are_refused_before_any_work(override, needle, tmp_path):
    """Each value a run would accept and then train on as nonsense: one line naming the key, the value and the
    valid range, exit 2, and no run directory left behind."""
    rd = tmp_path / "run"
    where = f"output_root={tmp_path / 'runs'}" if override.startswith("run_name") else f"run_dir={rd}"
    res = runner.invoke(app, ["run", "recipe=tiny_8domains", *override.split(), where])
    assert res.exit_code == 2, res.output
    assert needle in " ".join(res.output.split()) and "Traceback" not in res.output
    assert len([ln for ln in res.output.splitlines() if ln.strip()]) == 1
    assert not rd.exists() and not (tmp_path / "runs").exists() and not (tmp_path.parent.parent / "x").exists()


def test_a_run_dir_that_cannot_be_a_directory_is_one_line(tmp_path):
    afile = tmp_path / "afile"
    afile.write_text("mine")
    for rd, needle in ((afile, "is a file, not a directory"), (afile / "sub", "which is a file")):
        res = runner.invoke(app, ["run", "recipe=tiny_8domains", f"run_dir={rd}"])
        assert res.exit_code == 2 and needle in " ".join(res.output.split()) and "Traceback" not in res.output, res.output
    assert afile.read_text() == "mine"


@pytest.mark.parametrize("args", [
    ["demo", "eval.harness.tasks=[boolq,hellaswagg]"],
    ["study", "--size", "tiny", "eval.harness.tasks=[boolq,hellaswagg]"],
])
def test_demo_and_study_check_every_run_before_the_first_starts(args, tmp_path, monkeypatch):
    """The checks of `gain run` hold for the runs `gain demo` and `gain study` compose (gain_cli.preflight)."""
    monkeypatch.chdir(tmp_path)
    res = runner.invoke(app, args)
    assert res.exit_code == 2, res.output
    assert "eval.harness.tasks: unknown task 'hellaswagg'" in " ".join(res.output.split())
    assert "Traceback" not in res.output
    assert not (tmp_path / "runs").exists()


def test_version_and_completion():
    import importlib.metadata as md

    from gain_cli.cli import complete_override

    res = runner.invoke(app, ["--version"])
    assert res.exit_code == 0 and res.output.strip() == f"gain {md.version('gain-cli')}"
    assert "--install-completion" in runner.invoke(app, ["--help"]).output
    assert complete_override("meth") == ["method="]
    assert complete_override("method=gain") == ["method=gain_attn", "method=gain_ffn"]
    assert "recipe=tiny_8domains" in complete_override("recipe=tiny")


def test_run_help_lists_config_groups_and_one_example_per_line():
    from gain_cli.config import GROUPS, group_choices, recipe_choices

    out = runner.invoke(app, ["run", "--help"]).output
    lines = [ln.strip() for ln in out.splitlines()]
    assert "gain run recipe=tiny_8domains method=lora train.steps=20 run_name=try1" in lines
    assert any(ln.startswith("gain run -m recipe=tiny_8domains") for ln in lines)
    for group in GROUPS:
        assert any(ln.startswith(group) and ", ".join(group_choices(group)) in ln for ln in lines), group
    assert ", ".join(recipe_choices()) in out


def test_a_sweep_ends_with_the_comparison_of_its_runs(tmp_path):
    res = runner.invoke(app, ["run", "-m", "recipe=tiny_8domains", "method=gain_ffn,lora", "domains.sequence=[dna,code]",
                              "train.steps=4", "eval.max_blocks=2", "eval.harness.enabled=false",
                              f"output_root={tmp_path}"])
    assert res.exit_code == 0, res.output
    reports = list((tmp_path / "tiny_8domains").glob("sweep-*/report.md"))
    assert len(reports) == 1 and "forgetting metrics (runs as columns)" in res.output
    text = reports[0].read_text()
    assert "method-gain_ffn" in text and "method-lora" in text
    assert (reports[0].parent / ".gain-output.json").is_file()
