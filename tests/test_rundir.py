"""RunDir: a run directory's layout, its finished stages and rows, the checks of a reopened run, the lock."""

import json
import os

import pytest
from omegaconf import OmegaConf

from gain_cli.errors import GainError
from gain_cli.rundir import RunDir, resolve_run_dir


def write_row(rd: RunDir, k: int, ppl: float) -> None:
    rd.row_dir(k).mkdir(parents=True, exist_ok=True)
    rd.metrics_path(k).write_text(json.dumps({"row": "base" if k == 0 else f"stage_{k}:d{k}", "ppl": {"d1": ppl}}))


def a_run(tmp_path, stages=(1, 2), total=3) -> RunDir:
    rd = RunDir(tmp_path / "run")
    rd.path.mkdir(parents=True)
    OmegaConf.save(OmegaConf.create({"domains": {"sequence": [f"d{i}" for i in range(1, total + 1)]},
                                     "resume": False}), rd.config_path)
    write_row(rd, 0, 10.0)
    for k in stages:
        write_row(rd, k, 10.0 - k)
    return rd


def test_layout_and_what_is_finished(tmp_path):
    rd = a_run(tmp_path, stages=(1, 2))
    assert rd.metrics_path(0) == rd.path / "base" / "metrics.json"
    assert rd.state_path(2) == rd.path / "stages" / "stage_2" / "method_state.safetensors"
    assert rd.holds_run() and rd.base_done() and rd.finished_stages() == [1, 2]
    assert [r["ppl"]["d1"] for r in rd.rows()] == [10.0, 9.0, 8.0]
    write_row(rd, 4, 1.0)  # a gap: stage 3 missing, so 4 does not count
    assert rd.finished_stages() == [1, 2]
    assert rd.info() == {} and not rd.has_matrix() and not rd.is_drift()


def test_reopening_checks_say_one_line(tmp_path):
    rd = a_run(tmp_path, stages=(1,))
    cfg, done, total = rd.require_finished("merge")
    assert done == [1] and total == 3 and list(cfg.domains.sequence) == ["d1", "d2", "d3"]
    rd.check_stage(1, total, done)
    rd.check_stage(0, total, done, base=True)
    with pytest.raises(GainError, match=r"stage 2 of .* is not finished \(finished: 1\)"):
        rd.check_stage(2, total, done)
    with pytest.raises(GainError, match=r"--stage 4: stages are numbered 1..3"):
        rd.check_stage(4, total, done)
    with pytest.raises(GainError, match="not a gain run directory"):
        RunDir(tmp_path / "nothing").require_run()
    (tmp_path / "file").write_text("x")
    with pytest.raises(GainError, match="is a file"):
        RunDir(tmp_path / "file").require_run()
    empty = a_run(tmp_path / "e", stages=())
    with pytest.raises(GainError, match="no finished stage to export"):
        empty.require_finished("export")


def test_prepare_refuses_a_second_run_and_a_changed_config(tmp_path):
    cfg = OmegaConf.create({"resume": False, "run_dir": None, "seed": 0})
    rd = RunDir(tmp_path / "r")
    rd.prepare(cfg)  # new: fine
    rd.path.mkdir()
    OmegaConf.save(cfg, rd.config_path)
    with pytest.raises(GainError, match="already holds a run; pass resume=true"):
        rd.prepare(cfg)
    changed = OmegaConf.create({"resume": True, "run_dir": None, "seed": 1})
    with pytest.raises(GainError, match="config differs .*seed"):
        rd.prepare(changed)
    rd.info_path.write_text(json.dumps({"num_processes": 2}))
    with pytest.raises(GainError, match="started with 2 process"):
        rd.check_same_processes(OmegaConf.create({"resume": True}), 1)


def test_resolve_run_dir(tmp_path):
    base = {"output_root": str(tmp_path), "recipe": "r", "method": {"name": "lora"}, "run_dir": None,
            "run_name": None, "resume": False}
    assert resolve_run_dir(OmegaConf.create({**base, "run_name": "x"})) == (tmp_path / "r" / "lora" / "x").resolve()
    assert resolve_run_dir(OmegaConf.create({**base, "run_dir": str(tmp_path / "d")})) == (tmp_path / "d").resolve()
    with pytest.raises(GainError, match="no earlier run"):
        resolve_run_dir(OmegaConf.create({**base, "resume": True}))
    older, newer = tmp_path / "r" / "lora" / "a", tmp_path / "r" / "lora" / "b"
    for d, t in ((older, 1_000), (newer, 2_000)):
        d.mkdir(parents=True)
        RunDir(d).info_path.write_text("{}")
        os.utime(d, (t, t))
    assert resolve_run_dir(OmegaConf.create({**base, "resume": True})) == newer.resolve()


def test_the_lock_refuses_a_live_process_and_is_removed(tmp_path):
    rd = RunDir(tmp_path)
    with rd.lock():
        assert rd.lock_path.is_file()
    assert not rd.lock_path.exists()
    import socket

    rd.lock_path.write_text(json.dumps({"pid": os.getppid(), "host": socket.gethostname(), "started": "then"}))
    with pytest.raises(GainError, match="is in use by process"):
        with rd.lock():
            pass
    rd.lock_path.write_text(json.dumps({"pid": 2**22 + 12345, "host": socket.gethostname()}))  # a dead process
    with rd.lock():
        pass
