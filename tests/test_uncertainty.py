"""The bootstrap behind every interval: known variance, coverage, per-block PPLs, seeds, differences."""

import math

import numpy as np
import pytest

from gain_cli.errors import GainError
from gain_cli.reporting.metrics import compute_metrics
from gain_cli.reporting.uncertainty import (Interval, bootstrap_mean, coverage, group_intervals, mark_differences,
                                            percentile_interval, run_samples)

DOMAINS = ["a", "b", "c"]


def _rows(nll, tokens=127, per_item=None):
    """Row dicts as a run writes them: nll[r][d] = per-block NLL sums."""
    labels = ["base", *(f"stage_{k}:{DOMAINS[k - 1]}" for k in range(1, len(nll)))]
    rows = []
    for r, label in enumerate(labels):
        row = {"row": label, "eval_tokens": {d: tokens * len(nll[r][j]) for j, d in enumerate(DOMAINS)},
               "block_nll": {d: list(map(float, nll[r][j])) for j, d in enumerate(DOMAINS)}}
        if per_item is not None:
            row["harness"] = {"boolq": {"acc": float(np.mean(per_item[r])), "per_item": list(map(float, per_item[r]))}}
        rows.append(row)
    return rows


def test_bootstrap_interval_of_a_mean_matches_the_known_standard_error():
    # 50 zeros and 50 ones: mean 0.5, standard error sqrt(0.25 / 100) = 0.05 → 95 % interval 0.5 ± 0.098
    iv = bootstrap_mean([0.0, 1.0] * 50, replicates=4000, seed=1)
    assert iv.value == 0.5
    assert iv.lo == pytest.approx(0.5 - 1.96 * 0.05, abs=0.012)
    assert iv.hi == pytest.approx(0.5 + 1.96 * 0.05, abs=0.012)


def test_percentile_interval_of_known_replicates():
    lo, hi = percentile_interval(np.arange(1001, dtype=float))  # 0..1000: 2.5th and 97.5th percentiles
    assert lo == pytest.approx(25.0, abs=1e-9) and hi == pytest.approx(975.0, abs=1e-9)
    with pytest.raises(GainError, match="no finite"):
        percentile_interval([math.nan, math.inf])


def test_interval_covers_the_true_mean_about_95_percent_of_the_time():
    def estimator(x, t):
        return bootstrap_mean(x, replicates=400, seed=t)

    cov = coverage(estimator, lambda rng: rng.normal(3.0, 2.0, size=40), truth=3.0, trials=300, seed=7)
    # the percentile bootstrap at n = 40 covers ~93-95 %; 300 trials give ±1.3 % of binomial noise
    assert 0.89 <= cov <= 0.985
    narrow = coverage(lambda x, t: Interval(x.mean(), x.mean() - 0.01, x.mean() + 0.01),
                      lambda rng: rng.normal(3.0, 2.0, size=40), truth=3.0, trials=100)
    assert narrow < 0.2  # an interval that is too narrow is caught


def test_run_samples_reproduce_the_run_perplexities():
    rng = np.random.default_rng(0)
    nll = 127 * (2.0 + 0.2 * rng.random((4, 3, 8)))
    s = run_samples(_rows(nll), DOMAINS)
    expect = np.exp(nll.sum(axis=2) / (8 * 127))
    np.testing.assert_allclose(s.ppl(), expect, rtol=1e-12)
    # a drawn block set: block 0 twice and block 5 once
    draw = [np.array([0, 0, 5])] * 3
    np.testing.assert_allclose(s.ppl(draw)[2, 1], math.exp((2 * nll[2, 1, 0] + nll[2, 1, 5]) / (3 * 127)))


def test_intervals_collapse_when_blocks_agree_and_seeds_are_equal():
    # every block of a cell has the same NLL: resampling blocks changes nothing, so lo == value == hi
    per_cell = np.array([[3.0, 3.0, 3.0], [2.5, 3.2, 3.1], [2.7, 2.6, 3.3], [2.9, 2.8, 2.4]])
    nll = np.repeat(per_cell[:, :, None], 6, axis=2) * 127
    s = run_samples(_rows(nll), DOMAINS)
    g = group_intervals([s, s], replicates=200)
    m = compute_metrics(np.exp(per_cell), DOMAINS)
    iv = g.get("earlier_change_vs_own_mean")
    assert iv.value == pytest.approx(m.earlier_change_vs_own_mean, rel=1e-12)
    assert iv.lo == pytest.approx(iv.value, rel=1e-12) and iv.hi == pytest.approx(iv.value, rel=1e-12)
    assert g.ppl[1][0].lo == pytest.approx(math.exp(2.5))


def test_two_seeds_interval_spans_their_values():
    # blocks identical within a cell, the two seeds differ: the interval is [seed A's value, seed B's value]
    a = np.array([[3.0, 3.0, 3.0], [2.5, 3.2, 3.1], [2.7, 2.6, 3.3], [2.9, 2.8, 2.4]])
    b = a.copy()
    b[3, 0] += 0.3
    runs = [run_samples(_rows(np.repeat(x[:, :, None], 4, axis=2) * 127), DOMAINS) for x in (a, b)]
    g = group_intervals(runs, replicates=400, seed=3)
    va = compute_metrics(np.exp(a), DOMAINS).earlier_change_vs_base_mean
    vb = compute_metrics(np.exp(b), DOMAINS).earlier_change_vs_base_mean
    iv = g.get("earlier_change_vs_base_mean")
    assert iv.value == pytest.approx((va + vb) / 2)
    assert iv.lo == pytest.approx(min(va, vb)) and iv.hi == pytest.approx(max(va, vb))


def test_downstream_drop_interval_over_items():
    rng = np.random.default_rng(2)
    nll = 127 * (2.0 + 0.1 * rng.random((4, 3, 5)))
    items = np.ones((4, 50))
    items[3, :10] = 0.0  # 100 % → 80 % at the last row: a 20-point drop
    g = group_intervals([run_samples(_rows(nll, per_item=items), DOMAINS)], replicates=500, seed=0)
    drop = g.get("drop:boolq")
    assert drop.value == pytest.approx(-20.0)
    assert drop.lo < -20.0 < drop.hi < -9.0  # binomial se of 20 % at n = 50 is 5.7 points
    assert g.accuracy["boolq"][0].lo == 100.0


def test_missing_block_nlls_are_named():
    rows = _rows(127 * np.ones((2, 3, 4)))
    del rows[1]["block_nll"]["b"]
    with pytest.raises(GainError, match="no per-block NLLs for b"):
        run_samples(rows, DOMAINS)


def test_interval_comparisons_and_format():
    a, b, c = Interval(-12.4, -14.0, -10.9), Interval(5.0, 2.0, 8.0), Interval(-11.0, -13.0, 1.0)
    assert a.format(1, " %") == "-12.4 % [-14.0, -10.9]"
    assert a.below(b) and not b.below(a) and not a.overlaps(b) and a.overlaps(c)
    assert (a.sign(), b.sign(), c.sign()) == (-1, 1, 0)
    assert Interval(None, None, None).format() == "–"

    class G:
        def __init__(self, iv):
            self.iv = iv

        def get(self, name):
            return self.iv

    marks = mark_differences({"gain": G(a), "lora": G(b), "other": G(c)}, "x")
    assert marks == {"gain": "lora", "lora": "", "other": "lora"}
