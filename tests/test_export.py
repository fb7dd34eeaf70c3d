"""`gain export --format peft`: tiny runs exported as stock PEFT adapters, loaded with ``PeftModel.from_pretrained``
on the freshly built base model, give gain's own model of the stage (max |Δlogits| ≤ 1e-5)."""

import json
import os
import subprocess
import sys
import warnings

import pytest
import torch
from omegaconf import OmegaConf
from typer.testing import CliRunner

from gain_cli.cli import app

runner = CliRunner()
FAST = ["recipe=tiny_8domains", "domains.sequence=[dna,code]", "model.pretrain=null", "train.steps=3",
        "eval.max_blocks=1", "eval.harness.enabled=false"]
RUNS = {  # name: overrides (two stages each; the refused methods one short stage)
    "lora": ["method=lora"],
    "ia3": ["method=ia3"],
    "gain_attn": ["method=gain_attn"],
    "gain_ffn": ["method=gain_ffn"],
    "gpt2_gain_ffn_exp": ["model=tiny-gpt2", "method=gain_ffn", "method.parametrization=exp"],
    "ewc_lora": ["method=ewc_lora"],
    "imsm": ["method=imsm", "domains.sequence=[dna]", "train.steps=1"],
    "full_ft": ["method=full_ft", "domains.sequence=[dna]", "train.steps=1"],
}
IDS = torch.randint(3, 250, (2, 24), generator=torch.Generator().manual_seed(0))


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """``run(name)``: the run directory of RUNS[name], trained once per module."""
    root, done = tmp_path_factory.mktemp("export_runs"), {}

    def get(name):
        if name not in done:
            rd = root / name
            res = runner.invoke(app, ["run", *FAST, *RUNS[name], f"run_dir={rd}"])
            assert res.exit_code == 0, res.output
            done[name] = rd
        return done[name]

    return get


def export(rd, out, *args):
    res = runner.invoke(app, ["export", str(rd), "--out", str(out), *args])
    assert res.exit_code == 0, res.output
    return " ".join(res.output.split())


def gain_model(rd, after: int):
    """gain's own model after stage ``after`` (0: the base model), merged into plain weights."""
    from gain_cli.methods import build_method
    from gain_cli.models.loading import load_model, model_spec
    from gain_cli.rundir import RunDir

    cfg = OmegaConf.load(rd / "config.yaml")
    model, _ = load_model(cfg.model, cfg.cache_dir)
    if after == 0:
        return model.eval()
    method = build_method(OmegaConf.to_container(cfg.method), model_spec(cfg.model, model.config.model_type))
    return method.merge(RunDir(rd).apply_saved_stages(model, method, after)).eval()


def logits(model):
    with torch.no_grad():
        return model(input_ids=IDS).logits


def check_round_trip(rd, out, first: int, last: int) -> None:
    """The adapter on the model after stage first-1 computes gain's model after stage ``last``."""
    from peft import PeftModel

    assert sorted(p.name for p in out.iterdir()) == [".gain-output.json", "README.md", "adapter_config.json",
                                                     "adapter_model.safetensors"]
    want = logits(gain_model(rd, last))
    base = gain_model(rd, first - 1)
    before = logits(base)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model = PeftModel.from_pretrained(base, str(out)).eval()
    assert not [w for w in caught if "keys" in str(w.message).lower()], [str(w.message) for w in caught]
    got = logits(model)
    assert (want - before).abs().max() > 1e-3  # the stages changed the model: the comparison means something
    assert (got - want).abs().max() <= 1e-5


def config_of(out):
    return json.loads((out / "adapter_config.json").read_text())


def test_lora_stage_1_on_the_pretrained_model(run, tmp_path):
    rd = run("lora")
    said = export(rd, tmp_path / "a", "--stage", "1")
    assert "stage 1 of 2 (dna)" in said and "LoRA (r=8" in said and "PEFT adapter written to" in said
    cfg = config_of(tmp_path / "a")
    assert cfg["peft_type"] == "LORA" and cfg["r"] == 8 and cfg["base_model_name_or_path"] is None
    check_round_trip(rd, tmp_path / "a", 1, 1)


