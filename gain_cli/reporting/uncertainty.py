"""Confidence intervals for perplexity cells and forgetting metrics: a bootstrap over seeds, blocks and items.

What varies between two repetitions of an experiment, and is resampled here:

* **validation blocks** — every PPL cell is the token-weighted NLL of a fixed set of validation blocks of its
  domain (their per-block NLL sums are kept in each row's ``metrics.json``, ``block_nll``). A replicate draws the
  blocks of each domain with replacement, *the same draw for every row and every seed* (the rows are evaluated
  on the same blocks, so their errors are paired: a metric that compares two rows keeps the pairing);
* **downstream items** — an lm-eval task's accuracy is the mean of its per-item 0/1 scores (``per_item`` of the
  harness result); items are drawn with replacement, the same draw for every row and seed;
* **seeds** — runs of one method that differ only in their seed (initialisation, data order). With several
  seeds a replicate first draws the seeds with replacement, then computes each drawn seed's metric on the
  drawn blocks and items, and averages them (a two-stage, hierarchical bootstrap). With one seed only blocks and
  items are resampled, and the interval says nothing about seed-to-seed variation.

The point estimate of a metric is its mean over the seeds on all blocks and items; the interval is the
percentile interval (2.5 %, 97.5 % for 95 %) of the replicates. Metrics are the ones of
:func:`gain_cli.reporting.metrics.compute_metrics` (one definition for points and replicates).
Two methods' intervals that do not overlap mark a difference (a conservative test: non-overlap of two 95 %
intervals implies a difference at well below 5 %).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from gain_cli.errors import GainError
from gain_cli.reporting.metrics import ForgettingMetrics, compute_metrics

DEFAULT_REPLICATES = 1000
DEFAULT_LEVEL = 0.95


@dataclass(frozen=True)
class Interval:
    """A point estimate with a confidence interval ``[lo, hi]`` (``None`` where undefined)."""

    value: float | None
    lo: float | None
    hi: float | None
    level: float = DEFAULT_LEVEL

    @property
    def defined(self) -> bool:
        return self.value is not None and self.lo is not None and self.hi is not None

    def scaled(self, k: float) -> "Interval":
        if not self.defined:
            return self
        lo, hi = sorted((self.lo * k, self.hi * k))
        return Interval(self.value * k, lo, hi, self.level)

    def below(self, other: "Interval") -> bool:
        """This interval lies entirely below ``other`` (a difference in the intervals' sense)."""
        return self.defined and other.defined and self.hi < other.lo

    def overlaps(self, other: "Interval") -> bool:
        return not (self.below(other) or other.below(self))

    def sign(self) -> int:
        """+1 if the interval is entirely above 0, -1 if entirely below, 0 if it contains 0 (or is undefined)."""
        if not self.defined:
            return 0
        return 1 if self.lo > 0 else (-1 if self.hi < 0 else 0)

    def format(self, digits: int = 1, unit: str = "") -> str:
        """``-12.4 % [-14.0, -10.9]`` style."""
        if self.value is None:
            return "–"
        v = f"{self.value:+.{digits}f}{unit}"
        if self.lo is None or self.hi is None:
            return v
        return f"{v} [{self.lo:+.{digits}f}, {self.hi:+.{digits}f}]"

    def to_dict(self) -> dict[str, float | None]:
        return {"value": self.value, "lo": self.lo, "hi": self.hi, "level": self.level}


def percentile_interval(samples: Sequence[float] | np.ndarray, level: float = DEFAULT_LEVEL) -> tuple[float, float]:
    """The central ``level`` percentile interval of bootstrap replicates (non-finite replicates dropped)."""
    a = np.asarray(samples, dtype=float).reshape(-1)
    a = a[np.isfinite(a)]
    if a.size == 0:
        raise GainError("no finite bootstrap replicate to build an interval from")
    tail = (1.0 - level) / 2.0 * 100.0
    lo, hi = np.percentile(a, [tail, 100.0 - tail])
    return float(lo), float(hi)


def bootstrap_mean(values: Sequence[float] | np.ndarray, replicates: int = DEFAULT_REPLICATES,
                   level: float = DEFAULT_LEVEL, seed: int = 0) -> Interval:
    """Mean of ``values`` with its percentile-bootstrap interval (resampling the values)."""
    x = np.asarray(values, dtype=float).reshape(-1)
    if x.size == 0:
        raise GainError("bootstrap_mean of no values")
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, x.size, size=(replicates, x.size))
    lo, hi = percentile_interval(x[idx].mean(axis=1), level)
    return Interval(float(x.mean()), lo, hi, level)


# --------------------------------------------------------------------------------------------- one run's data


