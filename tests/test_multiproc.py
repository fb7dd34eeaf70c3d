"""Scale-out: the tiny recipe under two CPU processes equals one process; the launcher; the memory estimate.

The tests marked ``multiproc`` start two gloo processes (``make test-multiproc``); the others are
fast unit tests of the launcher command, the refusal of inconsistent launches and the memory
arithmetic, and run by default.

Equal results need the same global batch: ``train.batch_size`` is per process and one optimiser
step sees batch_size × grad_accum × num_processes sequences (loop.train_stage takes them in one
seeded order, process r taking the r-th slice of each step's batch), so the one-process reference
runs with twice the per-process batch size. Evaluation is a strided shard of the blocks per process
with the NLL sums and token counts summed across processes; 7 blocks per domain makes the shards
uneven (4 + 3).
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from gain_cli.cli import app
from gain_cli.config import compose_config
from gain_cli.errors import GainError

runner = CliRunner()
PER_PROCESS_BATCH = 4
COMMON = ["recipe=tiny_8domains", "domains.sequence=[dna,code]", "train.steps=8", "train.checkpoint_every=4",
          "eval.max_blocks=7", "eval.harness.enabled=false"]
LAUNCH_ENV_KEYS = ("WORLD_SIZE", "RANK", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT",
                   "GAIN_LAUNCHED", "ACCELERATE_USE_CPU")


def _env(**extra) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in LAUNCH_ENV_KEYS}
    env.update({"OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}, **extra)
    return env


def _matrix(rd: Path) -> dict:
    return json.loads((rd / "ppl_matrix.json").read_text())


def _state(rd: Path, k: int) -> dict:
    from safetensors.torch import load_file

    return load_file(str(rd / "stages" / f"stage_{k}" / "method_state.safetensors"))


# --- two processes vs one (marked multiproc) ------------------------------------------------------

def _single(method: str, rd: Path) -> Path:
    res = runner.invoke(app, ["run", *COMMON, f"method={method}", f"train.batch_size={2 * PER_PROCESS_BATCH}",
                              f"run_dir={rd}"])
    assert res.exit_code == 0, res.output
    return rd


def _two_processes(method: str, how: str, rd: Path, extra: tuple[str, ...] = ()) -> Path:
    args = [*COMMON, f"method={method}", f"train.batch_size={PER_PROCESS_BATCH}", f"run_dir={rd}", *extra]
    if how == "launcher":  # gain's own relaunch (launcher=accelerate_cpu2), for real
        from gain_cli.launcher import maybe_relaunch

        old = {k: os.environ.pop(k) for k in LAUNCH_ENV_KEYS if k in os.environ}
        try:
            cfg = compose_config([*args[1:], "launcher=accelerate_cpu2"], "tiny_8domains")
            rc = maybe_relaunch(cfg, ["run", *args, "launcher=accelerate_cpu2"])
        finally:
            os.environ.update(old)
        assert rc == 0
        return rd
    if how == "accelerate":
        from gain_cli.launcher import free_port

        cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
               "--main_process_port", str(free_port()), "--mixed_precision", "no", "--dynamo_backend", "no",
               "-m", "gain_cli", "run", *args]
        out = subprocess.run(cmd, env=_env(ACCELERATE_USE_CPU="1"), capture_output=True, text=True, timeout=600)
    else:  # torchrun
        out = _torchrun(args)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    return rd


def _torchrun(args: list[str], **env_extra: str) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "-m", "gain_cli", "run", *args]
    # without ACCELERATE_USE_CPU Accelerate sees one process per CPU rank (refused)
    return subprocess.run(cmd, env=_env(ACCELERATE_USE_CPU="1", **env_extra), capture_output=True, text=True,
                          timeout=600)


@pytest.fixture(scope="module")
def pairs(tmp_path_factory):
    """(one-process run, two-process run) per method; the one-process runs first (they warm the caches)."""
    root = tmp_path_factory.mktemp("mp")
    single = {m: _single(m, root / f"single_{m}") for m in ("gain_ffn", "lora", "full_ft")}
    how = {"gain_ffn": "launcher", "lora": "torchrun", "full_ft": "accelerate"}
    return {m: (single[m], _two_processes(m, how[m], root / f"two_{m}")) for m in single}


@pytest.mark.multiproc
@pytest.mark.parametrize("method", ["gain_ffn", "lora", "full_ft"])
def test_two_processes_give_the_one_process_matrix(pairs, method):
    one, two = pairs[method]
    m1, m2 = _matrix(one), _matrix(two)
    assert m1["rows"] == m2["rows"] and m1["domains"] == m2["domains"] and len(m1["rows"]) == 3
    for r1, r2 in zip(m1["values"], m2["values"]):
        for a, b in zip(r1, r2):
            assert abs(a - b) <= 1e-4 * abs(a), (method, m1["values"], m2["values"])
    # token-weighted reduce: the same number of predicted tokens (7 blocks × 63, split 4 + 3)
    base1 = json.loads((one / "base" / "metrics.json").read_text())
    base2 = json.loads((two / "base" / "metrics.json").read_text())
    assert base1["eval_tokens"] == base2["eval_tokens"] == {"dna": 7 * 63, "code": 7 * 63}


@pytest.mark.multiproc
@pytest.mark.parametrize("method,atol", [("gain_ffn", 1e-5), ("lora", 1e-5), ("full_ft", 1e-4)])
def test_two_processes_give_the_one_process_checkpoints(pairs, method, atol):
    import torch

    one, two = pairs[method]
    for k in (1, 2):
        s1, s2 = _state(one, k), _state(two, k)
        assert set(s1) == set(s2) and s1
        for name in s1:
            assert torch.allclose(s1[name], s2[name], atol=atol, rtol=0), (method, k, name,
                                                                         (s1[name] - s2[name]).abs().max().item())
        m1 = json.loads((one / "stages" / f"stage_{k}" / "metrics.json").read_text())["train"]
        m2 = json.loads((two / "stages" / f"stage_{k}" / "metrics.json").read_text())["train"]
        assert m1["tokens"] == m2["tokens"] == 8 * 2 * PER_PROCESS_BATCH * 64  # same global batch
        assert m1["losses"] == pytest.approx(m2["losses"], rel=1e-5, abs=1e-6)  # loss averaged over processes


@pytest.mark.multiproc
def test_two_compiled_processes_give_the_one_process_eager_matrix(pairs, tmp_path):
    """train.compile / eval.compile under DDP (torch.compile of the DDP-wrapped model, gloo): same matrix."""
    from gain_cli.models.compiling import compile_unavailable

    why = compile_unavailable("cpu")
    if why is not None:
        pytest.skip(f"torch.compile cannot build CPU kernels here: {why}")
    one = pairs["gain_ffn"][0]
    two = _two_processes("gain_ffn", "torchrun", tmp_path / "two_compiled", ("train.compile=true", "eval.compile=true"))
    m1, m2 = _matrix(one), _matrix(two)
    for r1, r2 in zip(m1["values"], m2["values"]):
        for a, b in zip(r1, r2):
            assert abs(a - b) <= 1e-4 * abs(a), (m1["values"], m2["values"])


@pytest.mark.multiproc
@pytest.mark.parametrize("method", ["gain_ffn", "full_ft"])
def test_two_process_run_killed_mid_stage_resumes_to_the_same_results(pairs, method, tmp_path):
    """Both ranks SIGKILLed in stage 2 after its step-4 checkpoint; `resume=true` under two processes rebuilds
    stage 1 from its saved state, continues stage 2 from the checkpoint (method, optimiser, scheduler) and ends
    where the uninterrupted two-process run ended."""
    import torch

    rd = tmp_path / "killed"
    args = [*COMMON, f"method={method}", f"train.batch_size={PER_PROCESS_BATCH}", f"run_dir={rd}"]
    out = _torchrun(args, GAIN_FAULT_KILL_AT="stage2.step6")
    assert out.returncode != 0 and (rd / "stages" / "stage_2" / "ckpt-4").is_dir(), out.stderr[-3000:]
    assert not (rd / "stages" / "stage_2" / "method_state.safetensors").exists()
    out = _torchrun([*args, "resume=true"])
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    assert "resuming" in out.stdout
    whole = pairs[method][1]
    assert _matrix(rd) == _matrix(whole)
    s1, s2 = _state(rd, 2), _state(whole, 2)
    assert set(s1) == set(s2) and all(torch.equal(s1[n], s2[n]) for n in s1)
    m1 = json.loads((rd / "stages" / "stage_2" / "metrics.json").read_text())["train"]
    m2 = json.loads((whole / "stages" / "stage_2" / "metrics.json").read_text())["train"]
    assert m1["losses"] == m2["losses"] and len(m1["losses"]) == 8


@pytest.mark.multiproc
def test_two_process_run_records_two_processes_and_main_writes_once(pairs):
    for method, (one, two) in pairs.items():
        info = json.loads((two / "run_info.json").read_text())
        assert info["num_processes"] == 2 and info["status"] == "complete", method
        assert json.loads((one / "run_info.json").read_text())["num_processes"] == 1
        assert not (two / ".lock").exists() and not list(two.rglob("*.tmp"))
        assert not list(two.glob("stages/*/ckpt-*")) and not list(two.glob("stages/*/checkpoint.json"))
        log = [json.loads(line) for line in (two / "train_log.jsonl").read_text().splitlines()]
        steps = [(r["stage"], r["step"]) for r in log]
        assert len(steps) == len(set(steps)), "train_log.jsonl written by more than one process"


@pytest.mark.multiproc
def test_gain_run_with_a_launcher_config_runs_two_processes(tmp_path):
    """`gain run ... launcher=accelerate_cpu2` re-executes itself through accelerate launch (the CLI wiring)."""
    rd = tmp_path / "cli"
    out = subprocess.run([sys.executable, "-m", "gain_cli", "run", "recipe=tiny_8domains", "domains.sequence=[dna]",
                          "train.steps=2", "eval.max_blocks=3", "eval.harness.enabled=false", "launcher=accelerate_cpu2",
                          f"train.batch_size={PER_PROCESS_BATCH}", f"run_dir={rd}"],
                         env=_env(), capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    assert json.loads((rd / "run_info.json").read_text())["num_processes"] == 2
    assert out.stdout.count("results: ") == 1  # printed by the main process only
    assert "launching 2 process(es)" in out.stdout


@pytest.mark.multiproc
def test_a_locked_run_dir_stops_every_process(tmp_path):
    """The main process finds the run directory in use: both processes exit with the one-line error (no rank left
    waiting for the main one), and the other run's lock is left alone."""
    from gain_cli.launcher import free_port

    rd = tmp_path / "r"
    rd.mkdir()
    holder = {"pid": os.getpid(), "host": __import__("socket").gethostname(), "started": "2026-01-01T00:00:00"}
    (rd / ".lock").write_text(json.dumps(holder))
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
           "--main_process_port", str(free_port()), "--mixed_precision", "no", "--dynamo_backend", "no",
           "-m", "gain_cli", "run", *COMMON, f"run_dir={rd}"]
    out = subprocess.run(cmd, env=_env(ACCELERATE_USE_CPU="1"), capture_output=True, text=True, timeout=300)
    msg = out.stdout + out.stderr
    assert out.returncode != 0, msg[-3000:]
    assert msg.count(f"is in use by process {os.getpid()}") >= 2, msg[-3000:]  # said by both ranks
    assert "gain_cli/runner.py" not in msg  # a one-line error, not a stack trace from a rank
    assert json.loads((rd / ".lock").read_text()) == holder
    assert not (rd / "base").exists()


