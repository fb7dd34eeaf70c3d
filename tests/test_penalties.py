"""Penalties any method carries (method.penalty): L2 and EWC on GAIN, with exact values, state round trips, the
config route and a whole tiny run."""

import json

import pytest
import torch
from safetensors.torch import load_file
from typer.testing import CliRunner

from gain_cli.architectures import ARCHITECTURES
from gain_cli.cli import app
from gain_cli.config import compose_config
from gain_cli.errors import GainError
from gain_cli.io import atomic_save_safetensors
from gain_cli.methods import build_method
from gain_cli.methods.penalties import EwcPenalty, L2Penalty, Penalized
from test_baselines import ctx, tiny_model, val

SPEC = ARCHITECTURES["llama"]
GAIN = {"name": "gain_ffn", "kind": "gain", "modules": ["attn", "ffn"], "parametrization": "plain", "l2": 0.0,
        "lr": 3e-3}


def gain_with(penalty):
    return build_method({**GAIN, "penalty": penalty}, SPEC)


def gains(m, model):
    return dict(m.trainable_parameters(model))


def shift(m, model, scale, seed=1):
    """Move every gain vector by a seeded random amount; returns the moves by name."""
    g = torch.Generator().manual_seed(seed)
    moves = {}
    with torch.no_grad():
        for n, p in gains(m, model).items():
            moves[n] = torch.randn(p.shape, generator=g) * scale
            p.add_(moves[n])
    return moves


def test_l2_on_gain_is_the_squared_move_of_the_gains(tmp_path):
    m = gain_with({"name": "l2", "lambda": 0.5})
    assert isinstance(m, Penalized) and isinstance(m.penalty, L2Penalty) and m.kind == "gain"
    model = m.attach(tiny_model())
    assert len(gains(m, model)) == 4  # 2 layers × (attn, ffn)
    assert val(m.regularization(model)) == 0.0
    moves = shift(m, model, 0.03)
    want = 0.5 * sum(float((d.double() ** 2).sum()) for d in moves.values())
    assert val(m.regularization(model)) == pytest.approx(want, rel=1e-5)
    state = load_file(str(atomic_save_safetensors(tmp_path / "s.safetensors", m.state_dict(model))))
    anchors = {k for k in state if k.startswith("l2_anchor/")}
    assert anchors == {f"l2_anchor/{n}" for n in gains(m, model)}
    assert all(torch.equal(state[f"l2_anchor/{n}"], torch.ones_like(p)) for n, p in gains(m, model).items())

    m2 = gain_with({"name": "l2", "lambda": 0.5})
    fresh = m2.attach(tiny_model())
    m2.load_state_dict(fresh, state)
    assert val(m2.regularization(fresh)) == pytest.approx(val(m.regularization(model)), rel=1e-6)
    merged = m.merge(model)
    assert not any(".gain" in n for n, _ in merged.named_parameters())


def test_ewc_on_gain_weighs_the_moves_of_the_gains_by_their_fisher(tmp_path):
    m = gain_with("ewc")
    assert isinstance(m.penalty, EwcPenalty) and m.lam == 1.0e6  # the penalty's documented default
    model = m.attach(tiny_model())
    assert m.regularization(model) is None  # stage 1: no Fisher yet
    shift(m, model, 0.02)
    m.after_training(model, ctx(1))
    assert set(m.penalty.fisher) == set(gains(m, model)) and m.penalty.n_domains == 1
    assert sum(float(f.sum()) for f in m.penalty.fisher.values()) > 0
    assert m.stage_info()["ewc"]["fisher_domains"] == 1

    model = m.attach(m.finish_stage(model))  # stage 2 starts from the merged model, gains at ones again
    assert all(torch.equal(p, torch.ones_like(p)) for p in gains(m, model).values())
    assert val(m.regularization(model)) == 0.0
    moves = shift(m, model, 0.01, seed=2)
    want = 0.5 * 1e6 * sum(float((m.penalty.fisher[n].double() * d.double() ** 2).sum()) for n, d in moves.items())
    assert val(m.regularization(model)) == pytest.approx(want, rel=1e-5)

    state = m.state_dict(model)
    assert int(state["ewc_meta/domains"][0]) == 1 and any(k.startswith("ewc_anchor/") for k in state)
    m2 = gain_with("ewc")
    fresh = m2.attach(m.finish_stage(m.attach(tiny_model())))
    m2.load_state_dict(fresh, {k: v.clone() for k, v in state.items()})
    assert all(torch.equal(m.penalty.fisher[k], m2.penalty.fisher[k]) for k in m.penalty.fisher)


