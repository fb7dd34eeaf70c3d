"""The forgetting–adaptation Pareto front: front computation and the written report."""

import csv
import json
import math

import pytest

from gain_cli.errors import GainError
from gain_cli.reporting.pareto import pareto_front, pareto_points, plot_pareto, write_pareto


def test_dominated_point_is_off_the_front():
    # (x = adaptation, higher better; y = forgetting, lower better)
    pts = [(10.0, 5.0), (8.0, 6.0), (12.0, 20.0), (4.0, -1.0)]
    assert pareto_front(pts) == [True, False, True, True]


def test_ties():
    # identical points: neither dominates the other
    assert pareto_front([(5.0, 1.0), (5.0, 1.0)]) == [True, True]
    # same y, smaller x: dominated; same x, larger y: dominated
    assert pareto_front([(5.0, 1.0), (4.0, 1.0), (5.0, 2.0)]) == [True, False, False]
    # a tie with a point that is itself dominated does not save it
    assert pareto_front([(6.0, 0.0), (5.0, 1.0), (5.0, 1.0)]) == [True, False, False]


def test_single_point_empty_and_non_finite():
    assert pareto_front([{"x": 1.0, "y": 2.0}]) == [True]
    assert pareto_front([]) == []
    # NaN y (a one-stage run) is never on the front and dominates nothing
    assert pareto_front([(100.0, math.nan), (1.0, 50.0)]) == [False, True]


def _fake_run(root, name, values, method):
    rd = root / name
    rd.mkdir(parents=True)
    domains = ["a", "b", "c"][: len(values[0])]
    rows = ["base"] + [f"stage_{k}:{domains[k - 1]}" for k in range(1, len(values))]
    (rd / "ppl_matrix.json").write_text(json.dumps({"metric": "ppl", "domains": domains, "rows": rows,
                                                    "values": values}))
    lines = ["method:"] + [f"  {k}: {v}" for k, v in method.items()] + ["seed: 0"]
    (rd / "config.yaml").write_text("\n".join(lines) + "\n")
    return rd


@pytest.fixture
def fake_runs(tmp_path):
    base = [10.0, 20.0, 40.0]
    return [
        # in-domain: 10→8 (-20%), 20→15 (-25%), 40→30 (-25%) → x = 23.33; earlier: a 8→10 (+25%), b 15→15 (0) → y = 12.5
        _fake_run(tmp_path, "lora_lr1", [base, [8, 21, 41], [9, 15, 42], [10, 15, 30]],
                  {"name": "lora", "kind": "lora", "lr": 1e-4}),
        # x = mean(10, 10, 10) = 10; earlier: a 9→9, b 18→18 → y = 0
        _fake_run(tmp_path, "gain", [base, [9, 20, 40], [9, 18, 40], [9, 18, 36]],
                  {"name": "gain_ffn", "kind": "gain", "lr": 3e-3, "l2": 0.0}),
        # dominated by gain: x = 5, y = +10
        _fake_run(tmp_path, "ewc_lam1", [base, [9.5, 20, 40], [9.5, 19, 40], [10.45, 20.9, 38]],
                  {"name": "ewc", "kind": "ewc", "base": "full_ft", "lr": 2e-5, "lambda": 1000.0}),
        # one stage only: y undefined
        _fake_run(tmp_path, "l2_partial", [base, [5, 20, 40]],
                  {"name": "l2", "kind": "l2", "base": "lora", "lr": 2e-4, "lambda": 0.5}),
    ]


def test_points_from_run_dirs(fake_runs):
    pts = pareto_points(fake_runs)
    lora, gain, ewc, l2 = pts
    assert lora["x"] == pytest.approx(100 * (0.2 + 0.25 + 0.25) / 3)
    assert lora["y"] == pytest.approx(12.5)
    assert gain["x"] == pytest.approx(10.0) and gain["y"] == pytest.approx(0.0)
    assert gain["lambda"] == 0.0 and gain["lr"] == 3e-3 and gain["label"] == "gain_ffn"
    assert ewc["x"] == pytest.approx(5.0) and ewc["y"] == pytest.approx(10.0)
    assert ewc["label"] == "ewc (full_ft)" and ewc["lambda"] == 1000.0
    assert l2["stages"] == 1 and math.isnan(l2["y"]) and l2["x"] == pytest.approx(50.0)
    assert pareto_front(pts) == [True, True, False, False]


def test_write_pareto_files(fake_runs, tmp_path):
    out = write_pareto(fake_runs, tmp_path / "report")
    png, md, cs = out / "pareto.png", out / "pareto.md", out / "pareto.csv"
    assert png.stat().st_size > 1000 and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    text = md.read_text()
    assert "| lora_lr1 | lora |" in text and "ewc (full_ft)" in text and "★" in text
    rows = list(csv.DictReader(cs.open()))
    assert len(rows) == 4
    on_front = {r["run"].rsplit("/", 1)[-1]: r["on_front"] for r in rows}
    assert on_front == {"lora_lr1": "true", "gain": "true", "ewc_lam1": "false", "l2_partial": "false"}
    assert not list(out.glob("*.tmp")) and not list(out.glob(".*.tmp"))
    assert "not directly comparable" in text  # the one-stage run differs from the others


def test_write_pareto_skips_unusable_dirs_and_cli(fake_runs, tmp_path):
    from typer.testing import CliRunner

    from gain_cli.cli import app

    crashed = tmp_path / "crashed"
    crashed.mkdir()
    out = write_pareto([*fake_runs[:3], crashed], tmp_path / "r1")
    text = (out / "pareto.md").read_text()
    assert "Skipped" in text and "crashed" in text and "not directly comparable" not in text
    with pytest.raises(GainError, match="no ppl_matrix.json"):
        write_pareto([fake_runs[0], crashed], tmp_path / "r2", skip_invalid=False)
    with pytest.raises(GainError, match="no usable run"):
        write_pareto([crashed], tmp_path / "r3")
    res = CliRunner().invoke(app, ["report", "pareto", *map(str, fake_runs[:3]), "--out", str(tmp_path / "r4")])
    assert res.exit_code == 0, res.output
    assert (tmp_path / "r4" / "pareto.png").is_file() and (tmp_path / "r4" / "pareto.csv").is_file()


def test_plot_single_point(tmp_path, fake_runs):
    pts = pareto_points(fake_runs[:1])
    assert plot_pareto(pts, tmp_path / "one.png").stat().st_size > 1000


def test_bad_run_dirs(tmp_path):
    with pytest.raises(GainError, match="no ppl_matrix.json"):
        pareto_points([tmp_path])
    rd = _fake_run(tmp_path, "base_only", [[10.0, 20.0]], {"name": "lora", "lr": 1e-4})
    with pytest.raises(GainError, match="no finished stage"):
        pareto_points([rd])
    with pytest.raises(GainError, match="no run directories"):
        pareto_points([])