@pytest.mark.multiproc
def test_multi_gpu_without_cpu_switch_is_refused(tmp_path):
    """`accelerate launch --multi_gpu` on a CPU-only machine starts two 'rank 0 of 1' processes: refused."""
    import torch

    if torch.cuda.is_available():
        pytest.skip("needs a machine without GPUs")
    from gain_cli.launcher import free_port

    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
           "--main_process_port", str(free_port()), "-m", "gain_cli", "run", *COMMON, f"run_dir={tmp_path / 'r'}"]
    out = subprocess.run(cmd, env=_env(), capture_output=True, text=True, timeout=300)
    assert out.returncode != 0
    assert "Accelerate sees 1 process(es) but WORLD_SIZE=2" in out.stdout + out.stderr
    assert not (tmp_path / "r" / "config.yaml").exists()


# --- fast checks (default test run) ---------------------------------------------------------------

def test_world_size_mismatch_is_refused_with_a_clear_message(tmp_path):
    out = subprocess.run([sys.executable, "-m", "gain_cli", "run", *COMMON, f"run_dir={tmp_path / 'r'}"],
                         env=_env(WORLD_SIZE="2"), capture_output=True, text=True, timeout=300)
    assert out.returncode == 2, out.stdout + out.stderr
    msg = out.stdout + out.stderr
    assert "Accelerate sees 1 process(es) but WORLD_SIZE=2" in msg and "--multi_gpu" in msg
    assert "Traceback" not in msg


