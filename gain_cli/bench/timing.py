"""Timing on a noisy machine: medians of repeats, interleaved runs, ratios within one repeat.

Every comparison runs its contenders in the same process, alternating the order each repeat (A,B then B,A …),
so slow drift of the machine's load hits both sides alike; a ratio combines the per-repeat ratios (each from two
back-to-back runs) in order-balanced pairs (see ``paired_ratio``) and is reported next to the medians of the two
sides. Use an even number of repeats.
"""

from __future__ import annotations

import gc
import math
import statistics
import time
from collections.abc import Callable, Sequence
from typing import Any


def median(xs: Sequence[float]) -> float:
    return float(statistics.median(xs)) if xs else float("nan")


def spread(xs: Sequence[float]) -> float:
    """(max - min) / median of the samples: how noisy the measurement was (0 = identical repeats)."""
    if len(xs) < 2:
        return 0.0
    m = median(xs)
    return float((max(xs) - min(xs)) / m) if m else float("nan")


def timed(fn: Callable[[], Any]) -> tuple[float, Any]:
    """(wall seconds, result) of one call; garbage collected before so earlier runs' memory does not bill this one."""
    gc.collect()
    t0 = time.perf_counter()
    out = fn()
    return time.perf_counter() - t0, out


def interleaved(runs: dict[str, Callable[[], Any]], repeats: int) -> dict[str, list[tuple[float, Any]]]:
    """Run every contender ``repeats`` times, alternating the order each repeat; {name: [(seconds, result), ...]}."""
    names = list(runs)
    out: dict[str, list[tuple[float, Any]]] = {n: [] for n in names}
    for r in range(repeats):
        order = names if r % 2 == 0 else names[::-1]
        for n in order:
            out[n].append(timed(runs[n]))
    return out


def paired_ratio(num: Sequence[float], den: Sequence[float]) -> float:
    """Order-balanced ratio of rates measured back to back: num[i] / den[i] per repeat, combined per (A,B), (B,A)
    pair of repeats by geometric mean, then the median over the pairs.

    Whichever side runs first in a repeat can pay a first-run cost (measured: ~15 % for full fine-tuning's fresh
    gradient and optimiser memory), and the order alternates, so a plain median over an odd number of repeats
    would bill one side more often. An unpaired last repeat is left out; one repeat gives its own ratio.
    """
    ratios = [a / b for a, b in zip(num, den) if b]
    if len(ratios) < 2:
        return median(ratios)
    return median([math.sqrt(ratios[i] * ratios[i + 1]) for i in range(0, len(ratios) - 1, 2)])


def rel_diff(a: float, b: float) -> float:
    """|a - b| / |b| (b the reference), guarded against b = 0."""
    return abs(a - b) / max(abs(b), 1e-12)
