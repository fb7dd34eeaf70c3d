"""LoRA through PEFT: a fresh adapter per stage, merged into the weights after the stage.

Config: r, alpha, dropout, target_modules (null = the architecture table's ``lora_targets``), lr.
GPT-2's Conv1D projections are handled by PEFT with ``fan_in_fan_out=True``.
Merge: PEFT's ``merge_and_unload`` (W += (alpha/r)·B·A, the adapter weights are fp32).
"""

from __future__ import annotations

import copy
from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from gain_cli.architectures import decoder_layers
from gain_cli.errors import GainError
from gain_cli.methods.base import LR_RANGE, Method, MethodConfig, check_state_keys, per_layer_formula, register
from gain_cli.schemas.typed import at_least, between, positive, section, setting
from gain_cli.training.sharding import (
    add_full_,
    full,
    is_partitioned,
    mul_replicated_,
    reshard,
    set_full_,
    shape_of,
)

ADAPTER = "default"  # PEFT's adapter name (one adapter per stage)


@section("method")
class LoraConfig(MethodConfig):
    """LoRA's settings (PEFT's ``LoraConfig``); DoRA, replay-LoRA, IMSM and the l2 / ewc methods on LoRA share them."""

    r: int = setting(8, "adapter rank", check=at_least(1))
    alpha: float = setting(16, "scale numerator: the adapter's delta is (alpha / r) · B A",
                           check=positive("a finite number > 0 (LoRA's scale is alpha / r)"))
    dropout: float = setting(0.0, "dropout on the adapter's input",
                             check=between(0, 1, "a probability in [0, 1)", open_hi=True))
    target_modules: Any = setting(None, "module names to adapt; null: the architecture table's defaults (attention "
                                  "projections)")
    lr: float = setting(2.0e-4, "AdamW learning rate of the adapter (ours)",
                        check=LR_RANGE)


def lora_config(cfg: LoraConfig, spec):
    """A PEFT ``LoraConfig`` from a method config (``r``, ``alpha``, ``dropout``, ``target_modules``)."""
    from peft import LoraConfig as PeftLoraConfig

    targets = cfg.target_modules or list(spec.lora_targets)
    if isinstance(targets, str):
        targets = [targets]
    if not targets:
        raise GainError(f"no LoRA target modules for architecture '{spec.model_type}': set method.target_modules "
                        "or model.arch_overrides.lora_targets")
    return PeftLoraConfig(
        r=int(cfg.r),
        lora_alpha=float(cfg.alpha),
        lora_dropout=float(cfg.dropout),
        target_modules=list(targets),
        bias="none",
        fan_in_fan_out=spec.transposed_weights,
        task_type="CAUSAL_LM",
    )


def attach_peft(model: nn.Module, peft_config, method: str) -> nn.Module:
    """PEFT's ``get_peft_model``, its refusals (a target module the model lacks, a bad value) as one line."""
    from peft import get_peft_model

    try:
        return get_peft_model(model, peft_config)
    except (ValueError, TypeError) as exc:
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise GainError(f"method {method}: PEFT cannot build the adapter: {first} "
                        "(check method.target_modules and the method's values)") from exc


def check_peft_targets(model: nn.Module, peft_config, method: str) -> None:
    """Every entry of the adapter's ``target_modules`` names a module of ``model`` (PEFT's own matching), so that a
    typo is one line before the run starts, not PEFT's error when the first stage attaches."""
    from peft.tuners.tuners_utils import check_target_module_exists

    targets = peft_config.target_modules
    targets = [targets] if isinstance(targets, str) else sorted(targets or ())
    names = [n for n, _ in model.named_modules()]
    for target in targets:
        one = copy.copy(peft_config)  # PEFT's matching, one target at a time
        one.target_modules = {target}
        if not any(check_target_module_exists(one, n) for n in names):
            leaves = sorted({n.rsplit(".", 1)[-1] for n, m in model.named_modules()  # Linear and GPT-2's Conv1D
                             if getattr(m, "weight", None) is not None and m.weight.dim() == 2
                             and not isinstance(m, nn.Embedding)})
            raise GainError(f"method {method}: target module '{target}' is not in the model (method.target_modules; "
                            f"its projections: {', '.join(leaves)})")


