"""Busy machine: training and perplexity throughput while other work holds the cores, old fixed vs adaptive threads.

``gain_cli/threads.py`` chooses at CLI start the OpenMP wait policy and torch thread count from the load: idle →
spinning (``ACTIVE``) on every core, busy → sleeping (``PASSIVE``) idle threads, still on every core (this section
measured PASSIVE with one thread under two busy loops on 2 cores at 0.38-0.44 of the idle speed and with two at
0.53-0.70, which set the rule). It checks that choice where it matters, on our own workloads with the machine
shared:

  idle      no synthetic load; ACTIVE + every core (the fixed setting before, and what the choice picks when idle)
  old       under ``busy_loops`` busy-loop processes; ACTIVE + every core (the fixed setting before)
  adaptive  under the same load; ``choose(cores, load=busy_loops, env={})`` (the known synthetic load is passed:
            the 1-minute load average lags a minute behind; it is recorded next to each measurement)

Workloads, each in its own fresh subprocess per setting (the wait policy is read once, when torch loads):

  train       ``busy_train_steps`` optimiser steps of our stage loop (``train_stage`` with GAIN-FFN, batch
              ``train_batch`` × ``train_seq``, as ``bench/training.py`` runs it); tokens/s over the steps after
              the first (set-up and first-step kernel choice excluded)
  perplexity  ``evaluate_blocks`` over ``eval_windows`` windows of ``eval_seq`` tokens, called one batch of
              ``eval_batch`` at a time after one untimed warm-up batch (a call per batch is what the sweep does
              inside; it lets a measurement cut off by its timeout still give a rate); predicted tokens/s

Data: random token ids of the right shape (seeded), not the domain text: throughput does not depend on what the
tokens say, and the children then need no tokenised data.

The load is the bench's own: ``busy_loops`` processes ``while time.time() < deadline: pass``, started right before
the busy measurements and killed in a ``finally`` (exceptions, KeyboardInterrupt); their deadline (start +
``busy_max_seconds``) ends them even when the bench itself is killed with SIGKILL. Every measurement subprocess
has a timeout (``busy_timeout_seconds``, and never past the load's deadline, so a busy measurement is always under
load); a timed-out one reports the rate of the steps it finished and ``timed_out: true``. So the section takes at
most 2 × ``busy_timeout_seconds`` idle + ``busy_max_seconds`` busy (16 minutes with the defaults). At the smollm2
size on the 2-core machine it took 5-6 minutes (308 s and 364 s; 2 minutes of it the old setting's training under
load, ~20 tok/s); at the tiny size with the test's workloads about 40 s, nearly all subprocess start-up.

bench.json ``busy_machine``: ``cores``, ``busy_loops``, ``load_pids``, ``data``, ``train_shape``,
``perplexity_shape``, ``settings`` ({idle, old, adaptive}: policy, threads), ``adaptive_choice`` (the line),
``loadavg`` (idle, busy_start, busy_end), and per workload (``train``, ``perplexity``): {idle, old, adaptive}:
tokens_per_s, timed (steps or batches), seconds, timed_out, loadavg_after (and ``error`` or ``skipped`` when no
rate), plus ``old_of_idle``, ``adaptive_of_idle``, ``adaptive_over_old``; ``seconds`` for the whole section.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from typing import Any

from gain_cli.bench.training import train_cfg
from gain_cli.config import compose_config
from gain_cli.errors import GainError
from gain_cli.threads import choose

WORKLOADS = ("train", "perplexity")

_CHILD = r"""
import json, sys, time
import torch
spec = json.loads(sys.argv[1])
torch.set_num_threads(spec["threads"])
from gain_cli.models.loading import load_model, model_spec
model, _ = load_model(spec["model_cfg"], spec["cache_dir"])
g = torch.Generator().manual_seed(spec["seed"])
def timed(tokens, seconds):
    print(f"TIMED {tokens} {seconds}", flush=True)
if spec["workload"] == "train":
    from accelerate import Accelerator
    from gain_cli.methods import build_method
    from gain_cli.training.loop import train_stage
    cfg = spec["train_cfg"]
    method = build_method(spec["method_cfg"], model_spec(spec["model_cfg"], model.config.model_type))
    torch.manual_seed(spec["seed"])
    model = method.attach(model)
    per_step = cfg["batch_size"] * cfg["seq_len"]
    blocks = torch.randint(0, model.config.vocab_size, (cfg["steps"] * cfg["batch_size"], cfg["seq_len"]), generator=g)
    marks = []
    def progress(*_):
        marks.append(time.perf_counter())
        if len(marks) > 1:  # the first step (set-up, first-use kernel choice) is not timed
            timed(per_step, marks[-1] - marks[-2])
    train_stage(model, method, blocks, cfg, seed=spec["seed"], stage=1, accelerator=Accelerator(mixed_precision="no"),
                progress=progress)
