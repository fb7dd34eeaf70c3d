"""The dense matmul rate this machine reaches at a model's shapes (FLOPs per token: ``gain_cli.models.flops``).

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

from gain_cli.models.flops import matmul_shapes


def _time_once(fn, *args) -> float:
    t0 = time.perf_counter()
    fn(*args)
    return time.perf_counter() - t0


class MatmulProbe:
    """Dense matmul rate at a model's weight shapes (one ``run()`` = one pass over every shape and form)."""

    def __init__(self, model: nn.Module | None, tokens: int, dtype: torch.dtype = torch.float32, seed: int = 0,
                 counts: dict[tuple[int, int], int] | None = None):
        """The shapes of ``model``'s matmul weights, or ``counts`` ({(in, out): occurrences}) without a model."""
        self.tokens = int(tokens)
        self.dtype = dtype
        self.counts = Counter(counts) if counts is not None else Counter((i, o) for i, o, _ in matmul_shapes(model))
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
