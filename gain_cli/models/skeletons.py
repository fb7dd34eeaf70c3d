"""The one builder of Hugging Face configs and ``meta``-device skeletons from a model config (``configs/model/*``).

Loading a ``source: config`` model, counting a method's parameters (``gain info params``) and estimating memory
(``gain info memory``) all build the HF config here, from ``model.hf_config`` (or, for the memory estimate of a
model on disk, its ``config.json``), and the weightless skeleton with ``meta_skeleton``.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from gain_cli.errors import GainError
from gain_cli.models.tokenizers import byte_tokenizer
from gain_cli.schemas.run import ModelConfig

FALLBACK_VOCAB = 256 + 4  # no vocab_size and no byte tokenizer: 256 bytes + 4 special tokens (a guess, said so)
MISSING_VOCAB = ("model_default", "fallback")


def hf_config_from(model_cfg: Mapping[str, Any] | ModelConfig, vocab_size: int | None = None):
    """``AutoConfig.for_model(hf_config.model_type, **hf_config)``, the vocabulary size replaced when given."""
    from transformers import AutoConfig

    model_cfg = ModelConfig.of(model_cfg)
    fields = dict(model_cfg.hf_config)
    model_type = fields.pop("model_type", None)
    if not model_type:
        raise GainError(f"model config '{model_cfg.name}' has no hf_config.model_type: add the architecture "
                        "fields (model_type, hidden sizes, layers, heads, vocab_size, …) under model.hf_config")
    if vocab_size is not None:
        fields["vocab_size"] = vocab_size
    try:
        return AutoConfig.for_model(model_type, **fields)
    except (ValueError, KeyError, TypeError) as exc:
        raise GainError(f"model config '{model_cfg.name}': {str(exc).splitlines()[0]}") from exc


def byte_vocab(model_cfg: Mapping[str, Any] | ModelConfig) -> int | None:
    """The vocabulary a ``tokenizer: bytes`` model gets when its hf_config names none (what load_model gives it)."""
    model_cfg = ModelConfig.of(model_cfg)
    if model_cfg.tokenizer != "bytes" or "vocab_size" in model_cfg.hf_config:
        return None

    return len(byte_tokenizer())


def config_without_weights(model_cfg: Mapping[str, Any] | ModelConfig, missing_vocab: str = "model_default",
                           from_disk: bool = False) -> tuple[Any, str | None]:
    """(HF config, a note or None) for a model without loading it.

    The vocabulary: ``hf_config.vocab_size``, else the byte tokenizer's for ``tokenizer: bytes``, else the model
    type's own default (``model_default``) or ``FALLBACK_VOCAB`` with a note (``fallback``). ``from_disk``: a model
    without ``hf_config`` is read from ``model.path``'s config.json when that is on disk."""
    if missing_vocab not in MISSING_VOCAB:
        raise ValueError(f"missing_vocab must be one of {MISSING_VOCAB}, not {missing_vocab!r}")
    model_cfg = ModelConfig.of(model_cfg)
    fields = model_cfg.hf_config
    if from_disk and not fields.get("model_type"):
        path = model_cfg.path
        if path and (Path(os.path.expanduser(str(path))) / "config.json").is_file():
            from transformers import AutoConfig

            return AutoConfig.from_pretrained(os.path.expanduser(str(path)), local_files_only=True,
                                              trust_remote_code=model_cfg.trust_remote_code), None
        raise GainError(f"model config '{model_cfg.name}' has no hf_config (and no local model.path with a "
                        "config.json): add the architecture fields under model.hf_config to estimate memory")
    vocab, note = byte_vocab(model_cfg), None
    if vocab is not None and missing_vocab == "fallback":
        note = (f"hf_config has no vocab_size; used {vocab}, the size of the built-in byte-level tokenizer "
                "(model.tokenizer=bytes)")
    elif vocab is None and "vocab_size" not in fields and missing_vocab == "fallback":
        vocab = FALLBACK_VOCAB
        note = (f"hf_config has no vocab_size; assumed {FALLBACK_VOCAB} (256 bytes + 4 special tokens); "
                "set model.hf_config.vocab_size for an exact count")
    config = hf_config_from(model_cfg, vocab_size=vocab)
    if missing_vocab == "fallback":
        for key in ("bos_token_id", "eos_token_id", "pad_token_id"):  # defaults may point outside a small vocabulary
            v = getattr(config, key, None)
            if isinstance(v, int) and v >= config.vocab_size and key not in fields:
                setattr(config, key, None)
    return config, note


def meta_skeleton(config: Any, dtype=None):
    """The ``*ForCausalLM`` of ``config`` (``dtype``, default fp32) on the meta device: shapes and parameter counts,
    no memory, no weights. (torch is imported here, not at the top: ``gain info`` and the launcher import this.)"""
    import torch
    from transformers import AutoModelForCausalLM

    dtype = dtype or torch.float32

    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(config, dtype=dtype)