def test_lora_stage_2_belongs_on_the_stage_1_merged_model(run, tmp_path):
    rd = run("lora")
    said = export(rd, tmp_path / "a", "--stage", "2")
    assert "the model after stage 1" in said and f"gain merge {rd} --stage 1" in said
    marker = json.loads((tmp_path / "a" / ".gain-output.json").read_text())
    assert marker["stages"] == [2] and marker["base"]["after_stage"] == 1
    assert "gain merge" in (tmp_path / "a" / "README.md").read_text()
    check_round_trip(rd, tmp_path / "a", 2, 2)


def test_lora_stages_1_2_are_one_adapter_of_twice_the_rank(run, tmp_path):
    rd = run("lora")
    said = export(rd, tmp_path / "a", "--stages", "1..2")
    assert "r=16 = 2 stages × r 8" in said
    cfg = config_of(tmp_path / "a")
    assert cfg["r"] == 16 and cfg["lora_alpha"] == 32  # the same scale alpha/r
    check_round_trip(rd, tmp_path / "a", 1, 2)


def test_ewc_lora_exports_its_lora_part(run, tmp_path):
    rd = run("ewc_lora")  # its stage-2 state also holds the Fisher of stage 1
    export(rd, tmp_path / "a", "--stages", "1..2")
    check_round_trip(rd, tmp_path / "a", 1, 2)


@pytest.mark.parametrize("spec", ["1..2", "2"])
def test_ia3_cumulative_and_single_stage(run, tmp_path, spec):
    rd = run("ia3")
    args = ["--stages", spec] if ".." in spec else ["--stage", spec]
    export(rd, tmp_path / "a", *args)
    cfg = config_of(tmp_path / "a")
    assert cfg["peft_type"] == "IA3" and sorted(cfg["feedforward_modules"]) == ["down_proj"]
    check_round_trip(rd, tmp_path / "a", 1 if ".." in spec else 2, 2)


def test_gain_attn_is_ia3_on_the_attention_output_projection(run, tmp_path):
    rd = run("gain_attn")
    export(rd, tmp_path / "a", "--stages", "1..2")
    cfg = config_of(tmp_path / "a")
    assert cfg["peft_type"] == "IA3"
    assert cfg["target_modules"] == cfg["feedforward_modules"] == ["self_attn.o_proj"]
    check_round_trip(rd, tmp_path / "a", 1, 2)


def test_gain_ffn_stages_multiply_into_one_adapter(run, tmp_path):
    from safetensors.torch import load_file

    rd = run("gain_ffn")
    export(rd, tmp_path / "a", "--stages", "1..2")
    cfg = config_of(tmp_path / "a")
    assert sorted(cfg["target_modules"]) == sorted(cfg["feedforward_modules"]) == ["mlp.down_proj", "self_attn.o_proj"]
    s1, s2 = (load_file(str(rd / "stages" / f"stage_{k}" / "method_state.safetensors")) for k in (1, 2))
    adapter = load_file(str(tmp_path / "a" / "adapter_model.safetensors"))
    key = "model.layers.0.mlp.down_proj"
    assert torch.equal(adapter[f"base_model.model.{key}.ia3_l"], (s1[f"{key}.gain"] * s2[f"{key}.gain"])[None, :])
    check_round_trip(rd, tmp_path / "a", 1, 2)
    export(rd, tmp_path / "b", "--stage", "2")  # stage 2 alone: on the stage-1 model
    check_round_trip(rd, tmp_path / "b", 2, 2)


def test_gain_ffn_on_gpt2_conv1d_with_exp_parametrization(run, tmp_path):
    rd = run("gpt2_gain_ffn_exp")
    export(rd, tmp_path / "a", "--stages", "1..2")
    cfg = config_of(tmp_path / "a")
    assert sorted(cfg["target_modules"]) == ["attn.c_proj", "mlp.c_proj"] and cfg["fan_in_fan_out"] is True
    check_round_trip(rd, tmp_path / "a", 1, 2)


def test_the_documented_example_loads_it_without_gain(run, tmp_path):
    """docs/export.md's five lines, in a process where gain cannot be imported."""
    rd = run("gain_ffn")
    export(rd, tmp_path / "adapter", "--stages", "1..2")
    gain_model(rd, 0).save_pretrained(tmp_path / "base")
    torch.save(IDS, tmp_path / "ids.pt")
    code = f"""
import sys; sys.modules["gain_cli"] = None  # no gain
import torch
from transformers import AutoModelForCausalLM
from peft import PeftModel
base = AutoModelForCausalLM.from_pretrained({str(tmp_path / 'base')!r})
model = PeftModel.from_pretrained(base, {str(tmp_path / 'adapter')!r}).eval()
with torch.no_grad():
    torch.save(model(input_ids=torch.load({str(tmp_path / 'ids.pt')!r})).logits, {str(tmp_path / 'got.pt')!r})
"""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)
    assert res.returncode == 0, res.stderr[-2000:]
    assert (torch.load(tmp_path / "got.pt") - logits(gain_model(rd, 2))).abs().max() <= 1e-5


