"""The stage loop across the stages of one process: every stage is prepared by Accelerate afresh (its
mixed-precision autocast included) and leaves the model as it found it; the fp16 loss scaler starts every stage
from its initial state and is part of a mid-stage checkpoint; fp16 on CPU is refused instead of silently ignored."""

import pytest
import torch

from gain_cli.errors import GainError
from tiny_models import tiny_method, tiny_model

BLOCKS = torch.randint(3, 300, (6, 16), generator=torch.Generator().manual_seed(0))
CFG = {"steps": 2, "batch_size": 2, "schedule": "constant"}


@pytest.fixture
def fresh_accelerate_state():
    from accelerate.state import AcceleratorState, GradientState

    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()
    yield
    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()


LR = {"gain_ffn": 1e-2, "full_ft": 1e-4}


@pytest.mark.parametrize("method_name", ["gain_ffn", "full_ft"])
@pytest.mark.parametrize("precision", ["no", "bf16"])
def test_every_stage_of_a_process_trains_under_the_configured_precision(method_name, precision,
                                                                       fresh_accelerate_state):
    """One process, no DDP wrapper: the model object goes from stage to stage (GAIN merges into it, full FT
    trains it in place). Accelerate hands back a model it has prepared before untouched, which dropped the bf16
    autocast from stage 2 on; each stage's forwards must run under the run's precision."""
    from accelerate import Accelerator

    from gain_cli.training.loop import train_stage

    model, method = tiny_model("llama"), tiny_method(method_name, lr=LR[method_name])
    acc = Accelerator(mixed_precision=precision)
    seen: dict[int, list[bool]] = {}
    stage = 0
    model.model.layers[0].mlp.up_proj.register_forward_pre_hook(   # a projection no method replaces
        lambda *_: seen.setdefault(stage, []).append(torch.is_autocast_enabled("cpu")))
    left_on_model = set()
    for stage in (1, 2, 3):
        model = method.attach(model)
        train_stage(model, method, BLOCKS, CFG, seed=0, stage=stage, accelerator=acc)
        model = method.finish_stage(model)
        left_on_model |= {a for a in ("forward", "_original_forward", "_is_accelerate_prepared") if a in model.__dict__}
    assert seen == {k: [precision == "bf16"] * CFG["steps"] for k in (1, 2, 3)}
    assert not left_on_model  # the model is left as it came


def test_fp16_loss_scaler_restarts_every_stage_and_is_checkpointed(tmp_path, fresh_accelerate_state):
    from accelerate import Accelerator

    from gain_cli.training.accelerator import prepared_for_stage
    from gain_cli.training.checkpoint import StageCheckpoints

    acc = Accelerator()
    acc.scaler = torch.amp.GradScaler("cpu", init_scale=8.0, growth_interval=1)  # what fp16 on a GPU sets up
    acc.gain_initial_scaler_state = acc.scaler.state_dict()
    model, method = tiny_model("llama"), tiny_method("gain_ffn", lr=LR["gain_ffn"])
    model = method.attach(model)
    optimizer = torch.optim.AdamW([p for _, p in method.trainable_parameters(model)])
    acc.scaler.scale(torch.ones(()))  # the scaler's lazy start, as in a first backward
    acc.scaler.update(new_scale=2.0 ** 20)  # the scale an earlier stage ended with
    with prepared_for_stage(acc, model, optimizer):
        assert acc.scaler.get_scale() == 8.0
        acc.scaler.update(new_scale=2.0)
        ckpts = StageCheckpoints(tmp_path, every=1)
        ckpts.save(1, method, model, optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, lambda _: 1.0), [1.0],
                   32, acc.scaler)
    assert ckpts.load()["scaler"] == acc.scaler.state_dict()
    assert ckpts.load()["scaler"]["scale"] == 2.0


def test_fp16_on_cpu_is_refused_with_the_valid_choices(fresh_accelerate_state):
    from omegaconf import OmegaConf

    from gain_cli.training.accelerator import make_accelerator

    cfg = OmegaConf.create({"seed": 0, "train": {"mixed_precision": "fp16", "grad_accum": 1}})
    with pytest.raises(GainError, match=r"fp16 needs a GPU.*valid on CPU: no, bf16"):
        make_accelerator(cfg)


def test_one_process_runs_experiments_of_different_precisions_one_after_another(tmp_path):
    """Accelerate's process-wide state refuses a second Accelerator with another mixed precision; `gain demo` or a
    sweep from Python runs several experiments in one process, so each run starts from a fresh state."""
    import json

    from typer.testing import CliRunner

    from gain_cli.cli import app

    losses = {}
    for precision in ("no", "bf16", "no"):
        rd = tmp_path / f"{precision}_{len(losses)}"
        res = CliRunner().invoke(app, ["run", "recipe=tiny_8domains", "domains.sequence=[dna]", "train.steps=3",
                                       "eval.max_blocks=2", "eval.harness.enabled=false",
                                       f"train.mixed_precision={precision}", f"run_dir={rd}"])
        assert res.exit_code == 0, res.output
        losses[rd.name] = json.loads((rd / "stages" / "stage_1" / "metrics.json").read_text())["train"]["losses"]
    assert losses["no_0"] == losses["no_2"]
    assert losses["bf16_1"] != losses["no_0"]  # trained under bf16 autocast, not fp32