def test_sharded_launch_is_plain_processes_with_gain_s_own_sharding(tmp_path, fake_popen):
    """launcher.accelerate_config=fsdp|deepspeed_zero3: gain shards the model itself (train.sharding=fsdp|zero3),
    so Accelerate gets no config file (on CPU it would silently drop FSDP and refuse DeepSpeed); a bad
    train.sharding is refused before any process starts."""
    from gain_cli.launcher import build_launch_command, maybe_relaunch

    for name in ("fsdp", "deepspeed_zero3"):
        cmd, env = build_launch_command(_cfg("launcher=accelerate_cpu2", f"launcher.accelerate_config={name}"), ["run"],
                                        tmp_path)
        assert "--config_file" not in cmd and "--multi_gpu" in cmd and env["ACCELERATE_USE_CPU"] == "1", name
    with pytest.raises(GainError, match="train.sharding"):
        maybe_relaunch(_cfg("launcher=gpu8", "train.sharding=zero2", f"run_dir={tmp_path / 'z'}"), ["run"])
    assert fake_popen.calls == []


class _FakePopen:
    calls: list = []

    def __init__(self, cmd, env=None, **kw):
        self.cmd, self.env = cmd, env
        _FakePopen.calls.append(self)

    def wait(self, timeout=None):
        return 3


