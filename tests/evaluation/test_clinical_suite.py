"""Constraints, OpenKBP scores, region gamma and the evaluation suite's outputs."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest

from vmatdose.evaluation.constraints import (
    Constraint,
    constraint_rows,
    constraint_summary,
    parse_constraints,
)
from vmatdose.evaluation.openkbp_scores import dose_score, dvh_errors, openkbp_scores
from vmatdose.evaluation.regions import gamma_regions, region_pass_rates
from vmatdose.evaluation.suite import (
    EvaluationSettings,
    evaluate_case,
    run_suite,
    uncertainty_metrics,
)
from vmatdose.metrics.gamma import gamma_index

from conftest import make_box_case

CONSTRAINTS = [
    {"structure": "PTV70", "metric": "V95%", "op": ">=", "limit": 95.0},
    {"structure": "Rectum", "metric": "V50Gy", "op": "<", "limit": 50.0},
    {"structure": "Rectum", "metric": "Dmax", "op": "<", "limit": 20.0},
    {"structure": "Bladder", "metric": "V65Gy", "op": "<", "limit": 35.0},
]


def test_constraints_on_a_known_dose():
    case = make_box_case()  # 70 Gy PTV70, 56 Gy PTV56, 10 Gy elsewhere in the body
    pred = case.dose.copy()
    pred[case.mask("PTV70") > 0] = 60.0  # under-dosed target: V95% drops to 0
    rows = constraint_rows(case, pred, parse_constraints(CONSTRAINTS))
    by_label = {r["constraint"]: r for r in rows}
    target = by_label["PTV70 V95% >= 95%"]
    assert target["ref_value"] == 100.0 and target["pred_value"] == 0.0
    assert target["ref_pass"] is True and target["pred_pass"] is False
    assert target["agree"] is False
    rectum = by_label["Rectum V50Gy < 50%"]
    assert rectum["ref_value"] == 0.0 and rectum["ref_pass"] and rectum["agree"]
    assert by_label["Rectum Dmax < 20 Gy"]["ref_value"] == pytest.approx(10.0)
    missing = by_label["Bladder V65Gy < 35%"]
    assert missing["evaluable"] is False and missing["agree"] is None
    summary = constraint_summary(rows)
    assert summary["PTV70 V95% >= 95%"]["agreement_percent"] == 0.0
    assert summary["Bladder V65Gy < 35%"]["n_not_evaluable"] == 1


def test_constraint_config_typos_fail_early():
    with pytest.raises(ValueError, match="op must be"):
        Constraint.from_config({"structure": "Rectum", "metric": "V50Gy", "op": "=<",
                                "limit": 1})
    with pytest.raises(ValueError, match="unsupported DVH metric"):
        Constraint.from_config({"structure": "Rectum", "metric": "V50", "op": "<", "limit": 1})
    with pytest.raises(ValueError, match="lacks"):
        Constraint.from_config({"structure": "Rectum", "metric": "V50Gy"})


def test_openkbp_scores_of_a_uniform_offset():
    case = make_box_case()
    pred = case.dose + 1.0 * (case.body > 0)  # +1 Gy in the body: every score is 1 Gy
    assert dose_score(case, pred) == pytest.approx(1.0)
    # outside the possible-dose mask counts too (the official formula)
    everywhere = case.dose + 1.0
    assert dose_score(case, everywhere) == pytest.approx(case.body.size / case.body.sum())
    errors = dvh_errors(case, pred, ["PTV70", "PTV56"])
    # targets: D99, D95, D1; the OAR: D0.1cc, Dmean
    assert len(errors) == 3 + 3 + 2
    np.testing.assert_allclose(errors, 1.0, atol=1e-9)
    scores = openkbp_scores([1.0, 3.0], [[1.0] * 8, [3.0] * 2])
    assert scores["dose_score_gy"] == 2.0
    assert scores["dvh_score_gy"] == pytest.approx((8 * 1.0 + 2 * 3.0) / 10)  # pooled


def test_region_gamma_localises_a_low_dose_error():
    case = make_box_case(shape=(20, 24, 28))
    pred = case.dose.copy()
    regions = gamma_regions(case, ["PTV70", "PTV56"], margin_mm=4.0)
    union = sum(m.astype(int) for m in regions.values())
    assert np.array_equal(union, case.body.astype(int)), "regions partition the body"
    # 15 instead of 10 Gy (7 % of the max) in the remainder and outside the body (not
    # scored): no evaluated dose within 3 % of 10 Gy is in reach, except by the OAR region
    pred[regions["remainder"] | (case.body == 0)] = 15.0
    gamma = gamma_index(case.dose, pred, case.spacing_mm, mask=case.body > 0)
    rates = region_pass_rates(gamma, regions)
    assert rates["targets"] == 100.0
    assert rates["remainder"] < 25.0
    assert rates["oar_Rectum"] > 50.0


def _settings(**kwargs):
    return EvaluationSettings(targets=["PTV70", "PTV56"],
                              constraints=parse_constraints(CONSTRAINTS), **kwargs)


def test_evaluate_case_row_has_gamma_dvh_and_scores():
    case = make_box_case()
    result = evaluate_case(case, case.dose.copy(), _settings(figures=False))
    row = result.row
    assert row["mae_body_gy"] == 0.0 and row["openkbp_dose_score_gy"] == 0.0
    assert row["gamma_3pct_3mm_pass"] == 100.0 and row["gamma_2pct_2mm_pass"] == 100.0
    assert row["gamma_3pct_3mm_targets_pass"] == 100.0
    assert row["d95_PTV70_ref_gy"] == pytest.approx(70.0)
    assert {r["structure"] for r in result.dvh_rows} == {"PTV70", "PTV56", "Rectum"}
    errors = np.array([r["error_gy"] for r in result.dvh_rows])
    assert np.all(errors[np.isfinite(errors)] == 0.0)
    # D2cc of the 0.5 cc rectum is undefined (NaN), everything else is scored
    assert np.isnan(errors).sum() == 1


@pytest.mark.slow
def test_suite_writes_tables_figures_and_report(tmp_path):
    cases = [make_box_case(case_id=f"box{i}") for i in range(2)]
    pairs = [(c, c.dose * (1.0 + 0.02 * i)) for i, c in enumerate(cases)]
    table, summary = run_suite(pairs, _settings(figure_cases=1, dpi=60), tmp_path)
    assert list(table["case_id"]) == ["box0", "box1"]
    for name in ("per_case.csv", "dvh.csv", "constraints.csv", "summary.json", "report.html"):
        assert (tmp_path / name).is_file(), name
    for stem in ("box0_slices", "box0_dvh", "structure_errors"):
        assert (tmp_path / "figures" / f"{stem}.png").is_file()
        assert (tmp_path / "figures" / f"{stem}.pdf").is_file()
    assert not (tmp_path / "figures" / "box1_slices.png").exists()
    saved = json.loads((tmp_path / "summary.json").read_text())
    assert saved["openkbp"]["dose_score_gy"] == pytest.approx(
        np.mean([0.0, dose_score(cases[1], pairs[1][1])]))
    assert saved["constraints"]["PTV70 V95% >= 95%"]["n_evaluated"] == 2
    html = (tmp_path / "report.html").read_text()
    assert "figures/box0_slices.png" in html and "PTV70 V95% &gt;= 95%" in html
    dvh = pd.read_csv(tmp_path / "dvh.csv")
    scaled = dvh[(dvh.case_id == "box1") & (dvh.structure == "PTV70") & (dvh.metric == "Dmean")]
    assert float(scaled["error_gy"].iloc[0]) == pytest.approx(1.4, abs=1e-4)


def test_unknown_evaluation_key_is_refused():
    with pytest.raises(ValueError, match="unknown keys.*gama"):
        EvaluationSettings.from_config(["PTV70"], [], {"gama": []})


def test_uncertainty_metrics_rank_the_errors():
    case = make_box_case()
    rng = np.random.default_rng(0)
    error = rng.uniform(0.0, 2.0, case.shape)
    pred = case.dose + error
    tracking = uncertainty_metrics(case, pred, 0.5 * error)  # std proportional to |error|
    assert tracking["uncertainty_error_correlation"] == pytest.approx(1.0)
    assert tracking["uncertainty_mean_std_gy"] == pytest.approx(0.5 * error[case.body > 0].mean())
    assert np.isnan(uncertainty_metrics(case, pred, np.ones(case.shape))[
        "uncertainty_error_correlation"])
    row = evaluate_case(case, pred, _settings(figures=False, gamma=[]), std_gy=0.5 * error).row
    assert row["uncertainty_error_correlation"] == pytest.approx(1.0)
    assert "uncertainty_mean_std_gy" not in evaluate_case(case, pred, _settings(gamma=[])).row