else:
    from gain_cli.evaluation.perplexity import evaluate_blocks
    n, seq, bs = spec["windows"], spec["seq"], spec["batch"]
    blocks = torch.randint(0, model.config.vocab_size, (n, seq), generator=g)
    evaluate_blocks(model, blocks[:bs], bs)  # warm-up, untimed
    for i in range(0, n, bs):
        t0 = time.perf_counter()
        res = evaluate_blocks(model, blocks[i:i + bs], bs)
        timed(res.tokens, time.perf_counter() - t0)
print("DONE", flush=True)
"""

_LOAD = "import sys, time\ndeadline = float(sys.argv[1])\nwhile time.time() < deadline:\n    pass\n"


def check_busy_settings(s) -> None:
    """One-line errors for settings this section cannot measure with."""
    if int(s.busy_loops) < 1:
        raise GainError(f"busy_loops must be >= 1, got {s.busy_loops}")
    if not float(s.busy_max_seconds) > 0 or not float(s.busy_timeout_seconds) > 0:
        raise GainError(f"busy_max_seconds and busy_timeout_seconds must be > 0, got {s.busy_max_seconds}, "
                        f"{s.busy_timeout_seconds}")
    if int(s.busy_train_steps) < 2:
        raise GainError(f"busy_train_steps must be >= 2 (the first step is not timed), got {s.busy_train_steps}")


def _cores() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def _loadavg() -> list[float]:
    return [round(x, 2) for x in os.getloadavg()] if hasattr(os, "getloadavg") else []


def start_load(n: int, max_seconds: float) -> list[subprocess.Popen]:
    """``n`` busy-loop processes that end by themselves ``max_seconds`` from now (even if nobody kills them)."""
    deadline = time.time() + float(max_seconds)
    procs: list[subprocess.Popen] = []
    try:
        for _ in range(n):
            procs.append(subprocess.Popen([sys.executable, "-c", _LOAD, repr(deadline)], stdin=subprocess.DEVNULL,
                                          stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
    except BaseException:
        stop_load(procs)
        raise
    return procs


def stop_load(procs: list[subprocess.Popen]) -> None:
    """Kill and reap every load process (reaped: no zombie keeps its pid)."""
    for p in procs:
        if p.poll() is None:
            p.kill()
    for p in procs:
        with contextlib.suppress(subprocess.TimeoutExpired):
            p.wait(timeout=10)


@contextlib.contextmanager
def synthetic_load(n: int, max_seconds: float) -> Iterator[tuple[list[subprocess.Popen], float]]:
    """(load processes, their deadline) for the ``with`` body; they are gone when it ends, however it ends."""
    deadline = time.time() + float(max_seconds)
    procs = start_load(n, max_seconds)
    try:
        time.sleep(0.2)  # let them reach their loop before the first measurement starts
        yield procs, deadline
    finally:
        stop_load(procs)


def _stdout_text(out) -> str:
    """A timed-out run's partial stdout (bytes on POSIX even with ``text=True``)."""
    if out is None:
        return ""
    return out.decode(errors="replace") if isinstance(out, bytes) else out


def measure(workload: str, spec: dict[str, Any], policy: str, threads: int, timeout: float) -> dict[str, Any]:
    """Run one workload in a fresh subprocess under ``policy`` / ``threads``; its tokens/s over the timed parts.

    Only the policy comes in through the environment, as the CLI sets it; the thread count is set in the child
    with ``torch.set_num_threads`` (as a run does), so an ``OMP_NUM_THREADS`` of ours is not passed on."""
    env = dict(os.environ, OMP_WAIT_POLICY=policy, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1",
               TRANSFORMERS_VERBOSITY="error", TOKENIZERS_PARALLELISM="false")
    env.pop("OMP_NUM_THREADS", None)
    child = dict(spec, workload=workload, threads=int(threads))
    timed_out, err = False, None
    try:
        proc = subprocess.run([sys.executable, "-c", _CHILD, json.dumps(child)], env=env, capture_output=True,
                              text=True, timeout=timeout)
        stdout = proc.stdout
        if proc.returncode != 0:
            err = (proc.stderr.strip().splitlines() or [f"exit status {proc.returncode}"])[-1][:300]
    except subprocess.TimeoutExpired as e:  # run() has killed the child; keep what it had finished
        stdout, timed_out = _stdout_text(e.stdout), True
    parts = [line.split()[1:] for line in stdout.splitlines() if line.startswith("TIMED ")]
    tokens = sum(int(t) for t, _ in parts)
    seconds = sum(float(x) for _, x in parts)
    out: dict[str, Any] = {"policy": policy, "threads": int(threads),
                           "tokens_per_s": round(tokens / seconds, 1) if seconds > 0 else None,
                           "timed": len(parts), "seconds": round(seconds, 4), "timed_out": timed_out,
                           "loadavg_after": _loadavg()}
    if out["tokens_per_s"] is None:
        out["error"] = err or (f"timed out after {timeout:.0f} s before a timed step" if timed_out else "no timed step")
    return out


