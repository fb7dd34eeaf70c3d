"""train.log_with: Accelerate's trackers fed by a run (TensorBoard offline, read back with TensorBoard's reader)."""

import pytest
from typer.testing import CliRunner

from gain_cli.cli import app

runner = CliRunner()
RUN = ["run", "recipe=tiny_8domains", "method=gain_ffn", "domains.sequence=[dna,code]", "train.steps=6",
       "train.log_every=2", "eval.max_blocks=2", "eval.harness.enabled=false"]


def test_a_tiny_run_writes_tensorboard_events_with_losses_and_perplexities(tmp_path):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    rd = tmp_path / "run"
    res = runner.invoke(app, [*RUN, "train.log_with=tensorboard", f"run_dir={rd}"])
    assert res.exit_code == 0, res.output
    events = list((rd / "trackers").rglob("events.out.tfevents.*"))
    assert events, list((rd / "trackers").rglob("*"))
    scalars = {}
    for ev in events:
        acc = EventAccumulator(str(ev.parent))
        acc.Reload()
        for tag in acc.Tags()["scalars"]:
            scalars[tag] = [(e.step, e.value) for e in acc.Scalars(tag)]
    # training: every log_every=2 steps of both stages, on one axis of global steps
    assert [s for s, _ in scalars["train/loss"]] == [2, 4, 6, 8, 10, 12]
    import json

    logged = [json.loads(line) for line in (rd / "train_log.jsonl").read_text().splitlines()]
    assert [v for _, v in scalars["train/loss"]] == pytest.approx([r["loss"] for r in logged], rel=1e-6)  # float32
    # rows: row 0 at step 0, stage K at K·steps, the values of the perplexity matrix
    matrix = json.loads((rd / "ppl_matrix.json").read_text())["values"]
    assert [s for s, _ in scalars["ppl/dna"]] == [0, 6, 12]
    assert [v for _, v in scalars["ppl/code"]] == pytest.approx([row[1] for row in matrix], rel=1e-6)
    assert [s for s, _ in scalars["ppl/own"]] == [6, 12]


def test_tracker_choice_is_checked_before_any_work_and_may_change_on_resume(tmp_path):
    rd = tmp_path / "run"
    res = runner.invoke(app, [*RUN, "train.log_with=tensorbored", f"run_dir={rd}"])
    assert res.exit_code == 2 and "unknown train.log_with 'tensorbored' (valid: null, tensorboard, wandb" in res.output
    assert not rd.exists()
    from gain_cli.config import compose_config, config_hash

    a = compose_config(["train.log_with=tensorboard"], "tiny_8domains")
    assert config_hash(a) == config_hash(compose_config([], "tiny_8domains"))  # where results are logged, not what
