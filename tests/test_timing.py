"""timing.json: where a run's time went (train, perplexity, lm-eval, other) with the tokens and model FLOPs of each
phase, and `gain bench --runs`: the shares and the end-to-end MFU against the matmul peak measured here."""

import json

import pytest
from typer.testing import CliRunner

from gain_cli.cli import app
from gain_cli.reporting.timing import PHASES, read_timing, time_shares

runner = CliRunner()
STEPS, BATCH, SEQ, BLOCKS, BLOCK = 3, 4, 32, 2, 64


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    rd = tmp_path_factory.mktemp("timing") / "r"
    res = runner.invoke(app, ["run", "recipe=tiny_8domains", "domains.sequence=[legal,code]",
                              f"train.steps={STEPS}", f"train.batch_size={BATCH}", f"train.seq_len={SEQ}",
                              f"eval.max_blocks={BLOCKS}", "eval.harness.limit=4", f"run_dir={rd}"])
    assert res.exit_code == 0, res.output
    return rd


def test_each_phase_has_its_seconds_tokens_and_flops(run):
    from gain_cli.config import compose_config
    from gain_cli.methods import build_method
    from gain_cli.models.flops import flops_per_token
    from gain_cli.models.loading import load_model, model_spec

    (s,) = read_timing(run)["sessions"]
    ph = s["phases"]
    assert s["status"] == "complete" and s["wall_seconds"] > 0
    assert s["other_seconds"] == pytest.approx(s["wall_seconds"] - sum(ph[p]["seconds"] for p in PHASES), abs=5e-3)  # each rounded to 1 ms
    # two stages of STEPS steps × BATCH × SEQ tokens (from the logged rate: to its 0.1 tok/s rounding)
    assert ph["train"]["tokens"] == pytest.approx(2 * STEPS * BATCH * SEQ, rel=0.01)
    # the FLOPs of a training token: the model with GAIN-FFN attached (frozen matmul weights: no weight-grads)
    cfg = compose_config(["domains.sequence=[legal,code]"], "tiny_8domains")
    model, _ = load_model(cfg.model, cfg.cache_dir)
    plain = flops_per_token(model, BLOCK, training=False)["total"]
    attached = build_method(cfg.method, model_spec(cfg.model, model.config.model_type)).attach(model)
    fpt = flops_per_token(attached, SEQ, training=True)
    assert fpt["backward_weights"] == 0.0
    assert ph["train"]["flops"] == pytest.approx(ph["train"]["tokens"] * fpt["total"], rel=1e-9)
    # perplexity: 3 rows (base + 2 stages) × 2 domains × BLOCKS blocks × BLOCK positions, forward FLOPs each
    assert ph["perplexity"]["tokens"] == 3 * 2 * BLOCKS * BLOCK
    assert ph["perplexity"]["flops"] == pytest.approx(ph["perplexity"]["tokens"] * plain, rel=1e-9)
    # lm-eval: the forwards BoolQ made (4 items per row, prompts of varying length, padding included)
    assert ph["lm-eval"]["tokens"] > 0 and ph["lm-eval"]["flops"] > 0 and ph["lm-eval"]["seconds"] > 0
    assert s["model"] == "tiny-llama" and s["step_tokens"] == BATCH * SEQ
    assert "train.compile: eager (auto:" in s["compile"]["train"]


def test_a_resumed_run_adds_a_session(run, tmp_path):
    import shutil

    rd = tmp_path / "r"
    shutil.copytree(run, rd)
    res = runner.invoke(app, ["run", "recipe=tiny_8domains", "domains.sequence=[legal,code]",
                              f"train.steps={STEPS}", f"train.batch_size={BATCH}", f"train.seq_len={SEQ}",
                              f"eval.max_blocks={BLOCKS}", "eval.harness.limit=4", f"run_dir={rd}", "resume=true"])
    assert res.exit_code == 0, res.output
    first, second = read_timing(rd)["sessions"]
    assert first == read_timing(run)["sessions"][0]
    assert all(second["phases"][p]["tokens"] == 0 for p in PHASES)  # nothing left to do: all of it is "other"
    shares = time_shares([read_timing(rd)])
    assert shares["sessions"] == 2 and shares["wall_seconds"] == pytest.approx(
        first["wall_seconds"] + second["wall_seconds"], abs=0.1)


def test_time_shares_sum_runs_and_give_the_mfu():
    t = {"sessions": [{"wall_seconds": 100.0, "other_seconds": 10.0,
                       "phases": {"train": {"seconds": 60.0, "tokens": 600, "flops": 6e12},
                                  "perplexity": {"seconds": 20.0, "tokens": 400, "flops": 1e12},
                                  "lm-eval": {"seconds": 10.0, "tokens": 100, "flops": 1e12}}}]}
    r = time_shares([t, t], peak_flops=1e11)
    assert r["wall_seconds"] == 200.0 and r["share"] == {"train": 0.6, "perplexity": 0.2, "lm-eval": 0.1, "other": 0.1}
    assert r["total_flops"] == 16e12 and r["mfu"] == pytest.approx(16e12 / (1e11 * 200.0))
    assert r["phase_mfu"]["train"] == pytest.approx(12e12 / (1e11 * 120.0))


def test_bench_runs_reports_the_shares_against_the_peak_measured_here(run, tmp_path):
    res = runner.invoke(app, ["bench", "--runs", str(run), "--out", str(tmp_path / "b")])
    assert res.exit_code == 0, res.output
    r = json.loads((tmp_path / "b" / "end_to_end.json").read_text())
    assert sum(r["share"].values()) == pytest.approx(1.0, abs=1e-3)
    assert r["mfu"] == pytest.approx(r["total_flops"] / (r["peak_flops_per_s"] * r["wall_seconds"]), rel=1e-3)
    out = " ".join(res.output.split())  # the console wraps long lines
    assert "| train |" in out and "end-to-end MFU" in out


def test_bench_runs_without_timing_is_one_line(tmp_path):
    (tmp_path / "old").mkdir()
    res = runner.invoke(app, ["bench", "--runs", str(tmp_path / "old"), "--out", str(tmp_path / "b")])
    assert res.exit_code == 2 and "no timing.json" in res.output and "Traceback" not in res.output
