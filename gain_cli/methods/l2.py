"""L2: a plain quadratic pull toward the previous stage's weights, on full FT or on LoRA.

Penalty added to the LM loss of every micro-batch (``λ`` = ``method.lambda``)::

    full FT (base: full_ft):  λ · Σ_i (θ_i − θ_prev,i)²     over every trainable weight
    LoRA    (base: lora):     λ · Σ_m ‖ΔW_m‖²_F             ΔW_m = scale · B_m A_m of each adapted module

θ_prev is the model the stage started from (the base model in stage 1, the merged model of
stage k−1 afterwards). LoRA adapts the frozen previous model and merges after the stage, so its
distance to the previous weights is exactly the adapter's delta ΔW: no copy of the weights is
kept. For full FT the anchor θ_prev is a copy of the weights taken in ``attach`` and is saved
with the stage state (keys ``l2_anchor/<param>``; a full-FT L2 stage state is therefore twice
the size of a full-FT one) so that ``load_state_dict`` on a freshly attached model reproduces
the same penalty exactly. λ = 0 turns the pull off (the method is then plain full FT / LoRA).

The penalty itself is ``gain_cli.methods.penalties.L2Penalty``, which any method carries with
``method.penalty=l2``; this module is that penalty on full FT or LoRA with its settings at the
method's top level (``configs/method/l2.yaml``: base (lora | full_ft), lambda, lr, weight_decay,
and for ``base: lora`` the LoRA settings r, alpha, dropout, target_modules).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, ClassVar

from gain_cli.methods.base import Method, register
from gain_cli.methods.full_ft import FullFT
from gain_cli.methods.lora import Lora, LoraConfig
from gain_cli.methods.penalties import L2Penalty, Penalized, build_penalty
from gain_cli.schemas.typed import non_negative, section, setting

BASES = {"full_ft": FullFT, "lora": Lora}


@section("method")
class L2Config(LoraConfig):
    """An L2 pull on full FT or LoRA; the LoRA settings apply to ``base: lora`` only."""

    base: str = setting("full_ft", "the method the penalty is put on", choices=tuple(BASES))
    strength: float = setting(0.0, "λ, the penalty's strength (0: plain full FT / LoRA)", key="lambda",
                              check=non_negative())


def build_base(cfg: L2Config, spec) -> Method:
    """The full-FT or LoRA method that the l2 / ewc methods put their penalty on (``method.base``)."""
    cls = BASES[cfg.base]
    inner = cls(cls.config.shared_with(cfg), spec)
    inner.name = cfg.name or inner.kind
    return inner


class OnBaseMethod(Penalized):
    """A penalty (named by the subclass's ``penalty``) on full FT or LoRA, settings at the method's top level."""

    penalty_name = ""
    config: ClassVar[type[L2Config]] = L2Config

    def __init__(self, cfg: Mapping[str, Any] | L2Config, spec):
        cfg = type(self).config.of(cfg)
        inner = build_base(cfg, spec)
        super().__init__(inner, build_penalty(self.penalty_name, inner, cfg))
        self.cfg = cfg


@register("l2", config=L2Config)
class L2(OnBaseMethod):
    penalty_name = "l2"
    boundary_refusal = L2Penalty.boundary_refusal