def _adapter_parameters(model: nn.Module) -> dict[str, nn.Parameter]:
    """The adapter's parameters by name (what PEFT's state dict is made of)."""
    return {n: p for n, p in model.named_parameters() if "lora_" in n or "ia3_" in n}


def _peft_keys(model: nn.Module) -> dict[str, str]:
    """PEFT's state-dict key of every adapter parameter name (``...lora_A.default.weight`` → ``...lora_A.weight``),
    found by PEFT's own renaming so that a sharded model saves under the keys an unsharded one does."""
    from peft import get_peft_model_state_dict

    names = list(_adapter_parameters(model))
    tagged = {n: torch.tensor(i) for i, n in enumerate(names)}
    return {names[int(v)]: k for k, v in get_peft_model_state_dict(model, state_dict=tagged).items()}


def peft_state(model: nn.Module) -> dict[str, torch.Tensor]:
    from peft import get_peft_model_state_dict

    params = _adapter_parameters(model)
    if any(is_partitioned(p) for p in params.values()):  # sharded: every process gathers, in the same order
        return {key: full(params[name]).detach().cpu().clone() for name, key in _peft_keys(model).items()}
    return {k: v.detach().cpu().clone() for k, v in get_peft_model_state_dict(model).items()}


def load_peft_state(method: Method, model: nn.Module, state: Mapping[str, torch.Tensor]) -> None:
    """Load an adapter state saved by ``peft_state`` into a freshly attached PeftModel (keys must match exactly)."""
    from peft import set_peft_model_state_dict

    params = _adapter_parameters(model)
    keys = _peft_keys(model)
    expected = {keys[n]: p for n, p in params.items() if n in keys}
    check_state_keys(method, set(expected), state)
    for k, v in expected.items():
        if shape_of(v) != tuple(state[k].shape):
            raise GainError(f"saved {method.name} state: {k} has shape {tuple(state[k].shape)}, "
                            f"the model needs {shape_of(v)}")
    if any(is_partitioned(p) for p in params.values()):  # sharded: each process writes its own shards
        for k, p in expected.items():
            set_full_(p, state[k])
        return
    set_peft_model_state_dict(model, dict(state))


def _peft_layers(model: nn.Module) -> list[nn.Module]:
    from peft.tuners.ia3 import IA3Layer
    from peft.tuners.lora import LoraLayer

    return [m for _, m in model.named_modules() if isinstance(m, (LoraLayer, IA3Layer))]


def fresh_lora_values(mod: nn.Module, adapter: str = ADAPTER) -> tuple[torch.Tensor, torch.Tensor]:
    """(A, B) as PEFT's ``get_peft_model`` initialises a LoRA linear layer, with the same random draws in the same
    order: ``nn.Linear(in, r)`` and ``nn.Linear(r, out)`` are built (each draws its default init), then A is drawn
    again (Kaiming-uniform, a = √5) and B is zero (``LoraLayer.update_layer`` / ``reset_lora_parameters``; checked
    against PEFT in tests/test_sharding.py)."""
    import math

    r = mod.r[adapter]
    a = nn.Linear(mod.in_features, r, bias=False).weight.detach()
    nn.Linear(r, mod.out_features, bias=False)
    nn.init.kaiming_uniform_(a, a=math.sqrt(5))
    return a, torch.zeros(mod.out_features, r)


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


PEFT_PREFIX = "base_model.model."


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


