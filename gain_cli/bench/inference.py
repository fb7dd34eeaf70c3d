"""Inference cost after merge: merged GAIN vs the base model, and the unmerged (wrapped) GAIN overhead.

The gains are set to a seeded random vector around 1 (``1 + 0.1·N(0, 1)``) so the merge actually changes the
weights; the merged model's logits are checked against the wrapped model's. Forward passes (``inference_mode``)
of the three models are interleaved (``timing.interleaved``: base, merged, wrapped, then the reverse order …)
and each ratio is the median over repeats of per-repeat medians.
"""

from __future__ import annotations

import copy
import time
from typing import Any

import torch

from gain_cli.bench.timing import interleaved, median
from gain_cli.methods import build_method


def _forward_time(model, ids: torch.Tensor, n: int) -> float:
    ts = []
    with torch.inference_mode():
        for _ in range(n):
            t0 = time.perf_counter()
            model(input_ids=ids)
            ts.append(time.perf_counter() - t0)
    return median(ts)


def bench_inference(base_model, spec, method_cfg: dict, ids: torch.Tensor, s, repeats: int, log=print) -> dict[str, Any]:
    method = build_method(method_cfg, spec)
    wrapped = method.attach(copy.deepcopy(base_model)).eval()
    g = torch.Generator().manual_seed(s.seed)
    with torch.no_grad():
        for w in method.wrappers(wrapped).values():
            w.gain.copy_(1.0 + 0.1 * torch.randn(w.gain.shape, generator=g))
    merged = method.merge(copy.deepcopy(wrapped)).eval()
    base = base_model.eval()
    with torch.inference_mode():
        lw = wrapped(input_ids=ids).logits.float()
        lm = merged(input_ids=ids).logits.float()
        lb = base(input_ids=ids).logits.float()
    max_abs = float((lw - lm).abs().max())
    scale = float(lw.abs().max())
    models = {"base": base, "merged": merged, "wrapped": wrapped}
    for m in models.values():  # warm-up
        _forward_time(m, ids, 1)
    runs = interleaved({k: (lambda m=m: _forward_time(m, ids, s.infer_repeats)) for k, m in models.items()}, repeats)
    samples = {k: [per_forward for _, per_forward in v] for k, v in runs.items()}  # median seconds per forward
    ratio = lambda k: median([a / b for a, b in zip(samples[k], samples["base"])])  # noqa: E731
    out = {
        "batch": int(ids.shape[0]), "seq_len": int(ids.shape[1]),
        "base_ms": round(1e3 * median(samples["base"]), 2),
        "merged_ms": round(1e3 * median(samples["merged"]), 2),
        "wrapped_ms": round(1e3 * median(samples["wrapped"]), 2),
        "merged_over_base": round(ratio("merged"), 4),
        "wrapped_over_base": round(ratio("wrapped"), 4),
        "samples_ms": {k: [round(1e3 * x, 2) for x in v] for k, v in samples.items()},
        "merged_vs_wrapped_max_abs_logit_diff": max_abs,
        "merged_vs_wrapped_max_rel_logit_diff": max_abs / max(scale, 1e-12),
        "merged_vs_base_max_abs_logit_diff": float((lm - lb).abs().max()),
        "merged_is_plain_model": not method.wrappers(merged),
    }
    log(f"  inference: merged/base {out['merged_over_base']:.3f}, wrapped/base {out['wrapped_over_base']:.3f}, "
        f"|merged - wrapped| logits ≤ {max_abs:.2e}")
    return out
