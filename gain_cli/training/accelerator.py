"""The Accelerator of a run, and the check that Accelerate sees the processes that were launched."""

from __future__ import annotations

import os
from contextlib import contextmanager

from gain_cli.errors import GainError

MIXED_PRECISION = ("no", "bf16", "fp16")
SHARDED_UNSUPPORTED = (
    "sharded training (FSDP / DeepSpeed ZeRO-3) is not supported by gain's stage loop yet: saving the method's "
    "state, merging it into the weights and the per-process evaluation assume every process holds the whole "
    "model; use data parallel (launcher.accelerate_config=ddp or null) — see the README section Running at scale"
)


def sharded_requested(acc=None) -> bool:
    """True when the launch asks for FSDP or DeepSpeed (on CPU Accelerate silently falls back to DDP)."""
    env = any(os.environ.get(v, "").lower() in ("1", "true") for v in ("ACCELERATE_USE_FSDP", "ACCELERATE_USE_DEEPSPEED"))
    return env or (acc is not None and str(getattr(acc, "distributed_type", "")).split(".")[-1] in ("FSDP", "DEEPSPEED"))


def make_accelerator(cfg):
    from accelerate import Accelerator
    from accelerate.utils import set_seed

    mp = str(cfg.train.get("mixed_precision", "no"))
    if mp not in MIXED_PRECISION:
        raise GainError(f"unknown train.mixed_precision '{mp}' (valid: {', '.join(MIXED_PRECISION)})")
    # Accelerate keeps its settings in a process-wide state that refuses a second, different mixed precision; a
    # process may run several experiments (`gain demo`, a sweep from Python), so each starts from a fresh one, as
    # the HF TrainingArguments do. The process group (PartialState) is kept.
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(reset_partial_state=False)
    acc = Accelerator(gradient_accumulation_steps=int(cfg.train.get("grad_accum", 1)), mixed_precision=mp)
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if acc.num_processes != world:
        raise GainError(
            f"Accelerate sees {acc.num_processes} process(es) but WORLD_SIZE={world}: the launch is inconsistent "
            "(on CPU use `ACCELERATE_USE_CPU=1 accelerate launch --multi_gpu --num_processes N`, or "
            "`ACCELERATE_USE_CPU=1 torchrun --nproc_per_node N`: without ACCELERATE_USE_CPU=1 every CPU process is alone)"
        )
    if sharded_requested(acc):
        raise GainError(SHARDED_UNSUPPORTED)
    if mp == "fp16" and acc.device.type == "cpu":
        raise GainError("train.mixed_precision=fp16 needs a GPU: on CPU Accelerate has no fp16 autocast and would "
                        "silently train in fp32 (valid on CPU: no, bf16)")
    # the fp16 loss scaler's state before any step: every stage starts from it (prepared_for_stage)
    acc.gain_initial_scaler_state = acc.scaler.state_dict() if acc.scaler is not None else None
    set_seed(int(cfg.seed))
    return acc


# what accelerator.prepare() sets on a model that it does not wrap (one process: no DDP wrapper)
_PREPARE_ATTRIBUTES = ("forward", "_original_forward", "_is_accelerate_prepared")


@contextmanager
def prepared_for_stage(accelerator, model, optimizer):
    """``accelerator.prepare(model, optimizer)`` for one training stage, undone on exit.

    Accelerate marks a model it has prepared and hands it back untouched when it is asked again, so with one process
    (no DDP wrapper in between) every stage after the first would train without the mixed-precision autocast; and
    its ``unwrap_model(keep_fp32_wrapper=False)`` strips the model class's own forward decorators too. Here the
    attributes ``prepare`` set on the model are put back as they were, so each stage prepares the same model afresh.
    The fp16 loss scaler (GPU only) starts every stage from its initial state, like the optimiser.
    """
    saved = {k: model.__dict__[k] for k in _PREPARE_ATTRIBUTES if k in model.__dict__}
    initial_scaler_state = getattr(accelerator, "gain_initial_scaler_state", None)  # set by make_accelerator
    if accelerator.scaler is not None and initial_scaler_state is not None:
        accelerator.scaler.load_state_dict(initial_scaler_state)
    pmodel, optimizer = accelerator.prepare(model, optimizer)
    try:
        yield pmodel, optimizer
    finally:
        for k in _PREPARE_ATTRIBUTES:
            model.__dict__.pop(k, None)
        model.__dict__.update(saved)
        accelerator.free_memory()  # drops the accelerator's references to this stage's objects
