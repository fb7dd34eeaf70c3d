"""Sharded training with DeepSpeed ZeRO-3 (``train.sharding=zero3``), driven by gain itself; an optional extra.

DeepSpeed is not a dependency of gain: ``make setup-deepspeed`` installs it (the registry has only its source
distribution, built with ``pip install --no-build-isolation``; no compiled op is built at install time, and on CPU
its first run JIT-compiles one communication op with g++ and ninja, ~4 min once per machine).

How a run uses it (the FSDP2 path's structure, gain_cli.training.sharding, with DeepSpeed's partitioning):

* the method is attached once, then ``deepspeed.initialize`` partitions every parameter over the processes (each
  process keeps ``1/N`` of the flattened parameter, ``param.ds_tensor``; ``param.data`` is empty outside a forward)
  and builds ONE engine for the whole run, whose optimiser holds the fp32 master copies of the trainable
  parameters only. Its module hooks gather a module's parameters for its forward, so evaluation and lm-eval call
  the model as usual, on every process (a forward is a collective);
* every stage starts the optimiser afresh (AdamW moments cleared, fp32 masters taken from the model's values:
  ``begin_stage``) with its own learning-rate schedule, trains through ``engine.backward`` / ``engine.step``
  (DeepSpeed averages gradients over the processes, accumulates and clips), and ends as the FSDP path does: the
  method folds its trained parts into the weights on each process's own partition, without gathering a weight;
* mid-stage checkpoints keep the optimiser state partitioned (``engine.save_checkpoint``: one file per process)
  and resume exactly.

All parameters are partitioned, small ones too (``stage3_param_persistence_threshold: 0``), and released after
every forward (``stage3_max_live_parameters``, ``stage3_max_reuse_distance``: 0), so outside a forward the only copy
of a parameter is its partitions: the in-place edits below (``set_full``, ``add_full``, ``mul_full``) change those.
Penalties computed outside the forward (``method.l2`` of GAIN) would see empty parameters and are refused.
"""

from __future__ import annotations

import os
from typing import Any

import torch
from torch import nn

from gain_cli.errors import GainError
from gain_cli.schemas.run import TrainConfig
from gain_cli.training.optim import make_optimizer

INSTALL_HINT = ("DeepSpeed is an optional extra: `make setup-deepspeed` (or pip install setuptools wheel hjson ninja "
                "py-cpuinfo msgpack einops && pip install --no-build-isolation deepspeed), or use train.sharding=fsdp")
CHECKPOINT_TAG = "zero3"


def import_deepspeed(device_type: str):
    """``deepspeed``, with its accelerator matching the run's device (set before the first import)."""
    os.environ.setdefault("DS_ACCELERATOR", "cpu" if device_type == "cpu" else "cuda")
    try:
        import deepspeed
    except ImportError:
        raise GainError(f"train.sharding=zero3 needs DeepSpeed, which is not installed. {INSTALL_HINT}") from None
    import logging

    from deepspeed.utils import logger

    logger.setLevel(logging.WARNING)  # its INFO lines (config dumps, timers) would bury the run's own output
    return deepspeed


def is_zero_param(t) -> bool:
    return isinstance(t, torch.Tensor) and hasattr(t, "ds_id")


def ds_config(train_cfg, world: int) -> dict[str, Any]:
    """The DeepSpeed config of a run: micro-batch and accumulation from ``train``, ZeRO stage 3, clipping, bf16."""
    train = TrainConfig.of(train_cfg)
    bs, ga, mp = train.batch_size, train.grad_accum, train.mixed_precision
    return {
        "train_micro_batch_size_per_gpu": bs,
        "gradient_accumulation_steps": ga,
        "train_batch_size": bs * ga * world,
        "gradient_clipping": float(train.max_grad_norm or 0.0),
        "bf16": {"enabled": mp == "bf16"},  # bf16 weights, fp32 master copies of the trainable ones
        "zero_optimization": {"stage": 3, "stage3_param_persistence_threshold": 0,
                              "stage3_max_live_parameters": 0, "stage3_max_reuse_distance": 0,
                              "stage3_prefetch_bucket_size": 0},
        "zero_allow_untested_optimizer": True,  # torch's AdamW (gain_cli.training.loop.make_optimizer)
        "steps_per_print": 10 ** 9,
        "wall_clock_breakdown": False,
    }


def make_engine(model: nn.Module, method, train_cfg, device_type: str, world: int):
    """Partition ``model`` (attached, trainable parts with ``requires_grad``) and return the run's engine."""
    if method.regularizes():
        raise GainError(f"method '{method.name}' cannot train with train.sharding=zero3: its penalty is computed "
                        "outside the forward, where ZeRO-3 parameters are empty (set it to 0, or use "
                        "train.sharding=fsdp)")
    if TrainConfig.of(train_cfg).compile is True:  # auto: eager under ZeRO-3 (Experiment.plan_compile)
        raise GainError("train.compile is not supported with train.sharding=zero3 (DeepSpeed's hooks gather the "
                        "parameters around every module); set train.compile=false or use train.sharding=fsdp")
    deepspeed = import_deepspeed(device_type)
    optimizer = make_optimizer(method.optimizer_groups(model))
    engine, *_ = deepspeed.initialize(model=model, optimizer=optimizer, config=ds_config(train_cfg, world))
    return engine


