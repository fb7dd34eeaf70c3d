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

This module also holds what the EWC method (``gain_cli.methods.ewc``) shares with it: building
the underlying full-FT / LoRA method, delegating to it, and reading the LoRA deltas.

Config (``configs/method/l2.yaml``): base (lora | full_ft), lambda, lr, weight_decay, and for
``base: lora`` the LoRA settings r, alpha, dropout, target_modules.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from gain_cli.errors import GainError, unknown_choice
from gain_cli.methods.base import Method, check_state_keys, register
from gain_cli.methods.full_ft import FullFT
from gain_cli.methods.lora import Lora

BASES = ("full_ft", "lora")
PEFT_PREFIX = "base_model.model."


def build_base(cfg: Mapping[str, Any], spec) -> Method:
    """The full-FT or LoRA method that a penalty method wraps (``method.base``)."""
    base = str(cfg.get("base", "full_ft"))
    if base not in BASES:
        raise unknown_choice("method.base", base, BASES)
    return (FullFT if base == "full_ft" else Lora)(cfg, spec)


def lora_layers(model: nn.Module) -> dict[str, nn.Module]:
    """PEFT LoRA layers keyed by the plain HF name of the weight they adapt (e.g. ``model.layers.0.self_attn.q_proj.weight``)."""
    from peft.tuners.lora import LoraLayer

    out = {}
    for name, mod in model.named_modules():
        if isinstance(mod, LoraLayer) and len(getattr(mod, "lora_A", {})):
            plain = name[len(PEFT_PREFIX):] if name.startswith(PEFT_PREFIX) else name
            out[f"{plain}.weight"] = mod
    return out


def lora_delta(mod: nn.Module) -> torch.Tensor:
    """ΔW = scale · B A of a LoRA layer in fp32, laid out like its base weight (differentiable)."""
    delta = None
    for adapter in mod.lora_A:
        a, b = mod.lora_A[adapter].weight, mod.lora_B[adapter].weight
        if a.dim() != 2:
            raise GainError(f"the L2/EWC penalty supports LoRA on linear projections only, not {type(mod).__name__}")
        d = (b.float() @ a.float()) * float(mod.scaling[adapter])
        if getattr(mod, "fan_in_fan_out", False):  # GPT-2 Conv1D: weight stored (in, out)
            d = d.T
        delta = d if delta is None else delta + d
    return delta


def lora_base_weights(model: nn.Module) -> dict[str, nn.Parameter]:
    return {name: mod.get_base_layer().weight for name, mod in lora_layers(model).items()}


