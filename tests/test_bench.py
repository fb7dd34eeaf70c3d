"""`gain bench` at the tiny size: structure, finite numbers, and the correctness checks behind the comparisons.

Times are never asserted (the machine is shared); what is asserted is what makes the comparisons fair: our loop and
the HF Trainer reach the same losses on the same steps, our perplexity sweep and lm-eval's rolling log-likelihood give
the same NLL on the same windows, score_yes_no picks what lm-eval picks, and merged GAIN gives the wrapped model's logits.
"""

import json
import math

import pytest

# Our loop and the Trainer run the same fp32 maths on the same batches; the only differences are summation order
# (mean vs sum / num_items loss) and our losses being stored to 6 decimals: agreement to 1e-5 relative is expected.
LOSS_RTOL = 1e-5


@pytest.fixture(scope="module")
def bench(tmp_path_factory):
    from gain_cli.bench import bench_settings, run_bench

    out = tmp_path_factory.mktemp("bench")
    import os

    from gain_cli.models.compiling import compile_unavailable

    env_before = dict(os.environ)
    can_compile = compile_unavailable("cpu") is None
    s = bench_settings("tiny", train_steps=4, warmup_steps=1, eval_windows=8, boolq_items=12, infer_repeats=2,
                       probe_repeats=1, threads=1, train_compile_methods=("gain_ffn",) if can_compile else (),
                       eval_compile=can_compile)
    result = run_bench("tiny", out, repeats=1, settings=s, log=lambda msg: None)
    # nothing the benchmark ran (the Trainer with torch_compile=True exports ACCELERATE_DYNAMO_BACKEND) may change
    # how later runs of this process and its subprocesses train
    assert {k: v for k, v in os.environ.items() if k.startswith("ACCELERATE")} == \
        {k: v for k, v in env_before.items() if k.startswith("ACCELERATE")}
    return out, result


def _numbers(obj, path=""):
    if isinstance(obj, bool) or obj is None or isinstance(obj, str):
        return
    if isinstance(obj, (int, float)):
        yield path, obj
    elif isinstance(obj, dict):
        for k, v in obj.items():
            yield from _numbers(v, f"{path}.{k}")
    elif isinstance(obj, (list, tuple)):
        for i, v in enumerate(obj):
            yield from _numbers(v, f"{path}[{i}]")


def test_bench_json_has_every_section_with_finite_numbers(bench):
    out, result = bench
    data = json.loads((out / "bench.json").read_text())
    for key in ("settings", "machine", "model", "probe", "training", "perplexity", "boolq", "inference", "targets_met"):
        assert key in data, key
    assert set(data["training"]["methods"]) == {"gain_ffn", "lora", "full_ft"}
    for m, row in data["training"]["methods"].items():
        for k in ("ours_tokens_per_s", "trainer_tokens_per_s", "ratio", "ours_mfu", "trainer_mfu", "flops_per_token"):
            assert k in row, (m, k)
        assert row["ours_tokens_per_s"] > 0 and row["trainer_tokens_per_s"] > 0
    assert "fp32" in data["perplexity"] and data["perplexity"]["fp32"]["ratio"] > 0
    bad = [(p, v) for p, v in _numbers(data) if not math.isfinite(v)]
    assert not bad, bad


def test_flop_counts_show_the_frozen_weight_saving(bench):
    _, result = bench
    f = {m: r["flops_per_token"] for m, r in result["training"]["methods"].items()}
    # full FT computes weight-grads for every matmul weight; GAIN for none (its gains are not matmul weights)
    assert f["full_ft"]["backward_weights"] == 2 * f["full_ft"]["matmul_params"]
    assert f["gain_ffn"]["backward_weights"] == 0
    assert 0 < f["lora"]["backward_weights"] < f["full_ft"]["backward_weights"]
    assert f["gain_ffn"]["total"] < f["lora"]["total"] < f["full_ft"]["total"]