@pytest.mark.parametrize("name, why", [("imsm", "gated two-model architecture"),
                                       ("full_ft", "use `gain merge`")])
def test_imsm_and_full_ft_say_why_they_cannot_be_exported(run, tmp_path, name, why):
    res = runner.invoke(app, ["export", str(run(name)), "--out", str(tmp_path / "a"), "--stage", "1"])
    assert res.exit_code == 2 and why in " ".join(res.output.split())
    assert len(res.output.strip().splitlines()) <= 3  # one line (wrapped by the console at most)
    assert not (tmp_path / "a").exists()


@pytest.mark.parametrize("name, changes, why", [("l2", {"base": "full_ft"}, "full fine-tuning"),
                                                ("ewc", {}, "full fine-tuning"),
                                                ("imsm", {"backbone": "ia3"}, "two-model")])
def test_penalties_on_full_ft_are_refused_too(name, changes, why):
    from gain_cli.errors import GainError
    from gain_cli.export import adapter_kind
    from tests.tiny_models import tiny_method

    with pytest.raises(GainError, match=why):
        adapter_kind(tiny_method(name, **changes))


@pytest.mark.parametrize("args, why", [
    (["--stage", "3"], "stages are numbered 1..2"),
    (["--stage", "0"], "stages are numbered 1..2"),
    (["--stages", "1..5"], "--stages 1..5: stages are numbered 1..2"),
    (["--stages", "2..1"], "the range is empty"),
    (["--stages", "one"], "give a range A..B"),
    ([], "give --stage K"),
    (["--stage", "1", "--stages", "1..2"], "give --stage K"),
    (["--stage", "1", "--format", "gguf"], "unknown --format 'gguf' (valid: peft)"),
])
def test_bad_input_is_one_line(run, tmp_path, args, why):
    res = runner.invoke(app, ["export", str(run("gain_ffn")), "--out", str(tmp_path / "a"), *args])
    assert res.exit_code == 2 and why in " ".join(res.output.split())
    assert not (tmp_path / "a").exists()


def test_out_never_destroys_a_users_files(run, tmp_path):
    rd = run("gain_ffn")
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("keep")
    res = runner.invoke(app, ["export", str(rd), "--out", str(mine), "--stage", "1"])
    assert res.exit_code == 2 and "--overwrite" in res.output and (mine / "notes.txt").read_text() == "keep"
    assert not list(tmp_path.glob(".*.tmp"))
    out = tmp_path / "adapter"
    for _ in range(2):  # a second export replaces gain's own output
        export(rd, out, "--stage", "1")
    export(rd, mine, "--stage", "1", "--overwrite")
    assert not (mine / "notes.txt").exists() and (mine / "adapter_model.safetensors").is_file()


def test_export_is_listed_and_has_help():
    assert "export" in runner.invoke(app, ["--help"]).output
    res = runner.invoke(app, ["export", "--help"])
    assert res.exit_code == 0 and "--stages" in res.output
    assert "PeftModel.from_pretrained" in " ".join(res.output.split())


@pytest.mark.parametrize("method", ["lora", "gain_ffn"])
def test_a_drift_runs_segment_exports_as_one_adapter_on_the_pretrained_model(method, tmp_path):
    """train.domain_schedule=drift: the state at segment K is the whole run up to K, so --stage K and --stages 1..K
    are the same adapter, on the pretrained model."""
    rd = tmp_path / "drift"
    res = runner.invoke(app, ["run", *FAST, f"method={method}", "train.domain_schedule=drift", f"run_dir={rd}"])
    assert res.exit_code == 0, res.output
    export(rd, tmp_path / "a", "--stages", "1..2")
    check_round_trip(rd, tmp_path / "a", 1, 2)
    export(rd, tmp_path / "b", "--stage", "2")
    check_round_trip(rd, tmp_path / "b", 1, 2)
