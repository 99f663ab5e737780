"""What the prediction grid costs on the challenge arrays: one checkpoint, the OpenKBP
validation patients, each ``spacing_mismatch`` policy; official scores, the signed D95
error of each PTV and the seconds of prediction (experiments/route_invariance.md, cause 4).

    PYTHONPATH=$PWD python experiments/spacing_policy.py <ckpt> '<case glob>' [policy ...]

``<case glob>``: the validation case files, e.g. ``data/openkbp/openkbp-full/pt_2??.npz``
(OpenKBP's validation patients are pt_201-pt_240; several globs: comma-separated). Prints one JSON object per policy.
"""

from __future__ import annotations

import glob
import json
import sys
import time
from pathlib import Path

import numpy as np

from vmatdose.evaluation.openkbp_scores import score_patients
from vmatdose.inference import Predictor
from vmatdose.metrics.dvh import dose_at_volume

TARGETS = ("PTV70", "PTV63", "PTV56")


def d95(dose_gy: np.ndarray, mask: np.ndarray) -> float:
    """D95 (Gy) of one (1, Z, Y, X) mask, as the challenge's DVH score computes it."""
    return float(dose_at_volume(dose_gy.astype(np.float32), mask, 95.0, method="openkbp")[0])


def d95_errors(pairs) -> dict[str, float]:
    """Mean signed D95 error (prediction - reference, Gy) of each PTV over the patients
    that have it."""
    errors: dict[str, list[float]] = {t: [] for t in TARGETS}
    for case, pred in pairs:
        for target in TARGETS:
            if target in case.structures and case.mask(target).any():
                mask = case.mask(target)[None] > 0
                errors[target].append(float(d95(pred, mask) - d95(case.dose, mask)))
    return {t: round(float(np.mean(v)), 3) for t, v in errors.items() if v}


def main(ckpt: str, pattern: str, policies: list[str]) -> None:
    paths = sorted(Path(p) for part in pattern.split(",") for p in glob.glob(part))
    for policy in policies or ["resample", "training_grid"]:
        predictor = Predictor.from_checkpoint(ckpt, "cpu", spacing_mismatch=policy)
        start = time.perf_counter()
        pairs = [(p.case, p.dose_gy) for p in predictor.predict_all(paths)]
        seconds = time.perf_counter() - start
        scores = score_patients(pairs, list(TARGETS))
        moved = sum(predictor.on_training_grid(case) is not case for case, _ in pairs)
        print(json.dumps({"policy": policy, "patients": len(pairs), "resampled": moved,
                          "dose_score_gy": round(scores["dose_score_gy"], 4),
                          "dvh_score_gy": round(scores["dvh_score_gy"], 4),
                          "d95_error_gy": d95_errors(pairs),
                          "seconds_per_patient": round(seconds / max(len(pairs), 1), 2),
                          "per_patient": {k: round(v["dose_score_gy"], 3)
                                          for k, v in scores["per_patient"].items()}}))


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], sys.argv[3:])
