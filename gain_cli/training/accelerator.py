"""The Accelerator of a run, and the check that Accelerate sees the processes that were launched."""

from __future__ import annotations

import os

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
    set_seed(int(cfg.seed))
    return acc
