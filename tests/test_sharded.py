"""Sharded training (FSDP2, train.sharding=fsdp; DeepSpeed ZeRO-3, train.sharding=zero3) under two CPU processes
equals one process.

The tests marked ``multiproc`` start two gloo processes with a short process-group timeout
(GAIN_DIST_TIMEOUT_S), so a collective that one process never joins fails the test in seconds instead of
hanging CI. Evaluation uses 7 blocks per domain in batches of 3: the shards are 4 + 3 blocks, i.e. 2 forwards
on one process and 1 on the other without the dummy-batch padding (which would hang a sharded model).
The one-process references use twice the per-process batch (the same global batch).
The ZeRO-3 tests (marked ``deepspeed`` too) need the optional extra (`make setup-deepspeed`) and are skipped without
it; `make test-deepspeed` installs it and runs them.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
from typer.testing import CliRunner

from gain_cli.cli import app
from gain_cli.config import compose_config
from gain_cli.errors import GainError

runner = CliRunner()
PER_PROCESS_BATCH = 4
COMMON = ["recipe=tiny_8domains", "domains.sequence=[dna,code]", "train.steps=6", "train.checkpoint_every=3",
          "eval.max_blocks=7", "eval.batch_size=3"]
NO_HARNESS = "eval.harness.enabled=false"
HARNESS = "eval.harness.limit=12"  # BoolQ on 12 of the packaged items, after every stage
LAUNCH_ENV_KEYS = ("WORLD_SIZE", "RANK", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT",
                   "GAIN_LAUNCHED", "ACCELERATE_USE_CPU", "ACCELERATE_USE_FSDP", "ACCELERATE_USE_DEEPSPEED")
# GAIN with its L2 pull toward 1 (summed over the local shards of the gains when sharded)
EXTRA = {"gain_ffn": [HARNESS, "method.l2=1.0"], "lora": [NO_HARNESS], "full_ft": [NO_HARNESS]}
ZERO3_EXTRA = {"gain_ffn": [HARNESS], "lora": [NO_HARNESS], "full_ft": [NO_HARNESS]}  # ZeRO-3 refuses a penalty
ACCELERATE_CONFIG = {"fsdp": "fsdp", "zero3": "deepspeed_zero3"}


def _env(**extra) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in LAUNCH_ENV_KEYS}
    env.update({"OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
                "GAIN_DIST_TIMEOUT_S": "60"}, **extra)
    return env


def _matrix(rd: Path, name: str = "ppl_matrix") -> dict:
    return json.loads((rd / f"{name}.json").read_text())


def _state(rd: Path, k: int) -> dict:
    from safetensors.torch import load_file

    return load_file(str(rd / "stages" / f"stage_{k}" / "method_state.safetensors"))


def _single(method: str, rd: Path, extra: dict = EXTRA) -> Path:
    res = runner.invoke(app, ["run", *COMMON, *extra[method], f"method={method}",
                              f"train.batch_size={2 * PER_PROCESS_BATCH}", f"run_dir={rd}"])
    assert res.exit_code == 0, res.output
    return rd


def _args(method: str, rd: Path, extra: dict = EXTRA) -> list[str]:
    return [*COMMON, *extra[method], f"method={method}", f"train.batch_size={PER_PROCESS_BATCH}", f"run_dir={rd}"]


def _torchrun(args: list[str], sharding: str = "fsdp", **env_extra: str) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "-m", "gain_cli", "run", *args, f"train.sharding={sharding}"]
    return subprocess.run(cmd, env=_env(ACCELERATE_USE_CPU="1", **env_extra), capture_output=True, text=True,
                          timeout=900)


def _sharded(method: str, rd: Path, how: str, sharding: str = "fsdp", extra: dict = EXTRA) -> tuple[Path, str]:
    if how == "launcher":  # `gain run ... launcher=accelerate_cpu2 launcher.accelerate_config=fsdp`, the CLI wiring
        out = subprocess.run([sys.executable, "-m", "gain_cli", "run", *_args(method, rd, extra),
                              "launcher=accelerate_cpu2", f"launcher.accelerate_config={ACCELERATE_CONFIG[sharding]}"],
                             env=_env(), capture_output=True, text=True, timeout=900)
    else:
        out = _torchrun(_args(method, rd, extra), sharding)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    return rd, out.stdout


@dataclass
class Pairs:
    sharding: str
    extra: dict
    runs: dict  # method -> (one-process run, sharded two-process run, its stdout)


SAYS = {"fsdp": "sharded training: FSDP2", "zero3": "sharded training: DeepSpeed ZeRO-3"}


@pytest.fixture(scope="module", params=["fsdp", pytest.param("zero3", marks=pytest.mark.deepspeed)])
def pairs(request, tmp_path_factory):
    """The same tests for both sharded paths: FSDP2 and (with the optional extra installed) DeepSpeed ZeRO-3."""
    sharding = request.param
    if sharding == "zero3":
        pytest.importorskip("deepspeed", reason="DeepSpeed is an optional extra: make setup-deepspeed")
    extra = ZERO3_EXTRA if sharding == "zero3" else EXTRA
    root = tmp_path_factory.mktemp(f"shard_{sharding}")
    how = {"gain_ffn": "launcher", "lora": "torchrun", "full_ft": "torchrun"}
    runs = {}
    for m in how:
        one = _single(m, root / f"single_{m}", extra)
        two, stdout = _sharded(m, root / f"{sharding}_{m}", how[m], sharding, extra)
        runs[m] = (one, two, stdout)
    return Pairs(sharding, extra, runs)


@pytest.mark.multiproc
@pytest.mark.parametrize("method", ["gain_ffn", "lora", "full_ft"])
def test_sharded_run_gives_the_one_process_matrix_and_states(pairs, method):
    import torch

    one, two, _ = pairs.runs[method]
    m1, m2 = _matrix(one), _matrix(two)
    assert m1["rows"] == m2["rows"] and len(m1["rows"]) == 3
    for r1, r2 in zip(m1["values"], m2["values"]):
        for a, b in zip(r1, r2):
            assert abs(a - b) <= 1e-4 * abs(a), (method, m1["values"], m2["values"])
    for k in (1, 2):
        s1, s2 = _state(one, k), _state(two, k)
        assert set(s1) == set(s2) and s1
        for name in s1:
            assert torch.allclose(s1[name], s2[name], atol=1e-5, rtol=0), (method, k, name,
                                                                         (s1[name] - s2[name]).abs().max().item())
        t1 = json.loads((one / "stages" / f"stage_{k}" / "metrics.json").read_text())["train"]
        t2 = json.loads((two / "stages" / f"stage_{k}" / "metrics.json").read_text())["train"]
        assert t1["tokens"] == t2["tokens"] and t1["losses"] == pytest.approx(t2["losses"], rel=1e-5, abs=1e-6)
    # every block scored once, in block order, on every process (7 blocks, split 4 + 3)
    b1 = json.loads((one / "base" / "metrics.json").read_text())
    b2 = json.loads((two / "base" / "metrics.json").read_text())
    assert b1["eval_tokens"] == b2["eval_tokens"] == {"dna": 7 * 63, "code": 7 * 63}
    assert b1["block_nll"]["dna"] == pytest.approx(b2["block_nll"]["dna"], rel=1e-5)


@pytest.mark.multiproc
def test_sharded_boolq_row_equals_one_process(pairs):
    one, two, _ = pairs.runs["gain_ffn"]
    h1, h2 = _matrix(one, "harness_matrix"), _matrix(two, "harness_matrix")
    assert len(h2["rows"]) == 3 and "boolq" in json.dumps(h2)
    assert all(0.0 <= v <= 1.0 for row in h2["values"] for v in row)  # accuracies, no NaN (a missing row)
    assert h1 == h2


@pytest.mark.multiproc
def test_sharded_run_says_so_and_records_sharding_and_memory(pairs):
    from omegaconf import OmegaConf

    from gain_cli.memory import memory_estimate

    _, two, stdout = pairs.runs["gain_ffn"]
    assert f"{SAYS[pairs.sharding]} over 2 processes" in stdout, stdout[-2000:]
    assert "launching 2 process(es)" in stdout
    for method, (one, two, _) in pairs.runs.items():
        info = json.loads((two / "run_info.json").read_text())
        assert info["num_processes"] == 2 and info["sharding"] == pairs.sharding and info["status"] == "complete", method
        assert json.loads((one / "run_info.json").read_text())["sharding"] == "none"
        assert not list(two.glob("stages/*/ckpt-*")) and not (two / ".lock").exists()
        # `gain info memory`'s sharded weights term against the parameter bytes measured on the largest process
        cfg = OmegaConf.load(two / "config.yaml")
        est = memory_estimate(*(OmegaConf.to_container(cfg[k], resolve=True) for k in ("model", "method", "train")),
                              num_processes=2, sharding=pairs.sharding)
        per_process = est["weights_bytes"] / 2
        assert abs(info["param_bytes_per_process"] - per_process) <= 0.10 * per_process, (method, info, per_process)


@pytest.mark.multiproc
def test_gain_merge_of_a_sharded_run_equals_the_unsharded_merge(pairs, tmp_path):
    import torch
    from safetensors.torch import load_file

    for method in ("gain_ffn", "lora"):
        one, two, _ = pairs.runs[method]
        outs = []
        for rd, name in ((one, "one"), (two, "two")):
            res = runner.invoke(app, ["merge", str(rd), "--out", str(tmp_path / f"{method}_{name}")])
            assert res.exit_code == 0, res.output
            outs.append(load_file(str(tmp_path / f"{method}_{name}" / "model.safetensors")))
        w1, w2 = outs
        assert set(w1) == set(w2)
        for k in w1:
            assert torch.allclose(w1[k], w2[k], atol=1e-5, rtol=0), (method, k)


@pytest.mark.multiproc
def test_sharded_run_killed_mid_stage_resumes_bit_for_bit(pairs, tmp_path):
    """Both ranks SIGKILLed in stage 2 after its step-3 checkpoint (method state gathered, optimiser state sharded
    with torch.distributed.checkpoint); the resumed sharded run ends where the uninterrupted one ended."""
    import torch

    rd = tmp_path / "killed"
    args = _args("full_ft", rd, pairs.extra)
    out = _torchrun(args, pairs.sharding, GAIN_FAULT_KILL_AT="stage2.step5")
    assert out.returncode != 0 and (rd / "stages" / "stage_2" / "ckpt-3" / "optimizer").is_dir(), out.stderr[-3000:]
    assert not (rd / "stages" / "stage_2" / "method_state.safetensors").exists()
    out = _torchrun([*args, "resume=true"], pairs.sharding)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    assert "resuming" in out.stdout
    whole = pairs.runs["full_ft"][1]
    assert _matrix(rd) == _matrix(whole)
    s1, s2 = _state(rd, 2), _state(whole, 2)
    assert set(s1) == set(s2) and all(torch.equal(s1[n], s2[n]) for n in s1)
    m1 = json.loads((rd / "stages" / "stage_2" / "metrics.json").read_text())["train"]
    m2 = json.loads((whole / "stages" / "stage_2" / "metrics.json").read_text())["train"]
    assert m1["losses"] == m2["losses"] and len(m1["losses"]) == 6


# --- one process ------------------------------------------------------------------------------------------

def test_fresh_lora_values_are_peft_s_own_initialisation():
    """A sharded stage reopens the LoRA adapter with the values get_peft_model would draw (same seed, same order)."""
    import torch
    from peft import get_peft_model

    from gain_cli.methods import build_method
    from gain_cli.methods.lora import _peft_layers, fresh_lora_values
    from gain_cli.models.loading import load_model, model_spec

    cfg = compose_config(["method=lora"], "tiny_8domains")
    model, _ = load_model(cfg.model, cfg.cache_dir)
    method = build_method(dict(cfg.method), model_spec(cfg.model, model.config.model_type))
    torch.manual_seed(5)
    peft = get_peft_model(model, method.peft_config())
    expected = [(m.lora_A["default"].weight.detach().clone(), m.lora_B["default"].weight.detach().clone())
                for m in _peft_layers(peft)]
    torch.manual_seed(5)
    got = [fresh_lora_values(m) for m in _peft_layers(peft)]
    assert len(got) == len(expected) > 0
    for (a1, b1), (a2, b2) in zip(expected, got):
        assert torch.equal(a1, a2) and torch.equal(b1, b2)


@pytest.mark.parametrize("method,needle", [
    ("imsm", "runs two copies of the model"),
    ("l2", "penalty reads whole weights"),
    ("ewc", "Fisher estimate needs per-weight gradients"),
])
def test_methods_that_cannot_be_sharded_are_refused_with_one_line(method, needle):
    from gain_cli.methods import build_method
    from gain_cli.models.loading import model_spec

    cfg = compose_config([f"method={method}", "method.lambda=0.1"] if method != "imsm" else [f"method={method}"],
                         "tiny_8domains")
    m = build_method(dict(cfg.method), model_spec(cfg.model, "llama"))
    with pytest.raises(GainError, match=needle) as exc:
        m.check_shardable()
    assert "train.sharding=none" in str(exc.value) and "\n" not in str(exc.value)
    for shardable in ("gain_ffn", "gain_attn", "lora", "ia3", "full_ft", "lora_replay"):
        c = compose_config([f"method={shardable}"], "tiny_8domains")
        build_method(dict(c.method), model_spec(c.model, "llama")).check_shardable()


def test_sharding_switch_and_its_sources(monkeypatch):
    from gain_cli.methods import build_method
    from gain_cli.models.loading import model_spec
    from gain_cli.training.sharding import requested_sharding, sharding_mode

    for k in ("ACCELERATE_USE_FSDP", "ACCELERATE_USE_DEEPSPEED"):
        monkeypatch.delenv(k, raising=False)
    assert requested_sharding(compose_config([], "tiny_8domains")) == "none"
    assert requested_sharding(compose_config(["train.sharding=fsdp"], "tiny_8domains")) == "fsdp"
    assert requested_sharding(compose_config(["launcher=gpu8", "launcher.accelerate_config=fsdp"], "tiny_8domains")) == "fsdp"
    with pytest.raises(GainError, match="valid: auto, fsdp, none, zero3"):
        requested_sharding(compose_config(["train.sharding=fsdq"], "tiny_8domains"))
    for zero3 in (["train.sharding=zero3"], ["launcher=gpu8", "launcher.accelerate_config=deepspeed_zero3"]):
        assert requested_sharding(compose_config(zero3, "tiny_8domains")) == "zero3"
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")  # a hand launch with Accelerate's FSDP config
    assert requested_sharding(compose_config([], "tiny_8domains")) == "fsdp"
    monkeypatch.delenv("ACCELERATE_USE_FSDP")
    monkeypatch.setenv("ACCELERATE_USE_DEEPSPEED", "true")  # ... and with its DeepSpeed config
    monkeypatch.setenv("ACCELERATE_DEEPSPEED_ZERO_STAGE", "3")
    assert requested_sharding(compose_config([], "tiny_8domains")) == "zero3"
    monkeypatch.setenv("ACCELERATE_DEEPSPEED_ZERO_STAGE", "2")
    with pytest.raises(GainError, match="ZeRO stage 2 is not supported"):
        requested_sharding(compose_config([], "tiny_8domains"))
    monkeypatch.delenv("ACCELERATE_USE_DEEPSPEED")
    monkeypatch.delenv("ACCELERATE_DEEPSPEED_ZERO_STAGE")
    auto = compose_config(["train.sharding=auto", "method=full_ft"], "tiny_8domains")
    full = build_method(dict(auto.method), model_spec(auto.model, "llama"))
    gain = build_method(dict(compose_config(["method=gain_ffn"], "tiny_8domains").method), model_spec(auto.model, "llama"))
    assert sharding_mode(auto, 2, full) == "fsdp" and sharding_mode(auto, 2, gain) == "none"
    assert sharding_mode(auto, 1, full) == "none"  # one process: nothing to shard


def test_gpu_recipes_shard_by_default():
    from gain_cli.memory import estimate_for_config

    big = estimate_for_config(compose_config([], "llama-3.1-70b_8domains"))
    assert big["sharding"] == "fsdp" and big["num_processes"] == 16
    qwen = estimate_for_config(compose_config(["method=full_ft", "launcher=gpu8"], "qwen2.5_8domains"))
    assert qwen["sharding"] == "fsdp"
    assert estimate_for_config(compose_config(["launcher=gpu8"], "qwen2.5_8domains"))["sharding"] == "none"


def test_zero3_refusals_come_before_deepspeed_is_needed(monkeypatch):
    """Without the extra, train.sharding=zero3 says how to install it; a penalty outside the forward or
    train.compile is refused in one line before anything is partitioned."""
    from gain_cli.methods import build_method
    from gain_cli.models.loading import model_spec
    from gain_cli.training import zero3

    monkeypatch.setitem(sys.modules, "deepspeed", None)  # as if not installed
    with pytest.raises(GainError, match="make setup-deepspeed"):
        zero3.import_deepspeed("cpu")
    cfg = compose_config(["method=gain_ffn", "method.l2=1.0"], "tiny_8domains")
    gain = build_method(dict(cfg.method), model_spec(cfg.model, "llama"))
    with pytest.raises(GainError, match="cannot train with train.sharding=zero3: its penalty"):
        zero3.make_engine(None, gain, cfg.train, "cpu", 2)
    plain = build_method(dict(compose_config(["method=gain_ffn"], "tiny_8domains").method), model_spec(cfg.model, "llama"))
    with pytest.raises(GainError, match="train.compile is not supported with train.sharding=zero3"):
        zero3.make_engine(None, plain, {**dict(cfg.train), "compile": True}, "cpu", 2)


def test_zero3_partition_of_a_broadcast_factor_is_exact():
    """The slice of a process's partition of ``factor`` broadcast to a weight's shape (GAIN's s[None, :], (IA)³'s
    rows or columns), computed without building the whole broadcast."""
    import torch

    from gain_cli.training.zero3 import broadcast_part

    torch.manual_seed(0)
    for shape, factor in [((4, 6), torch.randn(1, 6)), ((4, 6), torch.randn(4, 1)), ((4, 6), torch.randn(6)),
                          ((4, 6), torch.randn(4, 6)), ((3, 4, 5), torch.randn(4, 1))]:
        whole = factor.expand(shape).reshape(-1)
        for start, end in ((0, 12), (5, 17), (12, 24)):
            end = min(end, whole.numel())
            assert torch.equal(broadcast_part(factor, shape, start, end), whole[start:end]), (shape, start)