@dataclass
class RunSamples:
    """What the bootstrap needs of one run: per-block NLLs and per-item scores of every finished row."""

    domains: list[str]
    block_nll: np.ndarray            # (rows, domains, blocks): NLL sum of each validation block
    tokens_per_block: np.ndarray     # (domains,): predicted tokens per block
    items: dict[str, np.ndarray] = field(default_factory=dict)   # task -> (rows, items) 0/1 scores

    @property
    def n_rows(self) -> int:
        return self.block_nll.shape[0]

    def ppl(self, blocks: Sequence[np.ndarray] | None = None) -> np.ndarray:
        """(rows, domains) perplexities on all blocks, or on the drawn block indices of each domain."""
        if blocks is None:
            mean = self.block_nll.sum(axis=2) / (self.block_nll.shape[2] * self.tokens_per_block)
        else:
            mean = np.stack([self.block_nll[:, j, b].sum(axis=1) / (len(b) * self.tokens_per_block[j])
                             for j, b in enumerate(blocks)], axis=1)
        return np.exp(mean)

    def accuracy(self, task: str, items: np.ndarray | None = None) -> np.ndarray:
        a = self.items[task]
        return (a if items is None else a[:, items]).mean(axis=1)


def run_samples(rows: Sequence[dict[str, Any]], domains: Sequence[str]) -> RunSamples:
    """Build :class:`RunSamples` from a run's row dicts (``base/metrics.json``, ``stages/stage_K/metrics.json``).

    GainError when a row lacks per-block NLLs (a run made before they were kept: re-evaluate it) or the rows'
    block counts differ.
    """
    if not rows:
        raise GainError("a run without rows has no confidence intervals")
    nll, tokens = [], None
    for r in rows:
        per = r.get("block_nll") or {}
        missing = [d for d in domains if not per.get(d)]
        if missing:
            raise GainError(f"row {r.get('row')!r} has no per-block NLLs for {', '.join(missing)} (a run from before "
                            "they were kept): its cells have no confidence intervals")
        counts = [len(per[d]) for d in domains]
        if len(set(counts)) != 1:
            raise GainError(f"row {r.get('row')!r}: domains have different numbers of validation blocks {counts}; "
                            "the bootstrap needs the same number per domain")
        nll.append([per[d] for d in domains])
        toks = np.array([int(r["eval_tokens"][d]) / len(per[d]) for d in domains])
        tokens = toks if tokens is None else tokens
    block_nll = np.asarray(nll, dtype=float)
    if block_nll.ndim != 3:
        raise GainError("rows differ in their number of validation blocks")
    items: dict[str, np.ndarray] = {}
    tasks = list((rows[0].get("harness") or {}))
    for t in tasks:
        per_row = [((r.get("harness") or {}).get(t) or {}).get("per_item") for r in rows]
        if all(p for p in per_row) and len({len(p) for p in per_row}) == 1:
            items[t] = np.asarray(per_row, dtype=float)
    return RunSamples(list(domains), block_nll, tokens, items)


# --------------------------------------------------------------------------------------------- metrics with intervals

#: headline metrics: (ForgettingMetrics attribute, display scale)
HEADLINE: dict[str, float] = {
    "in_domain_change_mean": 100.0,
    "earlier_change_vs_own_mean": 100.0,
    "earlier_change_vs_base_mean": 100.0,
    "bwt": 1.0,
    "fwt": 1.0,
    "max_forgetting_mean": 1.0,
    "avg_final_ppl": 1.0,
}
PER_DOMAIN = ("in_domain_change", "earlier_change_vs_own", "earlier_change_vs_base", "bwt_per_domain",
              "fwt_per_domain", "max_forgetting")


def _metric_values(m: ForgettingMetrics) -> dict[str, float]:
    """Flat view of one run's metrics: headline names, ``name:domain`` per-domain values, ``drop:task``."""
    out: dict[str, float] = {}
    for k in HEADLINE:
        v = getattr(m, k)
        if v is not None:
            out[k] = float(v)
    for k in PER_DOMAIN:
        for d, v in getattr(m, k).items():
            out[f"{k}:{d}"] = float(v)
    for t, h in m.harness.items():
        out[f"drop:{t}"] = float(h.drop_points)
        out[f"final_acc:{t}"] = 100.0 * float(h.curve[-1])
    return out


def _metrics_of(s: RunSamples, blocks=None, items: dict[str, np.ndarray] | None = None) -> dict[str, float]:
    ppl = s.ppl(blocks)
    harness = {t: s.accuracy(t, None if items is None else items[t]) for t in s.items}
    return _metric_values(compute_metrics(ppl, s.domains, harness))


