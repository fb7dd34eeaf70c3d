"""(IA)³ through PEFT with its stock defaults: a fresh set of vectors per stage, merged after the stage.

(IA)³ (Liu et al. 2022, "Few-Shot Parameter-Efficient Fine-Tuning is Better and Cheaper than
In-Context Learning") learns vectors initialised to ones: for *feedforward* modules the vector
scales the layer input (W·diag(l), like GAIN), for the other targets it scales the output
(diag(l)·W, bias included). Targets default to PEFT's table for the architecture
(``peft.utils.constants.TRANSFORMERS_MODELS_TO_IA3_TARGET_MODULES_MAPPING`` and
``..._FEEDFORWARD_MODULES_MAPPING``; e.g. llama: k_proj, v_proj, down_proj with down_proj
feedforward; gpt2: c_attn, mlp.c_proj with mlp.c_proj feedforward). Where PEFT has no default
(phi3) the architecture table's ``ia3_targets`` / ``ia3_feedforward`` are used.

Config (``configs/method/ia3.yaml``): lr, target_modules (null = defaults), feedforward_modules
(null = the targets that name the default feedforward modules, matched by the modules they name: ``mlp.down_proj``
is PEFT's feedforward ``down_proj``; see ``feedforward_among``).
Merge: PEFT's ``merge_and_unload`` (weights multiplied by the fp32 vectors, cast back once).
State: ``get_peft_model_state_dict`` / ``set_peft_model_state_dict``.
"""

from __future__ import annotations

from typing import Any

from gain_cli.errors import GainError
from gain_cli.methods.base import LR_RANGE, MethodConfig, register
from gain_cli.methods.lora import PeftMethod
from gain_cli.schemas.typed import section, setting


def default_ia3_modules(spec) -> tuple[list[str], list[str]]:
    """(targets, feedforward modules): PEFT's stock defaults for ``spec.model_type``, else the table's."""
    from peft.utils.constants import TRANSFORMERS_MODELS_TO_IA3_FEEDFORWARD_MODULES_MAPPING as FF
    from peft.utils.constants import TRANSFORMERS_MODELS_TO_IA3_TARGET_MODULES_MAPPING as TARGETS

    if spec.ia3_targets:
        return list(spec.ia3_targets), list(spec.ia3_feedforward)
    if spec.model_type in TARGETS:
        return list(TARGETS[spec.model_type]), list(FF.get(spec.model_type, []))
    raise GainError(f"PEFT has no default (IA)3 modules for architecture '{spec.model_type}': set "
                    "method.target_modules and method.feedforward_modules, or model.arch_overrides.ia3_targets "
                    "and model.arch_overrides.ia3_feedforward")


def _as_list(v: Any) -> list[str] | None:
    if v is None:
        return None
    return [v] if isinstance(v, str) else [str(x) for x in v]


def _names_within(key: str, other: str) -> bool:
    """Every module the target key ``key`` matches is matched by ``other`` too (PEFT matches a key against a module
    name by equality or as a dotted suffix: ``mlp.down_proj`` lies within ``down_proj``, not the other way round)."""
    return key == other or key.endswith("." + other)


def feedforward_among(targets: list[str], default_ff: list[str]) -> list[str]:
    """The targets that name feedforward modules, matched by the modules they name, not by spelling: with PEFT's
    default feedforward ``down_proj``, the target ``mlp.down_proj`` is feedforward. A target that names feedforward
    and other modules at once (GPT-2's ``c_proj``: ``attn.c_proj`` and the feedforward ``mlp.c_proj``) is refused:
    one (IA)³ vector side cannot serve both."""
    ff = []
    for t in targets:
        if any(_names_within(t, f) for f in default_ff):
            ff.append(t)
        elif any(_names_within(f, t) for f in default_ff):
            within = [f for f in default_ff if _names_within(f, t)]
            raise GainError(f"method.target_modules entry '{t}' names feedforward modules ({', '.join(within)}) and "
                            f"others at once: list them apart (e.g. attn.{t}, {within[0]}) or set "
                            "method.feedforward_modules")
    return ff


@section("method")
class Ia3Config(MethodConfig):
    target_modules: Any = setting(None, "modules whose outputs (or, for feedforward ones, inputs) a vector scales; "
                                  "null: PEFT's default (IA)3 targets for the architecture (llama: k_proj, v_proj, "
                                  "down_proj)")
    feedforward_modules: Any = setting(None, "the targets scaled on their input; null: PEFT's defaults among them")
    lr: float = setting(3.0e-3, "AdamW learning rate of the vectors (ours)",
                        check=LR_RANGE)


def ia3_config(cfg: Ia3Config, spec):
    """A PEFT ``IA3Config`` from a method config (``target_modules``, ``feedforward_modules``)."""
    from peft import IA3Config

    targets = _as_list(cfg.target_modules)
    ff = _as_list(cfg.feedforward_modules)
    if targets is None:
        targets, default_ff = default_ia3_modules(spec)
        if ff is None:
            ff = default_ff
    elif ff is None:
        try:
            _, default_ff = default_ia3_modules(spec)
        except GainError:
            default_ff = []
        ff = feedforward_among(targets, default_ff)
    bad = [f for f in ff if f not in targets]
    if bad:
        raise GainError(f"method.feedforward_modules must be a subset of method.target_modules (not in it: {bad})")
    return IA3Config(target_modules=list(targets), feedforward_modules=list(ff),
                     fan_in_fan_out=spec.transposed_weights, task_type="CAUSAL_LM")


@register("ia3", config=Ia3Config)
class IA3(PeftMethod):
    def peft_config(self):
        return ia3_config(self.cfg, self.spec)
