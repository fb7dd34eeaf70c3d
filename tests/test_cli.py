"""The CLI through Typer's runner: help of every command, config printing, one-line errors."""

import subprocess
import sys

import pytest
from typer.testing import CliRunner

from gain_cli.cli import app

runner = CliRunner()
COMMANDS = ["run", "eval", "merge", "report", "data", "info"]


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