def test_penalty_config_route_and_refusals():
    cfg = compose_config(["method=gain_ffn", "method.penalty=ewc"], "tiny_8domains")
    m = build_method(dict(cfg.method), SPEC)
    assert isinstance(m.penalty, EwcPenalty) and m.penalty.fisher_batches == 4
    cfg = compose_config(["method=gain_ffn", "method.penalty={name:l2,lambda:0.25}"], "tiny_8domains")
    assert build_method(dict(cfg.method), SPEC).lam == 0.25
    plain = compose_config(["method=gain_ffn"], "tiny_8domains")
    assert plain.method.penalty is None and not isinstance(build_method(dict(plain.method), SPEC), Penalized)
    with pytest.raises(GainError, match="method.penalty.*'l1'.*ewc.*l2"):
        gain_with("l1")
    with pytest.raises(GainError, match="cannot train sharded"):
        gain_with({"name": "l2", "lambda": 1.0}).check_shardable()
    gain_with({"name": "l2", "lambda": 0.0}).check_shardable()  # no pull: plain GAIN, shardable
    with pytest.raises(GainError, match="drift cannot run method 'gain_ffn'.*stage boundaries"):
        compose_config(["method=gain_ffn", "method.penalty=l2", "train.domain_schedule=drift"], "tiny_8domains")


def test_a_run_of_gain_with_ewc(tmp_path):
    rd = tmp_path / "gain_ewc"
    res = CliRunner().invoke(app, ["run", "recipe=tiny_8domains", "train.steps=8", "eval.max_blocks=4",
                                   "eval.harness.enabled=false", "method=gain_ffn",
                                   "method.penalty={name:ewc,lambda:1.0e6,fisher_batches:2}",
                                   f"run_dir={rd}", "domains.sequence=[dna,code]"])
    assert res.exit_code == 0, res.output
    info = json.loads((rd / "stages" / "stage_2" / "train.json").read_text())["method_info"]["ewc"]
    assert info["fisher_domains"] == 2 and info["fisher_batches"] == 2 and info["base"] == "gain"
    assert info["final_penalty"] > 0  # stage 2 trained against stage 1's Fisher
    state = load_file(str(rd / "stages" / "stage_2" / "method_state.safetensors"))
    assert any(k.startswith("ewc_fisher/") for k in state) and any(k.endswith(".gain") for k in state)
    res = CliRunner().invoke(app, ["export", str(rd), "--out", str(tmp_path / "adapter"), "--stage", "2"])
    assert res.exit_code == 0, res.output


def test_the_pareto_table_names_a_runs_penalty_and_its_strength():
    from gain_cli.reporting.pareto import _penalty, method_label

    assert method_label({"name": "gain_ffn", "penalty": {"name": "ewc", "lambda": 5.0}}) == "gain_ffn + ewc"
    assert _penalty({"name": "gain_ffn", "penalty": {"name": "ewc", "lambda": 5.0}}) == ("ewc", 5.0)
    assert _penalty({"name": "gain_ffn", "penalty": "l2"}) == ("l2", None)
    assert method_label({"name": "l2", "base": "lora", "lambda": 10.0, "penalty": None}) == "l2 (lora)"
    assert _penalty({"name": "l2", "base": "lora", "lambda": 10.0, "penalty": None}) == (None, 10.0)


def test_an_unknown_penalty_is_one_line_before_any_run(tmp_path):
    rd = tmp_path / "never"
    res = CliRunner().invoke(app, ["run", "recipe=tiny_8domains", "method=gain_ffn", "method.penalty=bogus",
                                   f"run_dir={rd}"])
    assert res.exit_code == 2 and "Traceback" not in res.output
    assert "unknown method.penalty 'bogus' (valid: ewc, l2)" in res.output and not rd.exists()
