"""Fault injection: SIGKILL at many points, resume, identical matrices; locks; determinism; bad input."""

import json
import os
import signal
import subprocess
import sys
import time
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


def _killed_at(point: str, args: list[str], rd: Path) -> None:
    """``gain <args> run_dir=rd``, killed with SIGKILL at ``point`` (faults.point)."""
    res = _gain([*args, f"run_dir={rd}"], {"GAIN_FAULT_KILL_AT": point})
    assert res.returncode == -signal.SIGKILL, (res.returncode, res.stderr[-2000:])


def _resumed(args: list[str], rd: Path) -> subprocess.CompletedProcess:
    """The same command with resume=true, finished."""
    res = _gain([*args, f"run_dir={rd}", "resume=true"])
    assert res.returncode == 0, res.stderr[-2000:]
    return res


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
    rd, args = tmp_path / "run", ["run", *BASE, "method=lora"]
    _killed_at(point, args, rd)
    for f in rd.rglob("*.json"):
        json.loads(f.read_text())  # no partially written file is ever in place
    _resumed(args, rd)
    assert _values(rd) == _values(reference)
    assert not list(rd.rglob("*.tmp")) and not list(rd.rglob("ckpt-*"))


def test_a_stage_killed_during_its_evaluation_is_not_trained_again(reference, tmp_path):
    rd, args = tmp_path / "run", ["run", *BASE, "method=lora"]
    _killed_at("eval.stage_1.code", args, rd)
    res = _resumed(args, rd)
    assert "trained before the run stopped, applying its saved state" in " ".join(res.stdout.split())
    log = [json.loads(line) for line in (rd / "train_log.jsonl").read_text().splitlines()]
    steps = [(r["stage"], r["step"]) for r in log]
    assert len(steps) == len(set(steps))  # stage 1's steps were logged once: it was not trained again
    for k in (1, 2):
        ours = json.loads((rd / "stages" / f"stage_{k}" / "metrics.json").read_text())
        ref = json.loads((reference / "stages" / f"stage_{k}" / "metrics.json").read_text())
        assert ours["train"]["losses"] == ref["train"]["losses"] and ours["ppl"] == ref["ppl"]
    assert _values(rd) == _values(reference)


def test_bf16_run_killed_mid_stage_resumes_to_the_uninterrupted_matrix(tmp_path):
    """bf16 autocast, GAIN-FFN (the model object goes on from stage to stage): killed in stage 2 after its step-4
    checkpoint, the resumed process trains stage 2's last steps under the same autocast as the uninterrupted run."""
    args = ["run", *BASE, "method=gain_ffn", "train.mixed_precision=bf16"]
    res = _gain([*args, f"run_dir={tmp_path / 'whole'}"])
    assert res.returncode == 0, res.stderr[-2000:]
    _killed_at("stage2.step6", args, tmp_path / "killed")
    _resumed(args, tmp_path / "killed")
    assert _values(tmp_path / "killed") == _values(tmp_path / "whole")


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


# --- bad input: one line, exit code 2, nothing half-written ----------------------------------

def _one_line_error(res, needle):
    assert res.exit_code == 2, res.output
    assert "Traceback" not in res.output
    errors = [ln for ln in res.output.splitlines() if ln.startswith("error:")]
    assert len(errors) == 1 and needle in errors[0], res.output


@pytest.mark.parametrize("group", ["model", "method", "domains", "train", "eval"])
def test_unknown_name_in_any_group_lists_choices(group):
    from gain_cli.config import group_choices

    res = runner.invoke(app, ["run", "recipe=tiny_8domains", f"{group}=no_such_thing"])
    _one_line_error(res, f"unknown {group} 'no_such_thing' (valid: ")
    for choice in group_choices(group):
        assert choice in res.output


@pytest.mark.parametrize("override, needle", [
    ("train.steps=ten", "train.steps must be an integer, got 'ten'"),
    ("method.lr=fast", "method.lr must be a number, got 'fast'"),
    ("eval.batch_size=0", "eval.batch_size must be at least 1"),
    ("resume=maybe", "resume must be true or false"),
])
def test_type_errors_in_overrides(override, needle, tmp_path):
    res = runner.invoke(app, ["run", "recipe=tiny_8domains", override, f"run_dir={tmp_path / 'r'}"])
    _one_line_error(res, needle)
    assert not (tmp_path / "r").exists()


def _files_domain(root: Path, name: str, train: str, validation: str):
    (root / name).mkdir(parents=True)
    (root / name / "train.jsonl").write_text(train)
    (root / name / "validation.jsonl").write_text(validation)