def split_state(state: Mapping[str, torch.Tensor], prefix: str) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """(entries under ``prefix`` with the prefix removed, all other entries)."""
    own = {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
    rest = {k: v for k, v in state.items() if not k.startswith(prefix)}
    return own, rest


class OnBaseMethod(Method):
    """A method that adds a penalty to full FT or LoRA: everything else is the underlying method's.

    ``cumulative_state`` follows the underlying method (True for full FT: the last stage's state
    rebuilds the model; False for LoRA: every stage's adapter is replayed).
    """

    def __init__(self, cfg: Mapping[str, Any], spec):
        super().__init__(cfg, spec)
        self.inner = build_base(self.cfg, spec)
        self.inner.name = self.name
        self.base = self.inner.kind
        self.cumulative_state = self.inner.cumulative_state
        self.mergeable = self.inner.mergeable
        lam = self.cfg.get("lambda", 0.0)
        try:
            self.lam = float(lam or 0.0)
        except (TypeError, ValueError):
            raise GainError(f"method.lambda must be a number, got {lam!r}") from None
        if self.lam < 0:
            raise GainError(f"method.lambda must be >= 0, got {self.lam}")

    def attach(self, model: nn.Module) -> nn.Module:
        return self.inner.attach(model)

    @property
    def sharding_refusal(self) -> str | None:  # type: ignore[override]
        if self.kind == "ewc":
            return ("its Fisher estimate needs per-weight gradients of whole weights and its penalty reads whole "
                    "weights / LoRA deltas by name, which FSDP splits over the processes")
        if self.lam > 0:
            return (f"its {self.kind} penalty reads whole weights / LoRA deltas by name, which FSDP splits over the "
                    "processes (or set method.lambda=0)")
        return self.inner.sharding_refusal

    def open_sharded_stage(self, model: nn.Module) -> None:
        self.check_shardable()
        self.inner.open_sharded_stage(model)

    def close_sharded_stage(self, model: nn.Module) -> None:
        self.inner.close_sharded_stage(model)

    def stage_blocks(self, ctx) -> torch.Tensor:
        return self.inner.stage_blocks(ctx)

    def trainable_parameters(self, model: nn.Module) -> list[tuple[str, nn.Parameter]]:
        return self.inner.trainable_parameters(model)

    def optimizer_groups(self, model: nn.Module) -> list[dict[str, Any]]:
        return self.inner.optimizer_groups(model)

    def state_dict(self, model: nn.Module) -> dict[str, torch.Tensor]:
        return self.inner.state_dict(model)

    def load_state_dict(self, model: nn.Module, state: Mapping[str, torch.Tensor]) -> None:
        self.inner.load_state_dict(model, state)

    def finish_stage(self, model: nn.Module) -> nn.Module:
        return self.inner.finish_stage(model)

    def merge(self, model: nn.Module) -> nn.Module:
        return self.inner.merge(model)

    def param_summary(self, model: nn.Module) -> tuple[int, str]:
        return self.inner.param_summary(model)

    # -- shared by the penalties --
    def snapshot(self, model: nn.Module) -> dict[str, torch.Tensor]:
        """A detached copy of the trainable weights (the full-FT anchor)."""
        return {n: p.detach().clone() for n, p in self.inner.trainable_parameters(model)}

    def load_anchor(self, model: nn.Module, anchor: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        params = dict(self.inner.trainable_parameters(model))
        check_state_keys(self, set(params), anchor)
        return {n: anchor[n].to(params[n].device, params[n].dtype).clone() for n in params}

    def displacements(self, model: nn.Module, anchor: Mapping[str, torch.Tensor] | None) -> dict[str, torch.Tensor]:
        """θ − θ_prev per weight (fp32, differentiable): the LoRA deltas, or params minus the anchor."""
        if self.base == "lora":
            return {n: lora_delta(m) for n, m in lora_layers(model).items()}
        if anchor is None:
            return {}
        return {n: p.float() - anchor[n].float() for n, p in self.inner.trainable_parameters(model)}


@register("l2")
class L2(OnBaseMethod):
    ANCHOR = "l2_anchor/"
    boundary_refusal = "it needs stage boundaries: its penalty pulls toward the weights the previous stage ended with"

    def __init__(self, cfg: Mapping[str, Any], spec):
        super().__init__(cfg, spec)
        self.anchor: dict[str, torch.Tensor] | None = None
        self._final: float | None = None

    def attach(self, model: nn.Module) -> nn.Module:
        model = self.inner.attach(model)
        self.anchor = self.snapshot(model) if self.base == "full_ft" and self.lam > 0 else None
        return model

    def regularization(self, model: nn.Module) -> torch.Tensor | None:
        if self.lam == 0.0:
            return None
        d = self.displacements(model, self.anchor)
        if not d:
            return None
        return self.lam * sum((x ** 2).sum() for x in d.values())

    def state_dict(self, model: nn.Module) -> dict[str, torch.Tensor]:
        state = self.inner.state_dict(model)
        if self.anchor is not None:
            state.update({self.ANCHOR + n: t.detach().cpu().clone() for n, t in self.anchor.items()})
        return state

    def load_state_dict(self, model: nn.Module, state: Mapping[str, torch.Tensor]) -> None:
        anchor, rest = split_state(state, self.ANCHOR)
        self.inner.load_state_dict(model, rest)
        if anchor:
            if self.base != "full_ft":
                raise GainError(f"saved {self.name} state holds a full-FT anchor but method.base is {self.base}")
            self.anchor = self.load_anchor(model, anchor)

    def after_training(self, model: nn.Module, ctx) -> None:
        with torch.no_grad():
            pen = self.regularization(model)
        self._final = None if pen is None else float(pen)

    def stage_info(self) -> dict[str, Any]:
        return {"l2": {"base": self.base, "lambda": self.lam, "final_penalty": self._final}}
