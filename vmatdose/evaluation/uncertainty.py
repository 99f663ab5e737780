"""Is a model's per-voxel spread worth reading? Calibration of an ensemble's spread
against the error it should predict.

A model that returns a spread (``dose_std``, e.g. a generative model's ensemble standard
deviation) claims that the reference lies near its mean where the spread is small and
may lie far where it is large. Two checks, per case and per region:

* **spread-error correlation**: Pearson correlation, over the region's voxels, of the
  spread and the absolute error ``|mean - reference|`` (1: the spread ranks the errors
  perfectly; 0: it tells nothing);
* **95 % coverage**: the percentage of voxels whose reference lies inside the ensemble's
  95 % interval ``mean +- 1.96 std`` (a Gaussian interval: the prediction files carry the
  mean and the std, not the samples). A calibrated spread covers 95 %; less is an
  over-confident spread, more an over-cautious one. A small ensemble's sample std is a
  noisy estimate, which alone lowers coverage (with 4 samples the exact 95 % predictive
  interval is about 1.8 times wider).

Regions (inside the body): ``body``; ``targets`` (the union of the targets); ``oars``
(every other structure, minus the targets); ``low_dose`` (reference 10-50 % of the
highest prescription, :func:`vmatdose.evaluation.regions.dose_regions`), where plans
legitimately differ and a spread should be largest.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from vmatdose.data.case import Case
from vmatdose.evaluation.regions import dose_regions, target_union
from vmatdose.metrics.registry import INTERVAL_Z, UNCERTAINTY_REGIONS


def spread_error_correlation(std: np.ndarray, abs_error: np.ndarray) -> float:
    """Pearson correlation of spread and absolute error over the given voxels (any
    matching shapes); NaN for fewer than two voxels or when either is constant."""
    std = np.asarray(std, np.float64).ravel()
    abs_error = np.asarray(abs_error, np.float64).ravel()
    if std.shape != abs_error.shape:
        raise ValueError(f"spread {std.shape} and error {abs_error.shape} differ in size")
    if std.size < 2 or np.ptp(std) == 0 or np.ptp(abs_error) == 0:
        return float("nan")
    return float(np.corrcoef(std, abs_error)[0, 1])


def interval_coverage(reference: np.ndarray, mean: np.ndarray, std: np.ndarray,
                      z: float = INTERVAL_Z) -> float:
    """Percentage of voxels with ``|mean - reference| <= z * std`` (``z`` = 1.96: the
    Gaussian 95 % interval); NaN for no voxel. Arrays of one shape, in Gy."""
    reference, mean, std = (np.asarray(a, np.float64) for a in (reference, mean, std))
    if not reference.size:
        return float("nan")
    if np.any(std < 0):
        raise ValueError("a spread (standard deviation) cannot be negative")
    return float(100.0 * np.mean(np.abs(mean - reference) <= z * std))


def outside_interval(reference: np.ndarray, mean: np.ndarray, std: np.ndarray,
                     z: float = INTERVAL_Z) -> np.ndarray:
    """Boolean map of the voxels whose reference lies outside ``mean +- z * std``."""
    return np.abs(np.asarray(mean, np.float64) - reference) > z * np.asarray(std, np.float64)


def uncertainty_regions(case: Case, targets: Sequence[str]) -> dict[str, np.ndarray]:
    """Region name (:data:`~vmatdose.metrics.registry.UNCERTAINTY_REGIONS`) -> boolean
    (Z, Y, X) mask inside the body; ``low_dose`` only when the case has a prescription."""
    body = case.body > 0
    union = target_union(case, targets)
    oars = np.zeros(case.shape, bool)
    for name in case.structures:
        if name not in targets:
            oars |= case.mask(name) > 0
    regions = {"body": body, "targets": union & body, "oars": oars & ~union & body}
    low = dose_regions(case).get("low_dose")
    if low is not None:
        regions["low_dose"] = low
    return {name: regions[name] for name in UNCERTAINTY_REGIONS if name in regions}


def uncertainty_metrics(case: Case, pred_gy: np.ndarray, std_gy: np.ndarray,
                        targets: Sequence[str] = ()) -> dict[str, float]:
    """The per-case row entries of a prediction with a spread.

    Args:
        case: holds the reference dose (Z, Y, X) Gy, body and masks.
        pred_gy: (Z, Y, X) predicted (ensemble mean) dose, Gy.
        std_gy: (Z, Y, X) per-voxel spread (ensemble std), Gy, >= 0.
        targets: the protocol's target names (the rest are OARs).
    Returns:
        ``uncertainty_mean_std_gy`` (body), and per region ``r``:
        ``uncertainty_error_correlation[_r]`` and ``uncertainty_coverage95[_r]`` (%),
        the body's without a suffix. NaN where a region is empty or the spread flat.
    """
    if std_gy.shape != case.dose.shape or pred_gy.shape != case.dose.shape:
        raise ValueError(f"case {case.case_id!r}: prediction {pred_gy.shape} / spread "
                         f"{std_gy.shape} differ from the reference {case.dose.shape}")
    error = np.abs(pred_gy.astype(np.float64) - case.dose)
    row: dict[str, float] = {}
    for name, mask in uncertainty_regions(case, targets).items():
        suffix = "" if name == "body" else f"_{name}"
        if name == "body":
            row["uncertainty_mean_std_gy"] = (float(std_gy[mask].mean()) if mask.any()
                                              else float("nan"))
        row[f"uncertainty_error_correlation{suffix}"] = spread_error_correlation(
            std_gy[mask], error[mask])
        row[f"uncertainty_coverage95{suffix}"] = interval_coverage(
            case.dose[mask], pred_gy[mask], std_gy[mask])
    return row
