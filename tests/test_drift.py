"""train.domain_schedule=drift: one continuous run over the domains with a smooth mixing schedule, evaluated where a
staged run ends its stages (gain_cli/training/drift.py, docs/drift.md)."""

import json
import math
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf
from typer.testing import CliRunner

from gain_cli.cli import app
from gain_cli.training.drift import drift_plan, mixing_weights

runner = CliRunner()
S = 6  # steps per segment
BASE = ["recipe=tiny_8domains", "domains.sequence=[dna,code,chess]", f"train.steps={S}", "train.checkpoint_every=4",
        "eval.max_blocks=4", "eval.harness.enabled=false"]
DRIFT = ["train.domain_schedule=drift"]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """``runs(method, schedule, *extra)``: the run directory, trained once per module."""
    root, done = tmp_path_factory.mktemp("drift_runs"), {}

    def get(method, schedule, *extra):
        key = (method, schedule, *extra)
        if key not in done:
            rd = root / "_".join(k.replace("=", "-").replace("+", "").replace(".", "-") for k in key)
            res = runner.invoke(app, ["run", *BASE, f"method={method}", f"train.domain_schedule={schedule}", *extra,
                                      f"run_dir={rd}"])
            assert res.exit_code == 0, res.output
            done[key] = rd
        return done[key]

    return get


def _matrix(rd: Path) -> dict:
    return json.loads((rd / "ppl_matrix.json").read_text())


def _metrics(rd: Path, k: int) -> dict:
    return json.loads((rd / "stages" / f"stage_{k}" / "metrics.json").read_text())


def _log(rd: Path) -> list[dict]:
    return [json.loads(line) for line in (rd / "train_log.jsonl").read_text().splitlines()]


# --- the mixing schedule ------------------------------------------------------------------------

def test_mixing_weights_exact():
    # T = 3 domains, S = 8 steps, overlap 0.5: W = 4 steps centred on the boundaries 8 and 16
    p = lambda t: mixing_weights(t, 3, 8, 0.5)  # noqa: E731
    assert p(0) == p(5) == [1.0, 0.0, 0.0]
    assert p(6) == [0.875, 0.125, 0.0] and p(7) == [0.625, 0.375, 0.0]
    assert p(8) == [0.375, 0.625, 0.0] and p(9) == [0.125, 0.875, 0.0]
    assert p(10) == p(13) == [0.0, 1.0, 0.0]
    assert p(14) == [0.0, 0.875, 0.125] and p(17) == [0.0, 0.125, 0.875]
    assert p(18) == p(23) == [0.0, 0.0, 1.0]
    budget = [sum(p(t)[i] for t in range(24)) for i in range(3)]
    assert budget == [8.0, 8.0, 8.0]  # each domain: one stage's worth of examples in expectation
    # overlap 0: the staged run's abrupt switch; overlap 1: the windows touch, never more than two domains
    assert [mixing_weights(t, 2, 4, 0.0) for t in (3, 4)] == [[1.0, 0.0], [0.0, 1.0]]
    q = lambda t: mixing_weights(t, 3, 4, 1.0)  # noqa: E731
    assert q(1) == [1.0, 0.0, 0.0] and q(2) == [0.875, 0.125, 0.0] and q(5) == [0.125, 0.875, 0.0]
    assert q(6) == [0.0, 0.875, 0.125] and q(11) == [0.0, 0.0, 1.0]
    for t in range(12):
        assert math.isclose(sum(q(t)), 1.0) and sum(x > 0 for x in q(t)) <= 2


def test_plan_is_deterministic_and_overlap_zero_reads_the_staged_batches():
    from gain_cli.training.loop import stage_order

    n_blocks, per_step = [50, 70, 30], 8
    dom, blk = drift_plan(n_blocks, S, per_step, 0.0, seed=3)
    assert dom.tolist() == [i for i in range(3) for _ in range(S * per_step)]
    assert blk.tolist() == torch.cat([stage_order(n, S * per_step, 3, i + 1) for i, n in enumerate(n_blocks)]).tolist()
    a, b = drift_plan(n_blocks, S, per_step, 0.5, seed=3), drift_plan(n_blocks, S, per_step, 0.5, seed=3)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    assert not torch.equal(a[0], drift_plan(n_blocks, S, per_step, 0.5, seed=4)[0])
    assert all(int(blk_i) < n_blocks[int(d)] for d, blk_i in zip(*a))


def test_plan_follows_the_mixture():
    steps, per_step = 40, 500
    dom, _ = drift_plan([1000] * 3, steps, per_step, 0.5, seed=0)
    for t in (0, 25, 35, 39, 40, 44, 60, 79, 100, 119):
        got = torch.bincount(dom[t * per_step:(t + 1) * per_step], minlength=3).double() / per_step
        want = torch.tensor(mixing_weights(t, 3, steps, 0.5), dtype=torch.float64)
        assert (got - want).abs().max() < 0.08, (t, got, want)


# --- runs -----------------------------------------------------------------------------------------