def test_our_loop_and_the_trainer_reach_the_same_losses(bench):
    _, result = bench
    for m, row in result["training"]["methods"].items():
        assert row["loss_steps_compared"] == result["training"]["steps"], m
        assert row["loss_max_rel_diff"] <= LOSS_RTOL, (m, row["losses_ours"], row["losses_trainer"])
        assert row["heldout_rel_diff"] <= LOSS_RTOL, (m, row["heldout_loss_ours"], row["heldout_loss_trainer"])


def test_compiled_variants_compute_what_eager_computes(bench):
    _, result = bench
    if "training_compiled" not in result:
        pytest.skip("torch.compile cannot build CPU kernels on this machine")
    row = result["training_compiled"]["methods"]["gain_ffn"]
    eager = result["training"]["methods"]["gain_ffn"]
    # both sides compiled: the Trainer's torch_compile and our train.compile reach the same losses, which are the eager ones
    assert row["loss_max_rel_diff"] <= 1e-4, (row["losses_ours"], row["losses_trainer"])
    assert row["losses_ours"] == pytest.approx(eager["losses_ours"], rel=1e-4)
    assert row["final_loss_rel_diff_vs_eager"] <= 1e-4
    assert row["steady_ours_tokens_per_s"] > 0 and row["ours_overhead_seconds"] >= 0
    compiled = result["perplexity"]["fp32_compiled"]
    assert compiled["nll_rel_diff_vs_fp32"] <= 1e-5 and compiled["ours_compile_seconds"] >= 0


def test_perplexity_windows_match_lm_eval(bench):
    _, result = bench
    p = result["perplexity"]
    assert p["windows"] == 8 and p["predicted_tokens"] == 8 * (p["window_tokens"] - 1)
    assert p["nll_rel_diff_total"] <= 1e-5
    assert p["nll_max_abs_diff_per_window"] <= 1e-3


def test_score_yes_no_picks_what_lm_eval_picks(bench):
    _, result = bench
    b = result["boolq"]
    assert b["items"] == 12
    assert b["choices_equal"] and b["choices_differing"] == 0


def test_merged_gain_equals_wrapped_and_is_a_plain_model(bench):
    _, result = bench
    inf = result["inference"]
    assert inf["merged_is_plain_model"]
    assert inf["merged_vs_wrapped_max_abs_logit_diff"] <= 1e-5
    assert inf["merged_vs_base_max_abs_logit_diff"] > 1e-3  # the gains really changed the model


def test_unknown_size_is_a_user_error():
    from gain_cli.bench import bench_settings
    from gain_cli.errors import GainError

    with pytest.raises(GainError, match="unknown bench size"):
        bench_settings("huge")
    with pytest.raises(GainError, match="unknown bench setting"):
        bench_settings("tiny", nope=1)


def test_paired_ratio_cancels_a_first_run_cost():
    """Order alternates A,B / B,A; a side that runs first pays 20 %: the (A,B),(B,A) pairs cancel it exactly."""
    from gain_cli.bench.timing import paired_ratio

    true_a, true_b, cost = 300.0, 200.0, 0.8
    a = [true_a * (cost if r % 2 == 0 else 1.0) for r in range(4)]   # A first in repeats 0 and 2
    b = [true_b * (cost if r % 2 == 1 else 1.0) for r in range(4)]
    assert paired_ratio(a, b) == pytest.approx(1.5, rel=1e-12)
    assert paired_ratio(a[:3], b[:3]) == pytest.approx(1.5, rel=1e-12)  # the unpaired third repeat is left out
    assert paired_ratio(a[:1], b[:1]) == pytest.approx(0.8 * 1.5)       # one repeat: its own ratio
    assert paired_ratio([3.0, 1.0, 2.0, 2.0, 9.0, 1.0], [1.0] * 6) == pytest.approx(2.0)  # median of √3, 2, 3