@pytest.mark.parametrize("validation, needle", [
    ("", "has 0 tokens; at least 64 are needed"),
    (json.dumps({"text": "tiny"}) + "\n", "has 5 tokens; at least 64 are needed"),
])
def test_empty_or_too_small_domain_files(validation, needle, tmp_path):
    root = tmp_path / "data"
    _files_domain(root, "mine", json.dumps({"text": "x" * 5000}) + "\n", validation)
    res = runner.invoke(app, ["run", "recipe=tiny_8domains", "domains.source=files", f"domains.root={root}",
                              "domains.sequence=[mine]", f"run_dir={tmp_path / 'r'}"])
    _one_line_error(res, needle)
    assert "domain 'mine' (validation split)" in res.output


def test_missing_data_file_names_it(tmp_path):
    res = runner.invoke(app, ["run", "recipe=tiny_8domains", "domains.source=files", f"domains.root={tmp_path}",
                              "domains.sequence=[ghost]", f"run_dir={tmp_path / 'r'}"])
    _one_line_error(res, f"missing data file {tmp_path / 'ghost' / 'train.jsonl'}")


def test_unknown_tiny_domain(tmp_path):
    res = runner.invoke(app, ["run", "recipe=tiny_8domains", "domains.sequence=[dna,poetry]", f"run_dir={tmp_path}/r"])
    _one_line_error(res, "unknown domain 'poetry' (valid: ")


def test_tokenizer_model_mismatch(tmp_path):
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    model_dir = tmp_path / "model"
    LlamaForCausalLM(LlamaConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                                 num_key_value_heads=1, vocab_size=100)).save_pretrained(model_dir)
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.train_from_iterator([f"word{i} token{i} piece{i}" for i in range(400)],
                            trainers.BpeTrainer(vocab_size=300, special_tokens=["<unk>", "</s>"]))
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="</s>", unk_token="<unk>")
    fast.save_pretrained(model_dir)
    res = runner.invoke(app, ["eval", f"model={model_dir}", "domains=tiny8"])
    _one_line_error(res, f"tokenizer/model mismatch at {model_dir}: tokenizer has {len(fast)} tokens but the model's "
                         "embedding has 100 rows")


def test_unknown_architecture_says_how_to_add_it(tmp_path):
    from transformers import BloomConfig, BloomForCausalLM

    model_dir = tmp_path / "bloom"
    BloomForCausalLM(BloomConfig(hidden_size=16, n_layer=1, n_head=2, vocab_size=300)).save_pretrained(model_dir)
    res = runner.invoke(app, ["run", "recipe=tiny_8domains", f"model={model_dir}", "model.tokenizer=bytes",
                              f"run_dir={tmp_path / 'r'}"])
    _one_line_error(res, "architecture 'bloom' is not in gain's table")
    assert "model.arch_overrides" in res.output


def test_nan_loss_stops_the_stage_and_keeps_earlier_results(tmp_path):
    rd = tmp_path / "nan"
    args = ["run", *BASE, "method=gain_ffn", f"run_dir={rd}"]
    res = _gain(args, {"GAIN_FAULT_NAN_AT": "stage2.step3"})
    assert res.returncode == 2, res.stderr
    assert "stage 2: loss became nan at step 3" in res.stderr and "Traceback" not in res.stderr
    assert len(_values(rd)) == 2  # base + stage 1 kept
    assert (rd / "stages" / "stage_1" / "method_state.safetensors").is_file()
    assert not (rd / "stages" / "stage_2" / "metrics.json").exists()
    info = json.loads((rd / "run_info.json").read_text())
    assert info["status"] == "failed" and "loss became nan at step 3" in info["error"]
    res = _gain([*args, "resume=true"])  # the cause gone, the run resumes
    assert res.returncode == 0, res.stderr[-2000:]
    assert len(_values(rd)) == 3
    assert json.loads((rd / "run_info.json").read_text())["status"] == "complete"


def test_ctrl_c_says_how_to_resume_and_marks_the_run_interrupted(tmp_path):
    rd = tmp_path / "int"
    proc = subprocess.Popen([sys.executable, "-m", "gain_cli", "run", *BASE, "method=gain_ffn", "train.steps=100000",
                             f"run_dir={rd}"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))  # as in a terminal
    try:
        for _ in range(600):  # into stage 1 (the base row written)
            if (rd / "base" / "metrics.json").is_file() or proc.poll() is not None:
                break
            time.sleep(0.1)
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=120)
    finally:
        proc.kill()
    assert proc.returncode == 130, err[-2000:]
    assert "interrupted: finished stages are saved" in err and "Traceback" not in err
    assert json.loads((rd / "run_info.json").read_text())["status"] == "interrupted"
    assert not (rd / ".lock").exists()


