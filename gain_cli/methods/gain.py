"""GAIN: diagonal gain modulation of the input channels of chosen projections.

For a projection y = W x + b (``nn.Linear``, weight of shape (out, in)) GAIN learns s
(length ``in``, initialised to ones) and uses ``W_new = W · diag(s)``, i.e. y = W (s ⊙ x) + b.
GPT-2's ``Conv1D`` stores the weight transposed (in, out) with y = x W + b; there the same
maths is ``diag(s) · W``: row i of the stored weight is scaled by s_i. Either way the
adapted layer computes ``base(s ⊙ x)``, which is how the wrapper below runs during training;
``merge`` folds s into the weight so the adapted model has zero inference overhead. The bias is
left alone. This is exactly PEFT's (IA)³ with the same modules listed as *feedforward* modules
(tested in ``tests/test_methods.py``).

GAIN-attn targets the attention output projection (input = concatenated heads);
GAIN-FFN targets it and the FFN down projection (input = intermediate activations).
Because W·diag(s) only re-weights the columns of W, every output of a merged layer lies in
the column space of the pretrained W (the paper's Proposition 1, "output space preservation").

Precision: s is an fp32 parameter even when the model is bf16/fp16. The forward multiplies the
activation by s in fp32 (then casts back to the activation dtype), and the merge computes
``W.float() * s`` and casts once. Carrying across stages (``carry``):

  merge    fold s into the weights after every stage (the plain "merge per stage" scheme)
  product  keep the pretrained weights untouched and keep an fp32 running product
           s_1 ⊙ s_2 ⊙ … of the finished stages' gains in the wrapper (a buffer); the next
           stage trains a fresh s on top; ``merge`` folds the whole product once, in fp32.
           For a 16-bit model this avoids one rounding of W per stage.
  auto     (default) product when a target weight is not fp32, else merge.

Both give the same function (up to rounding); the saved stage state is the stage's own s either way.

Config (``configs/method/gain_*.yaml``):
  modules: attn | ffn | both | a list of attn, ffn and/or module paths relative to a decoder layer
           (e.g. [self_attn.o_proj, mlp.up_proj])
  parametrization: plain (s trained directly) | exp (s = exp(log_s), log_s initialised to 0)
  l2: strength λ of the pull λ·Σ(s − 1)² toward 1 (0 = off); applied to the stage's own s
  carry: auto | merge | product (see above)
  lr, weight_decay: the method's own optimiser settings
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from gain_cli.architectures import decoder_layers, get_submodule, in_features, is_transposed
from gain_cli.errors import GainError
from gain_cli.methods.base import LR_RANGE, Method, MethodConfig, check_state_keys, freeze, register
from gain_cli.schemas.typed import non_negative, section, setting
from gain_cli.training.sharding import (full, global_sum, is_dtensor, local, mul_replicated_, reshard, set_full_,
                                       shape_of)

PARAMETRIZATIONS = ("plain", "exp")
CARRY_MODES = ("auto", "merge", "product")


def scale_input_channels(weight: torch.Tensor, s: torch.Tensor, conv1d: bool) -> torch.Tensor:
    """``W · diag(s)`` for an ``nn.Linear`` weight (out, in); ``diag(s) · W`` for a Conv1D weight (in, out). fp32."""
    s = s.float()
    return weight.float() * (s[:, None] if conv1d else s[None, :])


class GainWrapper(nn.Module):
    """``base(s ⊙ x)`` with s kept in fp32 (trained in fp32 even for bf16 models).

    ``gain`` is the stage's trainable vector (s itself, or log s with ``exp``); ``carried`` (fp32
    buffer, or None) is the product of the gains of earlier stages not yet folded into the weight.
    """

    def __init__(self, base: nn.Module, parametrization: str = "plain"):
        super().__init__()
        self.base = base
        self.parametrization = parametrization
        n = in_features(base)
        self.gain = nn.Parameter(self._init(n, base.weight.device))
        self.register_buffer("carried", None, persistent=False)
        self.stage_open = True  # False between finish_stage (carry=product) and the next attach

    def _init(self, n: int, device) -> torch.Tensor:
        if self.parametrization == "exp":
            return torch.zeros(n, device=device, dtype=torch.float32)
        return torch.ones(n, device=device, dtype=torch.float32)

    @property
    def is_conv1d(self) -> bool:
        return is_transposed(self.base)

    def scale(self) -> torch.Tensor:
        """The stage's own s (fp32)."""
        return torch.exp(self.gain) if self.parametrization == "exp" else self.gain

    def total_scale(self) -> torch.Tensor:
        """s of this stage times the carried product of earlier stages (fp32)."""
        s = self.scale()
        return s if self.carried is None else s * self.carried

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.base((x.float() * self.total_scale()).to(x.dtype))

    @torch.no_grad()
    def fold(self) -> None:
        """carry=product: move the stage's s into the fp32 running product; reset s."""
        self.carried = self.total_scale().detach().clone()
        self.gain.copy_(self._init(self.gain.numel(), self.gain.device))
        self.gain.requires_grad_(False)
        self.stage_open = False

    @torch.no_grad()
    def merged_base(self) -> nn.Module:
        """Fold s (and the carried product) into the weight in fp32 and return the plain projection."""
        w = self.base.weight
        w.copy_(scale_input_channels(w, self.total_scale(), self.is_conv1d).to(w.dtype))
        return self.base


