"""train.compile / eval.compile: the compiled forward gives the eager results, and a machine that cannot build
kernels gets one line naming what is missing."""

import pytest
import torch
from typer.testing import CliRunner

from gain_cli.cli import app
from gain_cli.models import compiling
from tiny_models import tiny_method, tiny_model

runner = CliRunner()
WHY = compiling.compile_unavailable("cpu")
needs_toolchain = pytest.mark.skipif(WHY is not None, reason=f"torch.compile cannot build CPU kernels here: {WHY}")


def _gain_model():
    method = tiny_method("gain_ffn", lr=1e-2)
    return method.attach(tiny_model("llama")), method


@needs_toolchain
def test_compiled_stage_trains_like_eager():
    from accelerate import Accelerator

    from gain_cli.training.loop import train_stage

    blocks = torch.randint(3, 300, (6, 16), generator=torch.Generator().manual_seed(0))
    cfg = {"steps": 3, "batch_size": 2, "schedule": "constant"}
    from torch._dynamo.utils import counters

    torch._dynamo.reset()  # no compiled code left over from other tests
    counters.clear()
    runs = {}
    for compiled in (False, True):
        model, method = _gain_model()
        stats = train_stage(model, method, blocks, {**cfg, "compile": compiled}, seed=0, stage=1,
                            accelerator=Accelerator())
        runs[compiled] = (stats.losses, method.state_dict(model))
    assert counters["stats"]["unique_graphs"] >= 1  # the compiled run did compile
    assert runs[True][0] == pytest.approx(runs[False][0], rel=1e-5)
    assert runs[False][0][-1] != runs[False][0][0]  # it trained
    for key, value in runs[False][1].items():
        torch.testing.assert_close(runs[True][1][key], value, rtol=1e-5, atol=1e-6)


@needs_toolchain
def test_compiled_sweep_pads_the_short_last_batch_and_scores_like_eager():
    from gain_cli.evaluation.perplexity import evaluate_blocks

    from torch._dynamo.utils import counters

    def graphs_compiled(blocks) -> tuple[int, object]:
        torch._dynamo.reset()
        counters.clear()
        res = evaluate_blocks(model, blocks, 3, compile=True)
        return counters["stats"]["unique_graphs"], res

    model = tiny_model("llama")
    blocks = torch.randint(3, 300, (7, 16), generator=torch.Generator().manual_seed(1))  # batches of 3, 3, 1
    eager = evaluate_blocks(model, blocks, 3)
    n7, compiled = graphs_compiled(blocks)
    n6, _ = graphs_compiled(blocks[:6])
    assert n7 == n6 >= 1  # compiled, and the short last batch cost no second compile
    assert compiled.tokens == eager.tokens == 7 * 15
    assert compiled.nll_sum == pytest.approx(eager.nll_sum, rel=1e-5)


def test_missing_compiler_is_one_line_before_any_work(monkeypatch, tmp_path):
    monkeypatch.setattr(compiling.shutil, "which", lambda *_: None)
    assert "no C++ compiler" in compiling.compile_unavailable("cpu")
    assert compiling.compile_unavailable("cuda") is None  # GPU kernels need no host compiler
    res = runner.invoke(app, ["run", "recipe=tiny_8domains", "train.compile=true", f"run_dir={tmp_path / 'r'}"])
    assert res.exit_code != 0
    assert "train.compile=true needs torch.compile's C++ toolchain on CPU: no C++ compiler found" in res.output
    assert "Traceback" not in res.output
    assert not (tmp_path / "r" / "rows").exists()  # nothing was evaluated or trained


def test_compile_setting_must_be_a_boolean(tmp_path):
    res = runner.invoke(app, ["run", "recipe=tiny_8domains", "eval.compile=sometimes", f"run_dir={tmp_path / 'r'}"])
    assert res.exit_code != 0
    assert "eval.compile must be true or false, got 'sometimes'" in res.output
