"""Whole-sequence forward passes without Hugging Face's key/value cache.

A causal LM whose config says ``use_cache: true`` (most do) builds a ``DynamicCache`` in every forward that is not
told otherwise, and ``DynamicLayer.update`` copies each layer's keys and values into it (``torch.cat``). Training
and scoring whole sequences never read that cache back, so it is pure overhead (and, in training, memory kept
alive until the backward pass). The Hugging Face Trainer switches it off the same way
(``TrainingArguments.use_cache = False`` → ``model.config.use_cache``).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch


@contextmanager
def no_kv_cache(model: torch.nn.Module) -> Iterator[None]:
    """``config.use_cache = False`` on every (sub)model config inside ``model`` (e.g. both branches of IMSM, the
    base model of a PeftModel), restored afterwards."""
    configs = {}
    for module in model.modules():
        cfg = getattr(module, "config", None)
        if cfg is not None and getattr(cfg, "use_cache", None) is not None:
            configs[id(cfg)] = cfg
    saved = [(cfg, cfg.use_cache) for cfg in configs.values()]
    for cfg, _ in saved:
        cfg.use_cache = False
    try:
        yield
    finally:
        for cfg, value in saved:
            cfg.use_cache = value
