"""What the optimiser minimises: the prediction mimicked voxel by voxel, and the protocol's
clinical constraints as penalties (pyRadPlan objectives).

Every structure of the structure set gets pyRadPlan's ``SquaredMimicking`` (mean squared
deviation from the predicted dose over its voxels) with the weight of its kind (target,
organ at risk, body). Each clinical constraint ``{structure, metric, op, limit}`` of the
protocol becomes the matching penalty on that structure:

=====================================  =============================================
constraint                             penalty
=====================================  =============================================
``V<x>% >= L`` / ``V<x>Gy >= L``       ``MinDVH(d=x % of Rx / x Gy, v_min=L)``
``V<x>% < L`` / ``V<x>Gy < L``         ``MaxDVH(d=..., v_max=L)``
``Dmax < L``                           ``SquaredOverdosing(d_max=L)``
``Dmin >= L``                          ``SquaredUnderdosing(d_min=L)``
``Dmean < L``                          ``MeanDose(d_ref=min(L, predicted mean))``
``D<x>% < L`` / ``D<x>% >= L``         ``MaxDVH(d=L, v_max=x)`` / ``MinDVH(d=L, v_min=x)``
=====================================  =============================================

(``MeanDose`` pulls the mean towards its reference from both sides, so its reference is
the prediction's own mean capped at the limit: it never asks for more dose than the
prediction.) ``D<x>cc`` limits are turned into percent of the structure's volume.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

import numpy as np

from vmatdose.data.case import Case
from vmatdose.evaluation.constraints import Constraint
from vmatdose.metrics.dvh import parse_dvh_metric
from vmatdose.planning.patient import BODY, case_image
from vmatdose.planning.settings import PlanSettings

log = logging.getLogger(__name__)

_AT_LEAST = (">", ">=")


def constraint_penalty(constraint: Constraint, case: Case, pred_gy: np.ndarray,
                       weight: float) -> Any | None:
    """The pyRadPlan objective standing for ``constraint`` on ``case`` (``None`` when the
    case lacks the structure or the metric has no penalty form)."""
    from pyRadPlan.optimization.objectives import (
        MaxDVH,
        MeanDose,
        MinDVH,
        SquaredOverdosing,
        SquaredUnderdosing,
    )

    if not case.has_structure(constraint.structure) or not case.mask(constraint.structure).any():
        return None
    spec = parse_dvh_metric(constraint.metric)
    at_least = constraint.op in _AT_LEAST
    limit = constraint.limit
    mask = case.mask(constraint.structure) > 0
    if spec.quantity == "V":
        rx = case.prescriptions_gy.get(constraint.structure)
        if spec.unit == "%" and rx is None:
            return None
        dose = spec.value / 100.0 * rx if spec.unit == "%" else spec.value
        volume = float(np.clip(limit, 0.0, 100.0))
        return (MinDVH(priority=weight, d=dose, v_min=volume) if at_least
                else MaxDVH(priority=weight, d=dose, v_max=volume))
    if spec.quantity == "D":
        percent = spec.value if spec.unit == "%" else \
            100.0 * spec.value / (mask.sum() * case.voxel_volume_cc)
        percent = float(np.clip(percent, 0.0, 100.0))
        return (MinDVH(priority=weight, d=limit, v_min=percent) if at_least
                else MaxDVH(priority=weight, d=limit, v_max=percent))
    if spec.quantity == "Dmax" and not at_least:
        return SquaredOverdosing(priority=weight, d_max=limit)
    if spec.quantity == "Dmin" and at_least:
        return SquaredUnderdosing(priority=weight, d_min=limit)
    if spec.quantity == "Dmean" and not at_least:
        return MeanDose(priority=weight, d_ref=min(limit, float(pred_gy[mask].mean())))
    log.info("constraint %s has no penalty form: left to the mimicking", constraint.label)
    return None


def assign_objectives(cst: Any, case: Case, pred_gy: np.ndarray,
                      constraints: Sequence[Constraint], settings: PlanSettings) -> list[str]:
    """Set the objectives of every structure of ``cst`` (in place): mimicking of
    ``pred_gy`` (Z, Y, X) Gy plus the constraint penalties. Returns the penalties' labels."""
    from pyRadPlan.optimization.objectives import SquaredMimicking

    reference = case_image(case, pred_gy)
    by_name = {voi.name: voi for voi in cst.vois}
    for voi in cst.vois:
        kind = "body" if voi.name == BODY else \
            "target" if voi.voi_type == "TARGET" else "oar"
        weight = getattr(settings, f"{kind}_weight")
        voi.objectives = [SquaredMimicking(priority=weight, d_ref=reference)] if weight > 0 \
            else []
    applied = []
    for constraint in constraints:
        penalty = constraint_penalty(constraint, case, pred_gy, settings.constraint_weight)
        if penalty is not None and constraint.structure in by_name \
                and settings.constraint_weight > 0:
            by_name[constraint.structure].objectives = [
                *by_name[constraint.structure].objectives, penalty]
            applied.append(constraint.label)
    return applied
