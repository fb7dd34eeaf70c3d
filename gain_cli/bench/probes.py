"""FLOPs per token of a model under a method, and the dense matmul rate this machine reaches at its shapes.

FLOPs are counted per token for every matrix multiply (``nn.Linear`` and GPT-2 ``Conv1D``, the LM head included,
LoRA's adapter matrices included; the embedding lookup is not a matmul):

  forward            2·N                    N = Σ in·out over the matmul weights
  backward, inputs   2·N                    an upper bound: autograd also skips the input-grads below the first
                                            trainable weight (layer 0's q/k/v when the embedding is frozen, < 1 %)
  backward, weights  2·N_trainable          only weights that train; GAIN and LoRA skip the frozen ones — the saving
  attention          4·L·H·d_h·(T+1)/2      QKᵀ and PV over the causal context, forward; ×2 more in backward

The probe times ``x @ Wᵀ`` (forward), ``g @ W`` (input-grad) and ``gᵀ @ x`` (weight-grad) for every distinct weight
shape of the model at the benchmark's token count, fp32 (or bf16), with the process's thread setting, and reports
Σ flops / Σ seconds weighted by how often each shape occurs: the rate a perfect implementation of the model's
matmuls would reach here. Model-FLOPs utilisation = achieved model FLOP/s / that rate.
"""

from __future__ import annotations

import time
from collections import Counter
from typing import Any

import torch
from torch import nn


def matmul_shapes(model: nn.Module) -> list[tuple[int, int, bool]]:
    """(in_features, out_features, trainable) of every matmul weight of the model (each occurrence)."""
    from transformers.pytorch_utils import Conv1D

    out = []
    for mod in model.modules():
        if isinstance(mod, nn.Linear):
            out.append((mod.in_features, mod.out_features, bool(mod.weight.requires_grad)))
        elif isinstance(mod, Conv1D):
            i, o = mod.weight.shape
            out.append((int(i), int(o), bool(mod.weight.requires_grad)))
    return out


def attention_flops_per_token(config: Any, seq_len: int) -> float:
    """Forward FLOPs per token of the attention scores and the weighted sum (causal: mean context (T+1)/2)."""
    cfg = getattr(config, "text_config", None) or config
    layers = getattr(cfg, "num_hidden_layers", None) or getattr(cfg, "n_layer", None) or 0
    heads = getattr(cfg, "num_attention_heads", None) or getattr(cfg, "n_head", None) or 0
    hidden = getattr(cfg, "hidden_size", None) or getattr(cfg, "n_embd", None) or 0
    head_dim = getattr(cfg, "head_dim", None) or (hidden // heads if heads else 0)
    return 4.0 * layers * heads * head_dim * (seq_len + 1) / 2.0


def flops_per_token(model: nn.Module, seq_len: int, *, training: bool) -> dict[str, float]:
    """Model FLOPs per token (see the module doc); ``training=False``: the forward only."""
    shapes = matmul_shapes(model)
    n = float(sum(i * o for i, o, _ in shapes))
    n_train = float(sum(i * o for i, o, t in shapes if t))
    attn = attention_flops_per_token(model.config, seq_len)
    if not training:
        return {"forward": 2 * n + attn, "total": 2 * n + attn, "matmul_params": n, "trainable_matmul_params": n_train}
    fwd, bwd_in, bwd_w = 2 * n + attn, 2 * n + 2 * attn, 2 * n_train
    return {"forward": fwd, "backward_inputs": bwd_in, "backward_weights": bwd_w, "total": fwd + bwd_in + bwd_w,
            "matmul_params": n, "trainable_matmul_params": n_train,
            "weight_grad_skipped_fraction": round(1 - n_train / n, 4) if n else 0.0}


def _time_once(fn, *args) -> float:
    t0 = time.perf_counter()
    fn(*args)
    return time.perf_counter() - t0


class MatmulProbe:
    """Dense matmul rate at a model's weight shapes (one ``run()`` = one pass over every shape and form)."""

    def __init__(self, model: nn.Module, tokens: int, dtype: torch.dtype = torch.float32, seed: int = 0):
        self.tokens = int(tokens)
        self.dtype = dtype
        self.counts = Counter((i, o) for i, o, _ in matmul_shapes(model))
        g = torch.Generator().manual_seed(seed)
        self.tensors = {}
        for (i, o) in self.counts:
            self.tensors[(i, o)] = (torch.randn(self.tokens, i, generator=g).to(dtype),
                                    torch.randn(o, i, generator=g).to(dtype),
                                    torch.randn(self.tokens, o, generator=g).to(dtype))
        self.run()  # warm-up: oneDNN picks and caches its kernels on first use

    @torch.inference_mode()
    def run(self) -> float:
        """Σ flops / Σ seconds over forward, input-grad and weight-grad forms of every shape (weighted by occurrences)."""
        flops = secs = 0.0
        for (i, o), k in self.counts.items():
            x, w, gy = self.tensors[(i, o)]
            t = (_time_once(torch.matmul, x, w.t()) + _time_once(torch.matmul, gy, w)
                 + _time_once(torch.matmul, gy.t(), x))
            flops += k * 3 * 2.0 * self.tokens * i * o
            secs += k * t
        return flops / secs

    def rate(self, n: int = 1) -> float:
        """Median FLOP/s of ``n`` passes."""
        import statistics

        return float(statistics.median(self.run() for _ in range(max(1, n))))

    def describe(self) -> dict[str, Any]:
        return {"tokens": self.tokens, "dtype": str(self.dtype).replace("torch.", ""),
                "shapes": [{"in": i, "out": o, "count": k} for (i, o), k in sorted(self.counts.items())]}
