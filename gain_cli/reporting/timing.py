"""Where a run's time went, and how much of the machine it used: ``<run>/timing.json``.

Every run records, per process session (a resumed run adds one), its wall time from the start of the command to
its last write and, for each phase, the seconds, tokens and model FLOPs (``gain_cli.models.flops``):

  train       optimiser steps (tokens of every process; FLOPs of forward + backward for the method's trainable weights)
  perplexity  the validation sweeps (every position of every block is a forward token)
  lm-eval     the harness tasks (every token of every forward lm-eval makes, padding included)
  other       the rest of the wall time: loading, converting, merging, writing results and reports, compiling
              outside the first step

``time_shares`` sums runs and turns them into shares of the wall time, and with a matmul peak (FLOP/s, measured
by ``gain bench``'s probe at the model's shapes) into the end-to-end model-FLOPs utilisation:
MFU = Σ FLOPs of every phase ÷ (peak × wall time).
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from gain_cli.io import atomic_write_json, read_json
from gain_cli.rundir import RunDir

PHASES = ("train", "perplexity", "lm-eval")


class RunTiming:
    """The phases of one session of a run, accumulated as they finish."""

    def __init__(self, t0: float | None = None):
        self.t0 = time.perf_counter() if t0 is None else t0
        self.phases = {p: {"seconds": 0.0, "tokens": 0, "flops": 0.0} for p in PHASES}

    def add(self, phase: str, seconds: float, tokens: int, flops: float) -> None:
        ph = self.phases[phase]
        ph["seconds"] += float(seconds)
        ph["tokens"] += int(tokens)
        ph["flops"] += float(flops)

    def session(self) -> dict[str, Any]:
        wall = time.perf_counter() - self.t0
        phases = {p: {"seconds": round(v["seconds"], 3), "tokens": v["tokens"], "flops": v["flops"]}
                  for p, v in self.phases.items()}
        return {"wall_seconds": round(wall, 3), "phases": phases,
                "other_seconds": round(max(0.0, wall - sum(v["seconds"] for v in self.phases.values())), 3)}

    def write(self, run_dir: Path, **extra: Any) -> None:
        """Append this session to ``timing.json`` (atomically; earlier sessions of a resumed run are kept)."""
        path = RunDir(run_dir).timing_path
        sessions = read_json(path).get("sessions", []) if path.is_file() else []
        atomic_write_json(path, {"sessions": [*sessions, {**self.session(), **extra}]})


def read_timing(run_dir: Path) -> dict[str, Any] | None:
    path = RunDir(run_dir).timing_path
    return read_json(path) if path.is_file() else None


def time_shares(timings: list[dict[str, Any]], peak_flops: float | None = None) -> dict[str, Any]:
    """Sum the sessions of ``timings`` (each a ``timing.json``): seconds and share of the wall time per phase and
    ``other``, FLOPs, and with ``peak_flops`` the end-to-end MFU."""
    sessions = [s for t in timings for s in t.get("sessions", [])]
    wall = sum(s["wall_seconds"] for s in sessions)
    seconds = {p: sum(s["phases"][p]["seconds"] for s in sessions) for p in PHASES}
    seconds["other"] = sum(s["other_seconds"] for s in sessions)
    flops = {p: sum(s["phases"][p]["flops"] for s in sessions) for p in PHASES}
    tokens = {p: sum(s["phases"][p]["tokens"] for s in sessions) for p in PHASES}
    out: dict[str, Any] = {
        "runs": len(timings), "sessions": len(sessions), "wall_seconds": wall,
        "seconds": {k: round(v, 1) for k, v in seconds.items()},
        "share": {k: (round(v / wall, 4) if wall else None) for k, v in seconds.items()},
        "tokens": tokens, "flops": flops, "total_flops": sum(flops.values()),
    }
    if peak_flops:
        out["peak_flops_per_s"] = peak_flops
        out["mfu"] = out["total_flops"] / (peak_flops * wall) if wall else None
        # each phase's own utilisation: its FLOPs over its own seconds
        out["phase_mfu"] = {p: (flops[p] / (peak_flops * seconds[p]) if seconds[p] else None) for p in PHASES}
    return out