def test_atomic_writes_get_the_permissions_of_a_plain_open(tmp_path):
    from gain_cli.io import atomic_write_text

    atomic_write_text(tmp_path / "atomic.txt", "x")
    (tmp_path / "plain.txt").write_text("x")
    mode = lambda p: p.stat().st_mode & 0o777  # noqa: E731
    assert mode(tmp_path / "atomic.txt") == mode(tmp_path / "plain.txt")  # not mkstemp's private 0600


def test_out_of_disk_while_writing_leaves_no_corrupt_file(tmp_path, monkeypatch):
    import errno

    from gain_cli.errors import GainError
    from gain_cli.io import atomic_write_json

    target = tmp_path / "ppl_matrix.json"
    atomic_write_json(target, {"ok": 1})

    def full_disk(src, dst):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "replace", full_disk)
    with pytest.raises(GainError, match="no space left on the device while writing"):
        atomic_write_json(target, {"ok": 2})
    assert json.loads(target.read_text()) == {"ok": 1}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ppl_matrix.json"]


def test_boolq_file_with_missing_field_names_the_line(tmp_path):
    bad = tmp_path / "boolq.jsonl"
    good = {"question": "is it", "passage": "it is", "label": True, "idx": 0}
    bad.write_text(json.dumps(good) + "\n" + json.dumps({"question": "q", "label": False, "idx": 1}) + "\n")
    res = runner.invoke(app, ["run", *BASE, f"eval.harness.boolq_path={bad}", "eval.harness.enabled=true",
                              f"run_dir={tmp_path / 'r'}"])
    assert res.exit_code == 2, res.output
    assert f"{bad}:2" in res.output and "passage" in res.output


def test_weights_load_safely():
    import inspect

    from gain_cli.models import loading
    from gain_cli.training import checkpoint

    assert "use_safetensors=True" in inspect.getsource(loading.load_model)
    assert "weights_only=True" in inspect.getsource(checkpoint.StageCheckpoints.load)
    from gain_cli.config import compose_config

    for recipe in ("tiny_8domains",):
        assert compose_config([], recipe).model.trust_remote_code is False


def test_a_resumed_stage_logs_each_step_once_and_says_where_it_resumed(tmp_path):
    """Killed at step 6 (checkpoint at step 4, every step logged): the resumed stage drops the log lines of steps 5-6
    and logs them again, so every (stage, step) appears once, in order."""
    rd, args = tmp_path / "run", ["run", *BASE, "method=lora", "train.log_every=1"]
    _killed_at("stage1.step6", args, rd)
    logged = [json.loads(line)["step"] for line in (rd / "train_log.jsonl").read_text().splitlines()]
    assert logged[-1] == 6  # the lines the checkpoint does not cover were written before the kill
    res = _resumed(args, rd)
    assert "resumed stage 1 from step 4" in " ".join(res.stdout.split())
    log = [json.loads(line) for line in (rd / "train_log.jsonl").read_text().splitlines()]
    assert [(r["stage"], r["step"]) for r in log] == [(k, s) for k in (1, 2) for s in range(1, 13)]


# --- files a run names that cannot be used: one line, exit 2, no run directory (issue 17) -----------------------

