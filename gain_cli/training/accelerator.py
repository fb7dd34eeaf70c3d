"""The Accelerator of a run, the check that Accelerate sees the processes that were launched, and one process's
answer shared with all (``on_main_shared``)."""

from __future__ import annotations

import os
from collections.abc import Callable
from contextlib import contextmanager
from typing import Any

from gain_cli.errors import GainError
from gain_cli.training.sharding import process_group_timeout, requested_sharding

MIXED_PRECISION = ("no", "bf16", "fp16")


def make_accelerator(cfg):
    from accelerate import Accelerator
    from accelerate.utils import set_seed

    mp = str(cfg.train.mixed_precision)
    if mp not in MIXED_PRECISION:
        raise GainError(f"unknown train.mixed_precision '{mp}' (valid: {', '.join(MIXED_PRECISION)})")
    # Accelerate keeps its settings in a process-wide state that refuses a second, different mixed precision; a
    # process may run several experiments (`gain demo`, a sweep from Python), so each starts from a fresh one, as
    # the HF TrainingArguments do. The process group (PartialState) is kept.
    from accelerate.state import AcceleratorState

    sharding = requested_sharding(cfg)  # a bad train.sharding is refused before any process group exists
    if sharding != "none" and mp == "fp16":
        raise GainError("train.mixed_precision=fp16 is not supported with train.sharding (no sharded loss scaler); "
                        "use bf16")
    if sharding == "zero3":  # gain drives DeepSpeed itself (training/zero3.py): no DeepSpeed plugin in Accelerate
        os.environ.pop("ACCELERATE_USE_DEEPSPEED", None)
    AcceleratorState._reset_state(reset_partial_state=False)
    handlers = []
    timeout = process_group_timeout()
    if timeout is not None:  # GAIN_DIST_TIMEOUT_S: a collective that waits longer fails (tests: no hang in CI)
        from accelerate.utils import InitProcessGroupKwargs

        handlers.append(InitProcessGroupKwargs(timeout=timeout))
    acc = Accelerator(gradient_accumulation_steps=int(cfg.train.grad_accum), mixed_precision=mp,
                      kwargs_handlers=handlers)
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if acc.num_processes != world:
        raise GainError(
            f"Accelerate sees {acc.num_processes} process(es) but WORLD_SIZE={world}: the launch is inconsistent "
            "(on CPU use `ACCELERATE_USE_CPU=1 accelerate launch --multi_gpu --num_processes N`, or "
            "`ACCELERATE_USE_CPU=1 torchrun --nproc_per_node N`: without ACCELERATE_USE_CPU=1 every CPU process is alone)"
        )
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


@contextmanager
def sharded_stage(accelerator, model, optimizer):
    """The sharded counterpart of ``prepared_for_stage``: nothing is prepared. Accelerate would DDP-wrap an FSDP
    model on CPU (which fails) and its optimiser wrapper is not needed (the loop steps once per accumulated
    batch itself; autocast comes from ``accelerator.autocast()``; fp16 is refused with sharding)."""
    try:
        yield model, optimizer
    finally:
        accelerator.free_memory()


def on_main_shared(acc, fn: Callable[[], Any]) -> Any:
    """``fn()`` evaluated on the main process and given to every process (a GainError is raised everywhere)."""
    box: list[Any] = [None]
    if acc.is_main_process:
        try:
            box[0] = ("ok", fn())
        except GainError as exc:
            box[0] = ("error", str(exc))
    if acc.num_processes > 1:
        from accelerate.utils import broadcast_object_list

        broadcast_object_list(box, from_process=0)
    kind, value = box[0]
    if kind == "error":
        raise GainError(value)
    return value
