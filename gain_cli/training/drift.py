"""Boundary-free adaptation (``train.domain_schedule=drift``): one continuous training run over every domain.

A staged run (``stages``, the default) trains domain k in stage k with a freshly attached method, a fresh optimiser
and learning-rate schedule, and merges the method into the weights when the stage ends. A drift run trains **once**:
the method is attached once (GAIN gains of one, a LoRA adapter with B = 0, every weight for full FT), one AdamW and
one learning-rate schedule (warm-up at the very start only) run over all T·S steps (T domains, S = ``train.steps``),
nothing is merged or re-created between domains and the method is never told which domain an example comes from.
The data drifts from one domain to the next (the mixing schedule, below). The run is evaluated on every domain at
the steps where a staged run ends its stages (t = k·S), and row k is written as ``stage_k:<domain>``, so the
matrices, metrics and reports of a staged run apply unchanged. docs/drift.md has the full description.

**Mixing schedule.** Segment k (1-based) is steps (k−1)·S … k·S−1. The transition between domains k and k+1 is a
window of W = ``train.drift_overlap`` · S steps centred on the boundary k·S. With the ramps (τ = t + ½, the middle
of step t, 0-based; b = 1 … T−1)::

    r_0 = 1,   r_T = 0,   r_b(t) = clip((τ − b·S + W/2) / W, 0, 1)        (W = 0: r_b(t) = 1 if τ > b·S else 0)
    p_i(t) = r_{i−1}(t) − r_i(t)                                           probability of domain i = 1 … T

i.e. pure domain k in the middle of segment k, moving linearly to domain k+1 across the window; with overlap ≤ 1
at most two domains mix at any step, each domain gets S steps' worth of examples in expectation (the staged
budget), and at the evaluation point k·S the mixture is half k, half k+1 (the model has then seen W/8 steps' worth
of domain k+1). Every example of step t draws u ~ U[0, 1) and takes domain i with r_i ≤ u < r_{i−1}; domain i's
examples take its training blocks in the order a staged stage i would (``stage_order(seed, i)``), so with overlap 0
the drift run sees exactly the staged run's batches. The whole plan is a function of the seed and the config.

**Checkpoints.** The trainer state (method state, optimiser, schedule, RNG, data position) is saved in
``drift/ckpt-<step>/`` (gain_cli.training.checkpoint) every ``train.checkpoint_every`` steps *and* at every segment
end, before that segment's state is written; a resumed run continues the one run from there (the RNG is also reset
to the segment end's state before the next segment trains, so an evaluation in between never changes training).
The checkpoint is removed when the last segment is evaluated. ``stages/stage_K/method_state.safetensors`` holds the
method's whole state at step K·S (on the pretrained model): one saved state rebuilds row K (``gain merge``,
``gain eval --run``).
"""

from __future__ import annotations

import time
from typing import Any

import torch

from gain_cli import faults
from gain_cli.errors import GainError
from gain_cli.models.compiling import maybe_compile
from gain_cli.models.kv_cache import no_kv_cache
from gain_cli.schemas.run import TrainConfig, group_of
from gain_cli.training.accelerator import prepared_for_stage
from gain_cli.training.checkpoint import StageCheckpoints
from gain_cli.training.loop import StageStats, _micro_batch_loss, _step, stage_order
from gain_cli.training.optim import make_optimizer, make_scheduler

CHECKPOINT_DIR = "drift"  # in the run directory: the one run's trainer checkpoints
_PLAN_SEED = 7_777_777  # the plan's draws (offset from stage_order's seeds, which are 1_000_003·seed + stage)
SHARDING_REFUSAL = ("train.domain_schedule=drift trains unsharded: sharded training (train.sharding=fsdp|zero3) "
                    "reopens and folds the method at every stage boundary, which a drift run does not have; "
                    "use train.sharding=none")


def domain_schedule(cfg) -> str:
    """``stages`` or ``drift`` (``train.domain_schedule``; a config without the key is ``stages``)."""
    return group_of(cfg, "train").domain_schedule


def is_drift(cfg) -> bool:
    return domain_schedule(cfg) == "drift"


def drift_overlap(train_cfg) -> float:
    """``train.drift_overlap``: the transition window as a fraction of a segment (default 0.5)."""
    return float(TrainConfig.of(train_cfg).drift_overlap)


# --- the mixing schedule ------------------------------------------------------------------------

