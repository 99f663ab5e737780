import numpy as np
import pytest

from vmatdose.evaluation.baseline import StructureMeanBaseline, structure_classes
from vmatdose.evaluation.case_metrics import basic_case_metrics, d95_gy


def test_structure_classes_follow_config_priority(box_case):
    classes = structure_classes(box_case, ["PTV70", "PTV56", "Rectum", "Bladder"])
    assert (classes[box_case.mask("PTV70") > 0] == 0).all()
    assert (classes[box_case.body == 0] == 5).all()  # outside = len + 1
    in_body_only = (box_case.body > 0) & (box_case.masks.sum(0) == 0)
    assert (classes[in_body_only] == 4).all()


def test_baseline_reproduces_per_class_means_exactly(box_case):
    structures = ["PTV70", "PTV56", "Rectum"]
    baseline = StructureMeanBaseline(structures).fit([box_case])
    pred = baseline.predict(box_case)
    # The box case is piecewise constant per class except where the rectum overlaps.
    assert pred[box_case.mask("PTV70") > 0] == pytest.approx(70.0)
    assert pred[box_case.mask("PTV56") > 0] == pytest.approx(56.0)
    assert pred[box_case.body == 0] == pytest.approx(0.0)
    rectum = box_case.mask("Rectum") > 0
    assert pred[rectum].mean() == pytest.approx(box_case.dose[rectum].mean(), rel=1e-6)


def test_basic_metrics_of_a_known_error(box_case):
    pred = box_case.dose.copy()
    pred[box_case.mask("PTV70") > 0] -= 2.0  # PTV70 under-dosed by 2 Gy
    row = basic_case_metrics(box_case, pred, ["PTV70", "PTV56"])
    n_ptv, n_body = box_case.mask("PTV70").sum(), box_case.body.sum()
    assert row["mae_body_gy"] == pytest.approx(2.0 * n_ptv / n_body)
    assert row["mae_PTV70_gy"] == pytest.approx(2.0)
    assert row["d95_PTV70_error_gy"] == pytest.approx(-2.0)
    assert row["d95_PTV56_abs_error_gy"] == pytest.approx(0.0)


def test_d95_is_the_dose_the_hottest_95_percent_receive():
    dose = np.arange(1, 101, dtype=float).reshape(1, 10, 10)
    assert d95_gy(dose, np.ones_like(dose)) == 6.0  # voxels 6..100 Gy are 95 % of 100


def test_shape_mismatch_is_a_clear_error(box_case):
    with pytest.raises(ValueError, match="prediction shape"):
        basic_case_metrics(box_case, box_case.dose[:-1], ["PTV70"])
