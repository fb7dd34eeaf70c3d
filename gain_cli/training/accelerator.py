"""The Accelerator of a run, and the check that Accelerate sees the processes that were launched."""

from __future__ import annotations

import os

from gain_cli.errors import GainError

MIXED_PRECISION = ("no", "bf16", "fp16")


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
            "(on CPU use `ACCELERATE_USE_CPU=1 accelerate launch --multi_gpu --num_processes N` or torchrun)"
        )
    set_seed(int(cfg.seed))
    return acc