def ramps(t: torch.Tensor, n_domains: int, steps: int, overlap: float) -> torch.Tensor:
    """r_1 … r_{T−1} at the global steps ``t`` (0-based): shape (len(t), T−1), float64 (module docstring)."""
    tau = t.to(torch.float64)[:, None] + 0.5
    bounds = torch.arange(1, n_domains, dtype=torch.float64)[None, :] * steps
    width = float(overlap) * steps
    if width == 0:
        return (tau > bounds).to(torch.float64)
    return ((tau - bounds + width / 2) / width).clamp(0.0, 1.0)


def mixing_weights(t: int, n_domains: int, steps: int, overlap: float) -> list[float]:
    """p_1(t) … p_T(t): the probability that an example of global step ``t`` (0-based) comes from each domain."""
    r = ramps(torch.tensor([int(t)]), n_domains, steps, overlap)[0].tolist()
    r = [1.0, *r, 0.0]
    return [r[i] - r[i + 1] for i in range(n_domains)]


def drift_plan(n_blocks: list[int], steps: int, per_step: int, overlap: float, seed: int
               ) -> tuple[torch.Tensor, torch.Tensor]:
    """(domain index, block index) of every example of the run, in the order the loop reads them
    (step-major, ``per_step`` = batch_size × grad_accum × processes examples per step)."""
    n_domains = len(n_blocks)
    n = n_domains * steps * per_step
    t = torch.arange(n) // per_step
    g = torch.Generator().manual_seed(_PLAN_SEED + 1_000_003 * int(seed))
    u = torch.rand(n, generator=g, dtype=torch.float64)
    domain = (u[:, None] < ramps(t, n_domains, steps, overlap)).sum(dim=1)  # i with r_{i+1} <= u < r_i (0-based)
    block = torch.zeros(n, dtype=torch.long)

    for i, nb in enumerate(n_blocks):
        where = (domain == i).nonzero().squeeze(1)
        if where.numel():
            block[where] = stage_order(nb, where.numel(), seed, i + 1)
    return domain, block


# --- the one training run -----------------------------------------------------------------------

