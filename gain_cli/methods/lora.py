"""LoRA through PEFT: a fresh adapter per stage, merged into the weights after the stage.

Config: r, alpha, dropout, target_modules (null = the architecture table's defaults), lr.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import nn

from gain_cli.methods.base import Method, register


@register("lora")
class Lora(Method):
    def peft_config(self):
        from peft import LoraConfig

        targets = self.cfg.get("target_modules") or list(self.spec.lora_targets)
        return LoraConfig(
            r=int(self.cfg.get("r", 8)),
            lora_alpha=float(self.cfg.get("alpha", 16)),
            lora_dropout=float(self.cfg.get("dropout", 0.0)),
            target_modules=list(targets),
            bias="none",
            fan_in_fan_out=self.spec.model_type == "gpt2",
            task_type="CAUSAL_LM",
        )

    def attach(self, model: nn.Module) -> nn.Module:
        from peft import get_peft_model

        return get_peft_model(model, self.peft_config())

    def state_dict(self, model: nn.Module) -> dict[str, torch.Tensor]:
        from peft import get_peft_model_state_dict

        return {k: v.detach().cpu().clone() for k, v in get_peft_model_state_dict(model).items()}

    def load_state_dict(self, model: nn.Module, state: Mapping[str, torch.Tensor]) -> None:
        from peft import set_peft_model_state_dict

        res = set_peft_model_state_dict(model, dict(state))
        unexpected = getattr(res, "unexpected_keys", []) or []
        if unexpected:
            from gain_cli.errors import GainError

            raise GainError(f"saved LoRA state does not fit this model: unexpected keys e.g. {unexpected[:2]}")

    def merge(self, model: nn.Module) -> nn.Module:
        if hasattr(model, "merge_and_unload"):
            return model.merge_and_unload()
        return model