def base_optimizer(engine) -> torch.optim.Optimizer:
    """The torch AdamW inside the ZeRO-3 optimiser (its param groups carry the learning rates)."""
    return engine.optimizer.optimizer


def begin_stage(engine) -> None:
    """A fresh optimiser for a new stage: fp32 masters from the model's current values, no AdamW moments."""
    engine.optimizer.refresh_fp32_params()
    base_optimizer(engine).state.clear()
    engine.zero_grad()


def save_optimizer(engine, folder) -> None:
    """Every process writes its partition of the optimiser state (and fp32 masters) into ``folder``."""
    engine.save_checkpoint(str(folder), tag=CHECKPOINT_TAG, save_latest=False, exclude_frozen_parameters=True)


def load_optimizer(engine, folder) -> None:
    engine.load_checkpoint(str(folder), tag=CHECKPOINT_TAG, load_module_strict=False, load_optimizer_states=True,
                           load_lr_scheduler_states=False)


# --- a parameter's partition ----------------------------------------------------------------------------------

def release(p: torch.Tensor) -> None:
    """Drop a gathered copy of ``p`` (if a forward left one), so its partition is its only value."""
    from deepspeed.runtime.zero.partition_parameters import ZeroParamStatus

    if p.ds_status == ZeroParamStatus.AVAILABLE:
        p.partition()


def release_all(model: nn.Module) -> None:
    for p in model.parameters():
        if is_zero_param(p):
            release(p)


def _partition(p: torch.Tensor) -> tuple[torch.Tensor, int, int]:
    """(this process's part of the flattened ``p``, its start, its end) without the padding of the last part."""
    import torch.distributed as dist

    release(p)
    part = p.ds_tensor
    start = part.numel() * dist.get_rank()
    end = min(start + part.numel(), p.ds_numel)
    return part.view(-1)[: max(end - start, 0)], start, end


def _master(p: torch.Tensor) -> bool:
    """True when ``p`` has an fp32 master copy in the optimiser (a trainable parameter of the engine)."""
    return bool(p.requires_grad) and getattr(p, "_z3_optimizer", None) is not None


def full(p: torch.Tensor) -> torch.Tensor:
    """The whole ``p`` (a collective): the fp32 master of a trainable parameter, else the gathered partitions."""
    if _master(p):
        from deepspeed.utils import safe_get_full_fp32_param

        return safe_get_full_fp32_param(p).reshape(p.ds_shape)
    import deepspeed

    with deepspeed.zero.GatheredParameters([p], modifier_rank=None):
        return p.data.detach().clone()


@torch.no_grad()
def _write(p: torch.Tensor, new_flat_part) -> None:
    part, start, end = _partition(p)
    part.copy_(new_flat_part(part, start, end).to(part.dtype))


@torch.no_grad()
def set_full(p: torch.Tensor, value: torch.Tensor) -> None:
    """``p ← value`` (whole, the same on every process): written into this process's partition (and fp32 master)."""
    flat = value.detach().reshape(-1).to(p.ds_tensor.device)
    _write(p, lambda part, s, e: flat[s:e])
    if _master(p):
        from deepspeed.utils import safe_set_full_fp32_param

        safe_set_full_fp32_param(p, value.detach().float().to(p.ds_tensor.device))


@torch.no_grad()
def add_full(p: torch.Tensor, delta: torch.Tensor) -> None:
    """``p += delta`` (whole, laid out like ``p``) on this process's partition, in fp32."""
    flat = delta.detach().reshape(-1).to(p.ds_tensor.device).float()
    _write(p, lambda part, s, e: part.float() + flat[s:e])


@torch.no_grad()
def mul_full(p: torch.Tensor, factor: torch.Tensor) -> None:
    """``p *= factor`` (broadcastable to ``p``, e.g. ``s[None, :]``) on this process's partition, in fp32."""
    f = factor.detach().float().to(p.ds_tensor.device)
    _write(p, lambda part, s, e: part.float() * broadcast_part(f, tuple(p.ds_shape), s, e))


def broadcast_part(factor: torch.Tensor, shape: tuple[int, ...], start: int, end: int) -> torch.Tensor:
    """Elements ``start:end`` of ``factor`` broadcast to ``shape`` and flattened, without building the whole."""
    f = factor.reshape((1,) * (len(shape) - factor.dim()) + tuple(factor.shape)).contiguous()
    rem = torch.arange(start, end, device=f.device)
    index = torch.zeros_like(rem)
    for d in reversed(range(len(shape))):
        coord, rem = rem % shape[d], rem // shape[d]
        if f.shape[d] != 1:
            index += coord * f.stride(d)
    return f.reshape(-1)[index]


def partition_bytes(p: torch.Tensor) -> int:
    return p.ds_tensor.numel() * p.ds_tensor.element_size()