class DriftTrainer:
    """The optimiser, schedule and data plan of a drift run; trains one segment per call on the attached model."""

    def __init__(self, model, method, blocks: list[torch.Tensor], domains: list[str], train_cfg, *, seed: int,
                 accelerator):
        self.model, self.method, self.blocks, self.domains = model, method, blocks, domains
        self.cfg, self.acc, self.seed = TrainConfig.of(train_cfg), accelerator, int(seed)
        self.steps = self.cfg.steps
        self.total = len(blocks) * self.steps
        self.bs, self.ga = self.cfg.batch_size, self.cfg.grad_accum
        self.per_step = self.bs * self.ga * accelerator.num_processes
        self.overlap = drift_overlap(train_cfg)
        self.domain_of, self.block_of = drift_plan([b.shape[0] for b in blocks], self.steps, self.per_step,
                                                   self.overlap, self.seed)
        groups = method.optimizer_groups(model)
        if not any(p.numel() for g in groups for p in g["params"]):
            raise GainError(f"method '{method.name}' has no trainable parameters on this model")
        self.params = [p for g in groups for p in g["params"]]
        self.optimizer = make_optimizer(groups)
        self.scheduler = make_scheduler(self.optimizer, train_cfg, self.total)  # one schedule for the whole run
        self.step, self.losses, self.tokens = 0, [], 0
        self.rng: dict[str, Any] | None = None  # the RNG at the last segment end (or checkpoint)
        self.scaler_state = getattr(accelerator, "gain_initial_scaler_state", None)

    def restore(self, checkpoints) -> int | None:
        """Continue from the run's latest checkpoint (None: there is none, the run starts at step 0)."""
        saved = checkpoints.load()
        if saved is None:
            return None
        self.method.load_state_dict(self.model, saved["method_state"])
        self.optimizer.load_state_dict(saved["optimizer"])
        self.scheduler.load_state_dict(saved["scheduler"])
        self.step, self.losses, self.tokens = int(saved["step"]), list(saved["losses"]), int(saved["tokens"])
        self.rng = {"torch_rng": saved["torch_rng"], "python_rng": saved["python_rng"]}
        if saved.get("scaler"):
            self.scaler_state = saved["scaler"]
        return self.step

    def batch(self, first: int) -> torch.Tensor:
        """The ``batch_size`` training blocks at plan positions first … first+batch_size−1."""
        idx = range(first, first + self.bs)
        return torch.stack([self.blocks[int(self.domain_of[i])][int(self.block_of[i])] for i in idx])

    def segment_info(self, k: int) -> dict[str, Any]:
        """What segment k trained on: its global steps and how many examples each domain gave it."""
        lo, hi = (k - 1) * self.steps * self.per_step, k * self.steps * self.per_step
        counts = torch.bincount(self.domain_of[lo:hi], minlength=len(self.domains)).tolist()
        return {"global_steps": [(k - 1) * self.steps, k * self.steps], "overlap": self.overlap,
                "examples": {d: int(c) for d, c in zip(self.domains, counts) if c}}

    def train_segment(self, k: int, *, progress=None, log=None, checkpoints=None):
        """Train global steps (k−1)·S … k·S−1 (from where the run stands), save the checkpoint at k·S."""
        lo, hi = (k - 1) * self.steps, k * self.steps
        if not lo <= self.step <= hi:
            raise GainError(f"the drift run stands at step {self.step}, segment {k} is steps {lo}..{hi} "
                            f"(its checkpoint in {CHECKPOINT_DIR}/ is missing or stale; start a new run_dir)")
        if self.rng is not None:  # the same random stream whether the run went on or was resumed here
            StageCheckpoints.restore_rng(self.rng)
        acc, model = self.acc, self.model
        world = acc.num_processes
        max_norm, log_every = self.cfg.max_grad_norm, self.cfg.log_every
        start, tokens0 = self.step, self.tokens
        model.train()
        with prepared_for_stage(acc, model, self.optimizer) as (pmodel, optimizer), no_kv_cache(model):
            if acc.scaler is not None and self.scaler_state is not None:
                acc.scaler.load_state_dict(self.scaler_state)
            forward = maybe_compile(pmodel, self.cfg.compile is True, acc.device, "train.compile")
            t0 = time.perf_counter()
            for step in range(start, hi):
                local = step - lo  # 0-based step of the segment (fault points and logs as a staged stage's)
                step_loss = torch.zeros((), dtype=torch.float64)
                for a in range(self.ga):
                    ids = self.batch((step * self.ga + a) * self.bs * world + acc.process_index * self.bs)
                    ids = ids.to(acc.device)
                    with acc.accumulate(pmodel):
                        loss = _micro_batch_loss(forward, self.method, model, ids, k, local)
                        acc.backward(loss)
                        _step(acc, optimizer, self.scheduler, self.params, max_norm, False)
                    step_loss += loss.detach().double().cpu() / self.ga
                    self.tokens += ids.numel() * world
                if world > 1:
                    step_loss = acc.reduce(step_loss.to(acc.device), "mean").cpu()
                self.losses.append(float(step_loss))
                self.step = step + 1
                rate = (self.tokens - tokens0) / max(time.perf_counter() - t0, 1e-9)
                if progress is not None:
                    progress(local + 1, self.steps, self.losses[-1], rate)
                if log is not None and ((local + 1) % log_every == 0 or local + 1 == self.steps):
                    mix = mixing_weights(step, len(self.domains), self.steps, self.overlap)
                    log({"stage": k, "step": local + 1, "global_step": self.step, "loss": round(self.losses[-1], 5),
                         "lr": self.scheduler.get_last_lr()[0], "tokens": self.tokens, "tokens_per_s": round(rate, 1),
                         "mix": {d: round(p, 4) for d, p in zip(self.domains, mix) if p > 0}})
                if checkpoints is not None and (self.step == hi or checkpoints.due(self.step, self.total)):
                    self._save(checkpoints, optimizer)
                faults.point(f"stage{k}.step{local + 1}")
            if acc.scaler is not None:
                self.scaler_state = acc.scaler.state_dict()
        model.eval()
        elapsed = time.perf_counter() - t0
        losses = self.losses[lo:hi]
        seq_tokens = int(self.blocks[0].shape[1]) if self.blocks else 0
        return StageStats(steps=self.steps, tokens=self.steps * self.per_step * seq_tokens, seconds=round(elapsed, 3),
                          tokens_per_s=round((self.tokens - tokens0) / max(elapsed, 1e-9), 1),
                          first_loss=losses[0], final_loss=losses[-1], losses=[round(x, 6) for x in losses])

    def _save(self, checkpoints, optimizer) -> None:
        import random

        opt = optimizer.optimizer if hasattr(optimizer, "optimizer") else optimizer
        self.rng = {"torch_rng": torch.get_rng_state(), "python_rng": list(random.getstate()[1])}
        checkpoints.save(self.step, self.method, self.model, opt, self.scheduler, self.losses, self.tokens,
                         self.acc.scaler)
