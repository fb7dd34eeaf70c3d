"""EWC: elastic weight consolidation on top of full fine-tuning or LoRA.

Penalty added to the LM loss of every micro-batch (``λ`` = ``method.lambda``)::

    λ/2 · Σ_i F_i (θ_i − θ*_i)²

* ``base: full_ft`` (``configs/method/ewc.yaml``): θ = every trainable weight, θ* = the weights the
  stage started from (the anchor: a copy taken in ``attach``, i.e. the model after stage k−1).
* ``base: lora`` (``configs/method/ewc_lora.yaml``): LoRA adapts the frozen model of stage k−1
  and is merged after the stage, so θ − θ* of an adapted weight W is exactly the adapter's
  delta ΔW = scale · B A; the penalty is λ/2 · Σ F_W ⊙ ΔW² over the adapted modules, with the
  Fisher F_W taken w.r.t. those (merged) weights W. Nothing else of the model can move, so no
  weight copy is needed (the anchor is the frozen base itself).

Fisher (diagonal, empirical): after each stage's training (hook ``after_training``), on
``fisher_batches`` batches (of ``fisher_batch_size``, default ``train.batch_size``) of the stage's
own training blocks, drawn with a generator seeded by (seed, stage); per batch the gradient of the
mean-token LM loss (labels = inputs), squared element-wise, averaged over the batches, in fp32,
in eval mode (no dropout). For LoRA the gradient is w.r.t. the base weight of every adapted
module (which equals the gradient w.r.t. the merged weight); their ``requires_grad`` is switched
on only for this and restored. Mini-batch gradients (not per-sequence ones) make F a scaled
estimate; the scale is absorbed by λ. Every process computes the same batches, so the estimate
needs no communication.

Across domains (``fisher_accumulate``): ``sum`` (default) F ← F + F̂_k, i.e. the sum of the
per-domain EWC penalties around the latest anchor ("online EWC" without decay); ``mean``
F ← (n·F + F̂_k)/(n+1), a running mean over the n+1 finished domains. Stage 1 has no penalty.

State: the underlying method's state plus ``ewc_fisher/<weight>`` (fp32), ``ewc_anchor/<param>``
(full FT from stage 2 on; the stage's starting weights) and ``ewc_meta/domains`` (how many
domains the Fisher holds). The state saved after stage k holds the Fisher of domains 1..k, so
rebuilding from disk (resume, merge, eval: attach → load_state_dict → finish_stage) restores the
Fisher that stage k+1 needs, and a mid-stage checkpoint restores the running stage's Fisher and
anchor exactly. A full-FT EWC stage state is about 3× a full-FT one (weights, anchor, Fisher).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from gain_cli.errors import GainError, unknown_choice
from gain_cli.methods.base import StageContext, check_state_keys, register
from gain_cli.methods.l2 import OnBaseMethod, lora_base_weights, split_state

ACCUMULATE = ("sum", "mean")


@register("ewc")
class EWC(OnBaseMethod):
    FISHER, ANCHOR, META = "ewc_fisher/", "ewc_anchor/", "ewc_meta/"
    boundary_refusal = ("it needs stage boundaries: its penalty anchors the weights where each finished domain's stage "
                        "ended, weighted by a Fisher estimate on that domain's data")

    def __init__(self, cfg: Mapping[str, Any], spec):
        super().__init__(cfg, spec)
        self.accumulate = str(self.cfg.get("fisher_accumulate", "sum"))
        if self.accumulate not in ACCUMULATE:
            raise unknown_choice("method.fisher_accumulate", self.accumulate, ACCUMULATE)
        self.fisher_batches = int(self.cfg.get("fisher_batches", 4))
        if self.fisher_batches < 1:
            raise GainError(f"method.fisher_batches must be >= 1, got {self.fisher_batches}")
        self.fisher: dict[str, torch.Tensor] | None = None
        self.anchor: dict[str, torch.Tensor] | None = None
        self.n_domains = 0
        self._info: dict[str, Any] = {}

    # -- which weights the Fisher and the penalty are about --
    def fisher_targets(self, model: nn.Module) -> dict[str, torch.Tensor]:
        if self.base == "lora":
            return lora_base_weights(model)
        return dict(self.inner.trainable_parameters(model))

    def attach(self, model: nn.Module) -> nn.Module:
        model = self.inner.attach(model)
        # full FT: the anchor is the model this stage starts from (only needed once there is a Fisher)
        self.anchor = self.snapshot(model) if self.base == "full_ft" and self.fisher is not None else None
        return model

    def regularization(self, model: nn.Module) -> torch.Tensor | None:
        if self.fisher is None or self.lam == 0.0:
            return None
        d = self.displacements(model, self.anchor)
        if not d:  # full FT with a Fisher but no anchor: only after loading a final (non-training) state
            return None
        return 0.5 * self.lam * sum((self.fisher[n] * x ** 2).sum() for n, x in d.items())

    # -- Fisher --
    def after_training(self, model: nn.Module, ctx: StageContext) -> None:
        with torch.no_grad():
            pen = self.regularization(model)  # the stage's final penalty (for choosing λ), before the Fisher grows
        est = self.estimate_fisher(model, ctx)
        if self.fisher is None:
            self.fisher, self.n_domains = est, 1
        else:
            n = self.n_domains
            if self.accumulate == "sum":
                self.fisher = {k: self.fisher[k] + est[k] for k in est}
            else:
                self.fisher = {k: (self.fisher[k] * n + est[k]) / (n + 1) for k in est}
            self.n_domains = n + 1
        self._info = {
            "base": self.base, "lambda": self.lam, "fisher_batches": self.fisher_batches,
            "fisher_accumulate": self.accumulate, "fisher_domains": self.n_domains,
            "fisher_values": int(sum(v.numel() for v in self.fisher.values())),
            "final_penalty": None if pen is None else float(pen),
            "fisher_mean_this_domain": float(sum(v.sum() for v in est.values()) / max(1, sum(v.numel() for v in est.values()))),
        }

    def estimate_fisher(self, model: nn.Module, ctx: StageContext) -> dict[str, torch.Tensor]:
        """Diagonal empirical Fisher of the stage's domain (see the module docstring)."""
        seq_len = int(ctx.train_cfg["seq_len"])
        bs = int(self.cfg.get("fisher_batch_size") or ctx.train_cfg["batch_size"])
        blocks = ctx.data.blocks(ctx.domain, "train", seq_len)
        need = self.fisher_batches * bs
        g = torch.Generator().manual_seed(1_000_003 * int(ctx.seed) + int(ctx.stage) + 7_919_000)
        reps = -(-need // blocks.shape[0])
        idx = torch.cat([torch.randperm(blocks.shape[0], generator=g) for _ in range(reps)])[:need]

        targets = self.fisher_targets(model)
        if not targets:
            raise GainError(f"method '{self.name}': no weights to estimate the Fisher for (no trainable / adapted weights)")
        names = list(targets)
        tensors = [targets[n] for n in names]
        flags = [t.requires_grad for t in tensors]
        device = tensors[0].device
        est = {n: torch.zeros(t.shape, dtype=torch.float32, device=t.device) for n, t in targets.items()}
        was_training = model.training
        model.eval()
        try:
            for t in tensors:
                t.requires_grad_(True)
            with torch.enable_grad():
                for b in range(self.fisher_batches):
                    ids = blocks[idx[b * bs:(b + 1) * bs]].to(device)
                    loss = model(input_ids=ids, labels=ids).loss
                    grads = torch.autograd.grad(loss, tensors, allow_unused=True)
                    for n, gr in zip(names, grads):
                        if gr is not None:
                            est[n] += gr.detach().float() ** 2
        finally:
            for t, f in zip(tensors, flags):
                t.requires_grad_(f)
            model.train(was_training)
        return {n: v / self.fisher_batches for n, v in est.items()}

    def stage_info(self) -> dict[str, Any]:
        return {"ewc": dict(self._info)}

    # -- state --
    def state_dict(self, model: nn.Module) -> dict[str, torch.Tensor]:
        state = self.inner.state_dict(model)
        if self.fisher is not None:
            state.update({self.FISHER + n: t.detach().float().cpu().clone() for n, t in self.fisher.items()})
            state[self.META + "domains"] = torch.tensor([self.n_domains], dtype=torch.int64)
        if self.anchor is not None:
            state.update({self.ANCHOR + n: t.detach().cpu().clone() for n, t in self.anchor.items()})
        return state

    def load_state_dict(self, model: nn.Module, state: Mapping[str, torch.Tensor]) -> None:
        fisher, rest = split_state(state, self.FISHER)
        anchor, rest = split_state(rest, self.ANCHOR)
        meta, rest = split_state(rest, self.META)
        self.inner.load_state_dict(model, rest)
        if fisher:
            targets = self.fisher_targets(model)
            check_state_keys(self, set(targets), fisher)
            self.fisher = {n: fisher[n].to(targets[n].device, torch.float32).clone() for n in targets}
            self.n_domains = int(meta["domains"].reshape(-1)[0]) if "domains" in meta else 1
        else:
            self.fisher, self.n_domains = None, 0
        if anchor:
            if self.base != "full_ft":
                raise GainError(f"saved {self.name} state holds a full-FT anchor but method.base is {self.base}")
            self.anchor = self.load_anchor(model, anchor)
        else:
            self.anchor = None
