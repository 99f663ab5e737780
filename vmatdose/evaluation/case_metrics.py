"""Per-case dose metrics: MAE in the body and in each target, target D95 errors."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from vmatdose.data.case import Case
from vmatdose.metrics.dvh import dose_at_volume


def d95_gy(dose_gy: np.ndarray, mask: np.ndarray) -> float:
    """D95 (Gy): the highest dose at least 95 % of the structure receives (exact voxel
    definition of :mod:`vmatdose.metrics.dvh`); NaN for an empty mask."""
    if not mask.any():
        return float("nan")
    return float(dose_at_volume(dose_gy.astype(np.float64), mask[None], 95.0)[0])


def basic_case_metrics(case: Case, pred_gy: np.ndarray,
                       targets: Sequence[str]) -> dict[str, float]:
    """MAE (Gy) in the body and in each target, and each target's D95 (reference,
    prediction, signed error pred - ref).

    Args:
        case: holds the reference dose (Z, Y, X) Gy and the masks.
        pred_gy: (Z, Y, X) predicted dose in Gy on the case's grid.
    """
    if case.dose is None:
        raise ValueError(f"case {case.case_id!r} has no reference dose to evaluate against")
    if pred_gy.shape != case.dose.shape:
        raise ValueError(f"case {case.case_id!r}: prediction shape {pred_gy.shape} differs "
                         f"from the reference dose shape {case.dose.shape}")
    abs_err = np.abs(pred_gy.astype(np.float64) - case.dose)
    body = case.body > 0
    row: dict[str, float] = {"mae_body_gy": float(abs_err[body].mean()) if body.any()
                             else float("nan")}
    for target in targets:
        if not case.has_structure(target):
            continue
        mask = case.mask(target) > 0
        row[f"mae_{target}_gy"] = float(abs_err[mask].mean()) if mask.any() else float("nan")
        ref, pred = d95_gy(case.dose, mask), d95_gy(pred_gy, mask)
        row[f"d95_{target}_ref_gy"] = ref
        row[f"d95_{target}_pred_gy"] = pred
        row[f"d95_{target}_error_gy"] = pred - ref
        row[f"d95_{target}_abs_error_gy"] = abs(pred - ref)
    return row
