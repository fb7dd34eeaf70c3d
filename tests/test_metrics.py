"""Forgetting metrics against values computed by hand (rows = base + stages, columns = domains in training order)."""

import json
import math
from math import log

import numpy as np
import pytest

from gain_cli.errors import GainError
from gain_cli.reporting.matrices import load_run, read_matrix, write_matrix
from gain_cli.reporting.metrics import compute_metrics, relative_change_matrix

approx = lambda x: pytest.approx(x, rel=1e-12, abs=1e-12)  # noqa: E731

# T = 2, full run (3 rows × 2 domains)
P2 = [[10.0, 20.0],
      [8.0, 22.0],
      [9.0, 16.0]]

# T = 3, full run (4 rows × 3 domains)
P3 = [[10.0, 20.0, 40.0],
      [5.0, 25.0, 50.0],
      [8.0, 15.0, 25.0],
      [4.0, 21.0, 36.0]]


def test_two_domains_full_run():
    m = compute_metrics(P2, ["a", "b"], {"boolq": [0.70, 0.65, 0.62]})
    assert (m.num_domains, m.stages_done, m.complete) == (2, 2, True)
    # in-domain: a (8-10)/10 = -0.2; b (16-20)/20 = -0.2; mean -0.2
    assert m.in_domain_change == {"a": approx(-0.2), "b": approx(-0.2)}
    assert m.in_domain_change_mean == approx(-0.2)
    # earlier (j=1 only): vs own (9-8)/8 = +0.125; vs base (9-10)/10 = -0.1
    assert m.earlier_change_vs_own == {"a": approx(0.125)}
    assert m.earlier_change_vs_own_mean == approx(0.125)
    assert m.earlier_change_vs_base == {"a": approx(-0.1)}
    assert m.earlier_change_vs_base_mean == approx(-0.1)
    # BWT = ln 8 - ln 9 = ln(8/9) = -0.117783...
    assert m.bwt == approx(log(8 / 9)) and m.bwt == pytest.approx(-0.1177830357, abs=1e-9)
    assert m.bwt_per_domain == {"a": approx(log(8 / 9))}
    # FWT (j=2) = ln 20 - ln 22 = ln(10/11) = -0.0953101798
    assert m.fwt == approx(log(20 / 22)) and m.fwt == pytest.approx(-0.0953101798, abs=1e-9)
    assert m.fwt_per_domain == {"b": approx(log(20 / 22))}
    # max forgetting a: max(ln8-ln8, ln9-ln8) = ln(9/8) = 0.117783...
    assert m.max_forgetting == {"a": approx(log(9 / 8))}
    assert m.max_forgetting_mean == approx(log(9 / 8))
    # avg final log-PPL = (ln 9 + ln 16)/2 = ln(144)/2 = ln 12 = 2.4849066; avg final PPL = 25/2
    assert m.avg_final_log_ppl == approx(log(12)) and m.avg_final_log_ppl == pytest.approx(2.4849066498, abs=1e-9)
    assert m.avg_final_ppl == approx(12.5)
    # BoolQ: 100 × (0.62 − 0.70) = −8 points; per stage 0, −5, −8
    h = m.harness["boolq"]
    assert h.drop_points == pytest.approx(-8.0, abs=1e-9)
    assert h.delta_points == pytest.approx([0.0, -5.0, -8.0], abs=1e-9)
    assert h.curve == [0.70, 0.65, 0.62]


def test_three_domains_full_run():
    m = compute_metrics(P3, ["a", "b", "c"])
    assert (m.num_domains, m.stages_done, m.complete) == (3, 3, True)
    # in-domain: a (5-10)/10 = -0.5; b (15-20)/20 = -0.25; c (36-40)/40 = -0.1; mean -0.85/3 = -0.28333
    assert m.in_domain_change == {"a": approx(-0.5), "b": approx(-0.25), "c": approx(-0.1)}
    assert m.in_domain_change_mean == approx(-0.85 / 3)
    # vs own: a (4-5)/5 = -0.2; b (21-15)/15 = +0.4; mean 0.1
    assert m.earlier_change_vs_own == {"a": approx(-0.2), "b": approx(0.4)}
    assert m.earlier_change_vs_own_mean == approx(0.1)
    # vs base: a (4-10)/10 = -0.6; b (21-20)/20 = +0.05; mean -0.275
    assert m.earlier_change_vs_base == {"a": approx(-0.6), "b": approx(0.05)}
    assert m.earlier_change_vs_base_mean == approx(-0.275)
    # BWT = mean(ln5 - ln4, ln15 - ln21) = mean(0.2231436, -0.3364722) = -0.0566643
    assert m.bwt_per_domain == {"a": approx(log(5 / 4)), "b": approx(log(15 / 21))}
    assert m.bwt == approx((log(5 / 4) + log(15 / 21)) / 2) and m.bwt == pytest.approx(-0.0566643, abs=1e-6)
    # FWT = mean(ln20 - ln25, ln40 - ln25) = mean(-0.2231436, 0.4700036) = 0.1234300
    assert m.fwt_per_domain == {"b": approx(log(20 / 25)), "c": approx(log(40 / 25))}
    assert m.fwt == approx((log(20 / 25) + log(40 / 25)) / 2) and m.fwt == pytest.approx(0.1234300, abs=1e-6)
    # max forgetting a: max over stages 1..3 of ln P[k,a] - ln 5 = max(0, ln 8/5, ln 4/5) = ln 1.6 = 0.4700036
    #   (the peak at stage 2, not the final value); b: max(0, ln 21/15) = 0.3364722
    assert m.max_forgetting == {"a": approx(log(8 / 5)), "b": approx(log(21 / 15))}
    assert m.max_forgetting_mean == approx((log(8 / 5) + log(21 / 15)) / 2)
    # avg final log-PPL = (ln4 + ln21 + ln36)/3 = ln(3024)/3 = 2.6714453; avg final PPL = 61/3
    assert m.avg_final_log_ppl == approx(log(3024) / 3)
    assert m.avg_final_ppl == approx(61 / 3)
    assert m.harness == {}