@pytest.mark.parametrize("method", ["gain_ffn", "lora", "full_ft"])
def test_drift_run_writes_the_matrix_shape_of_a_staged_run(method, runs):
    staged, drift = _matrix(runs(method, "stages")), _matrix(runs(method, "drift"))
    assert drift["rows"] == staged["rows"] == ["base", "stage_1:dna", "stage_2:code", "stage_3:chess"]
    assert drift["domains"] == staged["domains"] == ["dna", "code", "chess"]
    assert [len(r) for r in drift["values"]] == [len(r) for r in staged["values"]] == [3] * 4
    assert all(math.isfinite(v) and v > 1 for r in drift["values"] for v in r)
    assert drift["values"][0] == staged["values"][0]  # the same base model
    assert drift["values"][1:] != staged["values"][1:]  # another run: nothing merged or reset between segments
    rd = runs(method, "drift")
    assert (rd / "ppl_matrix.csv").is_file() and (rd / "report" / "report.md").is_file()
    info = json.loads((rd / "run_info.json").read_text())
    assert info["status"] == "complete" and info["domain_schedule"] == "drift"
    assert not (rd / "drift").exists() and not list(rd.rglob("ckpt-*"))  # the run's checkpoint is gone when done
    for k in (1, 2, 3):
        m = _metrics(rd, k)
        assert m["drift"]["global_steps"] == [(k - 1) * S, k * S]
        assert sum(m["drift"]["examples"].values()) == S * 8  # batch_size 8
        assert (rd / "stages" / f"stage_{k}" / "method_state.safetensors").is_file()


def test_drift_is_one_continuous_run_with_one_schedule(runs):
    staged, drift = _log(runs("gain_ffn", "stages")), _log(runs("gain_ffn", "drift"))
    assert [r["global_step"] for r in drift] == [5, 6, 11, 12, 17, 18]  # log_every=5 and each segment's last step
    lrs = [r["lr"] for r in drift]
    assert all(a > b for a, b in zip(lrs, lrs[1:]))  # one warm-up, one cosine over the 18 steps
    lr = {(r["stage"], r["step"]): r["lr"] for r in staged}
    assert lr[(1, 6)] == lr[(2, 6)] == lr[(3, 6)]  # staged: every stage restarts its schedule
    assert drift[1]["mix"] == {"dna": round(2 / 3, 4), "code": round(1 / 3, 4)}  # step 6 of 18: the first window
    assert drift[-1]["mix"] == {"chess": 1.0}
    # overlap 0 reads exactly the staged batches: the first loss (before any update) is the staged run's; the next
    # segments start from the model the run went on with, not from a merged model with a fresh optimiser
    zero = runs("gain_ffn", "drift", "train.drift_overlap=0")
    st, dz = runs("gain_ffn", "stages"), zero
    assert _metrics(dz, 1)["train"]["losses"][0] == _metrics(st, 1)["train"]["losses"][0]
    assert _metrics(dz, 1)["drift"]["examples"] == {"dna": S * 8}
    assert _metrics(dz, 2)["train"]["losses"] != _metrics(st, 2)["train"]["losses"]
    assert _matrix(dz)["values"][1:] != _matrix(st)["values"][1:]


def test_a_drift_row_is_rebuilt_from_its_one_saved_state(runs):
    """``gain eval --run`` / ``gain merge``: row k's model is the pretrained one with segment k's state alone."""
    from gain_cli.data.domains import DomainData, ensure_domains
    from gain_cli.evaluation.perplexity import evaluate_blocks
    from gain_cli.methods import build_method
    from gain_cli.models.loading import load_model, model_spec
    from gain_cli.rundir import RunDir, saved_stages_to_apply

    rd = runs("lora", "drift")
    cfg = OmegaConf.load(rd / "config.yaml")
    model, tok = load_model(cfg.model, cfg.cache_dir)
    method = build_method(OmegaConf.to_container(cfg.method), model_spec(cfg.model, model.config.model_type))
    assert saved_stages_to_apply(method, 2) == [1, 2] and saved_stages_to_apply(method, 2, cumulative=True) == [2]
    model = method.merge(RunDir(rd).apply_saved_stages(model, method, 2)).eval()
    data = DomainData(ensure_domains(cfg.domains, cfg.cache_dir), tok, cfg.cache_dir)
    row = _matrix(rd)["values"][2]
    for d, want in zip(["dna", "code", "chess"], row):
        got = evaluate_blocks(model, data.blocks(d, "validation", int(cfg.eval.block_size), 4), 16).ppl
        assert math.isclose(got, want, rel_tol=1e-5), (d, got, want)


# --- refusals -------------------------------------------------------------------------------------

def _one_line_error(res, needle):
    assert res.exit_code == 2, res.output
    assert "Traceback" not in res.output
    errors = [ln for ln in res.output.splitlines() if ln.startswith("error:")]
    assert len(errors) == 1 and needle in " ".join(res.output.split()), res.output


