"""The criteria stage on small known problems (no planning engine needed)."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.sparse as sp

from vmatdose.evaluation.constraints import parse_constraints
from vmatdose.planning.refinement import (
    PlanObjective,
    Term,
    neighbour_pairs,
    optimise_bixels,
    optimise_segments,
    plan_terms,
)

from conftest import make_box_case

WEIGHTS = {"target": 100.0, "oar": 10.0, "body": 1.0}
CONSTRAINTS = parse_constraints([
    {"structure": "PTV70", "metric": "V95%", "op": ">=", "limit": 95.0},
    {"structure": "Rectum", "metric": "Dmax", "op": "<", "limit": 50.0},
    {"structure": "Rectum", "metric": "Dmean", "op": "<", "limit": 40.0}])


def test_gradient_matches_finite_differences():
    rng = np.random.default_rng(0)
    matrix = sp.random(30, 12, density=0.5, random_state=1, format="csc")
    interp = sp.random(20, 30, density=0.2, random_state=2, format="csr")
    idx = np.arange(20)
    terms = [Term("mimic", idx[:8], 3.0, rng.uniform(0, 2, 8), "m"),
             Term("under", idx[5:15], 7.0, 1.5, "u"),
             Term("over", idx[10:], 5.0, 0.2, "o"),
             Term("mean_over", idx[:12], 4.0, 0.1, "mo")]
    pairs = neighbour_pairs([np.array([[0, 0], [0, 1], [1, 0], [1, 1]]),
                             np.array([[r, c] for r in range(2) for c in range(4)])])
    objective = PlanObjective(matrix, interp, terms, pairs, smoothing_weight=2.0,
                              weight_scale=0.7)
    w = rng.uniform(0.5, 2.0, 12)
    _, grad = objective.value_and_grad(w)
    eps = 1e-6
    numeric = [(objective.value_and_grad(w + eps * e)[0]
                - objective.value_and_grad(w - eps * e)[0]) / (2 * eps) for e in np.eye(12)]
    np.testing.assert_allclose(grad, numeric, rtol=1e-5, atol=1e-7)


def test_neighbour_pairs_share_an_edge_within_a_beam():
    pairs = neighbour_pairs([np.array([[0, 0], [0, 1], [1, 1]]), np.array([[0, 0], [0, 1]])])
    assert sorted(map(tuple, pairs.tolist())) == [(0, 1), (1, 2), (3, 4)]


def _voxel_problem(pred):
    """One bixel per selected voxel (the dose is the weights): each voxel is free."""
    case = make_box_case()
    selection = case.body > 0
    terms = plan_terms(case, pred, selection, CONSTRAINTS, WEIGHTS, 1000.0, 0.02)
    n = int(selection.sum())
    identity = sp.identity(n, format="csc")
    return case, selection, terms, PlanObjective(identity, sp.identity(n, format="csr"), terms)


def test_criteria_stage_meets_what_mimicking_an_underdosed_prediction_misses():
    case = make_box_case()
    pred = case.dose.copy()
    pred[case.mask("PTV70") > 0] = 60.0  # V95 of PTV70 (66.5 Gy) fails
    pred[case.mask("Rectum") > 0] = 60.0  # Dmax < 50 and Dmean < 40 fail
    case, selection, terms, objective = _voxel_problem(pred)
    labels = [t.label for t in terms]
    assert "mimic PTV70" in labels and "mimic body" in labels
    assert {c.label for c in CONSTRAINTS} <= set(labels)
    start = pred[selection].astype(float)
    result = optimise_bixels(objective, start, max_iter=200)
    dose = np.zeros(case.shape)
    dose[selection] = result.x
    ptv = dose[case.mask("PTV70") > 0]
    rectum = dose[case.mask("Rectum") > 0]
    assert np.mean(ptv >= 0.95 * 70.0) >= 0.95
    assert rectum.max() < 50.0 and rectum.mean() < 40.0
    assert not result.hit_cap and result.iterations > 0
    # where no criterion binds the mimicking keeps the prediction
    rest = (case.body > 0) & (case.mask("PTV70") == 0) & (case.mask("Rectum") == 0) \
        & (case.mask("PTV56") == 0)
    np.testing.assert_allclose(dose[rest], pred[rest], atol=0.05)
    # converged: one objective value per iteration, flat at the end
    assert len(result.values) == result.iterations
    assert result.values[-1] == pytest.approx(result.value)
    assert 0.0 <= result.late_decrease(last=2) < 1e-4 < result.late_decrease(last=7)
    capped = optimise_bixels(objective, start, max_iter=3)
    assert capped.hit_cap and capped.late_decrease() > 0.1


def test_smoothing_removes_speckle_that_the_dose_does_not_see():
    """Each voxel gets the mean of two neighbouring bixels, so [0, 2, 0, 2, ...] and
    [1, 1, 1, ...] give the same dose: only the smoothness term tells them apart."""
    n = 10
    matrix = sp.diags([0.5, 0.5], [0, 1], shape=(n - 1, n), format="csc")
    terms = [Term("mimic", np.arange(n - 1), 1.0, np.ones(n - 1), "m")]
    speckled = np.tile([0.0, 2.0], n // 2)
    pairs = neighbour_pairs([np.stack([np.zeros(n, int), np.arange(n)], 1)])
    rough = optimise_bixels(PlanObjective(matrix, sp.identity(n - 1, format="csr"), terms,
                                          pairs, 0.0, 1.0), speckled, 100)
    smooth = optimise_bixels(PlanObjective(matrix, sp.identity(n - 1, format="csr"), terms,
                                           pairs, 1.0, 1.0), speckled, 100)
    assert np.abs(np.diff(rough.x)).max() > 1.5
    assert np.abs(np.diff(smooth.x)).max() < 0.1
    np.testing.assert_allclose(matrix @ smooth.x, 1.0, atol=0.05)


def test_segment_stage_reweights_apertures_with_a_floor():
    n = 6
    terms = [Term("mimic", np.arange(n), 1.0, np.array([1, 1, 3, 3, 1, 1.0]), "m")]
    objective = PlanObjective(sp.identity(n, format="csc"), sp.identity(n, format="csr"),
                              terms)
    apertures = sp.csc_matrix(np.array([[1, 0, 0], [1, 0, 0], [1, 1, 0], [1, 1, 0],
                                        [1, 0, 0], [1, 0, 1.0]]))
    result = optimise_segments(objective, apertures, np.array([0.5, 0.5, 0.5]), 0.25, 100)
    # the third segment is held at its floor; the open field then settles between the
    # three bixels that want 1 and the one that gets 0.25 on top: (3 x 1 + 0.75) / 4
    np.testing.assert_allclose(result.x, [0.9375, 2.0625, 0.25], atol=1e-3)
    assert result.value == pytest.approx((3 * 0.0625 ** 2 + 0.1875 ** 2) / n, abs=1e-6)


def test_float32_matrix_gives_the_float64_dose_and_gradient_within_1e_4():
    rng = np.random.default_rng(3)
    matrix = sp.random(400, 60, density=0.3, random_state=4, format="csr") * 0.02
    interp = sp.random(300, 400, density=0.02, random_state=5, format="csr")
    idx = np.arange(300)
    terms = [Term("mimic", idx, 100.0, rng.uniform(0, 70, 300), "m"),
             Term("under", idx[:100], 1000.0, 66.5, "u"),
             Term("mean_over", idx[100:], 1000.0, 10.0, "mo")]
    exact = PlanObjective(matrix.astype(np.float64), interp, terms)
    single = PlanObjective(matrix.astype(np.float32), interp, terms)
    w = rng.uniform(0.0, 200.0, 60)
    dose64, dose32 = exact.dose(w), single.dose(w)
    assert dose32.dtype == np.float64 and dose64.max() > 10.0
    np.testing.assert_allclose(dose32, dose64, rtol=1e-4, atol=1e-4 * dose64.max())
    (v64, g64), (v32, g32) = exact.value_and_grad(w), single.value_and_grad(w)
    assert g32.dtype == np.float64
    assert abs(v32 - v64) <= 1e-4 * abs(v64)
    np.testing.assert_allclose(g32, g64, rtol=1e-4, atol=1e-4 * np.abs(g64).max())