def test_partial_run_uses_last_finished_stage():
    # 3 domains, stages 1 and 2 done (rows 0..2 of P3): T' = 2
    m = compute_metrics(P3[:3], ["a", "b", "c"], {"boolq": [0.5, 0.6, 0.55, 0.4]})
    assert (m.num_domains, m.stages_done, m.complete) == (3, 2, False)
    # in-domain a -0.5, b -0.25 (c not trained yet); mean -0.375
    assert m.in_domain_change == {"a": approx(-0.5), "b": approx(-0.25)}
    assert m.in_domain_change_mean == approx(-0.375)
    # earlier = a only, final = row 2: vs own (8-5)/5 = 0.6; vs base (8-10)/10 = -0.2
    assert m.earlier_change_vs_own == {"a": approx(0.6)}
    assert m.earlier_change_vs_base == {"a": approx(-0.2)}
    # BWT = ln5 - ln8 = -0.4700036; FWT (j=2) = ln20 - ln25 = -0.2231436
    assert m.bwt == approx(log(5 / 8))
    assert m.fwt == approx(log(20 / 25))
    assert m.max_forgetting == {"a": approx(log(8 / 5))}
    # avg over row 2, all 3 columns: (ln8 + ln15 + ln25)/3 = ln(3000)/3; PPL (8+15+25)/3 = 16
    assert m.avg_final_log_ppl == approx(log(3000) / 3)
    assert m.avg_final_ppl == approx(16.0)
    # harness curve cut to the PPL rows: drop at row 2 = 100 × (0.55 − 0.5) = +5 points
    assert m.harness["boolq"].curve == [0.5, 0.6, 0.55]
    assert m.harness["boolq"].drop_points == pytest.approx(5.0, abs=1e-9)


def test_one_domain_edge_case():
    m = compute_metrics([[10.0], [7.0]], ["only"])
    assert (m.num_domains, m.stages_done, m.complete) == (1, 1, True)
    assert m.in_domain_change == {"only": approx(-0.3)}
    assert m.in_domain_change_mean == approx(-0.3)
    # no earlier domain, no domain with an earlier stage: everything about them undefined, never 0
    assert m.earlier_change_vs_own == {} and m.earlier_change_vs_own_mean is None
    assert m.earlier_change_vs_base == {} and m.earlier_change_vs_base_mean is None
    assert m.bwt_per_domain == {} and m.bwt is None
    assert m.fwt_per_domain == {} and m.fwt is None
    assert m.max_forgetting == {} and m.max_forgetting_mean is None
    assert m.avg_final_log_ppl == approx(log(7)) and m.avg_final_ppl == approx(7.0)
    d = m.to_dict()
    assert d["bwt"] is None and d["fwt"] is None and json.loads(json.dumps(d)) == d


def test_base_row_only():
    m = compute_metrics([[10.0, 20.0]], ["a", "b"])
    assert (m.stages_done, m.complete) == (0, False)
    assert m.in_domain_change == {} and m.in_domain_change_mean is None
    assert m.bwt is None and m.fwt is None and m.max_forgetting_mean is None
    # average of the base row: (ln10 + ln20)/2 = ln(200)/2; (10+20)/2 = 15
    assert m.avg_final_log_ppl == approx(log(200) / 2) and m.avg_final_ppl == approx(15.0)


