"""DoRA through PEFT (``LoraConfig(use_dora=True)``; Liu et al. 2024, "DoRA: Weight-Decomposed Low-Rank Adaptation").

Each target weight is split into a magnitude (one value per output row, trained) and a direction adapted by LoRA:
``W' = m · (W + (alpha/r)·B·A) / ‖W + (alpha/r)·B·A‖`` (row norms). Like LoRA a fresh adapter per stage, merged into the
weights after it (PEFT's ``merge_and_unload``); an additive baseline, compared in the GAIN paper's second version.
Config: LoRA's (r, alpha, dropout, target_modules, lr). Not shardable: the magnitude rescales whole weight rows, which
``train.sharding=fsdp|zero3`` would have to gather; one process or data parallel.
"""

from __future__ import annotations

from torch import nn

from gain_cli.methods.base import per_layer_formula, register
from gain_cli.methods.lora import Lora, LoraConfig, lora_config


@register("dora", config=LoraConfig)
class Dora(Lora):
    sharding_refusal = "its magnitude vector rescales whole weight rows (no sharded implementation)"

    def peft_config(self):
        config = lora_config(self.cfg, self.spec)
        config.use_dora = True
        return config

    def param_summary(self, model: nn.Module) -> tuple[int, str]:
        from peft.tuners.lora import LoraLayer

        entries = []
        for name, mod in model.named_modules():
            if isinstance(mod, LoraLayer) and len(mod.lora_A):
                for a in mod.lora_A:
                    r, i, o = mod.r[a], mod.in_features, mod.out_features
                    n = sum(p.numel() for p in (*mod.lora_A[a].parameters(), *mod.lora_B[a].parameters(),
                                                *mod.lora_magnitude_vector[a].parameters()))
                    entries.append((name, f"{r}·({i:,}+{o:,})+{o:,}", n))
        return sum(n for *_, n in entries), per_layer_formula(self.spec, entries)
