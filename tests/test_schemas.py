"""The typed config sections (gain_cli/schemas): every shipped config reads through them, bad values are one line
naming the key, defaults fill what a group leaves out, and `gain info keys|method` prints the fields."""

from __future__ import annotations

import dataclasses

import pytest
from omegaconf import OmegaConf
from typer.testing import CliRunner

from gain_cli.cli import app
from gain_cli.config import compose_config, config_hash, configs_dir, group_choices, load_saved_config
from gain_cli.errors import GainError
from gain_cli.methods import METHOD_KINDS, build_method, method_config
from gain_cli.methods.base import MethodConfig
from gain_cli.methods.gain import GainConfig
from gain_cli.methods.lora import LoraConfig
from gain_cli.methods.penalties import EwcPenaltyConfig
from gain_cli.schemas import GROUPS, HarnessConfig, RunConfig, TrainConfig
from gain_cli.schemas.typed import Section, section, setting

runner = CliRunner()


@pytest.mark.parametrize("group", list(GROUPS))
def test_every_shipped_group_config_reads_through_its_section(group):
    """Each YAML of the group, composed, is its section exactly: no key the section lacks, every value typed."""
    for name in group_choices(group):
        cfg = compose_config([f"{group}={name}"], None)
        typed = GROUPS[group].of(cfg[group])
        assert typed.to_dict() == OmegaConf.to_container(cfg[group]), (group, name)


def test_every_method_config_reads_through_its_kinds_class():
    for name in group_choices("method"):
        cfg = compose_config([f"method={name}"], None)
        typed = method_config(cfg.method)
        assert isinstance(typed, METHOD_KINDS[typed.kind].config) and typed.name == name
        assert typed.to_dict() == OmegaConf.to_container(cfg.method)


def test_every_method_kind_has_a_documented_config_class():
    for kind, cls in METHOD_KINDS.items():
        assert issubclass(cls.config, MethodConfig), kind
        for f in dataclasses.fields(cls.config):
            assert f.metadata.get("help"), f"{kind}: method.{f.metadata.get('key') or f.name} has no help"


@pytest.mark.parametrize("cls", [*GROUPS.values(), RunConfig, HarnessConfig])
def test_every_group_field_has_help(cls):
    for f in dataclasses.fields(cls):
        assert f.metadata.get("help"), f"{cls.prefix}.{f.name} has no help"


def test_defaults_fill_what_a_group_leaves_out():
    """The train YAMLs no longer list compile / drift settings: the section's defaults are in the composed config
    (and an override of such a key needs no +)."""
    cfg = compose_config(["train.drift_overlap=0.25"], "tiny_8domains")
    assert cfg.train.compile == "auto" and cfg.train.domain_schedule == "stages" and cfg.train.drift_overlap == 0.25
    assert cfg.train.sharding == "none" and cfg.train.threads is None
    assert "compile" not in OmegaConf.load(configs_dir() / "train" / "tiny.yaml")


def test_a_partial_section_takes_its_defaults_and_keeps_its_values():
    t = TrainConfig.of({"steps": 3})
    assert (t.steps, t.grad_accum, t.schedule, t.max_grad_norm) == (3, 1, "cosine", None)
    assert TrainConfig.of(t) is t
    lora = method_config({"kind": "lora", "r": 4})
    assert (lora.name, lora.r, lora.alpha, lora.lr) == ("lora", 4, 16, 2.0e-4)


@pytest.mark.parametrize("make, needle", [
    (lambda: TrainConfig.of({"steps": "ten"}), "train.steps must be an integer, got 'ten'"),
    (lambda: TrainConfig.of({"steps": True}), "train.steps must be an integer, got True"),
    (lambda: TrainConfig.of({"steps": 0}), "train.steps must be at least 1, got 0"),
    (lambda: TrainConfig.of({"stepz": 3}), "unknown train key 'stepz' (valid: batch_size, checkpoint_every"),
    (lambda: TrainConfig.of({"schedule": "cosin"}), "unknown train.schedule 'cosin' (valid: constant, cosine, linear)"),
    (lambda: TrainConfig.of({"warmup_ratio": None}), "train.warmup_ratio must be a number, got null"),
    (lambda: method_config({"kind": "lora", "alpha": 0}), "method.alpha must be a finite number > 0"),
    (lambda: method_config({"kind": "gain", "carry": "fold"}), "unknown method.carry 'fold' (valid: auto, merge"),
    (lambda: method_config({"kind": "gain", "r": 8}), "unknown method key 'r'"),
    (lambda: method_config({"kind": "ewc", "lambda": -1.0}), "method.lambda must be a finite number >= 0, got -1.0"),
    (lambda: EwcPenaltyConfig.of({"fisher_batches": 0}), "method.penalty.fisher_batches must be >= 1, got 0"),
])
def test_bad_values_are_one_line_naming_the_key(make, needle):
    with pytest.raises(GainError) as info:
        make()
    assert needle in str(info.value) and "\n" not in str(info.value)


