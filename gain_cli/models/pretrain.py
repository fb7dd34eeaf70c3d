"""Give a model built from a config some prior knowledge before the experiment ("pretraining").

A randomly initialised tiny model knows nothing, so adaptation could not make it forget
anything. ``model.pretrain`` trains it briefly (full AdamW, deterministic) on a mixture of
every tiny domain generated with a seed the experiment's data never uses, and caches the
result under ``<cache_dir>/models/<name>-<hash>/`` (safetensors), so it happens once.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch

from gain_cli.data.domains import tokenizer_fingerprint
from gain_cli.data.tiny import GENERATORS, generate
from gain_cli.io import atomic_save_safetensors
from gain_cli.progress import Phase, default_console
from gain_cli.schemas.run import ModelConfig, PretrainConfig

PRETRAIN_SEED = 7  # the experiment's tiny data uses seeds 1 (train) and 2 (validation)


def _key(model_cfg: ModelConfig, tokenizer) -> str:
    desc = json.dumps({"hf_config": model_cfg.hf_config, "init_seed": model_cfg.init_seed,
                       "pretrain": model_cfg.pretrain.to_dict() if model_cfg.pretrain else {},
                       "tok": tokenizer_fingerprint(tokenizer)},
                      sort_keys=True, default=str)
    return hashlib.sha256(desc.encode()).hexdigest()[:12]


def _corpus(tokenizer, docs_per_domain: int) -> np.ndarray:
    docs = [d for name in GENERATORS for d in generate(name, docs_per_domain, seed=PRETRAIN_SEED)]
    rng = np.random.default_rng(PRETRAIN_SEED)
    rng.shuffle(docs)
    ids: list[int] = []
    for seq in tokenizer(docs, add_special_tokens=False)["input_ids"]:
        ids += seq + [tokenizer.eos_token_id]
    return np.asarray(ids, dtype=np.int64)


def pretrained_tiny(model, tokenizer, model_cfg: Mapping[str, Any] | ModelConfig, cache_dir: str | Path):
    """Load the cached pretrained weights for this config, or pretrain now and cache them."""
    from safetensors.torch import load_file

    model_cfg = ModelConfig.of(model_cfg)
    pcfg = model_cfg.pretrain or PretrainConfig()
    path = Path(cache_dir) / "models" / f"{model_cfg.name}-{_key(model_cfg, tokenizer)}" / "model.safetensors"
    if path.is_file():
        model.load_state_dict(load_file(str(path)), strict=False)
        return model.eval()
    steps, bs, seq = pcfg.steps, pcfg.batch_size, pcfg.seq_len
    stream = _corpus(tokenizer, pcfg.docs_per_domain)
    n = len(stream) // seq
    blocks = torch.from_numpy(stream[: n * seq]).view(n, seq)
    g = torch.Generator().manual_seed(PRETRAIN_SEED)
    opt = torch.optim.AdamW(model.parameters(), lr=float(pcfg.lr), weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / 20) * max(0.05, 1 - s / steps))
    model.train()

    with torch.random.fork_rng(devices=[]), Phase(default_console(), f"pretraining {model_cfg.name} "
                                                  "(once; cached for later runs)", steps, "steps", loss="-") as ph:
        torch.manual_seed(PRETRAIN_SEED)
        for step in range(steps):
            idx = torch.randint(0, n, (bs,), generator=g)
            loss = model(input_ids=blocks[idx], labels=blocks[idx]).loss
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            sched.step()
            opt.zero_grad(set_to_none=True)
            if step % 10 == 9 or step == steps - 1:
                ph.update(step + 1, loss=f"{float(loss.detach()):.3f}")
    model.eval()
    state = {k: v for k, v in model.state_dict().items()}
    seen, unique = set(), {}
    for k, v in state.items():  # tied weights stored once
        if v.data_ptr() not in seen:
            seen.add(v.data_ptr())
            unique[k] = v
    atomic_save_safetensors(path, unique, metadata={"pretrain": json.dumps(pcfg.to_dict()), "final_loss": f"{float(loss.detach()):.4f}"})
    return model