@pytest.fixture
def fake_popen(monkeypatch):
    import gain_cli.launcher as launcher

    _FakePopen.calls = []
    from types import SimpleNamespace

    monkeypatch.setattr(launcher, "subprocess", SimpleNamespace(Popen=_FakePopen, TimeoutExpired=subprocess.TimeoutExpired))
    for k in LAUNCH_ENV_KEYS:
        monkeypatch.delenv(k, raising=False)
    return _FakePopen


def _cfg(*overrides):
    return compose_config(list(overrides), "tiny_8domains")


def test_relaunch_on_cpu_uses_multi_gpu_and_the_cpu_switch(fake_popen, tmp_path):
    from gain_cli.launcher import maybe_relaunch

    argv = ["run", "recipe=tiny_8domains", "launcher=accelerate_cpu2", "method=lora", f"run_dir={tmp_path / 'r'}"]
    rc = maybe_relaunch(_cfg(*argv[2:]), argv)
    assert rc == 3  # the launched run's exit code
    (call,) = fake_popen.calls
    cmd = call.cmd
    assert cmd[:3] == [sys.executable, "-m", "accelerate.commands.launch"]
    assert "--multi_gpu" in cmd and "--cpu" not in cmd and "--config_file" not in cmd
    assert cmd[cmd.index("--num_processes") + 1] == "2" and cmd[cmd.index("--num_machines") + 1] == "1"
    assert cmd[cmd.index("--mixed_precision") + 1] == "no" and int(cmd[cmd.index("--main_process_port") + 1]) > 0
    i = cmd.index("-m", 3)
    assert cmd[i:] == ["-m", "gain_cli", *argv]  # run_dir given: not added twice
    assert call.env["ACCELERATE_USE_CPU"] == "1" and call.env["GAIN_LAUNCHED"] == "1"