@pytest.mark.parametrize("method", ["ewc", "ewc_lora", "lora_replay", "l2"])
def test_methods_that_need_boundaries_are_refused(method, tmp_path):
    rd = tmp_path / "run"
    res = runner.invoke(app, ["run", *BASE, *DRIFT, f"method={method}", f"run_dir={rd}"])
    _one_line_error(res, f"train.domain_schedule=drift cannot run method '{method}': it needs stage boundaries")
    assert "gain_ffn" in res.output and "lora" in res.output  # the methods that do run
    assert not rd.exists()


def test_sharded_drift_and_bad_values_are_refused(tmp_path):
    rd = tmp_path / "run"
    res = runner.invoke(app, ["run", *BASE, *DRIFT, "train.sharding=fsdp", f"run_dir={rd}"])
    _one_line_error(res, "train.domain_schedule=drift trains unsharded")
    res = runner.invoke(app, ["run", *BASE, "train.domain_schedule=smooth", f"run_dir={rd}"])
    _one_line_error(res, "unknown train.domain_schedule 'smooth' (valid: drift, stages)")
    res = runner.invoke(app, ["run", *BASE, *DRIFT, "train.drift_overlap=1.5", f"run_dir={rd}"])
    _one_line_error(res, "train.drift_overlap must be a fraction of a segment in [0, 1]")
    assert not rd.exists()


# --- config hash and resume -------------------------------------------------------------------------

def test_the_default_schedule_keeps_the_hash_of_configs_without_the_key():
    from gain_cli.config import compose_config, config_differences, config_hash

    cfg = compose_config(BASE, None)
    assert cfg.train.domain_schedule == "stages"
    old = OmegaConf.create(OmegaConf.to_container(cfg))
    del old.train["domain_schedule"], old.train["drift_overlap"]  # a config saved before the keys existed
    assert config_hash(old) == config_hash(cfg) and config_differences(old, cfg) == []
    assert config_hash(compose_config([*BASE, "train.drift_overlap=0.25"], None)) == config_hash(cfg)  # unused
    drift = compose_config([*BASE, *DRIFT], None)
    assert config_hash(drift) != config_hash(cfg)
    assert config_differences(old, drift) == ["train.domain_schedule: (unset) → drift",
                                              "train.drift_overlap: (unset) → 0.5"]
    assert config_hash(compose_config([*BASE, *DRIFT, "train.drift_overlap=0.25"], None)) != config_hash(drift)


def test_a_run_saved_without_the_key_resumes_with_the_default(runs, tmp_path):
    ref = runs("gain_ffn", "stages")
    rd = tmp_path / "old"
    shutil.copytree(ref, rd)
    shutil.rmtree(rd / "stages" / "stage_3")
    cfg = OmegaConf.load(rd / "config.yaml")
    del cfg.train["domain_schedule"], cfg.train["drift_overlap"]
    (rd / "config.yaml").write_text(OmegaConf.to_yaml(cfg))
    res = runner.invoke(app, ["run", *BASE, "method=gain_ffn", f"run_dir={rd}", "resume=true"])
    assert res.exit_code == 0, res.output
    assert _matrix(rd)["values"] == _matrix(ref)["values"]


def _gain(args, env_extra=None, timeout=300):
    env = {**os.environ, **(env_extra or {})}
    return subprocess.run([sys.executable, "-m", "gain_cli", *args], capture_output=True, text=True, env=env,
                          timeout=timeout)


@pytest.mark.parametrize("point", [
    "stage2.step3",        # mid-segment 2, after the checkpoint at global step 8
    pytest.param("eval.stage_2.code", marks=pytest.mark.slow),  # segment 2 saved, its evaluation not finished (make test-slow)
])
def test_drift_killed_then_resumed_gives_identical_matrix(point, runs, tmp_path):
    ref = runs("gain_ffn", "drift")
    rd, args = tmp_path / "run", ["run", *BASE, *DRIFT, "method=gain_ffn"]
    res = _gain([*args, f"run_dir={rd}"], {"GAIN_FAULT_KILL_AT": point})
    assert res.returncode == -signal.SIGKILL, (res.returncode, res.stderr[-2000:])
    pointer = json.loads((rd / "drift" / "checkpoint.json").read_text())
    trainer = torch.load(rd / "drift" / pointer["folder"] / "trainer.pt", weights_only=True)
    want = 8 if point == "stage2.step3" else 2 * S
    assert pointer["step"] == want  # one checkpoint for the whole run, at global steps
    # one optimiser for the whole run: AdamW has counted every step since the start, not the segment's
    assert {float(s["step"]) for s in trainer["optimizer"]["state"].values()} == {float(want)}
    res = _gain([*args, f"run_dir={rd}", "resume=true"])
    assert res.returncode == 0, res.stderr[-2000:]
    assert _matrix(rd)["values"] == _matrix(ref)["values"]
    for k in (1, 2, 3):
        assert _metrics(rd, k)["train"]["losses"] == _metrics(ref, k)["train"]["losses"]
    steps = [r["global_step"] for r in _log(rd)]
    assert steps == [r["global_step"] for r in _log(ref)]  # logged once each: nothing trained twice
    assert not (rd / "drift").exists()
