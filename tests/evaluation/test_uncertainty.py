"""Uncertainty calibration: coverage and spread-error correlation on spreads and errors
whose answer is known, by region, and in the evaluation's table, figure and report."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from scipy import stats

from vmatdose.evaluation.figures import spread_error_figure
from vmatdose.evaluation.suite import EvaluationSettings, run_suite
from vmatdose.evaluation.uncertainty import (
    interval_coverage,
    outside_interval,
    spread_error_correlation,
    uncertainty_metrics,
    uncertainty_regions,
)
from vmatdose.metrics import registry

from conftest import make_box_case

N = 200_000


def _gaussian(seed: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(reference, mean, std): the reference drawn from N(mean, std) voxel by voxel, with
    a spread that varies over the voxels (0.2 to 3 Gy)."""
    rng = np.random.default_rng(seed)
    mean = rng.uniform(0.0, 70.0, N)
    std = rng.uniform(0.2, 3.0, N)
    return mean + std * rng.standard_normal(N), mean, std


def test_a_calibrated_gaussian_spread_covers_95_percent():
    reference, mean, std = _gaussian()
    assert interval_coverage(reference, mean, std) == pytest.approx(95.0, abs=0.2)


@pytest.mark.parametrize("factor", [0.5, 2.0])
def test_a_miscalibrated_spread_covers_what_the_normal_law_says(factor):
    reference, mean, std = _gaussian(1)
    expected = 100 * (2 * stats.norm.cdf(registry.INTERVAL_Z * factor) - 1)  # 67.3 / 99.99
    assert interval_coverage(reference, mean, factor * std) == pytest.approx(expected,
                                                                             abs=0.3)


def test_coverage_counts_the_interval_edge_as_inside_and_zero_spread_as_exact():
    mean = np.zeros(4)
    reference = np.array([0.0, 1.959964, 1.96, -3.0])
    assert interval_coverage(reference, mean, np.ones(4)) == 50.0  # 0 and the edge
    assert outside_interval(reference, mean, np.ones(4)).tolist() == [False, False, True,
                                                                      True]
    assert interval_coverage(reference, mean, np.zeros(4)) == 25.0  # only the exact voxel
    assert np.isnan(interval_coverage(np.array([]), np.array([]), np.array([])))
    with pytest.raises(ValueError, match="negative"):
        interval_coverage(reference, mean, -np.ones(4))


def test_spread_proportional_to_the_error_correlates_1_and_an_unrelated_one_about_0():
    rng = np.random.default_rng(2)
    error = rng.uniform(0.0, 5.0, N)
    assert spread_error_correlation(0.3 * error, error) == pytest.approx(1.0)
    assert spread_error_correlation(rng.uniform(0.0, 5.0, N), error) == pytest.approx(
        0.0, abs=0.01)
    # |error| of a Gaussian with that std: correlation of std and |e| is known,
    # E|e| = 0.798 std, so the correlation is positive and below 1
    reference, mean, std = _gaussian(3)
    assert 0.3 < spread_error_correlation(std, np.abs(reference - mean)) < 0.7
    assert np.isnan(spread_error_correlation(np.ones(10), error[:10]))  # flat spread
    with pytest.raises(ValueError, match="differ"):
        spread_error_correlation(np.ones(3), np.ones(4))


def test_regions_split_targets_oars_and_low_dose_inside_the_body():
    case = make_box_case()  # 70 Gy PTV70, 56 Gy PTV56 shell, Rectum, 10 Gy elsewhere
    regions = uncertainty_regions(case, ["PTV70", "PTV56"])
    assert list(regions) == ["body", "targets", "oars", "low_dose"]
    body = case.body > 0
    targets = (case.mask("PTV70") | case.mask("PTV56")) > 0
    np.testing.assert_array_equal(regions["targets"], targets & body)
    np.testing.assert_array_equal(regions["oars"], (case.mask("Rectum") > 0) & body)
    np.testing.assert_array_equal(regions["low_dose"], body & ~targets)  # 10 Gy = 14 % Rx


