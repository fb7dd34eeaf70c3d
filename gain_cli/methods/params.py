"""Parameter counts from a model config alone: a skeleton on the ``meta`` device, no weights, no hub.

``gain info params model=gpt2-large method=gain_ffn`` prints ``count_method_params``::

    model:     774,030,080    parameters of the base model (tied weights once)
    method:    230,400        the method's own parameters (gains / adapter (+ gate) / all weights)
    trainable: 230,400        parameters that train
    total:     774,260,480    parameters of the adapted model (IMSM: includes the frozen copy)
    formula:   36 layers × (1,280 (attn) + 5,120 (ffn)) = 230,400

The skeleton is built from ``model.hf_config`` (the architecture fields carried by every model
config) with ``AutoConfig.for_model`` + ``AutoModelForCausalLM.from_config`` under
``torch.device("meta")``; the method is attached to it exactly as in a run.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from gain_cli.errors import GainError

FALLBACK_VOCAB = 256 + 4  # no vocab_size and no byte tokenizer: 256 bytes + 4 special tokens (a guess, said so)


def _unique_numel(params) -> int:
    seen, n = set(), 0
    for p in params:
        if id(p) not in seen:
            seen.add(id(p))
            n += p.numel()
    return n


def meta_config(model_cfg: Mapping[str, Any]) -> tuple[Any, str | None]:
    """(HF config from ``model_cfg["hf_config"]``, a note when the vocabulary size was assumed)."""
    from transformers import AutoConfig

    fields = dict(model_cfg.get("hf_config") or {})
    model_type = fields.pop("model_type", None)
    if not model_type:
        raise GainError(f"model config '{model_cfg.get('name')}' has no hf_config.model_type: add the architecture "
                        "fields (model_type, hidden sizes, layers, heads, vocab_size, …) under model.hf_config")
    note = None
    if "vocab_size" not in fields:
        if model_cfg.get("tokenizer") == "bytes":  # what load_model gives such a model: the built-in byte tokenizer
            from gain_cli.models.tokenizers import byte_tokenizer

            fields["vocab_size"] = len(byte_tokenizer())
            note = (f"hf_config has no vocab_size; used {fields['vocab_size']}, the size of the built-in byte-level "
                    "tokenizer (model.tokenizer=bytes)")
        else:
            fields["vocab_size"] = FALLBACK_VOCAB
            note = (f"hf_config has no vocab_size; assumed {FALLBACK_VOCAB} (256 bytes + 4 special tokens); "
                    "set model.hf_config.vocab_size for an exact count")
    try:
        config = AutoConfig.for_model(model_type, **fields)
    except (ValueError, KeyError, TypeError) as exc:
        raise GainError(f"model config '{model_cfg.get('name')}': {str(exc).splitlines()[0]}") from exc
    for key in ("bos_token_id", "eos_token_id", "pad_token_id"):  # defaults may point outside a small vocabulary
        v = getattr(config, key, None)
        if isinstance(v, int) and v >= config.vocab_size and key not in fields:
            setattr(config, key, None)
    return config, note


def build_meta_model(model_cfg: Mapping[str, Any]):
    """The model's skeleton (``*ForCausalLM``) on the meta device, from ``model_cfg["hf_config"]`` alone."""
    from transformers import AutoModelForCausalLM

    from gain_cli.models.loading import torch_dtype

    config, note = meta_config(model_cfg)
    dtype = torch_dtype(str(model_cfg.get("dtype", "float32")))
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    model.gain_meta_note = note
    return model


def count_method_params(model_cfg: Mapping[str, Any], method_cfg: Mapping[str, Any]) -> dict[str, Any]:
    """``{total, trainable, method, model, formula}`` (+ ``note``) for a method on a model, from configs only."""
    from gain_cli.architectures import arch_for
    from gain_cli.methods import build_method

    model = build_meta_model(model_cfg)
    note = model.gain_meta_note
    n_model = _unique_numel(model.parameters())
    spec = arch_for(model.config.model_type, dict(model_cfg.get("arch_overrides") or {}))
    method = build_method(dict(method_cfg), spec)
    with torch.device("meta"):
        adapted = method.attach(model)
    trainable = method.count_trainable(adapted)
    n_method, formula = method.param_summary(adapted)
    out: dict[str, Any] = {
        "total": _unique_numel(adapted.parameters()),
        "trainable": trainable,
        "method": n_method,
        "model": n_model,
        "formula": formula,
    }
    if note:
        out["note"] = note
    return out
