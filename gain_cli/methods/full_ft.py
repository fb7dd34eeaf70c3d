"""Full fine-tuning: every weight trains; nothing to merge; the stage state is all weights."""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import nn

from gain_cli.errors import GainError
from gain_cli.methods.base import LR_RANGE, Method, MethodConfig, register
from gain_cli.schemas.typed import section, setting
from gain_cli.training.sharding import full, is_main_rank, is_partitioned, set_full_


@section("method")
class FullFtConfig(MethodConfig):
    lr: float = setting(2.0e-5, "AdamW learning rate of every weight (ours)",
                        check=LR_RANGE)


@register("full_ft", config=FullFtConfig)
class FullFT(Method):
    """Sharded, every weight is a DTensor: the state is gathered one weight at a time and kept by the main
    process only (the other processes get an empty dict: only the main process writes it)."""

    cumulative_state = True
    sharding_refusal = None
    trains_every_weight = True

    def table_trainable(self, model: nn.Module) -> int:
        return sum(p.numel() for p in model.parameters())

    def attach(self, model: nn.Module) -> nn.Module:
        for p in model.parameters():
            p.requires_grad_(True)
        return model

    def state_dict(self, model: nn.Module) -> dict[str, torch.Tensor]:
        seen: dict[int, str] = {}
        out = {}
        keep = is_main_rank() or not any(is_partitioned(p) for p in model.parameters())
        for k, v in model.state_dict(keep_vars=True).items():  # the parameters themselves (ZeRO-3: data empty)
            if id(v) in seen:  # tied weights (e.g. lm_head = embed_tokens): store once
                continue
            seen[id(v)] = k
            t = full(v)  # sharded: a collective, on every process
            if keep:
                out[k] = t.detach().cpu().clone()
        return out

    def load_state_dict(self, model: nn.Module, state: Mapping[str, torch.Tensor]) -> None:
        if any(is_partitioned(p) for p in model.parameters()):  # sharded: each process writes its own shards
            params = dict(model.named_parameters(remove_duplicate=False))
            missing = [n for n in params if n not in state and not any(params[n] is params[m] for m in state if m in params)]
            unexpected = [k for k in state if k not in params]
            if missing or unexpected:
                raise GainError(f"saved full_ft state does not fit this model: missing {missing[:2]}, unexpected {unexpected[:2]}")
            for k, t in state.items():
                set_full_(params[k], t)
            return
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

    def open_sharded_stage(self, model: nn.Module) -> None:
        self.attach(model)

    def close_sharded_stage(self, model: nn.Module) -> None:
        self.finish_stage(model)

    def param_summary(self, model: nn.Module) -> tuple[int, str]:
        n = self.count_trainable(model) or sum(p.numel() for p in model.parameters())
        return n, f"every weight of the model (tied weights counted once) = {n:,}"
