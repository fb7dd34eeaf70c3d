"""GAIN: diagonal gain modulation of the input channels of chosen projections.

For a projection y = W x + b (``nn.Linear``, weight of shape (out, in)) GAIN learns s
(length ``in``, initialised to ones) and uses ``W_new = W · diag(s)``, i.e. y = W (s ⊙ x) + b.
GPT-2's ``Conv1D`` stores the weight transposed (in, out) with y = x W + b; there the same
maths is ``diag(s) · W``: row i of the stored weight is scaled by s_i. Either way the
adapted layer computes ``base(s ⊙ x)``, which is how the wrapper below runs during training;
``merge`` folds s into the weight so the adapted model has zero inference overhead.

GAIN-attn targets the attention output projection (input = concatenated heads);
GAIN-FFN targets it and the FFN down projection (input = intermediate activations).
Because W·diag(s) only re-weights the columns of W, every output of a merged layer lies in
the column space of the pretrained W (the paper's Proposition 1, "output space preservation").

Config (``configs/method/gain_*.yaml``):
  modules: [attn] | [ffn] | [attn, ffn] | explicit module paths relative to a decoder layer
  parametrization: plain (s) | exp (s = exp(log_s), log_s initialised to 0)
  l2: strength of the pull sum((s - 1)^2) toward 1 (0 = off)
  lr, weight_decay: the method's own optimiser settings
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

from gain_cli.architectures import decoder_layers, get_submodule
from gain_cli.errors import GainError
from gain_cli.methods.base import Method, check_state_keys, freeze, register

PARAMETRIZATIONS = ("plain", "exp")


def _in_features(module: nn.Module) -> int:
    if isinstance(module, Conv1D):
        return module.weight.shape[0]
    if isinstance(module, nn.Linear):
        return module.in_features
    raise GainError(f"GAIN supports nn.Linear and GPT-2 Conv1D projections, not {type(module).__name__}")


class GainWrapper(nn.Module):
    """``base(s ⊙ x)`` with s kept in fp32 (trained in fp32 even for bf16 models)."""

    def __init__(self, base: nn.Module, parametrization: str = "plain"):
        super().__init__()
        self.base = base
        self.parametrization = parametrization
        n = _in_features(base)
        dev = base.weight.device
        init = torch.zeros(n, device=dev) if parametrization == "exp" else torch.ones(n, device=dev)
        self.gain = nn.Parameter(init.float())

    def scale(self) -> torch.Tensor:
        return torch.exp(self.gain) if self.parametrization == "exp" else self.gain

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.base(x * self.scale().to(x.dtype))

    @torch.no_grad()
    def merged_base(self) -> nn.Module:
        """Fold s into the weight in fp32 and return the plain projection."""
        w = self.base.weight
        s = self.scale().float()
        if isinstance(self.base, Conv1D):  # stored (in, out): scale rows
            new = w.float() * s[:, None]
        else:  # nn.Linear, stored (out, in): scale columns
            new = w.float() * s[None, :]
        w.copy_(new.to(w.dtype))
        return self.base


@register("gain")
class Gain(Method):
    def _module_paths(self) -> list[str]:
        mods = self.cfg.get("modules") or ["attn", "ffn"]
        alias = {"attn": self.spec.attn_out, "ffn": self.spec.ffn_down}
        return [alias.get(m, m) for m in mods]

    def _parametrization(self) -> str:
        p = self.cfg.get("parametrization", "plain")
        if p not in PARAMETRIZATIONS:
            raise GainError(f"unknown method.parametrization '{p}' (valid: {', '.join(PARAMETRIZATIONS)})")
        return p

    def _targets(self, model: nn.Module):
        """(parameter-name prefix, layer, attribute-owner, attribute-name) for every target."""
        out = []
        for i, layer in enumerate(decoder_layers(model, self.spec)):
            for path in self._module_paths():
                owner_path, _, attr = path.rpartition(".")
                owner = get_submodule(layer, owner_path) if owner_path else layer
                if not hasattr(owner, attr):
                    raise GainError(f"GAIN target '{path}' not found in decoder layer {i} of {type(model).__name__}")
                out.append((f"{self.spec.layers}.{i}.{path}", owner, attr))
        return out

    def wrappers(self, model: nn.Module) -> dict[str, GainWrapper]:
        return {name: getattr(owner, attr) for name, owner, attr in self._targets(model)
                if isinstance(getattr(owner, attr), GainWrapper)}

    def attach(self, model: nn.Module) -> nn.Module:
        freeze(model)
        param = self._parametrization()
        for _, owner, attr in self._targets(model):
            mod = getattr(owner, attr)
            if isinstance(mod, GainWrapper):
                raise GainError("GAIN is already attached to this model")
            setattr(owner, attr, GainWrapper(mod, param))
        return model

    def regularization(self, model: nn.Module) -> torch.Tensor | None:
        lam = float(self.cfg.get("l2", 0.0) or 0.0)
        if lam == 0.0:
            return None
        return lam * sum(((w.scale() - 1.0) ** 2).sum() for w in self.wrappers(model).values())

    def state_dict(self, model: nn.Module) -> dict[str, torch.Tensor]:
        return {f"{name}.gain": w.gain.detach().float().cpu().clone() for name, w in self.wrappers(model).items()}

    def load_state_dict(self, model: nn.Module, state: Mapping[str, torch.Tensor]) -> None:
        wrappers = self.wrappers(model)
        check_state_keys(self, {f"{n}.gain" for n in wrappers}, state)
        with torch.no_grad():
            for name, w in wrappers.items():
                w.gain.copy_(state[f"{name}.gain"].to(w.gain.device, torch.float32))

    def merge(self, model: nn.Module) -> nn.Module:
        for _, owner, attr in self._targets(model):
            mod = getattr(owner, attr)
            if isinstance(mod, GainWrapper):
                setattr(owner, attr, mod.merged_base())
        return model