def _saved_model(path: Path, *, safetensors: bool = True, tokenizer: bool = True) -> Path:
    """A 1-layer Llama saved as a Hugging Face directory, with gain's byte tokenizer."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from gain_cli.models.tokenizers import byte_tokenizer

    tok = byte_tokenizer()
    torch_model = LlamaForCausalLM(LlamaConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                               num_attention_heads=2, num_key_value_heads=1, vocab_size=len(tok),
                                               max_position_embeddings=256))
    torch_model.save_pretrained(path)
    if not safetensors:  # as older transformers saved by default (transformers 5 writes safetensors only)
        import torch

        torch.save(torch_model.state_dict(), path / "pytorch_model.bin")
        (path / "model.safetensors").unlink()
    if tokenizer:
        tok.save_pretrained(path)
    return path


def _unusable_model(kind: str, tmp: Path) -> list[str]:
    """The overrides naming a model directory that is wrong in one way (``kind``)."""
    d = tmp / "model"
    if kind == "pickled weights":
        _saved_model(d, safetensors=False)
    elif kind == "no tokenizer":
        _saved_model(d, tokenizer=False)
    elif kind == "no config":
        _saved_model(d)
        (d / "config.json").unlink()
    elif kind == "a file":
        d.write_text("not a model")
        return ["model=local", f"model.path={d}"]
    elif kind == "broken tokenizer":
        _saved_model(d)
        (d / "tokenizer.json").write_text("{not json")
    elif kind == "hub id offline":
        return ["model=local", "model.path=some-org/some-model"]
    return [f"model={d}"]


@pytest.mark.parametrize("kind, needle", [
    ("pickled weights", "holds no *.safetensors weights (found pytorch_model.bin: gain loads safetensors only"),
    ("no tokenizer", "has no tokenizer (tokenizer.json or tokenizer_config.json"),
    ("no config", "holds no config.json: not a saved Hugging Face model"),
    ("a file", "is a file, not a model directory"),
    ("hub id offline", "model.path 'some-org/some-model' is not a local directory and the hub is offline"),
    ("broken tokenizer", "cannot load the tokenizer from"),
])
def test_a_model_directory_that_cannot_be_used_is_one_line_and_leaves_no_run(kind, needle, tmp_path):
    rd = tmp_path / "run"
    res = runner.invoke(app, ["run", "recipe=tiny_8domains", *_unusable_model(kind, tmp_path), f"run_dir={rd}"])
    _one_line_error(res, needle)
    assert not rd.exists()


def test_gain_eval_checks_the_model_directory_too(tmp_path):
    res = runner.invoke(app, ["eval", *_unusable_model("pickled weights", tmp_path), "domains=tiny8"])
    _one_line_error(res, "holds no *.safetensors weights")


def test_a_domain_file_that_is_not_utf8_is_one_line_and_leaves_no_run(tmp_path):
    """The second domain's training file is Latin-1: found while the run reads its data, before its directory."""
    root, rd = tmp_path / "data", tmp_path / "run"
    _files_domain(root, "first", json.dumps({"text": "plain text " * 300}) + "\n", json.dumps({"text": "v " * 300}) + "\n")
    _files_domain(root, "second", "", json.dumps({"text": "v " * 300}) + "\n")
    (root / "second" / "train.jsonl").write_bytes(json.dumps({"text": "ok " * 300}).encode() + b"\n"
                                                  + '{"text": "caf\xe9"}\n'.encode("latin-1"))
    res = runner.invoke(app, ["run", "recipe=tiny_8domains", "domains.source=files", f"domains.root={root}",
                              "domains.sequence=[first,second]", f"run_dir={rd}"])
    _one_line_error(res, f"{root / 'second' / 'train.jsonl'}:2: not UTF-8 text (byte 0xe9 at column 14)")
    assert not rd.exists()


def test_a_lora_target_the_model_lacks_is_one_line_and_leaves_no_run(tmp_path):
    rd = tmp_path / "run"
    res = runner.invoke(app, ["run", "recipe=tiny_8domains", "method=lora", "method.target_modules=[no_such_proj]",
                              f"run_dir={rd}"])
    _one_line_error(res, "method lora: target module 'no_such_proj' is not in the model (method.target_modules; its projections: down_proj, gate_proj, k_proj")
    assert not rd.exists()


def test_gain_data_build_never_writes_into_a_users_directory(tmp_path):
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "thesis.txt").write_text("x")
    res = runner.invoke(app, ["data", "build", "demo", f"domains.root={mine}"])
    _one_line_error(res, f"domains.root {mine} is a non-empty directory that gain did not write: gain data build "
                         "refuses to write into it")
    assert [p.name for p in mine.iterdir()] == ["thesis.txt"] and (mine / "thesis.txt").read_text() == "x"
    res = runner.invoke(app, ["data", "build", "demo", f"domains.root={mine / 'thesis.txt'}"])
    _one_line_error(res, "is a file, not a directory")


def test_a_model_conversion_or_merge_leaves_files_at_the_umask(tmp_path):
    """save_pretrained writes safetensors through a private temp file (0600); gain gives them a plain open's mode."""
    from gain_cli.io import _FILE_MODE, apply_umask

    d = _saved_model(tmp_path / "m")
    os.chmod(d / "model.safetensors", 0o600)
    apply_umask(d)
    assert {oct(f.stat().st_mode & 0o777) for f in d.iterdir()} == {oct(_FILE_MODE)}


def test_ctrl_c_turned_into_another_error_by_a_library_still_reads_as_interrupted(monkeypatch):
    """transformers' lazy imports re-raise an interrupt inside an import as ModuleNotFoundError (seen in CI)."""
    import typer

    from gain_cli import interrupts
    from gain_cli.cli import user_errors

    monkeypatch.setattr(interrupts, "_received", False)
    before = signal.getsignal(signal.SIGINT)
    signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        interrupts.install()

        @user_errors
        def command():
            try:
                os.kill(os.getpid(), signal.SIGINT)
                time.sleep(5)  # the handler raises before this ends
            except KeyboardInterrupt:
                raise ModuleNotFoundError("Could not import module 'get_scheduler'") from None

        with pytest.raises(typer.Exit) as exit_:
            command()
        assert exit_.value.exit_code == 130

        monkeypatch.setattr(interrupts, "_received", False)  # without a Ctrl-C the same error stays an error

        @user_errors
        def broken():
            raise ModuleNotFoundError("no module")

        with pytest.raises(ModuleNotFoundError):
            broken()
    finally:
        signal.signal(signal.SIGINT, before)
