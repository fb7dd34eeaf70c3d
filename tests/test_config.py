"""Config composition: every recipe composes (no training), bad input gives one clear GainError."""

import pytest

from gain_cli.config import compose_config, group_choices, recipe_choices, split_recipe
from gain_cli.errors import GainError

GROUPS = ("model", "method", "domains", "train", "eval")


@pytest.mark.parametrize("recipe", recipe_choices())
def test_every_recipe_composes(recipe):
    cfg = compose_config([], recipe)
    assert cfg.recipe == recipe
    for group in GROUPS:
        assert group in cfg, f"{recipe} lacks {group}"
    assert cfg.method.name in group_choices("method")
    # a run recipe adapts to the 8 domains of its set; a study recipe to a shorter sequence of them
    assert len(cfg.domains.sequence) == 8 if cfg.study is None else 2 <= len(cfg.domains.sequence) < 8
    assert int(cfg.train.steps) > 0 and int(cfg.train.seq_len) > 0


@pytest.mark.parametrize("recipe", recipe_choices())
def test_recipe_headed_by_its_command(recipe):
    from gain_cli.config import recipes_dir

    lines = (recipes_dir() / f"{recipe}.yaml").read_text().splitlines()
    assert lines[0] == "# @package _global_"
    assert lines[1].startswith(f"# gain run recipe={recipe}") or lines[1].startswith("# gain study")


@pytest.mark.parametrize("method", group_choices("method"))
def test_every_method_selectable(method):
    cfg = compose_config([f"method={method}"], "tiny_8domains")
    assert cfg.method.name == method
    assert cfg.method.kind


def test_command_line_beats_recipe():
    cfg = compose_config(["method=lora", "train.steps=3", "method.r=4"], "tiny_8domains")
    assert (cfg.method.name, cfg.train.steps, cfg.method.r) == ("lora", 3, 4)


def test_split_recipe():
    assert split_recipe(["recipe=x", "a=1"], "d") == ("x", ["a=1"])
    assert split_recipe(["a=1"], "d") == ("d", ["a=1"])


@pytest.mark.parametrize(
    "overrides, recipe, expected",
    [
        (["method=lorra"], "tiny_8domains", "unknown method 'lorra' (valid: "),
        (["model=gpt5"], "tiny_8domains", "unknown model 'gpt5' (valid: "),
        (["domains=nope"], "tiny_8domains", "unknown domains 'nope' (valid: "),
        (["train.stepz=3"], "tiny_8domains", "unknown config key 'train.stepz'"),
        (["--lr=3"], "tiny_8domains", "unexpected option '--lr=3'"),
        (["steps"], "tiny_8domains", "malformed override 'steps'"),
        ([], "no_such_recipe", "unknown recipe 'no_such_recipe' (valid: "),
    ],
)
def test_bad_input_is_one_clear_line(overrides, recipe, expected):
    with pytest.raises(GainError) as e:
        compose_config(overrides, recipe)
    msg = str(e.value)
    assert expected in msg
    assert "\n" not in msg


def test_unknown_choice_lists_valid_choices():
    with pytest.raises(GainError) as e:
        compose_config(["method=lorra"], "tiny_8domains")
    for m in group_choices("method"):
        assert m in str(e.value)