def test_the_penalty_strength_keeps_its_yaml_name():
    """``lambda`` is not a Python name: the field is ``strength`` and every config, recipe and saved run says
    ``lambda``."""
    ewc = method_config({"kind": "ewc", "base": "lora", "lambda": 5.0})
    assert ewc.strength == 5.0 and ewc.to_dict()["lambda"] == 5.0 and "strength" not in ewc.to_dict()


def test_post_init_checks_several_fields():
    with pytest.raises(GainError, match=r"launcher.num_processes \(3\) must be a multiple of launcher.num_machines"):
        compose_config(["launcher.num_processes=3", "launcher.num_machines=2"], None)


def test_a_new_section_needs_only_fields():
    @section("demo")
    class Demo(Section):
        n: int = setting(2, "how many")
        tags: list[str] = setting(["a"], "names")

    a, b = Demo.of({}), Demo.of({})
    a.tags.append("b")
    assert b.tags == ["a"]  # list defaults are copied per instance
    assert Demo.describe() == [("demo.n", "integer", "2", "how many"), ("demo.tags", "list of strings", "[a]", "names")]
    with pytest.raises(GainError, match="demo.tags must be a list of strings, got"):
        Demo.of({"tags": [1]})


def test_a_saved_config_without_newer_keys_reads_with_their_defaults(tmp_path):
    cfg = compose_config(["method=lora"], "tiny_8domains")
    old = OmegaConf.to_container(cfg)
    del old["train"]["compile"], old["eval"]["harness"]["save_samples"], old["method"]["penalty"]
    path = tmp_path / "config.yaml"
    path.write_text(OmegaConf.to_yaml(OmegaConf.create(old)))
    loaded = load_saved_config(path)
    assert loaded.train.compile == "auto" and loaded.eval.harness.save_samples is False
    assert config_hash(OmegaConf.create(old)) == config_hash(cfg)


def test_build_method_takes_a_dict_a_dictconfig_or_a_typed_config():
    from gain_cli.architectures import arch_for

    spec = arch_for("llama")
    cfg = compose_config(["method=gain_attn"], None).method
    for given in (cfg, OmegaConf.to_container(cfg), method_config(cfg)):
        m = build_method(given, spec)
        assert isinstance(m.cfg, GainConfig) and m.cfg.modules == ["attn"] and m.name == "gain_attn"
    assert isinstance(build_method({"kind": "dora"}, spec).cfg, LoraConfig)


def test_info_keys_and_method_print_the_fields():
    res = runner.invoke(app, ["info", "keys", "train"], env={"COLUMNS": "200"})
    assert res.exit_code == 0, res.output
    assert "train.grad_accum" in res.output and "micro-batches per optimiser step" in res.output
    res = runner.invoke(app, ["info", "method", "gain_attn"], env={"COLUMNS": "200"})
    assert res.exit_code == 0, res.output
    assert "method.carry" in res.output and "[attn]" in res.output and "GainConfig" in res.output
    res = runner.invoke(app, ["info", "method", "lorra"])
    assert res.exit_code == 2 and "unknown method 'lorra' (valid: " in res.output
    res = runner.invoke(app, ["info", "keys", "trian"])
    assert res.exit_code == 2 and "unknown config group 'trian'" in res.output
    res = runner.invoke(app, ["info", "keys"], env={"COLUMNS": "200"})
    assert res.exit_code == 0 and "launcher.num_processes" in res.output and "model.hf_config" in res.output
