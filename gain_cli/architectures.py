"""The one table of architecture differences.

Every place that needs to know where a model family keeps its attention output
projection, FFN down projection, decoder layers or LoRA targets reads it here.
Module paths are relative to one decoder layer. To add an architecture, add a row
(keyed by the Hugging Face ``config.model_type``), or set the module names in the
model config (``model.arch_overrides: {layers: ..., attn_out: ..., ffn_down: ...}``).

Every row is checked against the real transformers module names by building a tiny model
of that type (``tests/test_architectures.py``). Rows (transformers 5.x module names):

  model_type               layers            attn_out            ffn_down            weights
  gpt2                     transformer.h     attn.c_proj         mlp.c_proj          Conv1D (in, out)
  llama qwen2 qwen3        model.layers      self_attn.o_proj    mlp.down_proj       nn.Linear (out, in)
  mistral gemma gemma2
  gemma3_text phi3
  stablelm olmo
  phi                      model.layers      self_attn.dense     mlp.fc2             nn.Linear
  gpt_neox (Pythia)        gpt_neox.layers   attention.dense     mlp.dense_4h_to_h   nn.Linear
  falcon                   transformer.h     self_attention.dense mlp.dense_4h_to_h  nn.Linear
  opt                      model.decoder.layers self_attn.out_proj fc2               nn.Linear
  gptj                     transformer.h     attn.out_proj       mlp.fc_out          nn.Linear

Besides module paths a row says how its weights are laid out (``transposed_weights``: GPT-2's Conv1D), which config
keys hold the sizes, and which key caps the final logits (Gemma 2/3). The functions below the table are the only
code that tells an ``nn.Linear`` from a ``Conv1D`` or looks inside a nested (multimodal) config.

``ia3_targets`` / ``ia3_feedforward`` are only needed where PEFT has no stock (IA)³ default
(``peft.utils.constants.TRANSFORMERS_MODELS_TO_IA3_*``), e.g. phi3; empty means "PEFT's default".
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any

from torch import nn
from transformers.pytorch_utils import Conv1D

from gain_cli.errors import GainError


@dataclass(frozen=True)
class ArchSpec:
    """Where the modules that the methods touch live in one model family."""

    model_type: str
    layers: str  # path from the top-level *ForCausalLM to the list of decoder layers
    attn_out: str  # attention output projection (input = concatenated heads)
    ffn_down: str  # FFN down projection (input = intermediate activations)
    lora_targets: tuple[str, ...] = field(default_factory=tuple)  # PEFT target_modules (suffixes)
    ia3_targets: tuple[str, ...] = field(default_factory=tuple)  # empty: PEFT's stock (IA)3 targets
    ia3_feedforward: tuple[str, ...] = field(default_factory=tuple)  # empty: PEFT's stock feedforward modules
    hidden_size_key: str = "hidden_size"
    intermediate_size_key: str = "intermediate_size"
    layers_key: str = "num_hidden_layers"
    transposed_weights: bool = False  # projections store their weight (in, out) (GPT-2's Conv1D; PEFT: fan_in_fan_out)
    logit_softcap_key: str | None = None  # config key of the final-logit soft-capping (tanh(x / c) · c), if any


_LLAMA_LIKE = dict(
    layers="model.layers",
    attn_out="self_attn.o_proj",
    ffn_down="mlp.down_proj",
    lora_targets=("q_proj", "k_proj", "v_proj", "o_proj"),
)

_LLAMA_IA3 = dict(ia3_targets=("k_proj", "v_proj", "down_proj"), ia3_feedforward=("down_proj",))

ARCHITECTURES: dict[str, ArchSpec] = {
    "gpt2": ArchSpec(
        "gpt2",
        layers="transformer.h",
        attn_out="attn.c_proj",  # Conv1D: weight stored (in, out)
        ffn_down="mlp.c_proj",
        lora_targets=("c_attn", "attn.c_proj"),
        hidden_size_key="n_embd",
        intermediate_size_key="n_inner",  # None in GPT-2 configs means 4 * n_embd
        layers_key="n_layer",
        transposed_weights=True,
    ),
    "llama": ArchSpec("llama", **_LLAMA_LIKE),
    "qwen2": ArchSpec("qwen2", **_LLAMA_LIKE),
    "qwen3": ArchSpec("qwen3", **_LLAMA_LIKE),
    "mistral": ArchSpec("mistral", **_LLAMA_LIKE),
    "gemma": ArchSpec("gemma", **_LLAMA_LIKE),
    "gemma2": ArchSpec("gemma2", **_LLAMA_LIKE, logit_softcap_key="final_logit_softcapping"),
    "gemma3_text": ArchSpec("gemma3_text", **_LLAMA_LIKE, logit_softcap_key="final_logit_softcapping"),
    # PEFT ships no (IA)3 default for stablelm and olmo: llama's, k and v (output side) + down_proj (input side)
    "stablelm": ArchSpec("stablelm", **_LLAMA_LIKE, **_LLAMA_IA3),
    "olmo": ArchSpec("olmo", **_LLAMA_LIKE, **_LLAMA_IA3),
    "phi3": ArchSpec(
        "phi3",
        layers="model.layers",
        attn_out="self_attn.o_proj",
        ffn_down="mlp.down_proj",
        lora_targets=("qkv_proj", "o_proj"),
        # PEFT ships no (IA)3 default for phi3; by analogy with llama: fused qkv (output side) + down_proj (input side)
        ia3_targets=("qkv_proj", "down_proj"),
        ia3_feedforward=("down_proj",),
    ),
    "phi": ArchSpec(
        "phi",
        layers="model.layers",
        attn_out="self_attn.dense",
        ffn_down="mlp.fc2",
        lora_targets=("q_proj", "k_proj", "v_proj", "dense"),
    ),
    "gpt_neox": ArchSpec(
        "gpt_neox",
        layers="gpt_neox.layers",
        attn_out="attention.dense",
        ffn_down="mlp.dense_4h_to_h",
        lora_targets=("query_key_value", "attention.dense"),
    ),
    "falcon": ArchSpec(
        "falcon",
        layers="transformer.h",
        attn_out="self_attention.dense",
        ffn_down="mlp.dense_4h_to_h",
        lora_targets=("query_key_value", "self_attention.dense"),
        intermediate_size_key="ffn_hidden_size",
    ),
    "opt": ArchSpec(
        "opt",
        layers="model.decoder.layers",
        attn_out="self_attn.out_proj",
        ffn_down="fc2",
        lora_targets=("q_proj", "k_proj", "v_proj", "out_proj"),
        intermediate_size_key="ffn_dim",
    ),
    "gptj": ArchSpec(
        "gptj",
        layers="transformer.h",
        attn_out="attn.out_proj",
        ffn_down="mlp.fc_out",
        lora_targets=("q_proj", "k_proj", "v_proj", "out_proj"),
        hidden_size_key="n_embd",
        intermediate_size_key="n_inner",  # None means 4 * n_embd, as in GPT-2
        layers_key="n_layer",
    ),
}

_OVERRIDABLE = ("layers", "attn_out", "ffn_down", "lora_targets", "ia3_targets", "ia3_feedforward")
_TUPLES = ("lora_targets", "ia3_targets", "ia3_feedforward")


def arch_for(model_type: str, overrides: dict[str, Any] | None = None) -> ArchSpec:
    """The ArchSpec for a HF ``model_type``, with optional per-model overrides."""
    overrides = {k: v for k, v in (overrides or {}).items() if v is not None}
    bad = sorted(set(overrides) - set(_OVERRIDABLE))
    if bad:
        raise GainError(f"unknown key(s) in model.arch_overrides: {', '.join(bad)} (valid: {', '.join(_OVERRIDABLE)})")
    for key in _TUPLES:
        if key in overrides:
            v = overrides[key]
            overrides[key] = (v,) if isinstance(v, str) else tuple(v)
    spec = ARCHITECTURES.get(model_type)
    if spec is None:
        missing = [k for k in ("layers", "attn_out", "ffn_down") if k not in overrides]
        if missing:
            raise GainError(
                f"architecture '{model_type}' is not in gain's table (known: {', '.join(sorted(ARCHITECTURES))}); "
                "add a row to gain_cli/architectures.py or set model.arch_overrides with keys "
                "layers, attn_out, ffn_down (module paths, e.g. layers=model.layers attn_out=self_attn.o_proj "
                "ffn_down=mlp.down_proj; add lora_targets=[...] for LoRA/IMSM and ia3_targets/ia3_feedforward "
                "for (IA)3 when PEFT has no default for it)"
            )
        return ArchSpec(model_type=model_type, **overrides)
    return replace(spec, **overrides) if overrides else spec


def get_submodule(root: Any, path: str) -> Any:
    obj = root
    for part in path.split("."):
        if not hasattr(obj, part):
            raise GainError(f"module path '{path}' not found in {type(root).__name__} (missing '{part}')")
        obj = getattr(obj, part)
    return obj


def decoder_layers(model: Any, spec: ArchSpec) -> list[Any]:
    return list(get_submodule(model, spec.layers))


def is_projection(module: Any) -> bool:
    """A matmul projection with a 2-D weight: ``nn.Linear`` (out, in) or GPT-2's ``Conv1D`` (in, out)."""
    return isinstance(module, (nn.Linear, Conv1D))


