"""The figure analyses (tokens, interpolate, combine) on tiny runs, checked against the run's own matrix."""

import json
import math

import pytest
from typer.testing import CliRunner

from gain_cli.cli import app

runner = CliRunner()
FAST = ["recipe=tiny_8domains", "train.steps=10", "eval.max_blocks=6", "eval.harness.enabled=false",
        "domains.sequence=[dna,code,chess]"]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("analysis")
    out = {}
    for m in ("gain_ffn", "lora"):
        rd = root / m
        res = runner.invoke(app, ["run", *FAST, f"method={m}", f"run_dir={rd}"])
        assert res.exit_code == 0, res.output
        out[m] = rd
    return out


def _ppl(rd):
    m = json.loads((rd / "ppl_matrix.json").read_text())
    return m["domains"], m["values"]


def test_token_shift_means_match_the_matrix(runs, tmp_path):
    res = runner.invoke(app, ["report", "tokens", str(runs["gain_ffn"]), str(runs["lora"]), "--out", str(tmp_path)])
    assert res.exit_code == 0, res.output
    assert (tmp_path / "token_shift.png").stat().st_size > 1000
    stats = json.loads((tmp_path / "token_shift.json").read_text())
    assert [s["method"] for s in stats] == ["gain_ffn", "lora"]
    for s in stats:
        domains, vals = _ppl(runs[s["method"]])
        assert s["adapted_on"] == "dna" and s["other_domains"] == ["code", "chess"]
        for d, mean in s["per_domain_mean"].items():
            j = domains.index(d)
            assert mean == pytest.approx(math.log(vals[1][j]) - math.log(vals[0][j]), abs=2e-5)
        assert s["std"] > 0


def test_interpolation_endpoints_are_base_and_adapted(runs, tmp_path):
    res = runner.invoke(app, ["report", "interpolate", str(runs["gain_ffn"]), "--stage", "1", "--points", "3",
                              "--out", str(tmp_path)])
    assert res.exit_code == 0, res.output
    (curve,) = json.loads((tmp_path / "interpolation.json").read_text())
    domains, vals = _ppl(runs["gain_ffn"])
    assert curve["alpha"] == [0.0, 0.5, 1.0]
    assert curve["in_domain_loss"][0] == pytest.approx(math.log(vals[0][0]), abs=2e-5)
    assert curve["in_domain_loss"][-1] == pytest.approx(math.log(vals[1][0]), abs=2e-5)
    cross_end = (math.log(vals[1][1]) + math.log(vals[1][2])) / 2
    assert curve["cross_domain_loss"][-1] == pytest.approx(cross_end, abs=2e-5)


def test_combination_grid_corner_is_the_sequential_model(runs, tmp_path):
    res = runner.invoke(app, ["report", "combine", str(runs["lora"]), "--stages", "1,2", "--out", str(tmp_path)])
    assert res.exit_code == 0, res.output
    grid = json.loads((tmp_path / "combination.json").read_text())
    domains, vals = _ppl(runs["lora"])
    i = grid["grid"].index(1.0)
    z = grid["grid"].index(0.0)
    # θ0 + Δ1 + Δ2 is the model after stage 2; θ0 alone is the base model
    assert grid["loss_b"][i][i] == pytest.approx(math.log(vals[2][1]), abs=2e-5)
    assert grid["cross_domain_loss"][i][i] == pytest.approx(math.log(vals[2][2]), abs=2e-5)
    assert grid["loss_a"][z][z] == pytest.approx(math.log(vals[0][0]), abs=2e-5)
    assert (tmp_path / "combination.png").stat().st_size > 1000


def test_report_kind_errors(runs):
    res = runner.invoke(app, ["report", "combine", str(runs["lora"]), "--stages", "1"])
    assert res.exit_code == 2 and "--stages" in res.output
    res = runner.invoke(app, ["report", "tokens"])
    assert res.exit_code == 2 and "at least one run directory" in res.output