def test_uncertainty_metrics_by_region_on_a_known_error():
    """Error 4 Gy in the targets, 1 Gy elsewhere; spread 1 Gy everywhere: the targets'
    reference lies outside the interval (4 > 1.96), the rest inside."""
    case = make_box_case()
    targets = (case.mask("PTV70") | case.mask("PTV56")) > 0
    pred = case.dose + np.where(targets, 4.0, 1.0)
    std = np.ones(case.shape)
    row = uncertainty_metrics(case, pred, std, ["PTV70", "PTV56"])
    body = case.body > 0
    assert row["uncertainty_coverage95_targets"] == 0.0
    assert row["uncertainty_coverage95_oars"] == 100.0
    assert row["uncertainty_coverage95_low_dose"] == 100.0
    assert row["uncertainty_coverage95"] == pytest.approx(100 * (body & ~targets).sum()
                                                          / body.sum())
    assert row["uncertainty_mean_std_gy"] == 1.0
    assert np.isnan(row["uncertainty_error_correlation"])  # a flat spread ranks nothing
    # a spread that follows the error: correlation 1 in the body and wherever error varies
    error = np.abs(pred - case.dose)
    row = uncertainty_metrics(case, pred, 0.5 * error, ["PTV70", "PTV56"])
    assert row["uncertainty_error_correlation"] == pytest.approx(1.0)
    assert row["uncertainty_coverage95"] == 0.0  # |e| > 1.96 * 0.5 |e|: all outside
    row = uncertainty_metrics(case, pred, error, ["PTV70", "PTV56"])
    assert row["uncertainty_coverage95"] == 100.0  # |e| <= 1.96 |e|: all inside
    for name in row:
        assert registry.metric(name) is not None, name


def test_registry_names_the_uncertainty_metrics():
    coverage = registry.metric("test/uncertainty_coverage95_low_dose")
    assert coverage.label == "reference inside the ensemble's 95 % interval in 10-50 % of Rx"
    assert coverage.unit == "%" and coverage.direction == "none"
    assert registry.heading("uncertainty_error_correlation_oars") == (
        "ensemble std - error correlation in organs at risk")
    assert set(registry.UNCERTAINTY) <= {f"uncertainty_{m}{s}" for m in
                                         ("coverage95", "error_correlation", "mean_std_gy")
                                         for s in ("", "_targets", "_oars", "_low_dose")}


@pytest.mark.slow
def test_suite_writes_uncertainty_columns_figure_and_report(tmp_path):
    case = make_box_case()
    rng = np.random.default_rng(4)
    std = rng.uniform(0.5, 2.0, case.shape)
    pred = case.dose + std * rng.standard_normal(case.shape)  # the reference ~ N(pred, std)
    settings = EvaluationSettings(targets=["PTV70", "PTV56"], gamma=[], figures=True,
                                  figure_cases=1, dpi=50)
    table, summary = run_suite([(case, pred, std)], settings, tmp_path)
    written = pd.read_csv(tmp_path / "per_case.csv")
    assert written["uncertainty_coverage95"].iloc[0] == pytest.approx(95.0, abs=2.5)
    assert "uncertainty_coverage95_low_dose" in summary["metrics"]
    assert (tmp_path / "figures" / "box_spread.png").stat().st_size > 10_000
    page = (tmp_path / "report.html").read_text()
    assert "reference inside the ensemble's 95 % interval in targets (%)" in page
    assert "box_spread.png" in page


def test_spread_figure_puts_spread_and_error_on_one_scale():
    case = make_box_case()
    pred = case.dose + 2.0
    fig = spread_error_figure(case, pred, np.full(case.shape, 0.5), ["PTV70", "PTV56"])
    images = [ax.images[1] for ax in fig.axes if len(getattr(ax, "images", [])) > 1]
    assert len(images) == 9  # 3 views x (spread, error, outside)
    spread, error = images[0], images[1]
    assert spread.get_clim() == error.get_clim() == (0, pytest.approx(2.0))
    assert "coverage 0.0 %" in fig._suptitle.get_text()
