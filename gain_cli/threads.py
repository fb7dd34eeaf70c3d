"""CPU threads fair on a busy machine: the OpenMP wait policy and the torch thread count from the load seen at start.

PyTorch's OpenMP pool spins its idle threads at every barrier. On idle cores that is the fastest setting; on a
machine shared with other work a descheduled pool thread stalls every parallel region (README "Thread settings":
6.7-97× slower forwards measured here at load 3-5). The wait policy is read once, when the OpenMP runtime loads
(``import torch``), so ``choose`` runs in the CLI entry, before anything imports torch:

* idle (1-minute load average of the other work < ``IDLE_LOAD``): spinning (``ACTIVE``), one thread per core;
* busy: ``PASSIVE`` (idle threads sleep) and the cores the others leave, at least one:
  ``threads = max(1, round(cores - load))``.

An ``OMP_WAIT_POLICY`` or ``OMP_NUM_THREADS`` already in the environment wins (the user decided), and so does
``train.threads`` for a run. The choice and its reason are kept for the run's log.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

IDLE_LOAD = 0.5


@dataclass(frozen=True)
class ThreadChoice:
    policy: str          # ACTIVE | PASSIVE (what OMP_WAIT_POLICY is set to)
    threads: int
    reason: str

    def line(self) -> str:
        return f"CPU threads: {self.threads}, OpenMP wait policy {self.policy} ({self.reason})"


def choose(cores: int, load: float, env: dict[str, str]) -> ThreadChoice:
    """The policy and thread count for ``cores`` cores at 1-minute load ``load`` (the others' work)."""
    busy = load >= IDLE_LOAD
    policy = "PASSIVE" if busy else "ACTIVE"
    threads = max(1, min(cores, round(cores - load))) if busy else cores
    reason = (f"load {load:.1f} on {cores} cores: busy, idle threads sleep and use the cores left" if busy
              else f"load {load:.1f} on {cores} cores: idle")
    if env.get("OMP_WAIT_POLICY"):
        policy, reason = env["OMP_WAIT_POLICY"].upper(), reason + "; OMP_WAIT_POLICY from the environment"
    if env.get("OMP_NUM_THREADS", "").isdigit():
        threads, reason = int(env["OMP_NUM_THREADS"]), reason + "; OMP_NUM_THREADS from the environment"
    return ThreadChoice(policy, threads, reason)


_CHOSEN: list[ThreadChoice] = []


def apply_at_start() -> ThreadChoice:
    """Choose from this machine's cores and load and set the environment torch reads when it loads (the CLI entry
    calls this before any torch import; later calls return the first choice)."""
    if not _CHOSEN:
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
        load = os.getloadavg()[0] if hasattr(os, "getloadavg") else 0.0
        choice = choose(cores, load, dict(os.environ))
        os.environ["OMP_WAIT_POLICY"] = choice.policy  # the thread count is set per run (torch.set_num_threads):
        _CHOSEN.append(choice)                          # launched processes get Accelerate's share of the cores
    return _CHOSEN[0]


def chosen() -> ThreadChoice | None:
    return _CHOSEN[0] if _CHOSEN else None


def threads_for_run(train_threads: int | None) -> tuple[int | None, str | None]:
    """(torch threads to set or None to leave torch's, the log line): ``train.threads`` wins; then the start-up
    choice, in a process the CLI entry started itself (not one launched by Accelerate or torchrun, whose launcher
    divides the cores, nor one whose OMP_NUM_THREADS the user set)."""
    if train_threads:
        return int(train_threads), f"CPU threads: {int(train_threads)} (train.threads)"
    choice = chosen()
    if choice is None or os.environ.get("RANK") is not None or "OMP_NUM_THREADS" in os.environ:
        return None, None
    return choice.threads, choice.line()