def test_without_a_compiler_the_compiled_rows_are_skipped_not_fatal(monkeypatch):
    from gain_cli.bench import bench_settings
    from gain_cli.bench.runner import skip_uncompilable
    from gain_cli.models import compiling

    s = bench_settings("tiny", train_compile_methods=("gain_ffn",), eval_compile=True)
    monkeypatch.setattr(compiling.shutil, "which", lambda *_: None)
    logs = []
    kept, why = skip_uncompilable(s, logs.append)
    assert kept.train_compile_methods == () and kept.eval_compile is False and kept.train_steps == s.train_steps
    assert "no C++ compiler" in why and "compiled rows skipped" in logs[0]
    assert skip_uncompilable(bench_settings("tiny"), logs.append) == (bench_settings("tiny"), None)  # nothing asked


@pytest.mark.parametrize("cores, load, env, expected", [
    (2, 0.1, {}, ("ACTIVE", 2)),                       # idle: spin, every core
    (2, 3.0, {}, ("PASSIVE", 2)),                      # busy: sleep, every core (measured faster than fewer)
    (8, 2.2, {}, ("PASSIVE", 8)),
    (2, 3.0, {"OMP_WAIT_POLICY": "active"}, ("ACTIVE", 1)),   # the user's policy wins; spinning: the cores left
    (8, 2.2, {"OMP_WAIT_POLICY": "ACTIVE"}, ("ACTIVE", 6)),
    (2, 0.0, {"OMP_NUM_THREADS": "1"}, ("ACTIVE", 1)),
])
def test_thread_choice_follows_the_load(cores, load, env, expected):
    from gain_cli.threads import choose

    c = choose(cores, load, env)
    assert (c.policy, c.threads) == expected
    assert ("busy" in c.reason) == (load >= 0.5)


# --- busy machine (gain_cli/bench/busy.py): the section's structure and that its synthetic load never outlives it ---

def _gone(pid: int) -> bool:
    import os

    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    return False


def _tiny_busy_settings(**changes):
    from gain_cli.bench import bench_settings

    small = dict(busy_probe=True, busy_loops=1, busy_max_seconds=120, busy_timeout_seconds=90, busy_train_steps=2,
                 train_batch=2, train_seq=32, eval_windows=2, eval_seq=32, eval_batch=1)
    return bench_settings("tiny", **{**small, **changes})


def test_busy_machine_section_measures_three_settings_and_kills_its_load():
    from gain_cli.bench.busy import bench_busy
    from gain_cli.bench.runner import _configs, busy_rows
    from gain_cli.threads import choose

    s = _tiny_busy_settings()
    model_cfg, _, _, cache_dir = _configs(s)
    r = bench_busy(model_cfg, cache_dir, s, log=lambda msg: None)
    cores = r["cores"]
    assert r["settings"]["idle"] == r["settings"]["old"] == {"policy": "ACTIVE", "threads": cores}
    c = choose(cores, 1.0, {})
    assert r["settings"]["adaptive"] == {"policy": c.policy, "threads": c.threads} and r["adaptive_choice"] == c.line()
    for w in ("train", "perplexity"):
        v = r[w]
        for k in ("idle", "old", "adaptive"):
            rate = v[k]["tokens_per_s"]
            assert rate is not None and math.isfinite(rate) and rate > 0, (w, k, v[k])
            assert v[k]["timed"] >= 1 and not v[k]["timed_out"]
        idle = v["idle"]["tokens_per_s"]
        assert v["old_of_idle"] == pytest.approx(v["old"]["tokens_per_s"] / idle, abs=1e-3)
        assert v["adaptive_of_idle"] == pytest.approx(v["adaptive"]["tokens_per_s"] / idle, abs=1e-3)
    assert r["train"]["idle"]["timed"] == 1                                   # 2 steps, the first not timed
    assert r["perplexity"]["idle"]["timed"] == 2                              # 2 windows one at a time
    assert len(r["load_pids"]) == 1 and all(_gone(pid) for pid in r["load_pids"])
    assert len(r["loadavg"]["busy_end"]) == 3
    rows = busy_rows({"busy_machine": r})
    assert len(rows) == 2 and all(len(row) == 5 and "of idle" in row[4] for row in rows)