def test_relaunch_pins_the_run_dir_for_every_process(fake_popen, tmp_path):
    from gain_cli.launcher import maybe_relaunch

    argv = ["run", "recipe=tiny_8domains", "launcher.num_processes=2", "launcher.cpu=true", f"output_root={tmp_path}"]
    assert maybe_relaunch(_cfg(*argv[2:]), argv) == 3
    last = fake_popen.calls[0].cmd[-1]
    assert last.startswith(f"run_dir={tmp_path}/tiny_8domains/gain_ffn/")
    # the pinned value parses back through the config, also with awkward characters
    from gain_cli.launcher import hydra_value

    odd = str(tmp_path / "a b,c=d's")
    assert compose_config([f"run_dir={hydra_value(odd)}"], "tiny_8domains").run_dir == odd


def test_no_relaunch_for_one_process_or_inside_a_launch(fake_popen, monkeypatch):
    from gain_cli.launcher import maybe_relaunch

    assert maybe_relaunch(_cfg(), ["run"]) is None
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert maybe_relaunch(_cfg("launcher=accelerate_cpu2"), ["run", "launcher=accelerate_cpu2"]) is None
    monkeypatch.delenv("WORLD_SIZE")
    monkeypatch.setenv("GAIN_LAUNCHED", "1")  # simple launcher (1 process) sets no WORLD_SIZE
    assert maybe_relaunch(_cfg("launcher.num_processes=2"), ["run"]) is None
    monkeypatch.delenv("GAIN_LAUNCHED")
    assert maybe_relaunch(_cfg("launcher.accelerate_config=ddp"), ["run"]) is None  # one process: runs here
    assert fake_popen.calls == []


@pytest.mark.parametrize("gpus,needle", [(0, "has no GPUs: use one process (launcher=local) or CPU processes"),
                                          (4, "has 4 GPUs: use launcher.num_processes=4")])
def test_gpu_launch_on_a_machine_without_enough_gpus_is_refused_before_starting(fake_popen, monkeypatch, tmp_path,
                                                                                 gpus, needle):
    import gain_cli.launcher as launcher

    monkeypatch.setattr(launcher, "local_gpus", lambda: gpus)
    with pytest.raises(GainError, match=re.escape(needle)):
        launcher.maybe_relaunch(_cfg("launcher=gpu8", f"run_dir={tmp_path / 'r'}"), ["run", "launcher=gpu8"])
    assert fake_popen.calls == []
    monkeypatch.setattr(launcher, "local_gpus", lambda: 8)
    rc = launcher.maybe_relaunch(_cfg("launcher=gpu8", f"run_dir={tmp_path / 'r'}"), ["run", "launcher=gpu8"])
    assert rc == 3  # the (fake) launched run's exit code
    assert len(fake_popen.calls) == 1


def test_gpu_launch_uses_the_accelerate_config(fake_popen, tmp_path):
    from gain_cli.launcher import build_launch_command

    cmd, env = build_launch_command(_cfg("launcher=gpu8", "train.mixed_precision=bf16"), ["run", "launcher=gpu8"], tmp_path)
    assert cmd[cmd.index("--config_file") + 1].endswith("configs/accelerate/ddp.yaml")
    assert "--multi_gpu" not in cmd  # the file's distributed_type decides
    fsdp, _ = build_launch_command(_cfg("launcher=gpu8", "launcher.accelerate_config=fsdp"), ["run"], tmp_path)
    assert "--config_file" not in fsdp and "--multi_gpu" in fsdp  # gain shards the model itself
    assert cmd[cmd.index("--num_processes") + 1] == "8" and cmd[cmd.index("--mixed_precision") + 1] == "bf16"
    assert "ACCELERATE_USE_CPU" not in env or env["ACCELERATE_USE_CPU"] != "1"


