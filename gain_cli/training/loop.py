"""One training stage in an Accelerate loop.

AdamW over the method's trainable parameters (its own learning rate), warm-up then cosine /
linear / constant schedule, gradient accumulation, gradient clipping, mixed precision via
Accelerate, seeded data order, optionally a ``torch.compile``d forward (``train.compile``).
Data: packed training blocks of the stage's domain, shuffled with a generator seeded by
(seed, stage) and sharded across processes batch by batch.
"""

from __future__ import annotations

import math
import time
from contextlib import nullcontext
from dataclasses import asdict, dataclass, field

import torch

from gain_cli import faults
from gain_cli.errors import GainError
from gain_cli.models.compiling import maybe_compile
from gain_cli.models.kv_cache import no_kv_cache
from gain_cli.schemas.run import TrainConfig
from gain_cli.training import zero3
from gain_cli.training.accelerator import prepared_for_stage, sharded_stage
from gain_cli.training.optim import SCHEDULES, make_optimizer, make_scheduler  # noqa: F401  (re-exported)
from gain_cli.training.sharding import is_sharded


class NonFiniteLoss(GainError):
    def __init__(self, stage: int, step: int, value: float):
        super().__init__(f"stage {stage}: loss became {value} at step {step}; the stage was stopped "
                         "(finished stages and their results are kept; lower the learning rate and resume)")
        self.step = step


@dataclass
class StageStats:
    steps: int
    tokens: int
    seconds: float
    tokens_per_s: float
    first_loss: float
    final_loss: float
    losses: list[float] = field(default_factory=list)

    def to_dict(self) -> dict:
        return asdict(self)


def stage_order(n_blocks: int, n_needed: int, seed: int, stage: int) -> torch.Tensor:
    """Indices of the training blocks for one stage: reshuffled epochs until enough, deterministic."""
    g = torch.Generator().manual_seed(1_000_003 * int(seed) + int(stage))
    epochs = math.ceil(n_needed / n_blocks)
    return torch.cat([torch.randperm(n_blocks, generator=g) for _ in range(epochs)])[:n_needed]


