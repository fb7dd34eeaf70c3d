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
    assert not (tmp_path / "r").exists()  # refused before the run directory was made


def test_compile_setting_must_be_a_boolean_or_auto(tmp_path):
    res = runner.invoke(app, ["run", "recipe=tiny_8domains", "eval.compile=sometimes", f"run_dir={tmp_path / 'r'}"])
    assert res.exit_code != 0
    assert "eval.compile must be true, false or auto, got 'sometimes'" in res.output


# --- auto: compile when the work ahead pays for the one-off compile -------------------------------------------

def test_auto_is_the_default_everywhere():
    from gain_cli.config import compose_config, recipe_choices

    for recipe in recipe_choices():
        cfg = compose_config([], recipe)
        assert (cfg.train.compile, cfg.eval.compile) == ("auto", "auto"), recipe


def test_auto_compiles_only_when_the_saving_beats_the_compile(monkeypatch):
    monkeypatch.setattr(compiling, "compile_unavailable", lambda device: None)  # a toolchain
    cost = compiling.compile_seconds("train", 30)
    assert cost == 70.0  # 10 s + 2 s per layer: SmolLM2's 30 layers
    # on CPU the lower measured speed-up, 1.08: saved = work × (1 − 1/1.08) = work × 2/27
    short = compiling.decide_compile("auto", "train.compile", 16 * 8 * 1.7, 30, "cpu")  # the demo: 8 × 16 steps
    assert not short.enabled and "would save ~16 s, less than a ~70 s compile" in short.reason
    assert not compiling.decide_compile("auto", "train.compile", 27 / 2 * cost - 1, 30, "cpu").enabled
    assert compiling.decide_compile("auto", "train.compile", 27 / 2 * cost + 1, 30, "cpu").enabled
    # on a GPU 1.25: saved = work / 5; the GPU recipes' 8 × 300 steps at ~1.7 s save ~816 s
    long = compiling.decide_compile("auto", "train.compile", 8 * 300 * 1.7, 30, "cuda")
    assert long.enabled and "saves ~816 s for a one-off ~70 s" in long.reason
    assert not compiling.decide_compile("auto", "train.compile", 5 * cost, 30, "cuda").enabled
    assert compiling.decide_compile("auto", "train.compile", 5 * cost + 1, 30, "cuda").enabled
    # evaluation: 1.10× saves 1/11 of the work, against 5 s + 1.2 s per layer
    assert not compiling.decide_compile("auto", "eval.compile", 11 * 41.0 - 1, 30, "cpu").enabled
    assert compiling.decide_compile("auto", "eval.compile", 11 * 41.0 + 1, 30, "cpu").enabled
    # set by hand: as set, whatever the work
    assert compiling.decide_compile(True, "train.compile", 1.0, 30, "cpu").enabled
    assert not compiling.decide_compile(False, "train.compile", 1e9, 30, "cpu").enabled
    # nothing measured / a run that cannot compile (ZeRO-3): eager
    assert not compiling.decide_compile("auto", "train.compile", None, 30, "cpu").enabled
    refused = compiling.decide_compile("auto", "train.compile", 1e9, 30, "cpu", refused="zero3 trains eager")
    assert not refused.enabled and refused.reason == "auto: zero3 trains eager"


def test_auto_without_a_toolchain_is_eager_with_a_reason(monkeypatch):
    from gain_cli.errors import GainError

    monkeypatch.setattr(compiling.shutil, "which", lambda *_: None)
    d = compiling.decide_compile("auto", "train.compile", 1e9, 30, "cpu")
    assert not d.enabled
    assert d.line("train.compile") == ("train.compile: eager (auto: torch.compile cannot build kernels here: no C++ "
                                       "compiler found (install g++ or set CXX))")
    with pytest.raises(GainError, match="train.compile=true needs torch.compile's C\\+\\+ toolchain"):
        compiling.decide_compile(True, "train.compile", 1.0, 30, "cpu")


def test_a_short_run_logs_its_eager_choice(tmp_path):
    res = runner.invoke(app, ["run", "recipe=tiny_8domains", "domains.sequence=[legal]", "train.steps=2",
                              "eval.max_blocks=2", "eval.harness.enabled=false", f"run_dir={tmp_path / 'r'}"])
    assert res.exit_code == 0, res.output
    out = " ".join(res.output.split())  # the console wraps long lines
    assert "train.compile: eager (auto: ~0 s of training ahead would save ~0 s, less than a ~14 s compile)" in out
    assert "eval.compile: eager (auto: ~0 s of perplexity sweeps ahead would save ~0 s, less than a ~7 s compile)" in out


@needs_toolchain
def test_a_long_run_with_a_toolchain_compiles(tmp_path, monkeypatch):
    """The same run when the compile is (made) cheap: auto compiles, and the matrix is the eager one's."""
    from torch._dynamo.utils import counters

    from gain_cli.reporting.matrices import read_matrix

    args = ["run", "recipe=tiny_8domains", "domains.sequence=[legal]", "train.steps=2", "eval.max_blocks=2",
            "eval.harness.enabled=false"]
    eager = runner.invoke(app, [*args, "train.compile=false", "eval.compile=false", f"run_dir={tmp_path / 'e'}"])
    assert eager.exit_code == 0, eager.output
    monkeypatch.setattr(compiling, "FIXED_SECONDS", {"train": 0.0, "eval": 0.0})
    monkeypatch.setattr(compiling, "PER_LAYER_SECONDS", {"train": 0.0, "eval": 0.0})
    torch._dynamo.reset()
    counters.clear()
    res = runner.invoke(app, [*args, f"run_dir={tmp_path / 'c'}"])
    assert res.exit_code == 0, res.output
    out = " ".join(res.output.split())
    assert "train.compile: compiled (auto: ~" in out and "eval.compile: compiled (auto: ~" in out
    assert counters["stats"]["unique_graphs"] >= 1
    torch._dynamo.reset()
    a, b = read_matrix(tmp_path / "e" / "ppl_matrix.json"), read_matrix(tmp_path / "c" / "ppl_matrix.json")
    assert a.rows == b.rows and a.values.shape == (2, 1)
    assert torch.allclose(torch.tensor(a.values), torch.tensor(b.values), rtol=1e-5)