def test_multinode_launch_needs_a_shared_run_name_and_the_main_address(fake_popen, tmp_path):
    from gain_cli.launcher import build_launch_command, maybe_relaunch

    with pytest.raises(GainError, match="run_name"):
        maybe_relaunch(_cfg("launcher=multinode", "launcher.main_process_ip=10.0.0.1"), ["run"])
    with pytest.raises(GainError, match="main_process_ip"):
        build_launch_command(_cfg("launcher=multinode", "run_name=x"), ["run"], tmp_path)
    cmd, _ = build_launch_command(_cfg("launcher=multinode", "launcher.machine_rank=1", "launcher.main_process_ip=10.0.0.1",
                                       "run_name=x"), ["run"], tmp_path)
    for flag, value in (("--num_processes", "16"), ("--num_machines", "2"), ("--machine_rank", "1"),
                        ("--main_process_ip", "10.0.0.1"), ("--main_process_port", "29500")):
        assert cmd[cmd.index(flag) + 1] == value


def test_bad_launcher_settings_are_one_line_errors(fake_popen):
    from gain_cli.launcher import build_launch_command, launcher_settings

    with pytest.raises(GainError, match="neither a file nor one of the shipped"):
        build_launch_command(_cfg("launcher.num_processes=2", "launcher.accelerate_config=fsdpp"), ["run"])
    with pytest.raises(GainError, match="multiple of"):
        launcher_settings(_cfg("launcher.num_processes=3", "launcher.num_machines=2"))
    with pytest.raises(GainError, match="integer"):
        launcher_settings(_cfg("launcher.num_processes=two"))


def test_shipped_accelerate_configs_parse():
    from omegaconf import OmegaConf

    from gain_cli.accelerate_configs import resolve_accelerate_config, sharding_of

    expect = {"ddp": ("MULTI_GPU", "none"), "fsdp": ("FSDP", "fsdp"), "deepspeed_zero3": ("DEEPSPEED", "zero3")}
    for name, (kind, sharding) in expect.items():
        c = OmegaConf.load(resolve_accelerate_config(name))
        assert c.distributed_type == kind and sharding_of(name) == sharding
    fsdp = OmegaConf.load(resolve_accelerate_config("fsdp")).fsdp_config
    assert fsdp.fsdp_version == 2 and fsdp.fsdp_reshard_after_forward is True
    assert OmegaConf.load(resolve_accelerate_config("deepspeed_zero3")).deepspeed_config.zero_stage == 3


# --- memory estimate: exact arithmetic on the tiny configs -------------------------------------------

# tiny-llama: vocab 258 (byte tokenizer), hidden 64, intermediate 176, 2 layers, 4 heads, 2 KV heads (tied embeddings)
TINY_EMBED = 258 * 64
TINY_LAYER = 64 * 64 + 2 * (64 * 32) + 64 * 64 + 3 * (64 * 176) + 2 * 64  # q, k, v, o, gate/up/down, 2 norms
TINY_BASE = TINY_EMBED + 2 * TINY_LAYER + 64  # + final norm
TINY_GAIN = 2 * (64 + 176)
TINY_LORA = 2 * (8 * (64 + 64) + 2 * 8 * (64 + 32) + 8 * (64 + 64))  # r=8 on q, k, v, o
TINY_ACT_LOGITS = 8 * 8 * 64 * 258  # 8·b·s·V (fp32 logits + gradient)
TINY_ACT = (2 * 8 * 64 * 34 * 64 * 4) // 2 + TINY_ACT_LOGITS  # + L·b·s·34·h·e/2 with e = 4 (fp32)
TINY_ACT_16 = (2 * 8 * 64 * 34 * 64 * 2) // 2 + TINY_ACT_LOGITS  # e = 2 (bf16)


