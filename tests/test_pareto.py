"""The forgetting–adaptation Pareto front: front computation and the written report."""

import csv
import json
import math

import pytest

from gain_cli.errors import GainError
from gain_cli.reporting.pareto import differing_settings, pareto_front, pareto_points, plot_pareto, write_pareto
from test_figures import drawn  # noqa: F401  (the fixture: the figures a report saves)


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


def _fake_run(root, name, values, method, extra=()):
    rd = root / name
    rd.mkdir(parents=True)
    domains = ["a", "b", "c"][: len(values[0])]
    rows = ["base"] + [f"stage_{k}:{domains[k - 1]}" for k in range(1, len(values))]
    (rd / "ppl_matrix.json").write_text(json.dumps({"metric": "ppl", "domains": domains, "rows": rows,
                                                    "values": values}))
    lines = ["method:"] + [f"  {k}: {v}" for k, v in method.items()] + ["seed: 0", *extra]
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


def _lora(tmp_path, name, lr, steps, run_name=None, seed_line=()):
    base = [10.0, 20.0, 40.0]
    extra = [f"train:\n  steps: {steps}\n  log_every: 5"] + ([f"run_name: {run_name}"] if run_name else [])
    return _fake_run(tmp_path, name, [base, [8, 21, 41], [9, 15, 42], [10, 15, 30]],
                     {"name": "lora", "kind": "lora", "lr": lr}, extra=[*extra, *seed_line])


def test_runs_of_one_method_are_labelled_by_what_differs(tmp_path, drawn):
    runs = [_lora(tmp_path, "a", 1e-4, 100), _lora(tmp_path, "b", 3e-4, 200), _lora(tmp_path, "c", 3e-4, 100),
            _fake_run(tmp_path, "gain", [[10.0, 20.0, 40.0], [9, 20, 40], [9, 18, 40], [9, 18, 36]],
                      {"name": "gain_ffn", "kind": "gain", "lr": 3e-3, "l2": 0.0})]
    pts = pareto_points(runs)
    assert [p["label"] for p in pts] == ["lora [steps 100, lr 0.0001]", "lora [steps 200, lr 0.0003]",
                                         "lora [steps 100, lr 0.0003]", "gain_ffn"]   # a single run: unchanged
    assert [p["method_label"] for p in pts] == ["lora", "lora", "lora", "gain_ffn"]
    out = write_pareto(runs, tmp_path / "rep")
    legend = [t.get_text() for t in drawn["pareto.png"].axes[0].get_legend().get_texts()]
    assert legend[:4] == [p["label"] for p in pts] and legend[4] == "Pareto front"
    notes = {t.get_text() for t in drawn["pareto.png"].axes[0].texts}
    assert {"steps 100, lr 0.0001", "steps 200, lr 0.0003", "lr 0.003, λ 0"} <= notes
    text = (out / "pareto.md").read_text()
    assert "| a | lora [steps 100, lr 0.0001] |" in text and "| gain | gain_ffn |" in text
    rows = {r["run"].rsplit("/", 1)[-1]: r for r in csv.DictReader((out / "pareto.csv").open())}
    assert rows["b"]["setting"] == "steps 200, lr 0.0003" and rows["gain"]["setting"] == ""
    for ext in ("png", "svg", "pdf"):
        assert (out / f"pareto.{ext}").stat().st_size > 1000, ext


def test_labels_when_configs_do_not_tell_runs_apart(tmp_path):
    # only where the runs went (run_name, a placement key) and how often they logged differ: the directory names
    a, b = _lora(tmp_path, "x1", 1e-4, 100, run_name="x1"), _lora(tmp_path, "x2", 1e-4, 100, run_name="x2")
    assert [p["label"] for p in pareto_points([a, b])] == ["lora [x1]", "lora [x2]"]
    # a setting present in one config only counts as differing; more than four differences are cut short
    cfgs = [{"method": {"name": "l2", "lr": 1e-4}, "seed": 0},
            {"method": {"name": "l2", "lr": 2e-4, "lambda": 10.0}, "seed": 1, "train": {"steps": 5, "seq_len": 64}},
            {"method": {"name": "l2"}, "run_dir": "/elsewhere", "train": {"log_every": 1}}]
    assert differing_settings(cfgs) == ["train.steps", "method.lr", "method.lambda", "seed", "train.seq_len"]
    c = _fake_run(tmp_path, "many", [[10.0, 20.0], [9, 20], [9, 18]], {"name": "lora", "lr": 1e-3, "r": 16},
                  extra=["train:\n  steps: 7\n  seq_len: 32\n  batch_size: 4"])
    d = _fake_run(tmp_path, "few", [[10.0, 20.0], [9, 20], [9, 18]], {"name": "lora", "lr": 1e-4, "r": 8})
    assert [p["label"] for p in pareto_points([c, d])] == [
        "lora [steps 7, lr 0.001, r 16, batch_size 4, +1 more]", "lora [steps unset, lr 0.0001, r 8, batch_size unset, +1 more]"]