class PeftMethod(Method):
    """A method that is one PEFT adapter per stage, merged with ``merge_and_unload`` (LoRA, (IA)^3).

    Sharded (``train.sharding=fsdp``) the PeftModel stays for the whole run: a stage reopens the adapter with fresh
    values (LoRA: PEFT's random draws, B = 0; (IA)³: ones) and ends by adding ΔW = scale·B·A to the local shards of
    each base weight ((IA)³: multiplying them by the vectors), after which the adapter is the identity again.
    """

    sharding_refusal = None

    def peft_config(self):
        raise NotImplementedError

    def check_model(self, model: nn.Module) -> None:
        check_peft_targets(model, self.peft_config(), self.name)

    def attach(self, model: nn.Module) -> nn.Module:
        return attach_peft(model, self.peft_config(), self.name)

    def state_dict(self, model: nn.Module) -> dict[str, torch.Tensor]:
        return peft_state(model)

    def load_state_dict(self, model: nn.Module, state: Mapping[str, torch.Tensor]) -> None:
        load_peft_state(self, model, state)

    def merge(self, model: nn.Module) -> nn.Module:
        if hasattr(model, "merge_and_unload"):
            return model.merge_and_unload()
        return model

    def open_sharded_stage(self, model: nn.Module) -> None:
        from peft.tuners.lora import LoraLayer

        for mod in _peft_layers(model):
            if isinstance(mod, LoraLayer):
                a, b = fresh_lora_values(mod)
                set_full_(mod.lora_A[ADAPTER].weight, a)
                set_full_(mod.lora_B[ADAPTER].weight, b)
            else:
                set_full_(mod.ia3_l[ADAPTER], torch.ones(shape_of(mod.ia3_l[ADAPTER])))
        for p in _adapter_parameters(model).values():
            p.requires_grad_(True)

    def close_sharded_stage(self, model: nn.Module) -> None:
        from peft.tuners.lora import LoraLayer
        from peft.utils.other import transpose

        reshard(model)
        for mod in _peft_layers(model):
            base = mod.get_base_layer()
            fifo = getattr(mod, "fan_in_fan_out", False)
            if isinstance(mod, LoraLayer):  # W += scale·B·A (laid out like W), then B = 0
                a, b = full(mod.lora_A[ADAPTER].weight).float(), full(mod.lora_B[ADAPTER].weight).float()
                add_full_(base.weight, transpose(b @ a, fifo) * float(mod.scaling[ADAPTER]))
                set_full_(mod.lora_B[ADAPTER].weight, torch.zeros(b.shape))
            else:  # (IA)³: W ⊙ l (rows or columns), the bias too for output-side vectors; then l = 1
                vec = full(mod.ia3_l[ADAPTER]).detach().float()
                mul_replicated_(base.weight, transpose(vec, fifo))
                if not mod.is_feedforward and getattr(base, "bias", None) is not None:
                    mul_replicated_(base.bias, vec.reshape(shape_of(base.bias)))
                set_full_(mod.ia3_l[ADAPTER], torch.ones(vec.shape))
        for p in _adapter_parameters(model).values():
            p.requires_grad_(False)

    def param_summary(self, model: nn.Module) -> tuple[int, str]:
        return adapter_formula(model, self.spec)


@register("lora", config=LoraConfig)
class Lora(PeftMethod):
    # a penalty measures ΔW = scale · B A of each adapted weight (the distance to the previous merged model): no
    # anchor copy; EWC's Fisher is taken w.r.t. the adapted base weights
    anchored = False

    def peft_config(self):
        return lora_config(self.cfg, self.spec)

    def penalty_weights(self, model: nn.Module) -> dict[str, torch.Tensor]:
        return lora_base_weights(model)

    def table_trainable(self, model: nn.Module) -> int:
        """r · (in + out) of every targeted 2-D projection of the decoder layers."""
        r = int(self.cfg.r)
        targets = self.cfg.target_modules or self.spec.lora_targets
        targets = (targets,) if isinstance(targets, str) else tuple(targets)
        n = 0
        for layer in decoder_layers(model, self.spec):
            for name, mod in layer.named_modules():
                if name and any(name == t or name.endswith("." + t) or name.split(".")[-1] == t for t in targets):
                    if getattr(mod, "weight", None) is not None and mod.weight.dim() == 2:
                        n += r * (mod.weight.shape[0] + mod.weight.shape[1])
        return n

    def displacements(self, model: nn.Module, anchor=None) -> dict[str, torch.Tensor]:
        return {n: lora_delta(m) for n, m in lora_layers(model).items()}
