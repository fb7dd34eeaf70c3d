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

The penalty itself is ``gain_cli.methods.penalties.EwcPenalty``, which any method carries with
``method.penalty=ewc`` (GAIN included); this module is that penalty on full FT or LoRA with its
settings at the method's top level.
"""

from __future__ import annotations

import torch

from gain_cli.methods.base import register
from gain_cli.methods.l2 import L2Config, OnBaseMethod
from gain_cli.methods.penalties import EwcPenalty, EwcPenaltyConfig
from gain_cli.schemas.typed import non_negative, section, setting


@section("method")
class EwcConfig(EwcPenaltyConfig, L2Config):
    """EWC on full FT or LoRA: the penalty's settings (lambda, fisher_*) at the method's top level."""

    strength: float = setting(1.0e6, "λ: sweep it (mini-batch Fisher entries are small)", key="lambda",
                              check=non_negative())


@register("ewc", config=EwcConfig)
class EWC(OnBaseMethod):
    penalty_name = "ewc"
    boundary_refusal = EwcPenalty.boundary_refusal

    @property
    def fisher(self) -> dict[str, torch.Tensor] | None:
        return self.penalty.fisher

    @property
    def n_domains(self) -> int:
        return self.penalty.n_domains

    def estimate_fisher(self, model, ctx) -> dict[str, torch.Tensor]:
        return self.penalty.estimate_fisher(model, ctx)