def test_sign_convention_forgetting_vs_improvement():
    # earlier domain a gets worse after stage 2: 5 → 20
    forgot = compute_metrics([[10.0, 10.0], [5.0, 10.0], [20.0, 5.0]], ["a", "b"])
    assert forgot.bwt < 0 and forgot.bwt == approx(log(5 / 20))           # -ln 4
    assert forgot.earlier_change_vs_own_mean > 0 and forgot.earlier_change_vs_own_mean == approx(3.0)
    assert forgot.earlier_change_vs_base_mean > 0 and forgot.earlier_change_vs_base_mean == approx(1.0)
    assert forgot.max_forgetting_mean > 0 and forgot.max_forgetting_mean == approx(log(4))
    assert forgot.in_domain_change_mean < 0                                # own stages still improved
    # earlier domain a keeps improving: 5 → 4
    improved = compute_metrics([[10.0, 10.0], [5.0, 10.0], [4.0, 5.0]], ["a", "b"])
    assert improved.bwt > 0 and improved.earlier_change_vs_own_mean < 0
    assert improved.max_forgetting_mean == 0.0
    # FWT: stage 1 lowered b's PPL before its own stage (10 → 8) = positive transfer
    helped = compute_metrics([[10.0, 10.0], [5.0, 8.0], [5.0, 4.0]], ["a", "b"])
    assert helped.fwt > 0 and helped.fwt == approx(log(10 / 8))


def test_relative_change_matrix():
    rel = relative_change_matrix(P2)
    # row 0 zeros; (8-10)/10, (22-20)/20; (9-10)/10, (16-20)/20
    np.testing.assert_allclose(rel, [[0, 0], [-0.2, 0.1], [-0.1, -0.2]], atol=1e-12)


def test_non_finite_values_propagate_not_crash():
    m = compute_metrics([[10.0, 20.0], [float("inf"), 10.0], [float("nan"), 12.0]], ["a", "b"])
    assert math.isinf(m.in_domain_change["a"]) and math.isnan(m.bwt)
    d = json.loads(json.dumps(m.to_dict()))
    assert d["in_domain_change"]["a"] == "inf" and d["bwt"] == "nan"


@pytest.mark.parametrize("bad", [[[10.0, 20.0], [8.0, 0.0]], [[1.0], [1.0], [1.0]], [1.0, 2.0], [[]]])
def test_invalid_matrices(bad):
    with pytest.raises(GainError):
        compute_metrics(bad)


def test_write_and_load_roundtrip(tmp_path):
    j, c = write_matrix(tmp_path, "ppl_matrix", "ppl", ["a", "b"], ["base", "stage_1:a", "stage_2:b"], P2)
    obj = json.loads(j.read_text())
    assert obj == {"metric": "ppl", "domains": ["a", "b"], "rows": ["base", "stage_1:a", "stage_2:b"], "values": P2}
    assert c.read_text().splitlines() == ["row,a,b", "base,10.0,20.0", "stage_1:a,8.0,22.0", "stage_2:b,9.0,16.0"]
    write_matrix(tmp_path, "harness_matrix", "acc", ["boolq"], ["base", "stage_1:a"], [[0.5], [float("nan")]])
    h = json.loads((tmp_path / "harness_matrix.json").read_text())
    assert h["tasks"] == ["boolq"] and h["values"] == [[0.5], ["nan"]]
    run = load_run(tmp_path)
    assert run.domains == ["a", "b"] and run.stages_done == 2 and run.complete and run.method == tmp_path.name
    np.testing.assert_array_equal(run.ppl, np.array(P2))
    # harness written for fewer rows (crash between the two writes): padded with NaN
    assert run.harness["boolq"][0] == 0.5 and all(math.isnan(x) for x in run.harness["boolq"][1:])
    assert run.metrics.bwt == approx(log(8 / 9))
    assert not list(tmp_path.glob("*.tmp"))


def test_load_run_errors(tmp_path):
    with pytest.raises(GainError, match="does not exist"):
        load_run(tmp_path / "nope")
    with pytest.raises(GainError, match=str(tmp_path / "ppl_matrix.json")):
        load_run(tmp_path)
    (tmp_path / "ppl_matrix.json").write_text("{not json")
    with pytest.raises(GainError, match="ppl_matrix.json"):
        load_run(tmp_path)
    (tmp_path / "ppl_matrix.json").write_text(json.dumps({"metric": "ppl", "domains": ["a"], "rows": ["base"],
                                                          "values": [[1.0, 2.0]]}))
    with pytest.raises(GainError, match="malformed"):
        load_run(tmp_path)
    # columns out of training order
    write_matrix(tmp_path, "ppl_matrix", "ppl", ["a", "b"], ["base", "stage_1:b"], P2[:2])
    with pytest.raises(GainError, match="training order"):
        load_run(tmp_path)
    with pytest.raises(GainError, match="not found"):
        read_matrix(tmp_path / "missing.json")
