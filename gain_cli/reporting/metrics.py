"""Forgetting metrics of a sequential-adaptation run, from its perplexity (and harness) matrices.

Notation
--------
``P`` is the validation-perplexity matrix of one run: rows ``0..T'``, columns ``j = 1..T``
(0-based in code: column ``j-1``). Row 0 is the base model; row ``k`` is the model after training
stage ``k``, which trained on domain ``j = k`` (columns are in training order). A finished run has
``T' = T``; a partial run (stopped or still running) has ``T' < T`` and every metric below is
computed up to its last finished stage ``T'`` (read "T" as "T'" below). ``L = ln P`` (natural log
of perplexity = mean per-token cross-entropy in nats).

Formulas and sign conventions
-----------------------------
* **In-domain change**, domain ``j <= T'``: ``(P[j,j] - P[0,j]) / P[0,j]``, the relative PPL change
  from the base model to right after the domain's own stage. Negative = the domain got better
  (adaptation worked). ``in_domain_change_mean`` is its mean over ``j = 1..T'``.
* **Earlier-domain change**, domain ``j < T'`` (trained before the last stage):
  ``earlier_change_vs_own = (P[T',j] - P[j,j]) / P[j,j]`` (final vs right after its own stage) and
  ``earlier_change_vs_base = (P[T',j] - P[0,j]) / P[0,j]`` (final vs base model), and their means over
  ``j = 1..T'-1``. Negative = earlier domains improved, positive = they were forgotten. The GAIN paper's
  "7-13 % better (GAIN-FFN) / 18-36 % worse (LoRA) on earlier-trained domains" are of this kind.
* **BWT** (backward transfer) ``= mean_{j<T'} (L[j,j] - L[T',j])`` on log-PPL. Positive BWT = earlier
  domains got *better* after the later stages; negative BWT = forgetting. This matches the usual
  accuracy-based sign (BWT = R[T,j] - R[j,j], higher = better) with log-PPL's sign flipped, because
  lower PPL is better. ``bwt_per_domain[j] = L[j,j] - L[T',j]``.
* **FWT** (forward transfer) ``= mean_{2<=j<=T'} (L[0,j] - L[j-1,j])``: the log-PPL gain on domain
  ``j`` from training on the earlier domains, measured just before domain ``j``'s own stage. Positive =
  the earlier stages helped domain ``j``; negative = they hurt it. ``fwt_per_domain[j]`` holds the terms.
* **Average final log-PPL** ``= mean_j L[T',j]`` over all ``T`` columns, and **average final PPL**
  ``= mean_j P[T',j]`` (arithmetic mean; ``exp(avg_final_log_ppl)`` is the geometric mean). Lower = better.
  For a partial run this is the last finished row (untrained domains included).
* **Maximum forgetting**, domain ``j < T'``: ``max_{j<=k<=T'} L[k,j] - L[j,j]`` on log-PPL, the worst
  log-PPL increase over the own-stage value seen at any later stage. ``>= 0`` by construction
  (``k = j`` gives 0); larger = worse. ``max_forgetting_mean`` is its mean over ``j < T'``.
* **Harness tasks** (e.g. BoolQ accuracy ``A[k]`` in [0, 1] per row ``k``): ``curve = A[0..T']``,
  ``delta_points[k] = 100 * (A[k] - A[0])`` and ``drop_points = 100 * (A[T'] - A[0])`` in accuracy
  points. Negative = accuracy dropped vs the base model. Every task of the run gets them, from lm-eval's
  ``acc`` (``ForgettingMetrics.harness``) and, for tasks that report it, its length-normalised ``acc_norm``
  (:func:`harness_drops`); ``mean_drop_points`` is the unweighted mean of the tasks' drops.

Edge cases
----------
Undefined quantities are ``None`` (never a made-up 0): with ``T' = 1`` (one stage, e.g. a ``T = 1``
run) there are no earlier domains, so the earlier-domain changes, BWT and maximum forgetting are
empty / ``None``; FWT needs ``T' >= 2``. With ``T' = 0`` (only the base row) only the average final
(log-)PPL, i.e. of the base model, is defined. A NaN/inf input value propagates as NaN/inf into the
quantities that use it.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

from gain_cli.errors import GainError

#: Short statements of every sign convention, written into reports and printed by the CLI.
SIGN_CONVENTIONS: dict[str, str] = {
    "in_domain_change": "(P[j,j] - P[0,j]) / P[0,j]: relative PPL change of domain j from base to right after its "
                        "own stage; negative = better",
    "earlier_change_vs_own": "(P[T,j] - P[j,j]) / P[j,j] for j < T: final vs right after own stage; "
                             "negative = earlier domains improved, positive = forgotten",
    "earlier_change_vs_base": "(P[T,j] - P[0,j]) / P[0,j] for j < T: final vs base model; negative = better than base",
    "bwt": "mean_{j<T} (ln P[j,j] - ln P[T,j]): positive = earlier domains got better after later stages, "
           "negative = forgetting",
    "fwt": "mean_{2<=j<=T} (ln P[0,j] - ln P[j-1,j]): positive = earlier stages helped domain j before its own stage",
    "max_forgetting": "max_{j<=k<=T} ln P[k,j] - ln P[j,j] for j < T: >= 0, larger = worse",
    "avg_final_log_ppl": "mean_j ln P[T,j] over all domains; lower = better",
    "avg_final_ppl": "mean_j P[T,j] over all domains (arithmetic); lower = better",
    "harness_drop_points": "100 * (acc[T] - acc[0]) in accuracy points, per lm-eval task (acc and, where the task "
                           "reports it, acc_norm); negative = drop vs base",
}

#: Human-readable titles of the per-domain and summary metrics (used by tables and reports).
METRIC_TITLES: dict[str, str] = {
    "in_domain_change": "In-domain PPL change vs base (%)",
    "earlier_change_vs_own": "Earlier-domain PPL change, final vs own stage (%)",
    "earlier_change_vs_base": "Earlier-domain PPL change, final vs base (%)",
    "bwt_per_domain": "Backward transfer per domain (log-PPL)",
    "fwt_per_domain": "Forward transfer per domain (log-PPL)",
    "max_forgetting": "Maximum forgetting per domain (log-PPL)",
}


@dataclass
class HarnessMetrics:
    """One lm-eval task's accuracy over the rows of a run (see the module docstring)."""

    curve: list[float]          # acc[0..T'] in [0, 1]
    delta_points: list[float]   # 100 * (acc[k] - acc[0])
    drop_points: float          # 100 * (acc[T'] - acc[0])


