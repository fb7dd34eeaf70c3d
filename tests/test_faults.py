"""Fault injection: SIGKILL at many points, resume, identical matrices; locks; determinism; bad input."""

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from gain_cli.cli import app

runner = CliRunner()
BASE = ["recipe=tiny_8domains", "domains.sequence=[dna,code]", "train.steps=12", "train.checkpoint_every=4",
        "eval.max_blocks=6", "eval.harness.enabled=false"]


def _gain(args, env_extra=None, timeout=300):
    env = {**os.environ, **(env_extra or {})}
    return subprocess.run([sys.executable, "-m", "gain_cli", *args], capture_output=True, text=True, env=env, timeout=timeout)


def _values(rd: Path):
    return json.loads((rd / "ppl_matrix.json").read_text())["values"]


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    rd = tmp_path_factory.mktemp("ref") / "run"
    res = runner.invoke(app, ["run", *BASE, "method=lora", f"run_dir={rd}"])
    assert res.exit_code == 0, res.output
    return rd


@pytest.mark.parametrize("point", [
    "stage1.step6",            # mid-stage, after the step-4 checkpoint
    "ckpt8.before_pointer",    # while writing a checkpoint
    "eval.stage_1.code",       # mid-evaluation
    "write:ppl_matrix.json",   # mid-write of a result file (temp written, not yet renamed)
    "stage2.step12",           # end of the last stage, before its state is saved
])
def test_sigkill_then_resume_gives_identical_matrix(point, reference, tmp_path):
    rd = tmp_path / "run"
    res = _gain(["run", *BASE, "method=lora", f"run_dir={rd}"], {"GAIN_FAULT_KILL_AT": point})
    assert res.returncode == -signal.SIGKILL, (res.returncode, res.stderr[-2000:])
    for f in rd.rglob("*.json"):
        json.loads(f.read_text())  # no partially written file is ever in place
    res = _gain(["run", *BASE, "method=lora", f"run_dir={rd}", "resume=true"])
    assert res.returncode == 0, res.stderr[-2000:]
    assert _values(rd) == _values(reference)
    assert not list(rd.rglob("*.tmp")) and not list(rd.rglob("ckpt-*"))


def test_same_seed_twice_is_deterministic(reference, tmp_path):
    rd = tmp_path / "again"
    res = runner.invoke(app, ["run", *BASE, "method=lora", f"run_dir={rd}"])
    assert res.exit_code == 0, res.output
    assert _values(rd) == _values(reference)
    a = json.loads((rd / "run_info.json").read_text())
    b = json.loads((reference / "run_info.json").read_text())
    assert a["config_hash"] == b["config_hash"] and a["versions"] == b["versions"]


def test_second_run_on_a_locked_dir_refuses(tmp_path):
    rd = tmp_path / "locked"
    rd.mkdir()
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        import socket

        (rd / ".lock").write_text(json.dumps({"pid": sleeper.pid, "host": socket.gethostname(), "started": "now"}))
        res = runner.invoke(app, ["run", *BASE, f"run_dir={rd}"])
        assert res.exit_code == 2 and f"in use by process {sleeper.pid}" in res.output
    finally:
        sleeper.kill()
        sleeper.wait()
    # the holder is dead now: the lock is stale and the run goes ahead
    res = runner.invoke(app, ["run", *BASE, "train.steps=2", f"run_dir={rd}"])
    assert res.exit_code == 0, res.output
    assert not (rd / ".lock").exists()