def is_transposed(module: Any) -> bool:
    """The projection stores its weight (in, out) with y = x W + b (GPT-2's Conv1D), not (out, in)."""
    return isinstance(module, Conv1D)


def projection_shape(module: Any) -> tuple[int, int]:
    """(input width, output width) of a projection."""
    if not is_projection(module):
        raise GainError(f"expected an nn.Linear or GPT-2 Conv1D projection, not {type(module).__name__}")
    rows, cols = module.weight.shape
    return (int(rows), int(cols)) if is_transposed(module) else (int(cols), int(rows))


def in_features(module: Any) -> int:
    """Number of input channels of a projection (the length of a gain vector on it)."""
    return projection_shape(module)[0]


def text_config(config: Any) -> Any:
    """The language model's own config (a multimodal config nests it as ``text_config``)."""
    return getattr(config, "text_config", None) or config


def logit_softcap(config: Any, spec: ArchSpec) -> float | None:
    """The final-logit soft-capping constant of this model, or None."""
    return getattr(config, spec.logit_softcap_key, None) if spec.logit_softcap_key else None


def hidden_size(config: Any, spec: ArchSpec) -> int:
    return int(getattr(config, spec.hidden_size_key))


def intermediate_size(config: Any, spec: ArchSpec) -> int:
    v = getattr(config, spec.intermediate_size_key, None)
    if v is None:  # GPT-2: n_inner=None means 4 * n_embd
        return 4 * hidden_size(config, spec)
    return int(v)


def num_layers(config: Any, spec: ArchSpec) -> int:
    return int(getattr(config, spec.layers_key))
