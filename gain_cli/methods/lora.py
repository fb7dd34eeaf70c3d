"""LoRA through PEFT: a fresh adapter per stage, merged into the weights after the stage.

Config: r, alpha, dropout, target_modules (null = the architecture table's ``lora_targets``), lr.
GPT-2's Conv1D projections are handled by PEFT with ``fan_in_fan_out=True``.
Merge: PEFT's ``merge_and_unload`` (W += (alpha/r)·B·A, the adapter weights are fp32).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from gain_cli.errors import GainError
from gain_cli.methods.base import Method, check_state_keys, per_layer_formula, register


def lora_config(cfg: Mapping[str, Any], spec):
    """A PEFT ``LoraConfig`` from a method config (``r``, ``alpha``, ``dropout``, ``target_modules``)."""
    from peft import LoraConfig

    targets = cfg.get("target_modules") or list(spec.lora_targets)
    if isinstance(targets, str):
        targets = [targets]
    if not targets:
        raise GainError(f"no LoRA target modules for architecture '{spec.model_type}': set method.target_modules "
                        "or model.arch_overrides.lora_targets")
    return LoraConfig(
        r=int(cfg.get("r", 8)),
        lora_alpha=float(cfg.get("alpha", 16)),
        lora_dropout=float(cfg.get("dropout", 0.0)),
        target_modules=list(targets),
        bias="none",
        fan_in_fan_out=spec.model_type == "gpt2",
        task_type="CAUSAL_LM",
    )


def peft_state(model: nn.Module) -> dict[str, torch.Tensor]:
    from peft import get_peft_model_state_dict

    return {k: v.detach().cpu().clone() for k, v in get_peft_model_state_dict(model).items()}


def load_peft_state(method: Method, model: nn.Module, state: Mapping[str, torch.Tensor]) -> None:
    """Load an adapter state saved by ``peft_state`` into a freshly attached PeftModel (keys must match exactly)."""
    from peft import get_peft_model_state_dict, set_peft_model_state_dict

    expected = get_peft_model_state_dict(model)
    check_state_keys(method, set(expected), state)
    for k, v in expected.items():
        if tuple(v.shape) != tuple(state[k].shape):
            raise GainError(f"saved {method.name} state: {k} has shape {tuple(state[k].shape)}, "
                            f"the model needs {tuple(v.shape)}")
    set_peft_model_state_dict(model, dict(state))


def adapter_formula(model: nn.Module, spec, prefix: str = "") -> tuple[int, str]:
    """(trainable adapter parameters, per-layer formula) of a PeftModel (LoRA or (IA)³)."""
    from peft.tuners.ia3 import IA3Layer
    from peft.tuners.lora import LoraLayer

    entries = []
    for name, mod in model.named_modules():
        if isinstance(mod, LoraLayer) and len(mod.lora_A):
            for a in mod.lora_A:
                r = mod.r[a]
                n = sum(p.numel() for p in mod.lora_A[a].parameters()) + sum(p.numel() for p in mod.lora_B[a].parameters())
                entries.append((name, f"{r}·({mod.in_features:,}+{mod.out_features:,})", n))
        elif isinstance(mod, IA3Layer) and len(mod.ia3_l):
            for a in mod.ia3_l:
                n = mod.ia3_l[a].numel()
                side = "in" if mod.is_feedforward else "out"
                entries.append((name, f"{n:,} {side}", n))
    total = sum(n for *_, n in entries)
    return total, per_layer_formula(spec, entries, prefix)


class PeftMethod(Method):
    """A method that is one PEFT adapter per stage, merged with ``merge_and_unload`` (LoRA, (IA)^3)."""

    def peft_config(self):
        raise NotImplementedError

    def attach(self, model: nn.Module) -> nn.Module:
        from peft import get_peft_model

        return get_peft_model(model, self.peft_config())

    def state_dict(self, model: nn.Module) -> dict[str, torch.Tensor]:
        return peft_state(model)

    def load_state_dict(self, model: nn.Module, state: Mapping[str, torch.Tensor]) -> None:
        load_peft_state(self, model, state)

    def merge(self, model: nn.Module) -> nn.Module:
        if hasattr(model, "merge_and_unload"):
            return model.merge_and_unload()
        return model

    def param_summary(self, model: nn.Module) -> tuple[int, str]:
        return adapter_formula(model, self.spec)


@register("lora")
class Lora(PeftMethod):
    def peft_config(self):
        return lora_config(self.cfg, self.spec)