@pytest.mark.parametrize("error", [RuntimeError, KeyboardInterrupt])
def test_busy_machine_load_is_killed_when_a_measurement_fails(monkeypatch, error):
    from gain_cli.bench import busy

    started = []
    real_start = busy.start_load

    def start_load(n, max_seconds):
        started.extend(real_start(n, max_seconds))
        return started

    def measure(workload, spec, policy, threads, timeout):
        if started:  # under load: the load is running, then the measurement fails
            assert all(p.poll() is None for p in started)
            raise error("measurement failed")
        return {"policy": policy, "threads": threads, "tokens_per_s": 1.0}

    monkeypatch.setattr(busy, "start_load", start_load)
    monkeypatch.setattr(busy, "measure", measure)
    s = _tiny_busy_settings(busy_loops=2)
    with pytest.raises(error):
        busy.bench_busy({"name": "unused"}, "unused", s, log=lambda msg: None)
    assert len(started) == 2 and all(_gone(p.pid) for p in started)


def test_busy_load_ends_by_itself_at_its_deadline():
    """Even when nobody kills them (the bench killed with SIGKILL), the load processes end at their deadline."""
    from gain_cli.bench.busy import start_load

    procs = start_load(1, 1.0)
    assert procs[0].wait(timeout=20) == 0  # exited by itself (a kill would give -9)


def test_bad_busy_settings_are_user_errors():
    from gain_cli.bench.busy import check_busy_settings
    from gain_cli.errors import GainError

    for bad in (dict(busy_loops=0), dict(busy_max_seconds=0), dict(busy_train_steps=1)):
        with pytest.raises(GainError, match="busy_"):
            check_busy_settings(_tiny_busy_settings(**bad))


def test_a_timed_out_measurement_keeps_the_steps_it_finished(monkeypatch):
    import subprocess

    from gain_cli.bench import busy

    def run(*args, timeout, **kwargs):  # run() kills the child; on POSIX the partial stdout comes back as bytes
        raise subprocess.TimeoutExpired(args[0], timeout, output=b"TIMED 100 0.5\nTIMED 100 0.5\n")

    monkeypatch.setattr(busy.subprocess, "run", run)
    r = busy.measure("train", {}, "PASSIVE", 1, timeout=3)
    assert r["timed_out"] and r["timed"] == 2 and r["tokens_per_s"] == pytest.approx(200.0)


# --- default mode (gain_cli/bench/default_mode.py): a whole stage, ours with train.compile=auto vs the Trainer ---

def test_default_mode_decides_as_a_run_and_matches_the_trainer(tmp_path):
    from gain_cli.bench import run_section

    r = run_section("default", "tiny", tmp_path, 2, default_steps=4, default_methods=("gain_ffn",), threads=1)
    v = r["default_mode"]["methods"]["gain_ffn"]
    # a 4-step tiny stage: the saving is far below a compile's cost, so auto stays eager
    assert not v["compiled"] and v["decision"].startswith("train.compile: eager (auto: ~")
    assert len(v["ours_samples"]) == len(v["trainer_samples"]) == 2 and v["ratio"] > 0
    assert v["loss_max_rel_diff"] <= 1e-5  # the same eager maths on both sides
    assert (tmp_path / "default.json").is_file() and "default mode, 4-step stage" in (tmp_path / "default.md").read_text()


def test_default_mode_compiles_when_it_pays(tmp_path, monkeypatch):
    from gain_cli.bench import run_section
    from gain_cli.models import compiling

    if compiling.compile_unavailable("cpu") is not None:
        pytest.skip("torch.compile cannot build CPU kernels here")
    monkeypatch.setattr(compiling, "FIXED_SECONDS", {"train": 0.0, "eval": 0.0})
    monkeypatch.setattr(compiling, "PER_LAYER_SECONDS", {"train": 0.0, "eval": 0.0})
    r = run_section("default", "tiny", tmp_path, 2, default_steps=3, default_methods=("gain_ffn",), threads=1)
    v = r["default_mode"]["methods"]["gain_ffn"]
    assert v["compiled"] and "compiling saves" in v["decision"]
    assert v["loss_max_rel_diff"] <= 1e-4  # compiled ours vs the eager Trainer: the same losses to rounding