def train_stage(model, method, blocks: torch.Tensor, train_cfg, *, seed: int, stage: int, accelerator,
                progress=None, log=None, checkpoints=None, engine=None) -> StageStats:
    """Train one stage; with ``checkpoints`` (StageCheckpoints) save every N steps and resume mid-stage.

    ``engine``: the run's DeepSpeed ZeRO-3 engine (train.sharding=zero3), whose optimiser is the run's and is
    started afresh here; it does the backward, the gradient averaging, accumulation and clipping and the step."""
    train = TrainConfig.of(train_cfg)
    steps, bs, ga = train.steps, train.batch_size, train.grad_accum
    world = accelerator.num_processes
    per_step = bs * ga * world
    # the method's order (Method.training_order: replay's composed sequence), else the loop's seeded shuffle
    # (a duck-typed method without the hook, e.g. the bench's probes, gets the shuffle)
    method_order = getattr(method, "training_order", None)
    order = method_order(blocks.shape[0], steps * per_step, seed, stage) if method_order else None
    if order is None:
        order = stage_order(blocks.shape[0], steps * per_step, seed, stage)

    sharded = is_sharded(model)
    if engine is not None:
        zero3.begin_stage(engine)  # fresh AdamW moments, fp32 masters from the stage's opened values
        optimizer = zero3.base_optimizer(engine)
    else:
        # sharded: the model is already split into DTensors, so the optimiser (built here, after sharding) holds
        # the local shards of the trainable parameters only
        groups = method.optimizer_groups(model)
        if not any(p.numel() for g in groups for p in g["params"]):
            raise GainError(f"method '{method.name}' has no trainable parameters on this model")
        optimizer = make_optimizer(groups)
    scheduler = make_scheduler(optimizer, train, steps)
    start, losses, tokens = 0, [], 0
    saved = checkpoints.load() if checkpoints is not None else None
    if saved is not None:  # continue mid-stage exactly where the checkpoint left off
        method.load_state_dict(model, saved["method_state"])
        if sharded:
            checkpoints.load_optimizer(model, engine if engine is not None else optimizer)
        else:
            optimizer.load_state_dict(saved["optimizer"])
        scheduler.load_state_dict(saved["scheduler"])
        checkpoints.restore_rng(saved)
        start, losses, tokens = int(saved["step"]), list(saved["losses"]), int(saved["tokens"])
    model.train()
    params = [] if engine is not None else [p for g in groups for p in g["params"]]  # zero3: the engine clips
    max_norm, log_every = train.max_grad_norm, train.log_every

    # The scheduler is stepped by hand once per optimiser step (Accelerate's wrapper would step it once per
    # process). No K/V cache copies in a training forward (the Trainer turns it off too).
    prepare = sharded_stage if sharded else prepared_for_stage
    with prepare(accelerator, model, optimizer) as (pmodel, optimizer), no_kv_cache(model):
        if saved is not None and saved.get("scaler") and accelerator.scaler is not None:
            accelerator.scaler.load_state_dict(saved["scaler"])
        if engine is not None:
            pmodel = engine
        forward = maybe_compile(pmodel, train.compile is True, accelerator.device, "train.compile")
        t0 = time.perf_counter()
        tokens0 = tokens
        for step in range(start, steps):
            step_loss = torch.zeros((), dtype=torch.float64)
            for a in range(ga):
                base = (step * ga + a) * bs * world + accelerator.process_index * bs
                ids = blocks[order[base: base + bs]].to(accelerator.device)
                if engine is not None:  # DeepSpeed: the engine accumulates (loss / grad_accum), averages, clips
                    loss = _micro_batch_loss(forward, method, model, ids, stage, step)
                    engine.backward(loss)
                    boundary = engine.is_gradient_accumulation_boundary()
                    engine.step()  # the optimiser steps at the end of an accumulation only
                    if boundary:
                        scheduler.step()
                else:
                    with accelerator.accumulate(pmodel), (accelerator.autocast() if sharded else nullcontext()):
                        loss = _micro_batch_loss(forward, method, model, ids, stage, step)
                        accelerator.backward(loss)
                        _step(accelerator, optimizer, scheduler, params, max_norm, sharded)
                step_loss += loss.detach().double().cpu() / ga
                tokens += ids.numel() * world
            if world > 1:
                step_loss = accelerator.reduce(step_loss.to(accelerator.device), "mean").cpu()
            losses.append(float(step_loss))
            elapsed = time.perf_counter() - t0
            rate = (tokens - tokens0) / max(elapsed, 1e-9)
            if progress is not None:
                progress(step + 1, steps, losses[-1], rate)
            if log is not None and ((step + 1) % log_every == 0 or step + 1 == steps):
                log({"stage": stage, "step": step + 1, "loss": round(losses[-1], 5),
                     "lr": scheduler.get_last_lr()[0], "tokens": tokens, "tokens_per_s": round(rate, 1)})
            if checkpoints is not None and checkpoints.due(step + 1, steps):
                opt_state = engine if engine is not None else (
                    optimizer.optimizer if hasattr(optimizer, "optimizer") else optimizer)
                checkpoints.save(step + 1, method, model, opt_state, scheduler, losses, tokens, accelerator.scaler)
            faults.point(f"stage{stage}.step{step + 1}")
    model.eval()
    elapsed = time.perf_counter() - t0
    rate = (tokens - tokens0) / max(elapsed, 1e-9)
    return StageStats(steps=steps, tokens=tokens, seconds=round(elapsed, 3), tokens_per_s=round(rate, 1),
                      first_loss=losses[0], final_loss=losses[-1], losses=[round(x, 6) for x in losses])


def _micro_batch_loss(forward, method, model, ids, stage: int, step: int) -> torch.Tensor:
    """The loss of one micro-batch (LM loss plus the method's penalty), checked finite.

    Only the loss is kept: the output's full-vocabulary logits are freed right after the forward instead of living
    on through the backward and into the next step's forward."""
    loss = forward(input_ids=ids, labels=ids).loss
    reg = method.regularization(model)
    if reg is not None:
        loss = loss + reg
    loss = faults.poison_loss(f"stage{stage}.step{step + 1}", loss)
    if not torch.isfinite(loss.detach()):
        raise NonFiniteLoss(stage, step + 1, float(loss.detach()))
    return loss


def _step(accelerator, optimizer, scheduler, params, max_norm, sharded: bool) -> None:
    """The optimiser step after a micro-batch's backward (Accelerate's or FSDP's path)."""
    if sharded:  # a plain optimiser: step once per accumulated batch; the norm over all shards
        if accelerator.sync_gradients:
            if max_norm:
                torch.nn.utils.clip_grad_norm_(params, float(max_norm))
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
    else:  # Accelerate's optimiser wrapper skips the step inside an accumulation
        if accelerator.sync_gradients and max_norm:
            accelerator.clip_grad_norm_(params, float(max_norm))
        optimizer.step()
        if accelerator.sync_gradients:
            scheduler.step()
        optimizer.zero_grad(set_to_none=True)
