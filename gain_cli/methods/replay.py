"""Replay-augmented LoRA: LoRA whose stage mix includes blocks from earlier domains.

Everything about the adapter is plain LoRA (``gain_cli.methods.lora``); only the stage's training
blocks differ (hook ``stage_blocks``):

* Replay buffer: per earlier domain, at most ``buffer_blocks`` packed training blocks
  (``train.seq_len`` tokens each), a sample without replacement drawn with a generator seeded by
  (seed, that domain's stage). The buffer is a pure function of (data, seed, stage), so it is
  rebuilt identically on resume and needs no saved state. Nothing beyond these buffers is ever
  read from an earlier domain.
* Mix: the stage trains on exactly N = steps × batch_size × grad_accum × processes sequences
  (the same number as plain LoRA: compute-matched; replay *replaces* new-domain sequences).
  floor(N · ``replay_fraction``) of them are replayed blocks. Position i of the stage's sequence
  order is a replay slot iff floor((i+1)·f) > floor(i·f) (exact rational arithmetic), so every
  window of w consecutive sequences holds floor(w·f) or ceil(w·f) replayed ones — e.g. f = 0.1:
  one in every 10, f = 0.25 with batch 8: exactly 2 per batch. Replay slots go round-robin to the
  earlier domains (equal shares); each domain's buffer is walked in seeded reshuffled passes.
  The other slots walk the stage's own blocks in seeded reshuffled passes (as plain LoRA does).
* Order: the stage's blocks are that exact sequence of N blocks, and ``training_order`` tells the
  loop to take them as they are (``arange``) instead of its own seeded shuffle: the loop sees the
  intended sequence, in order, batch by batch (and across processes, since they take consecutive
  batch-sized slices). Stage 1 (plain LoRA) keeps the loop's shuffle.
* Memory: the returned tensor has N × seq_len int64 entries (own blocks repeat when N exceeds them).

Stage 1 (no earlier domain) or ``replay_fraction: 0`` is plain LoRA. ``stage_info()`` (stored in
the stage's metrics.json under ``method_info.replay``) records the buffered blocks/tokens per
earlier domain and how many blocks/tokens were replayed.

Config (``configs/method/lora_replay.yaml``): the LoRA settings plus replay_fraction (0 ≤ f < 1),
buffer_blocks (≥ 1).
"""

from __future__ import annotations

from collections.abc import Mapping
from fractions import Fraction
from typing import Any

import torch

from gain_cli.errors import GainError
from gain_cli.methods.base import StageContext, register
from gain_cli.methods.lora import Lora, LoraConfig
from gain_cli.schemas.run import TrainConfig
from gain_cli.schemas.typed import between, section, setting


def _generator(seed: int, stage: int, salt: int) -> torch.Generator:
    return torch.Generator().manual_seed(1_000_003 * int(seed) + int(stage) + 10_007 * int(salt) + 500_000_000)


