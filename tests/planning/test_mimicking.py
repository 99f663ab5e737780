"""Dose mimicking on a small phantom with the real planning engine (pyRadPlan, the
optional `plan` extra): the deliverable plan reaches the prescription and spares the
organs at risk better than an unmodulated plan; every output file is written."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pydicom
import pytest

pytest.importorskip("pyRadPlan", reason='the planning engine is an optional extra: '
                    'pip install -e ".[plan]"')

from vmatdose.data.beams import default_arrangement, targets_centroid_mm  # noqa: E402
from vmatdose.data.case import load_case, save_case  # noqa: E402
from vmatdose.data.phantom.generation import generate_phantom_case  # noqa: E402
from vmatdose.evaluation.constraints import parse_constraints  # noqa: E402
from vmatdose.inference.predictions import save_prediction  # noqa: E402
from vmatdose.planning.optimise import plan_case  # noqa: E402
from vmatdose.planning.preflight import check_cases  # noqa: E402
from vmatdose.planning.run import write_case_outputs  # noqa: E402
from vmatdose.planning.settings import PlanSettings  # noqa: E402
from vmatdose.protocol import Protocol  # noqa: E402

SETTINGS = PlanSettings(dose_grid_mm=8.0, bixel_width_mm=8.0, leaf_width_mm=4.0, max_iter=150,
                        criteria_max_iter=60, progress=False)
OARS = ("Rectum", "Bladder", "Femur_L", "Femur_R")


@pytest.fixture(scope="module")
def planned(tmp_path_factory):
    """A 24 x 32 x 48 phantom (6 x 8 x 8 mm) with five recorded beams, its reference dose
    standing in for a prediction, planned once."""
    root = tmp_path_factory.mktemp("plan")
    case = generate_phantom_case(3, shape=(24, 32, 48), spacing_mm=(6.0, 8.0, 8.0),
                                 n_beams=12)
    iso = targets_centroid_mm(case.masks[:2], case.spacing_mm, case.origin_mm)
    case.meta["beams"] = default_arrangement({"n_beams": 5}, iso).to_meta()
    save_case(case, root / "cases" / f"{case.case_id}.npz")
    save_prediction(case, case.dose, None, root / "pred" / f"{case.case_id}.npz")
    protocol = Protocol.load("prostate_sib")
    [job] = check_cases([root / "cases" / f"{case.case_id}.npz"], root / "pred", protocol,
                        SETTINGS)
    case = load_case(job.case_path)
    constraints = parse_constraints(protocol.constraints)
    plan = plan_case(case, case.dose, job.arrangement, constraints, SETTINGS)
    return root, case, job, constraints, plan


def test_deliverable_reaches_the_prescription(planned):
    _, case, job, _, plan = planned
    assert job.arrangement.source == "protocol" and len(plan.beams) == 5
    assert plan.dose_gy.shape == case.shape
    median = float(np.median(plan.dose_gy[case.mask("PTV70") > 0]))
    assert abs(median - 70.0) / 70.0 < 0.05, median
    assert plan.n_bixels == sum(b.weights.size for b in plan.beams)
    assert plan.seconds["total"] > 0 and plan.peak_rss_gb > 0.1


def test_sequenced_plan_stays_close_to_the_fluence_plan(planned):
    _, case, _, constraints, plan = planned
    segments = [len(b.segments) for b in plan.sequenced.beams]
    assert all(1 <= n <= SETTINGS.max_segments_per_beam for n in segments)
    # the segments deliver the bixel weights whose dose is the deliverable dose
    np.testing.assert_allclose(plan.dose_for(plan.sequenced.bixel_weights), plan.dose_gy,
                               rtol=1e-4, atol=1e-3)
    ptv = case.mask("PTV70") > 0
    for dose in (plan.fluence_dose_gy, plan.dose_gy):  # both normalised: D95 97 % of 70 Gy
        assert np.percentile(dose[ptv], 5) == pytest.approx(0.97 * 70.0, rel=1e-3)
    body = case.body > 0
    assert np.abs(plan.dose_gy - plan.fluence_dose_gy)[body].mean() < 0.05 * 70.0
    met = {k: sum(c.passes(c.value(case, d)) for c in constraints)
           for k, d in (("fluence", plan.fluence_dose_gy), ("deliverable", plan.dose_gy))}
    assert met["deliverable"] >= met["fluence"] - 1, met


def test_mimicking_beats_an_open_field_plan_on_the_organs(planned):
    _, case, _, _, plan = planned
    open_field = plan.dose_for(np.ones(plan.n_bixels))
    ptv = case.mask("PTV70") > 0
    open_field *= 70.0 / float(np.median(open_field[ptv]))  # same target dose
    for name in OARS:
        mask = case.mask(name) > 0
        assert plan.dose_gy[mask].mean() < open_field[mask].mean(), name


def test_outputs_are_written(planned):
    root, case, job, constraints, plan = planned
    out = root / "out"
    gamma = {"dose_percent": 3.0, "distance_mm": 3.0, "cutoff_percent": 10.0}
    row, criteria, points = write_case_outputs(case, case.dose, plan, job, constraints,
                                               SETTINGS, gamma, out, export_rtdose=True)
    folder = out / case.case_id
    for name in ("fluence.npz", "fluence.png", "dvh.png", "criteria.csv", "dvh_points.csv",
                 "summary.json", "segments.csv", "fluence_dose.npz"):
        assert (folder / name).is_file(), name
    assert (out / f"{case.case_id}.npz").is_file()
    plan_file = pydicom.dcmread(out / f"{case.case_id}_rtplan.dcm")
    assert len(plan_file.BeamSequence) == 5
    meterset = sum(float(b.BeamMeterset)
                   for b in plan_file.FractionGroupSequence[0].ReferencedBeamSequence)
    assert meterset == pytest.approx(row["mu_per_fraction"], abs=0.5)
    assert (out / f"{case.case_id}_rtdose.dcm").is_file()
    assert len(criteria) == len(constraints)
    assert {"reference_gy", "prediction_gy", "fluence_gy", "deliverable_gy"} <= set(points[0])
    assert {"fluence_criteria_met", "deliverable_criteria_met",
            "reference_criteria_evaluable"} <= set(row)
    assert 0.0 <= row["deliverable_vs_prediction_gamma_3pct_3mm_pass"] <= 100.0
    assert json.loads((folder / "summary.json").read_text())["n_bixels"] == plan.n_bixels
    table = pd.read_csv(folder / "criteria.csv")
    assert set(table["deliverable_met"]) <= {True, False}