@dataclass
class ForgettingMetrics:
    """Every metric of one run; ``None`` marks an undefined quantity (see the module docstring)."""

    domains: list[str]
    num_domains: int                                   # T
    stages_done: int                                   # T' (0 = only the base row)
    complete: bool                                     # T' == T
    in_domain_change: dict[str, float] = field(default_factory=dict)        # j <= T'
    in_domain_change_mean: float | None = None
    earlier_change_vs_own: dict[str, float] = field(default_factory=dict)   # j < T'
    earlier_change_vs_own_mean: float | None = None
    earlier_change_vs_base: dict[str, float] = field(default_factory=dict)  # j < T'
    earlier_change_vs_base_mean: float | None = None
    bwt_per_domain: dict[str, float] = field(default_factory=dict)          # j < T'
    bwt: float | None = None
    fwt_per_domain: dict[str, float] = field(default_factory=dict)          # 2 <= j <= T'
    fwt: float | None = None
    max_forgetting: dict[str, float] = field(default_factory=dict)          # j < T'
    max_forgetting_mean: float | None = None
    avg_final_log_ppl: float | None = None
    avg_final_ppl: float | None = None
    harness: dict[str, HarnessMetrics] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-able dict (non-finite floats become the strings "nan" / "inf" / "-inf")."""
        return _jsonable(asdict(self))


def _jsonable(obj: Any) -> Any:
    if isinstance(obj, dict):
        return {k: _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, float) and not math.isfinite(obj):
        return "nan" if math.isnan(obj) else ("inf" if obj > 0 else "-inf")
    return obj


jsonable = _jsonable  # for the reports' JSON files


def _mean(values: Sequence[float]) -> float | None:
    return float(np.mean(values)) if len(values) else None


def relative_change_matrix(ppl: np.ndarray) -> np.ndarray:
    """``(P[k,j] - P[0,j]) / P[0,j]`` for every row k and column j (row 0 is all zeros); negative = better."""
    p = np.asarray(ppl, dtype=float)
    return (p - p[0]) / p[0]


def _check_ppl(ppl: Any) -> np.ndarray:
    try:
        p = np.asarray(ppl, dtype=float)
    except (TypeError, ValueError) as e:
        raise GainError(f"perplexity matrix is not numeric: {e}") from None
    if p.ndim != 2 or p.shape[0] < 1 or p.shape[1] < 1:
        raise GainError(f"perplexity matrix must be 2-D with >= 1 row and >= 1 column, got shape {p.shape}")
    if p.shape[0] > p.shape[1] + 1:
        raise GainError(f"perplexity matrix has {p.shape[0]} rows for {p.shape[1]} domains; "
                        f"at most {p.shape[1] + 1} (base + one stage per domain)")
    if np.any(p[~np.isnan(p)] <= 0):
        raise GainError("perplexity matrix holds a value <= 0; perplexities are > 0")
    return p


def compute_metrics(ppl: Any, domains: Sequence[str] | None = None,
                    harness: Mapping[str, Any] | None = None) -> ForgettingMetrics:
    """All forgetting metrics of one run (formulas and signs in the module docstring).

    ``ppl``: array-like, shape ``(T'+1, T)``, row 0 = base, row k = after stage k (``T' <= T``).
    ``domains``: the ``T`` column names in training order (default ``d1..dT``).
    ``harness``: task -> accuracies per row (length ``T'+1``; a shorter curve is padded with NaN).
    """
    p = _check_ppl(ppl)
    n_rows, T = p.shape
    t = n_rows - 1  # T': last finished stage
    names = list(domains) if domains is not None else [f"d{j}" for j in range(1, T + 1)]
    if len(names) != T:
        raise GainError(f"{len(names)} domain names for a perplexity matrix with {T} columns")
    with np.errstate(divide="ignore", invalid="ignore"):
        L = np.log(p)
    m = ForgettingMetrics(domains=names, num_domains=T, stages_done=t, complete=t == T)

    # 0-based: domain j (1-based) is column j-1, its own stage is row j.
    for j in range(1, t + 1):
        m.in_domain_change[names[j - 1]] = float((p[j, j - 1] - p[0, j - 1]) / p[0, j - 1])
    m.in_domain_change_mean = _mean(list(m.in_domain_change.values()))

    for j in range(1, t):
        c = j - 1
        d = names[c]
        m.earlier_change_vs_own[d] = float((p[t, c] - p[j, c]) / p[j, c])
        m.earlier_change_vs_base[d] = float((p[t, c] - p[0, c]) / p[0, c])
        m.bwt_per_domain[d] = float(L[j, c] - L[t, c])
        m.max_forgetting[d] = float(np.max(L[j:t + 1, c]) - L[j, c])
    m.earlier_change_vs_own_mean = _mean(list(m.earlier_change_vs_own.values()))
    m.earlier_change_vs_base_mean = _mean(list(m.earlier_change_vs_base.values()))
    m.bwt = _mean(list(m.bwt_per_domain.values()))
    m.max_forgetting_mean = _mean(list(m.max_forgetting.values()))

    for j in range(2, t + 1):
        m.fwt_per_domain[names[j - 1]] = float(L[0, j - 1] - L[j - 1, j - 1])
    m.fwt = _mean(list(m.fwt_per_domain.values()))

    m.avg_final_log_ppl = float(np.mean(L[t]))
    m.avg_final_ppl = float(np.mean(p[t]))

    for task, accs in (harness or {}).items():
        m.harness[task] = harness_metrics(accs, n_rows)
    return m


def harness_metrics(accs: Any, n_rows: int | None = None) -> HarnessMetrics:
    """Curve, per-row change vs base and final drop (points) of one task's accuracies ``acc[0..T']``.

    With ``n_rows`` the curve is cut or NaN-padded to that many rows (the PPL matrix's), so the
    final drop is taken at the same stage ``T'`` as the perplexity metrics.
    """
    a = np.asarray(accs, dtype=float).reshape(-1)
    if n_rows is not None:
        a = np.concatenate([a[:n_rows], np.full(max(0, n_rows - a.size), np.nan)])
    if a.size == 0:
        raise GainError("harness accuracy curve is empty")
    delta = 100.0 * (a - a[0])
    return HarnessMetrics(curve=[float(x) for x in a], delta_points=[float(x) for x in delta],
                          drop_points=float(delta[-1]))


#: the lm-eval metrics whose change vs base the reports show (accuracies in [0, 1]; higher = better)
HARNESS_DROP_METRICS: tuple[str, ...] = ("acc", "acc_norm")


def harness_drops(by_metric: Mapping[str, Mapping[str, Any] | None], n_rows: int | None = None
                  ) -> dict[str, dict[str, HarnessMetrics]]:
    """``metric -> task -> HarnessMetrics`` for every task and each of :data:`HARNESS_DROP_METRICS` it has.

    ``by_metric``: ``metric -> task -> values per row`` (e.g. ``{"acc": run.harness, "acc_norm":
    run.harness_extra.get("acc_norm")}``); a task whose curve is all NaN for a metric (lm-eval does not report that
    metric for it, e.g. BoolQ's acc_norm) is left out of that metric. ``n_rows`` as in :func:`harness_metrics`."""
    out: dict[str, dict[str, HarnessMetrics]] = {}
    for metric in HARNESS_DROP_METRICS:
        for task, values in (by_metric.get(metric) or {}).items():
            a = np.asarray(values, dtype=float).reshape(-1)
            if a.size and not np.all(np.isnan(a)):
                out.setdefault(metric, {})[task] = harness_metrics(a, n_rows)
    return out


def mean_drop_points(drops: Mapping[str, HarnessMetrics]) -> float | None:
    """Unweighted mean of the tasks' final drops (points); None without tasks, NaN when a task's drop is NaN."""
    values = [h.drop_points for h in drops.values()]
    return float(np.mean(values)) if values else None