@dataclass
class GroupIntervals:
    """Intervals of every metric of one method (its runs = its seeds), and of every PPL cell."""

    seeds: int
    metrics: dict[str, Interval]                  # flat names (see _metric_values)
    ppl: list[list[Interval]]                     # (rows, domains)
    accuracy: dict[str, list[Interval]]           # task -> per row, in %
    replicates: int
    level: float

    def get(self, name: str) -> Interval:
        return self.metrics.get(name, Interval(None, None, None, self.level))


def group_intervals(runs: Sequence[RunSamples], replicates: int = DEFAULT_REPLICATES, level: float = DEFAULT_LEVEL,
                    seed: int = 0) -> GroupIntervals:
    """Point estimates (mean over the runs) and hierarchical-bootstrap intervals of one method's metrics.

    ``runs``: the method's runs (one per seed), with the same domains, rows, blocks and items. The rows used are
    those every run has finished.
    """
    if not runs:
        raise GainError("no runs to build intervals from")
    n_rows = min(r.n_rows for r in runs)
    ref = runs[0]
    for r in runs[1:]:
        if r.domains != ref.domains or r.block_nll.shape[2] != ref.block_nll.shape[2]:
            raise GainError("runs of one method differ in their domains or validation blocks")
    runs = [RunSamples(r.domains, r.block_nll[:n_rows], r.tokens_per_block,
                       {t: a[:n_rows] for t, a in r.items.items()}) for r in runs]
    tasks = [t for t in ref.items if all(t in r.items and r.items[t].shape[1] == ref.items[t].shape[1] for r in runs)]
    n_blocks, n_dom = ref.block_nll.shape[2], len(ref.domains)
    rng = np.random.default_rng(seed)

    points = [_metrics_of(r) for r in runs]
    names = [k for k in points[0] if all(k in p for p in points)]
    point = {k: float(np.mean([p[k] for p in points])) for k in names}
    ppl_point = np.mean([r.ppl() for r in runs], axis=0)
    acc_point = {t: 100.0 * np.mean([r.accuracy(t) for r in runs], axis=0) for t in tasks}

    reps = {k: np.empty(replicates) for k in names}
    ppl_reps = np.empty((replicates, n_rows, n_dom))
    acc_reps = {t: np.empty((replicates, n_rows)) for t in tasks}
    for b in range(replicates):
        chosen = rng.integers(0, len(runs), size=len(runs)) if len(runs) > 1 else np.zeros(1, dtype=int)
        blocks = [rng.integers(0, n_blocks, size=n_blocks) for _ in range(n_dom)]
        items = {t: rng.integers(0, ref.items[t].shape[1], size=ref.items[t].shape[1]) for t in tasks}
        vals = [_metrics_of(runs[i], blocks, items) for i in chosen]
        for k in names:
            reps[k][b] = np.mean([v.get(k, math.nan) for v in vals])
        ppl_reps[b] = np.mean([runs[i].ppl(blocks) for i in chosen], axis=0)
        for t in tasks:
            acc_reps[t][b] = 100.0 * np.mean([runs[i].accuracy(t, items[t]) for i in chosen], axis=0)

    def interval(v: float, samples: np.ndarray) -> Interval:
        if not np.isfinite(samples).any():
            return Interval(v, None, None, level)
        lo, hi = percentile_interval(samples, level)
        return Interval(v, lo, hi, level)

    metrics = {k: interval(point[k], reps[k]) for k in names}
    ppl = [[interval(float(ppl_point[i, j]), ppl_reps[:, i, j]) for j in range(n_dom)] for i in range(n_rows)]
    acc = {t: [interval(float(acc_point[t][i]), acc_reps[t][:, i]) for i in range(n_rows)] for t in tasks}
    return GroupIntervals(len(runs), metrics, ppl, acc, replicates, level)


def mark_differences(groups: dict[str, GroupIntervals], metric: str, lower_is_better: bool = True) -> dict[str, str]:
    """Per method, the methods it is better than on ``metric`` with non-overlapping intervals (e.g. ``"< lora"``)."""
    out: dict[str, str] = {}
    for a, ga in groups.items():
        better = []
        for b, gb in groups.items():
            if a == b:
                continue
            ia, ib = ga.get(metric), gb.get(metric)
            if (ia.below(ib) if lower_is_better else ib.below(ia)):
                better.append(b)
        out[a] = ", ".join(better)
    return out


def coverage(estimator: Callable[[np.ndarray, int], Interval], sampler: Callable[[np.random.Generator], np.ndarray],
             truth: float, trials: int, seed: int = 0) -> float:
    """Fraction of ``trials`` synthetic data sets whose interval holds ``truth`` (for checking an interval)."""
    rng = np.random.default_rng(seed)
    hits = 0
    for t in range(trials):
        iv = estimator(sampler(rng), t)
        hits += int(iv.lo <= truth <= iv.hi)
    return hits / trials
