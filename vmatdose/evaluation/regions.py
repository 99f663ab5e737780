"""Scoring regions for region-specific gamma: targets, OAR neighbourhoods, the rest.

The founding project suspected that most gamma failures sit in the low-dose region,
where plans legitimately differ; splitting the pass rate by region shows it:

* ``targets``: the union of the target structures;
* ``oar_<name>``: each OAR dilated by ``margin_mm`` (1 cm), minus the targets;
* ``remainder``: the body outside both.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from vmatdose.data.case import Case
from vmatdose.data.geometry import dilate_mm
from vmatdose.metrics.gamma import pass_rate_from_gamma


def gamma_regions(case: Case, targets: Sequence[str],
                  margin_mm: float = 10.0) -> dict[str, np.ndarray]:
    """Region name -> boolean (Z, Y, X) mask, all inside the body."""
    body = case.body > 0
    target_union = np.zeros(case.shape, bool)
    for name in targets:
        if case.has_structure(name):
            target_union |= case.mask(name) > 0
    regions = {"targets": target_union & body}
    covered = target_union.copy()
    for name in case.structures:
        if name in targets or not case.mask(name).any():
            continue
        around = dilate_mm(case.mask(name), margin_mm, case.spacing_mm) & ~target_union & body
        regions[f"oar_{name}"] = around
        covered |= around
    regions["remainder"] = body & ~covered
    return regions


def region_pass_rates(gamma: np.ndarray, regions: dict[str, np.ndarray]) -> dict[str, float]:
    """Gamma pass rate (%) of the evaluated voxels inside each region (NaN if none)."""
    rates = {}
    for name, mask in regions.items():
        rates[name] = pass_rate_from_gamma(np.where(mask, gamma, np.nan))
    return rates
