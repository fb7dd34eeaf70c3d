"""Full fine-tuning: every weight trains; nothing to merge; the stage state is all weights."""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import nn

from gain_cli.errors import GainError
from gain_cli.methods.base import Method, register


@register("full_ft")
class FullFT(Method):
    cumulative_state = True

    def attach(self, model: nn.Module) -> nn.Module:
        for p in model.parameters():
            p.requires_grad_(True)
        return model

    def state_dict(self, model: nn.Module) -> dict[str, torch.Tensor]:
        seen: dict[int, str] = {}
        out = {}
        for k, v in model.state_dict().items():
            ptr = v.data_ptr()
            if ptr in seen:  # tied weights (e.g. lm_head = embed_tokens): store once
                continue
            seen[ptr] = k
            out[k] = v.detach().cpu().clone()
        return out

    def load_state_dict(self, model: nn.Module, state: Mapping[str, torch.Tensor]) -> None:
        res = model.load_state_dict(dict(state), strict=False)
        tied = set(getattr(model, "_tied_weights_keys", None) or [])
        missing = [k for k in res.missing_keys if k not in tied and not any(k.endswith(t) for t in tied)]
        if missing or res.unexpected_keys:
            raise GainError(f"saved full_ft state does not fit this model: missing {missing[:2]}, unexpected {res.unexpected_keys[:2]}")

    def finish_stage(self, model: nn.Module) -> nn.Module:
        for p in model.parameters():
            p.requires_grad_(False)
        return model

    def merge(self, model: nn.Module) -> nn.Module:
        return model

    def param_summary(self, model: nn.Module) -> tuple[int, str]:
        n = self.count_trainable(model) or sum(p.numel() for p in model.parameters())
        return n, f"every weight of the model (tied weights counted once) = {n:,}"