def module_paths(modules: Any, spec) -> list[str]:
    """Resolve ``method.modules`` (attn | ffn | both | list of those and module paths) to paths in a decoder layer."""
    if modules is None:
        modules = ["attn", "ffn"]
    if isinstance(modules, str):
        modules = [modules]
    alias = {"attn": [spec.attn_out], "ffn": [spec.ffn_down], "both": [spec.attn_out, spec.ffn_down]}
    out: list[str] = []
    for m in modules:
        for p in alias.get(str(m), [str(m)]):
            if p not in out:
                out.append(p)
    if not out:
        raise GainError("method.modules is empty (use attn, ffn, both or module paths relative to a decoder layer)")
    return out


def module_label(path: str, spec) -> str:
    return {spec.attn_out: "attn", spec.ffn_down: "ffn"}.get(path, path)


@section("method")
class GainConfig(MethodConfig):
    modules: Any = setting(["attn", "ffn"], "where s scales the inputs: attn (the attention output projection) | ffn "
                           "(the FFN down projection) | both | module paths relative to a decoder layer; GAIN-attn is "
                           "[attn], GAIN-FFN [attn, ffn] (the paper's two variants)", paper=True)
    parametrization: str = setting("plain", "plain: s | exp: s = exp(log_s)", choices=PARAMETRIZATIONS)
    l2: float = setting(0.0, "strength of sum((s - 1)^2) added to the loss; 0: off", check=non_negative())
    carry: str = setting("auto", "merge: fold s into the weights after each stage | product: keep an fp32 running "
                         "product | auto: product for 16-bit weights", choices=CARRY_MODES)
    lr: float = setting(3.0e-3, "AdamW learning rate of s (ours; the paper's is not public)",
                        check=LR_RANGE)


