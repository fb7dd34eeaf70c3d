"""CPU threads fair on a busy machine: the OpenMP wait policy and the torch thread count from the load.

PyTorch's OpenMP pool spins its idle threads at every barrier. On idle cores that is the fastest setting; on a
machine shared with other work a descheduled spinning pool thread stalls every parallel region (docs/performance.md,
"Thread settings": 6.7-97× slower forwards measured here at load 3-5). The wait policy is read once, when the OpenMP
runtime loads (``import torch``), so ``choose`` runs in the CLI entry, before anything imports torch:

* idle (1-minute load average of the other work < ``IDLE_LOAD``): spinning (``ACTIVE``), one thread per core;
* busy: ``PASSIVE`` (idle threads sleep) and still one thread per core. Measured by ``gain bench``'s busy-machine
  section (SmolLM2, 2 cores, 2 busy-loop processes): sleeping threads remove the stall, and two of them trained
  1.4-1.6× faster than one (0.53-0.70 of the idle speed against 0.38-0.44), because the cores are shared per
  thread and a sleeping thread costs the others nothing;
* a spinning pool on a busy machine (the user set ``OMP_WAIT_POLICY=ACTIVE``, or the load came after an idle start)
  keeps to the cores the others leave, at least one: ``max(1, round(cores - load))``.

The load is looked at again at the start of every stage (``threads_for_stage``): the others' load is then the
1-minute load less this process's own threads, and a spinning pool's thread count follows it (the wait policy
cannot change once torch has loaded). Thread counts change the order of floating-point reductions, so a run whose
thread count changed between stages is reproducible to rounding; ``train.threads`` fixes the count for
bit-identical reruns. An ``OMP_WAIT_POLICY`` or ``OMP_NUM_THREADS`` already in the environment wins (the user
decided), and so does ``train.threads`` for a run. The choice and its reason are kept for the run's log.
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


def threads_for(policy: str, cores: int, load: float) -> int:
    """Torch threads for ``cores`` cores when the other work's load is ``load``: every core when idle or when idle
    threads sleep (PASSIVE); a spinning pool on a busy machine keeps to the cores left, at least one."""
    if load < IDLE_LOAD or policy == "PASSIVE":
        return cores
    return max(1, min(cores, round(cores - load)))


def choose(cores: int, load: float, env: dict[str, str]) -> ThreadChoice:
    """The policy and thread count for ``cores`` cores at 1-minute load ``load`` (the others' work)."""
    busy = load >= IDLE_LOAD
    policy = "PASSIVE" if busy else "ACTIVE"
    reason = (f"load {load:.1f} on {cores} cores: busy, idle threads sleep" if busy
              else f"load {load:.1f} on {cores} cores: idle")
    if env.get("OMP_WAIT_POLICY"):
        policy, reason = env["OMP_WAIT_POLICY"].upper(), reason + "; OMP_WAIT_POLICY from the environment"
    threads = threads_for(policy, cores, load)
    if env.get("OMP_NUM_THREADS", "").isdigit():
        threads, reason = int(env["OMP_NUM_THREADS"]), reason + "; OMP_NUM_THREADS from the environment"
    return ThreadChoice(policy, threads, reason)


_CHOSEN: list[ThreadChoice] = []


def machine() -> tuple[int, float]:
    """(cores this process may use, 1-minute load average)."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return cores, (os.getloadavg()[0] if hasattr(os, "getloadavg") else 0.0)


def apply_at_start() -> ThreadChoice:
    """Choose from this machine's cores and load and set the environment torch reads when it loads (the CLI entry
    calls this before any torch import; later calls return the first choice)."""
    if not _CHOSEN:
        cores, load = machine()
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
    choice = chosen() if governed() else None
    return (None, None) if choice is None else (choice.threads, choice.line())


def governed() -> bool:
    """Whether the start-up choice sets this process's threads (not set by the user or a launcher)."""
    return chosen() is not None and os.environ.get("RANK") is None and "OMP_NUM_THREADS" not in os.environ


def threads_for_stage(current: int, cores: int | None = None, load: float | None = None) -> tuple[int, str] | None:
    """At a stage's start, in a process the start-up choice governs: (new thread count, log line) when the load
    seen now calls for another count than ``current``, else None (a sleeping pool keeps every core). The others'
    load is the 1-minute load less this process's own ``current`` threads (busy in the minute before)."""
    if not governed():
        return None
    if cores is None or load is None:
        cores, load = machine()
    others = max(0.0, load - current)
    threads = threads_for(chosen().policy, cores, others)
    if threads == current:
        return None
    return threads, (f"CPU threads: {current} → {threads} (load {load:.1f} with this run's {current}: "
                     f"the other work's ~{others:.1f} on {cores} cores)")
