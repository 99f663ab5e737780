"""The OpenKBP challenge scores (Babier et al. 2021), as the challenge code computes them.

* dose score of a patient: ``sum(|pred - ref|)`` over the **whole** volume divided by the
  number N of voxels of the possible-dose mask (our ``body``), Gy. Dose a prediction puts
  outside the mask counts in the sum (the challenge zeroes its own predictions outside
  the mask before writing them); averaged over patients;
* :func:`mae_in_mask` is the mean absolute error *inside* the mask, a different number
  (smaller for a prediction with dose outside the mask): never report it as the dose
  score;
* DVH score: mean absolute error over patients, ROIs and metrics of D99, D95, D1 for
  targets and D0.1cc, Dmean for OARs, with OpenKBP's percentile definitions
  (``method="openkbp"`` in :mod:`vmatdose.metrics.dvh`). It is pooled over every
  (patient, ROI, metric) entry, not averaged per patient first.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from vmatdose.data.case import Case
from vmatdose.metrics.dvh import dose_at_cc, dose_at_volume, mean_dose

TARGET_METRICS = ("D99", "D95", "D1")
OAR_METRICS = ("D0.1cc", "Dmean")


def dose_score(case: Case, pred_gy: np.ndarray) -> float:
    """The challenge's dose score of one patient (Gy): ``sum |pred - ref|`` over the
    whole grid / the number of possible-dose-mask voxels (``case.body``)."""
    n_mask = int(np.count_nonzero(case.body))
    if n_mask == 0:
        return float("nan")
    error = np.abs(np.asarray(pred_gy, np.float64) - case.dose)
    return float(error.sum() / n_mask)


def mae_in_mask(case: Case, pred_gy: np.ndarray) -> float:
    """Mean absolute dose error (Gy) over the possible-dose-mask voxels only (not the
    challenge's dose score: dose outside the mask is ignored)."""
    region = case.body > 0
    if not region.any():
        return float("nan")
    return float(np.abs(pred_gy[region].astype(np.float64) - case.dose[region]).mean())


def dvh_entries(case: Case, dose_gy: np.ndarray, targets: Sequence[str]) -> dict[str, float]:
    """The challenge's DVH points of one dose: ``{"<ROI>/<metric>": Gy}`` for every
    structure the case has (targets: D99, D95, D1; OARs: D0.1cc, Dmean)."""
    entries: dict[str, float] = {}
    for name in case.structures:
        mask = case.mask(name)[None]
        if not mask.any():
            continue
        if name in targets:
            values = dose_at_volume(dose_gy, mask, [99.0, 95.0, 1.0], method="openkbp")[0]
            entries.update({f"{name}/{m}": float(v) for m, v in zip(TARGET_METRICS, values)})
        else:
            entries[f"{name}/D0.1cc"] = float(dose_at_cc(dose_gy, mask, 0.1, method="openkbp",
                                                         spacing_mm=case.spacing_mm)[0])
            entries[f"{name}/Dmean"] = float(mean_dose(dose_gy, mask)[0])
    return entries


def signed_dvh_errors(case: Case, pred_gy: np.ndarray, targets: Sequence[str]
                      ) -> dict[str, float]:
    """pred - ref (Gy) of every DVH point of one patient, ``{"<ROI>/<metric>": Gy}``."""
    ref = dvh_entries(case, case.dose, targets)
    pred = dvh_entries(case, pred_gy, targets)
    return {k: pred[k] - ref[k] for k in ref}


def dvh_errors(case: Case, pred_gy: np.ndarray, targets: Sequence[str]) -> list[float]:
    """|pred - ref| (Gy) of every DVH point of one patient (NaN points dropped)."""
    errors = [abs(e) for e in signed_dvh_errors(case, pred_gy, targets).values()]
    return [e for e in errors if np.isfinite(e)]


def openkbp_scores(dose_scores: Sequence[float],
                   dvh_error_lists: Sequence[Sequence[float]]) -> dict[str, float]:
    """Challenge-level scores from per-patient dose scores and DVH error lists."""
    pooled = [e for errors in dvh_error_lists for e in errors]
    return {"dose_score_gy": float(np.nanmean(dose_scores)) if len(dose_scores) else np.nan,
            "dvh_score_gy": float(np.mean(pooled)) if pooled else float("nan")}


def score_patients(pairs, targets: Sequence[str]) -> dict:
    """Both challenge scores of ``(case, predicted dose Gy)`` pairs, plus the per-patient
    dose scores and in-mask MAE, and each target's mean signed D95 error (prediction -
    reference, over the patients that have it): ``{"dose_score_gy", "dvh_score_gy",
    "d95_error_gy": {target: Gy}, "per_patient": {...}}``.
    """
    per_patient, dose_scores, dvh_lists = {}, [], []
    d95: dict[str, list[float]] = {t: [] for t in targets}
    for case, pred in pairs:
        dose_scores.append(dose_score(case, pred))
        signed = signed_dvh_errors(case, pred, targets)
        dvh_lists.append([abs(e) for e in signed.values() if np.isfinite(e)])
        for target in targets:
            if np.isfinite(signed.get(f"{target}/D95", np.nan)):
                d95[target].append(signed[f"{target}/D95"])
        per_patient[case.case_id] = {"dose_score_gy": dose_scores[-1],
                                     "mae_in_mask_gy": mae_in_mask(case, pred),
                                     "dvh_mean_error_gy": float(np.mean(dvh_lists[-1]))
                                     if dvh_lists[-1] else float("nan")}
    return {**openkbp_scores(dose_scores, dvh_lists), "n_patients": len(dose_scores),
            "d95_error_gy": {t: float(np.mean(v)) for t, v in d95.items() if v},
            "per_patient": per_patient}
