"""Parameter counts from a model config alone: a skeleton on the ``meta`` device, no weights, no hub.

``gain info params model=gpt2-large method=gain_ffn`` prints ``count_method_params``::

    model:     774,030,080    parameters of the base model (tied weights once)
    method:    230,400        the method's own parameters (gains / adapter (+ gate) / all weights)
    trainable: 230,400        parameters that train
    total:     774,260,480    parameters of the adapted model (IMSM: includes the frozen copy)
    formula:   36 layers × (1,280 (attn) + 5,120 (ffn)) = 230,400

The skeleton is built from ``model.hf_config`` (the architecture fields carried by every model
config) by ``gain_cli.models.skeletons`` on the meta device; the method is attached to it exactly as in a run.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from gain_cli.architectures import arch_for
from gain_cli.methods import build_method
from gain_cli.models.loading import torch_dtype
from gain_cli.models.skeletons import (  # noqa: F401  (tests)
    FALLBACK_VOCAB,
    config_without_weights,
    meta_skeleton,
)
from gain_cli.schemas.run import ModelConfig


def _unique_numel(params) -> int:
    seen, n = set(), 0
    for p in params:
        if id(p) not in seen:
            seen.add(id(p))
            n += p.numel()
    return n


def build_meta_model(model_cfg: Mapping[str, Any]):
    """The model's skeleton (``*ForCausalLM``) on the meta device, from ``model_cfg["hf_config"]`` alone."""
    config, note = config_without_weights(model_cfg, missing_vocab="fallback")
    model = meta_skeleton(config, torch_dtype(ModelConfig.of(model_cfg).dtype))
    model.gain_meta_note = note
    return model


def count_method_params(model_cfg: Mapping[str, Any], method_cfg: Mapping[str, Any]) -> dict[str, Any]:
    """``{total, trainable, method, model, formula}`` (+ ``note``) for a method on a model, from configs only."""
    model = build_meta_model(model_cfg)
    note = model.gain_meta_note
    n_model = _unique_numel(model.parameters())
    spec = arch_for(model.config.model_type, dict(ModelConfig.of(model_cfg).arch_overrides))
    method = build_method(method_cfg, spec)
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