def _child_spec(model_cfg: dict, cache_dir: str, s) -> dict[str, Any]:
    """What every child needs (JSON): the model, GAIN-FFN's config, the training config and the sweep's shape."""
    from dataclasses import replace

    from omegaconf import OmegaConf

    method_cfg = OmegaConf.to_container(compose_config(["method=gain_ffn"], None).method, resolve=True)
    return {"model_cfg": model_cfg, "cache_dir": cache_dir, "seed": int(s.seed), "method_cfg": method_cfg,
            "train_cfg": train_cfg(replace(s, mixed_precision="no", train_compile=False), int(s.busy_train_steps)),
            "windows": int(s.eval_windows), "seq": int(s.eval_seq), "batch": int(s.eval_batch)}


def _fraction(num: float | None, den: float | None) -> float | None:
    return round(num / den, 3) if num and den and math.isfinite(num) and math.isfinite(den) else None


def _busy_timeout(s, deadline: float) -> float | None:
    """A busy measurement's timeout: its own limit, but never past the load's deadline (None: no time left)."""
    left = deadline - time.time() - 2.0
    return min(float(s.busy_timeout_seconds), left) if left >= 5.0 else None


def bench_busy(model_cfg: dict, cache_dir: str, s, log=print) -> dict[str, Any]:
    """Tokens/s of training and perplexity idle, and under ``s.busy_loops`` busy loops with the old fixed and the
    adaptive thread setting, with the fractions of idle speed; see the module doc (and its bench.json keys)."""
    check_busy_settings(s)
    t_start = time.perf_counter()
    cores = _cores()
    choice = choose(cores, float(s.busy_loops), {})
    settings = {"idle": ("ACTIVE", cores), "old": ("ACTIVE", cores), "adaptive": (choice.policy, choice.threads)}
    spec = _child_spec(model_cfg, cache_dir, s)
    out: dict[str, Any] = {
        "cores": cores, "busy_loops": int(s.busy_loops), "busy_max_seconds": float(s.busy_max_seconds),
        "data": "random token ids (seeded)", "load_pids": [],
        "train_shape": {"steps": int(s.busy_train_steps), "timed_steps": int(s.busy_train_steps) - 1,
                        "batch": int(s.train_batch), "seq_len": int(s.train_seq), "method": "gain_ffn"},
        "perplexity_shape": {"windows": int(s.eval_windows), "seq_len": int(s.eval_seq), "batch": int(s.eval_batch)},
        "settings": {k: {"policy": p, "threads": t} for k, (p, t) in settings.items()},
        "adaptive_choice": choice.line(), "loadavg": {"idle": _loadavg()},
    }
    rates: dict[str, dict[str, Any]] = {w: {} for w in WORKLOADS}
    for w in WORKLOADS:
        rates[w]["idle"] = measure(w, spec, *settings["idle"], float(s.busy_timeout_seconds))
        log(f"  busy machine: {w} idle {rates[w]['idle']['tokens_per_s']} tok/s")
    with synthetic_load(int(s.busy_loops), float(s.busy_max_seconds)) as (procs, deadline):
        out["load_pids"] = [p.pid for p in procs]
        out["loadavg"]["busy_start"] = _loadavg()
        for i, w in enumerate(WORKLOADS):
            for name in (("old", "adaptive") if i % 2 == 0 else ("adaptive", "old")):  # order alternates
                timeout = _busy_timeout(s, deadline)
                rates[w][name] = (measure(w, spec, *settings[name], timeout) if timeout is not None else
                                  {"policy": settings[name][0], "threads": settings[name][1], "tokens_per_s": None,
                                   "skipped": "the load's lifetime (busy_max_seconds) was spent"})
                log(f"  busy machine: {w} {name} {rates[w][name]['tokens_per_s']} tok/s "
                    f"({s.busy_loops} busy loops, load average {os.getloadavg()[0]:.1f})")
        out["loadavg"]["busy_end"] = _loadavg()
    for w in WORKLOADS:
        r = rates[w]
        idle, old, ada = (r[k]["tokens_per_s"] for k in ("idle", "old", "adaptive"))
        out[w] = {**r, "old_of_idle": _fraction(old, idle), "adaptive_of_idle": _fraction(ada, idle),
                  "adaptive_over_old": _fraction(ada, old)}
    out["seconds"] = round(time.perf_counter() - t_start, 1)
    log(f"  busy machine: adaptive {out['train']['adaptive_of_idle']} / old {out['train']['old_of_idle']} of idle "
        f"(train), {out['perplexity']['adaptive_of_idle']} / {out['perplexity']['old_of_idle']} (perplexity); "
        f"{choice.line()}")
    return out
