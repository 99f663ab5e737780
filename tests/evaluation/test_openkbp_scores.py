"""The official OpenKBP scores: the dose score counts dose outside the possible-dose mask,
the in-mask MAE does not; the DVH score follows the challenge's percentile definitions."""

from __future__ import annotations

import numpy as np
import pytest

from vmatdose.data.case import Case
from vmatdose.evaluation.openkbp_scores import (
    dose_score,
    dvh_entries,
    dvh_errors,
    mae_in_mask,
    openkbp_scores,
    score_patients,
)


def small_case(dose: np.ndarray, mask: np.ndarray) -> Case:
    shape = dose.shape
    ptv = np.zeros(shape, np.uint8)
    ptv[2:4, 2:4, 2:4] = 1
    oar = np.zeros(shape, np.uint8)
    oar[0:2, 0:3, 0:3] = 1
    return Case(case_id="k", ct=np.zeros(shape, np.int16), masks=np.stack([ptv, oar]),
                structures=["PTV70", "Brainstem"], body=mask.astype(np.uint8),
                spacing_mm=np.array([2.5, 3.906, 3.906]), origin_mm=np.zeros(3),
                prescriptions_gy={"PTV70": 70.0}, dose=dose.astype(np.float32))


def test_dose_score_counts_dose_outside_the_mask_and_masked_mae_does_not():
    shape = (6, 6, 6)
    mask = np.zeros(shape, bool)
    mask[1:5, 1:5, 1:5] = True  # 64 voxels
    ref = np.where(mask, 50.0, 0.0)
    pred = ref + np.where(mask, 1.0, 0.0)  # 1 Gy too high inside
    pred[0, 0, 0] = 32.0  # dose outside the mask
    case = small_case(ref, mask)
    # official: (64 * 1 + 32) / 64 voxels of the mask
    assert dose_score(case, pred) == pytest.approx(96.0 / 64.0)
    assert mae_in_mask(case, pred) == pytest.approx(1.0)
    pred_masked = pred * mask
    assert dose_score(case, pred_masked) == pytest.approx(1.0)


def test_dvh_entries_follow_the_challenge_definitions():
    shape = (6, 6, 6)
    mask = np.ones(shape, bool)
    rng = np.random.default_rng(0)
    dose = rng.uniform(0, 70, shape)
    case = small_case(dose, mask)
    entries = dvh_entries(case, dose, ["PTV70"])
    ptv_dose = dose[case.mask("PTV70") > 0]
    assert entries["PTV70/D99"] == pytest.approx(np.percentile(ptv_dose, 1))
    assert entries["PTV70/D95"] == pytest.approx(np.percentile(ptv_dose, 5))
    assert entries["PTV70/D1"] == pytest.approx(np.percentile(ptv_dose, 99))
    oar_dose = dose[case.mask("Brainstem") > 0]  # 18 voxels of 38.1 mm^3
    n_tenth_cc = max(1, round(100 / np.prod(case.spacing_mm)))
    assert n_tenth_cc == 3
    expected = np.percentile(oar_dose, 100 - n_tenth_cc / oar_dose.size * 100)
    assert entries["Brainstem/D0.1cc"] == pytest.approx(expected)
    assert entries["Brainstem/Dmean"] == pytest.approx(oar_dose.mean())


def test_dvh_score_pools_every_entry_of_every_patient():
    assert openkbp_scores([1.0, 3.0], [[1.0, 2.0, 3.0], [7.0]]) == {
        "dose_score_gy": 2.0, "dvh_score_gy": pytest.approx(13.0 / 4)}
    shape = (6, 6, 6)
    mask = np.ones(shape, bool)
    dose = np.full(shape, 60.0)
    case = small_case(dose, mask)
    errors = dvh_errors(case, dose + 2.0, ["PTV70"])
    assert errors == pytest.approx([2.0] * 5)  # D99, D95, D1, D0.1cc, Dmean
    scores = score_patients([(case, dose + 2.0)], ["PTV70"])
    assert scores["dose_score_gy"] == pytest.approx(2.0)
    assert scores["dvh_score_gy"] == pytest.approx(2.0)
    assert scores["per_patient"]["k"]["mae_in_mask_gy"] == pytest.approx(2.0)


def test_score_patients_reports_each_targets_mean_signed_d95_error():
    shape = (6, 6, 6)
    mask = np.ones(shape, bool)
    dose = np.full(shape, 60.0)
    low, high = small_case(dose, mask), small_case(dose, mask)
    # one patient 3 Gy cold in the target, the other 1 Gy hot: mean -1 Gy (signed)
    scores = score_patients([(low, dose - 3.0), (high, dose + 1.0)], ["PTV70"])
    assert scores["d95_error_gy"] == {"PTV70": pytest.approx(-1.0)}
    assert scores["dvh_score_gy"] == pytest.approx(2.0)  # |errors| pooled: 3 x 5, 1 x 5
