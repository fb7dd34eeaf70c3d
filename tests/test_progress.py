"""Progress: one line per phase outside a terminal, a bar on one, and a time left that includes lm-eval."""

import io
import re

import pytest
from rich.console import Console
from typer.testing import CliRunner

from gain_cli.cli import app
from gain_cli.progress import Phase, RunClock


def test_a_phase_ends_with_one_line_outside_a_terminal_and_draws_a_bar_on_one():
    out = io.StringIO()
    with Phase(Console(file=out, force_terminal=False, width=200), "stage 1/2 dna · train", 4, "steps", loss="-") as ph:
        for step in range(1, 5):
            ph.update(step, loss=f"{1.0 / step:.3f}")
    assert out.getvalue().splitlines() == [f"stage 1/2 dna · train: 4 steps in {ph.seconds:.1f} s (loss 0.250)"]
    tty = io.StringIO()
    with Phase(Console(file=tty, force_terminal=True, width=120), "row 0 · perplexity", 3, "domains",
               overall=("run · 0/3 rows", 0, 3)) as ph:
        ph.update(advance=3)
    assert "row 0 · perplexity" in tty.getvalue() and "run · 0/3 rows" in tty.getvalue()


def test_time_left_uses_the_measured_costs_lm_eval_included():
    clock = RunClock(steps_per_stage=10, step_guess=0.5, sweep_guess=2.0)
    assert clock.seconds_left(stages_left=2, rows_left=3, harness=True) is None  # lm-eval not measured yet
    assert clock.seconds_left(stages_left=2, rows_left=3, harness=False) == pytest.approx(2 * 10 * 0.5 + 3 * 2.0)
    clock.record("perplexity", 1.0)
    clock.record("lm-eval", 4.0)
    clock.record("train", 3.0, steps=10)  # 0.3 s per step replaces the guess
    assert clock.seconds_left(stages_left=2, rows_left=2, harness=True) == pytest.approx(2 * 10 * 0.3 + 2 * (1.0 + 4.0))
    assert clock.eta(3, 3, 0, True) == "3/3 rows · done"


def test_a_run_logs_every_phase_and_its_time_left(tmp_path):
    res = CliRunner().invoke(app, ["run", "recipe=tiny_8domains", "domains.sequence=[dna,code]", "train.steps=4",
                                   "eval.max_blocks=2", "eval.harness.limit=4", f"run_dir={tmp_path / 'r'}"])
    assert res.exit_code == 0, res.output
    lines = [" ".join(ln.split()) for ln in res.output.splitlines()]
    for phase in ("row 0 (base model) · perplexity: 2 domains in", "row 0 (base model) · lm-eval (boolq):",
                  "stage 1/2 dna · train: 4 steps in", "stage 2/2 code · perplexity: 2 domains in",
                  "stage 2/2 code · lm-eval (boolq):"):
        assert sum(ln.startswith(phase) for ln in lines) == 1, phase
    text = " ".join(lines)
    assert re.search(r"run: 1/3 rows · [\d.]+ min · ~[\d.]+ min left \(perplexity [\d.]+ s/row, lm-eval [\d.]+ s/row", text)
    assert re.search(r"run: 3/3 rows · [\d.]+ min · done \(train [\d.]+ s/step", text)