def _walk(n_items: int, count: int, g: torch.Generator) -> torch.Tensor:
    """``count`` indices into ``n_items`` items: reshuffled passes, each item once per pass."""
    if count <= 0:
        return torch.zeros(0, dtype=torch.long)
    passes = -(-count // n_items)
    return torch.cat([torch.randperm(n_items, generator=g) for _ in range(passes)])[:count]


def replay_slots(n: int, fraction: float) -> torch.Tensor:
    """Boolean mask over n positions: True where floor((i+1)·f) > floor(i·f) (evenly spread)."""
    f = Fraction(str(fraction)).limit_denominator(1_000_000)
    p, q = f.numerator, f.denominator
    i = torch.arange(n, dtype=torch.long)
    return ((i + 1) * p) // q > (i * p) // q


def stage_sequences(train_cfg: Mapping[str, Any], accelerator) -> int:
    """How many sequences the training loop takes for one stage."""
    world = int(getattr(accelerator, "num_processes", 1) or 1)
    train = TrainConfig.of(train_cfg)
    return train.steps * train.batch_size * train.grad_accum * world


@section("method")
class ReplayConfig(LoraConfig):
    replay_fraction: float = setting(0.1, "share of each stage's training sequences taken from earlier domains "
                                     "(compute-matched: they replace new-domain ones)",
                                     check=between(0, 1, "in [0, 1)", open_hi=True))
    buffer_blocks: int = setting(64, "replay buffer per earlier domain, in packed blocks of train.seq_len tokens",
                                 check=((lambda v: v >= 1), ">= 1"))


@register("lora_replay", config=ReplayConfig)
class LoraReplay(Lora):
    boundary_refusal = ("it needs stage boundaries and domain labels: each stage mixes in buffers of the earlier "
                        "domains' training data, chosen by domain")

    def __init__(self, cfg: Mapping[str, Any], spec):
        super().__init__(cfg, spec)
        self.fraction, self.buffer_blocks = float(self.cfg.replay_fraction), int(self.cfg.buffer_blocks)
        self._info: dict[str, Any] = {}
        self._composed = False  # the last stage_blocks are the stage's exact sequence (a replay mix)

    def buffer(self, ctx: StageContext, domain: str, domain_stage: int) -> torch.Tensor:
        """The replay buffer of an earlier domain: at most ``buffer_blocks`` of its training blocks."""
        blocks = ctx.data.blocks(domain, "train", int(ctx.train_cfg["seq_len"]))
        g = _generator(ctx.seed, domain_stage, salt=0)
        keep = torch.randperm(blocks.shape[0], generator=g)[: self.buffer_blocks]
        return blocks[keep]

    def stage_blocks(self, ctx: StageContext) -> torch.Tensor:
        seq_len = int(ctx.train_cfg["seq_len"])
        own = super().stage_blocks(ctx)
        info: dict[str, Any] = {"replay_fraction": self.fraction, "buffer_blocks_per_domain": self.buffer_blocks,
                                "buffered_blocks": {}, "stored_blocks": 0, "stored_tokens": 0,
                                "replayed_blocks": 0, "replayed_tokens": 0, "replayed_by_domain": {}}
        self._composed = bool(ctx.earlier) and self.fraction > 0.0
        if not self._composed:
            self._info = info
            return own  # plain LoRA

        n = stage_sequences(ctx.train_cfg, ctx.accelerator)
        slots = replay_slots(n, self.fraction)
        n_replay = int(slots.sum())
        buffers = {d: self.buffer(ctx, d, j) for j, d in enumerate(ctx.earlier, 1)}

        seq = torch.empty((n, seq_len), dtype=own.dtype)
        seq[~slots] = own[_walk(own.shape[0], n - n_replay, _generator(ctx.seed, ctx.stage, salt=1))]
        replay_pos = torch.nonzero(slots).flatten()
        by_domain = {}
        m = len(ctx.earlier)
        for j, d in enumerate(ctx.earlier):
            pos = replay_pos[j::m]  # round-robin: replay slot r goes to earlier domain r mod m
            buf = buffers[d]
            seq[pos] = buf[_walk(buf.shape[0], pos.numel(), _generator(ctx.seed, ctx.stage, salt=2 + j))]
            by_domain[d] = int(pos.numel())

        stored = {d: int(b.shape[0]) for d, b in buffers.items()}
        info.update(buffered_blocks=stored, stored_blocks=sum(stored.values()),
                    stored_tokens=sum(stored.values()) * seq_len, replayed_blocks=n_replay,
                    replayed_tokens=n_replay * seq_len, replayed_by_domain=by_domain,
                    stage_sequences=n, new_domain_blocks=n - n_replay)
        self._info = info
        return seq

    def training_order(self, n_blocks: int, n_needed: int, seed: int, stage: int) -> torch.Tensor | None:
        if not self._composed:
            return None  # plain LoRA: the loop's shuffle
        if n_blocks != n_needed:
            raise GainError(f"replay composed {n_blocks} sequences for a stage that takes {n_needed}")
        return torch.arange(n_needed)

    def stage_info(self) -> dict[str, Any]:
        return {"replay": dict(self._info)}