def _groups(method: str, *extra):
    from omegaconf import OmegaConf

    cfg = compose_config([f"method={method}", *extra], "tiny_8domains")
    return [OmegaConf.to_container(cfg[k]) for k in ("model", "method", "train")]


@pytest.mark.parametrize("method,trainable,added", [("gain_ffn", TINY_GAIN, TINY_GAIN), ("lora", TINY_LORA, TINY_LORA),
                                                    ("full_ft", TINY_BASE, 0)])
def test_memory_estimate_exact_terms(method, trainable, added):
    from gain_cli.memory import memory_estimate

    est = memory_estimate(*_groups(method))
    assert est["params_trainable"] == trainable and est["params_added"] == added
    assert est["params_total"] == TINY_BASE + added
    assert est["weights_bytes"] == 4 * (TINY_BASE + added)
    assert est["gradients_bytes"] == 4 * trainable and est["optimizer_bytes"] == 8 * trainable
    assert est["activations_bytes"] == TINY_ACT
    assert est["per_process_bytes"] == 4 * (TINY_BASE + added) + 12 * trainable + TINY_ACT
    assert est["trainable_from"].startswith("method attached")


def test_memory_estimate_bf16_weights_keep_fp32_gains_and_shard():
    from gain_cli.memory import memory_estimate

    model, method, train = _groups("gain_ffn", "model.dtype=bfloat16")
    one = memory_estimate(model, method, train)
    assert one["weights_bytes"] == 2 * TINY_BASE + 4 * TINY_GAIN  # gains stay fp32
    assert one["activations_bytes"] == TINY_ACT_16
    two = memory_estimate(model, method, train, num_processes=2, sharding="fsdp")
    states = 2 * TINY_BASE + 4 * TINY_GAIN + 12 * TINY_GAIN
    gathered = (2 * TINY_LAYER + TINY_EMBED + 64) * 2
    assert two["gathered_bytes"] == gathered
    assert two["per_process_bytes"] == -(-states // 2) + gathered + TINY_ACT_16
    assert two["total_bytes"] == 2 * two["per_process_bytes"]
    ddp = memory_estimate(model, method, train, num_processes=2, sharding="none")
    assert ddp["per_process_bytes"] == one["per_process_bytes"]
    with pytest.raises(GainError, match="sharding"):
        memory_estimate(model, method, train, sharding="zero2")


@pytest.mark.parametrize("model_name,method,expected", [("tiny-llama", "gain_ffn", TINY_GAIN), ("tiny-llama", "lora", TINY_LORA),
                                                        ("tiny-gpt2", "gain_ffn", 2 * (64 + 256))])
def test_memory_estimate_falls_back_to_the_architecture_table(monkeypatch, model_name, method, expected):
    from gain_cli.memory import memory_estimate

    real = memory_estimate(*_groups(method, f"model={model_name}"))
    assert real["params_trainable"] == expected

    def broken(cfg, spec):
        raise RuntimeError("cannot attach on meta")

    monkeypatch.setattr("gain_cli.methods.build_method", broken)
    est = memory_estimate(*_groups(method, f"model={model_name}"))
    assert est["params_trainable"] == expected and est["trainable_from"].startswith("architecture table")
    assert est["weights_bytes"] == real["weights_bytes"]


def test_memory_lines_and_summary():
    from gain_cli.memory import estimate_for_config, format_estimate, summary_line

    cfg = compose_config(["launcher=accelerate_cpu2", "method=lora"], "tiny_8domains")
    est = estimate_for_config(cfg)
    assert est["num_processes"] == 2 and est["sharding"] == "none"
    text = "\n".join(format_estimate(est))
    assert "7,168 trainable" in text and "per process" in text
    assert summary_line(cfg).startswith("memory estimate: ~")
    fsdp = estimate_for_config(compose_config(["launcher=gpu8", "launcher.accelerate_config=fsdp"], "tiny_8domains"))
    assert fsdp["sharding"] == "fsdp" and fsdp["num_processes"] == 8
