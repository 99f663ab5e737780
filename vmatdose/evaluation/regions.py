"""Scoring regions for region-specific gamma: targets, OAR neighbourhoods, the rest.

The founding project suspected that most gamma failures sit in the low-dose region,
where plans legitimately differ; splitting the pass rate by region shows it:

* ``targets``: the union of the target structures;
* ``oar_<name>``: each OAR dilated by ``margin_mm`` (1 cm), minus the targets;
* ``remainder``: the body outside both;
* ``ptv_region``: the union of the targets dilated by ``ptv_margin_mm`` (5 mm), the
  seed project's "PTV-region gamma";
* ``high_dose``: reference dose above 50 % of the case's highest prescription;
* ``low_dose``: reference dose between 10 % and 50 % of it.

The first three partition the body (:func:`gamma_regions`); the last three overlap them,
other cuts of the same body (:func:`overlapping_regions`). :func:`scoring_regions` gives
both.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from vmatdose.data.case import Case
from vmatdose.data.geometry import dilate_mm
from vmatdose.metrics.gamma import pass_rate_from_gamma
from vmatdose.metrics.registry import HIGH_DOSE_FRACTION, LOW_DOSE_FRACTION, PTV_MARGIN_MM


def scoring_regions(case: Case, targets: Sequence[str], margin_mm: float = 10.0,
                    ptv_margin_mm: float = PTV_MARGIN_MM) -> dict[str, np.ndarray]:
    """Every region gamma is scored in: the partition, then the overlapping regions."""
    return {**gamma_regions(case, targets, margin_mm),
            **overlapping_regions(case, targets, ptv_margin_mm)}


def gamma_regions(case: Case, targets: Sequence[str],
                  margin_mm: float = 10.0) -> dict[str, np.ndarray]:
    """The partition of the body: region name -> boolean (Z, Y, X) mask."""
    body = case.body > 0
    union = target_union(case, targets)
    regions = {"targets": union & body}
    covered = union.copy()
    for name in case.structures:
        if name in targets or not case.mask(name).any():
            continue
        around = dilate_mm(case.mask(name), margin_mm, case.spacing_mm) & ~union & body
        regions[f"oar_{name}"] = around
        covered |= around
    regions["remainder"] = body & ~covered
    return regions


def target_union(case: Case, targets: Sequence[str]) -> np.ndarray:
    """(Z, Y, X) bool: the union of the case's target masks."""
    union = np.zeros(case.shape, bool)
    for name in targets:
        if case.has_structure(name):
            union |= case.mask(name) > 0
    return union


def overlapping_regions(case: Case, targets: Sequence[str],
                        ptv_margin_mm: float = PTV_MARGIN_MM) -> dict[str, np.ndarray]:
    """``ptv_region`` (targets grown by ``ptv_margin_mm``) and the dose regions, inside
    the body."""
    grown = dilate_mm(target_union(case, targets), ptv_margin_mm, case.spacing_mm)
    return {"ptv_region": grown & (case.body > 0), **dose_regions(case)}


def dose_regions(case: Case) -> dict[str, np.ndarray]:
    """``high_dose`` (reference > 50 % of the highest prescription) and ``low_dose``
    (10-50 %) inside the body; empty when the case has no dose or prescription."""
    if case.dose is None or not case.prescriptions_gy:
        return {}
    prescription = max(case.prescriptions_gy.values())
    body = case.body > 0
    high = case.dose > HIGH_DOSE_FRACTION * prescription
    low = (case.dose >= LOW_DOSE_FRACTION * prescription) & ~high
    return {"high_dose": high & body, "low_dose": low & body}


def region_pass_rates(gamma: np.ndarray, regions: dict[str, np.ndarray]) -> dict[str, float]:
    """Gamma pass rate (%) of the evaluated voxels inside each region (NaN if none)."""
    rates = {}
    for name, mask in regions.items():
        rates[name] = pass_rate_from_gamma(np.where(mask, gamma, np.nan))
    return rates
