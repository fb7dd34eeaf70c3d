"""Thread settings: one model forward timed in fresh processes under each OpenMP wait policy and thread count.

PyTorch's CPU kernels run on an OpenMP pool. By default its idle threads spin at every barrier; when the machine
is shared (more runnable threads than cores) a descheduled pool thread stalls every parallel region until the
scheduler returns to it. ``OMP_WAIT_POLICY=PASSIVE`` makes idle threads sleep instead. The policy is read once,
when the OpenMP runtime loads (at ``import torch``), so each setting is measured in its own subprocess. The
result depends on how busy the machine is at that moment (the load average is recorded with it).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from typing import Any

_CHILD = r"""
import json, os, sys, time, statistics
import torch
from gain_cli.models.loading import load_model
spec = json.loads(sys.argv[1])
torch.set_num_threads(spec["threads"])
model, _ = load_model(spec["model_cfg"], spec["cache_dir"])
g = torch.Generator().manual_seed(0)
ids = torch.randint(0, model.config.vocab_size, (spec["batch"], spec["seq"]), generator=g)
ts = []
with torch.inference_mode():
    model(input_ids=ids)
    for _ in range(spec["n"]):
        t0 = time.perf_counter(); model(input_ids=ids); ts.append(time.perf_counter() - t0)
print("RESULT " + json.dumps({"ms": 1e3 * statistics.median(ts)}))
"""


def _one(model_cfg: dict, cache_dir: str, policy: str, threads: int, batch: int, seq: int, n: int) -> float | None:
    env = dict(os.environ, OMP_WAIT_POLICY=policy, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1",
               TRANSFORMERS_VERBOSITY="error")
    spec = {"model_cfg": model_cfg, "cache_dir": cache_dir, "threads": threads, "batch": batch, "seq": seq, "n": n}
    try:
        proc = subprocess.run([sys.executable, "-c", _CHILD, json.dumps(spec)], env=env, capture_output=True,
                              text=True, timeout=600)
    except subprocess.TimeoutExpired:
        return None
    for line in proc.stdout.splitlines():
        if line.startswith("RESULT "):
            return float(json.loads(line[7:])["ms"])
    return None


def bench_threads(model_cfg: dict, cache_dir: str, s, log=print) -> dict[str, Any]:
    """{"<POLICY>/<threads>t": forward ms} for ACTIVE/PASSIVE × 1 thread / all cores, plus this process's setting."""
    cores = os.cpu_count() or 1
    counts = sorted({1, cores})
    out: dict[str, Any] = {"batch": s.infer_batch, "seq_len": s.infer_seq, "loadavg": [round(x, 2) for x in os.getloadavg()],
                           "this_process_policy": os.environ.get("OMP_WAIT_POLICY", "(unset: spinning)"), "forward_ms": {}}
    for policy in ("ACTIVE", "PASSIVE"):
        for t in counts:
            ms = _one(model_cfg, cache_dir, policy, t, s.infer_batch, s.infer_seq, max(3, s.infer_repeats))
            out["forward_ms"][f"{policy}/{t}t"] = None if ms is None else round(ms, 2)
    fm = out["forward_ms"]
    a, p = fm.get(f"ACTIVE/{cores}t"), fm.get(f"PASSIVE/{cores}t")
    out["active_over_passive"] = round(a / p, 3) if a and p else None
    log(f"  threads: forward ms {fm} (load {out['loadavg'][0]})")
    return out