@register("gain", config=GainConfig)
class Gain(Method):
    sharding_refusal = None

    def __init__(self, cfg: Mapping[str, Any] | GainConfig, spec):
        super().__init__(cfg, spec)
        self.parametrization, self.carry, self.l2 = self.cfg.parametrization, self.cfg.carry, float(self.cfg.l2)

    def _module_paths(self) -> list[str]:
        return module_paths(self.cfg.modules, self.spec)

    def _targets(self, model: nn.Module) -> list[tuple[str, nn.Module, str]]:
        """(parameter-name prefix, attribute owner, attribute name) for every target, in layer order."""
        out = []
        for i, layer in enumerate(decoder_layers(model, self.spec)):
            for path in self._module_paths():
                owner_path, _, attr = path.rpartition(".")
                owner = get_submodule(layer, owner_path) if owner_path else layer
                if not isinstance(getattr(owner, attr, None), nn.Module):
                    raise GainError(f"GAIN target '{path}' not found in decoder layer {i} of {type(model).__name__} "
                                    "(method.modules takes attn, ffn, both or module paths relative to a decoder layer)")
                out.append((f"{self.spec.layers}.{i}.{path}", owner, attr))
        return out

    def wrappers(self, model: nn.Module) -> dict[str, GainWrapper]:
        return {name: getattr(owner, attr) for name, owner, attr in self._targets(model)
                if isinstance(getattr(owner, attr), GainWrapper)}

    def attach(self, model: nn.Module) -> nn.Module:
        freeze(model)
        for _, owner, attr in self._targets(model):
            mod = getattr(owner, attr)
            if isinstance(mod, GainWrapper):
                if mod.stage_open:
                    raise GainError("GAIN is already attached to this model (finish_stage or merge first)")
                if mod.parametrization != self.parametrization:
                    raise GainError(f"GAIN wrapper uses parametrization '{mod.parametrization}', "
                                    f"this method '{self.parametrization}'")
                mod.gain.requires_grad_(True)
                mod.stage_open = True
            else:
                setattr(owner, attr, GainWrapper(mod, self.parametrization))
        return model

    def regularization(self, model: nn.Module) -> torch.Tensor | None:
        if self.l2 == 0.0:
            return None
        # on the local shards of a sharded gain (summed over the processes); the whole vector otherwise
        wrappers = list(self.wrappers(model).values())
        total = sum(((self._scale_of(local(w.gain), w) - 1.0) ** 2).sum() for w in wrappers)
        return self.l2 * (global_sum(total) if any(is_dtensor(w.gain) for w in wrappers) else total)

    def regularizes(self) -> bool:
        return self.l2 != 0.0

    def _scale_of(self, gain: torch.Tensor, w: GainWrapper) -> torch.Tensor:
        return torch.exp(gain) if w.parametrization == "exp" else gain

    def state_dict(self, model: nn.Module) -> dict[str, torch.Tensor]:
        return {f"{name}.gain": full(w.gain).detach().float().cpu().clone() for name, w in self.wrappers(model).items()}

    def load_state_dict(self, model: nn.Module, state: Mapping[str, torch.Tensor]) -> None:
        wrappers = self.wrappers(model)
        check_state_keys(self, {f"{n}.gain" for n in wrappers}, state)
        with torch.no_grad():
            for name, w in wrappers.items():
                t = state[f"{name}.gain"]
                if tuple(t.shape) != shape_of(w.gain):
                    raise GainError(f"saved {self.name} state: {name}.gain has shape {tuple(t.shape)}, "
                                    f"the model needs {shape_of(w.gain)}")
                set_full_(w.gain, t.float())

    def carry_mode(self, model: nn.Module) -> str:
        if self.carry != "auto":
            return self.carry
        wrappers = self.wrappers(model).values()
        return "product" if any(w.base.weight.dtype != torch.float32 for w in wrappers) else "merge"

    def finish_stage(self, model: nn.Module) -> nn.Module:
        if self.carry_mode(model) == "merge":
            return self.merge(model)
        for w in self.wrappers(model).values():
            w.fold()
        return model

    # -- sharded: the wrappers stay, the gains are folded into the local weight shards and set back to the init --
    def open_sharded_stage(self, model: nn.Module) -> None:
        for w in self.wrappers(model).values():
            set_full_(w.gain, w._init(shape_of(w.gain)[0], "cpu"))
            w.gain.requires_grad_(True)
            w.stage_open = True

    def close_sharded_stage(self, model: nn.Module) -> None:
        reshard(model)
        product = self.carry_mode(model) == "product"
        for w in self.wrappers(model).values():
            s = self._scale_of(full(w.gain).detach().float(), w)
            total = s if w.carried is None else s * w.carried
            if product:  # the fp32 running product stays in the wrapper, the weight stays as it is
                w.carried = total.clone()
            else:  # W·diag(s): every output-row shard holds all input columns (Conv1D: diag(s)·W, rows = inputs)
                mul_replicated_(w.base.weight, total[:, None] if w.is_conv1d else total[None, :])
                w.carried = None
            set_full_(w.gain, w._init(shape_of(w.gain)[0], "cpu"))
            w.gain.requires_grad_(False)
            w.stage_open = False

    def merge(self, model: nn.Module) -> nn.Module:
        for _, owner, attr in self._targets(model):
            mod = getattr(owner, attr)
            if isinstance(mod, GainWrapper):
                setattr(owner, attr, mod.merged_base())
        return model

    def table_trainable(self, model: nn.Module) -> int:
        return self.param_summary(model)[0]  # one gain per input of each wrapped projection, attached or not

    def param_summary(self, model: nn.Module) -> tuple[int, str]:
        per_layer: list[list[int]] = []
        for i, layer in enumerate(decoder_layers(model, self.spec)):
            row = []
            for path in self._module_paths():
                mod = get_submodule(layer, path)
                row.append(mod.gain.numel() if isinstance(mod, GainWrapper) else in_features(mod))
            per_layer.append(row)
        total = sum(map(sum, per_layer))
        labels = [module_label(p, self.spec) for p in self._module_paths()]
        n = len(per_layer)
        if n and all(r == per_layer[0] for r in per_layer):
            terms = [f"{v:,} ({lab})" for v, lab in zip(per_layer[0], labels)]
            inner = terms[0] if len(terms) == 1 else "(" + " + ".join(terms) + ")"
            return total, f"{n} layers × {inner} = {total:,}"
        return total, f"Σ over {n} layers of the input sizes of {', '.join(labels)} = {total:,}"
