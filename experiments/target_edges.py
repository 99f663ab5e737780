"""Why the recipe's PTV D95 comes out low (issue 30, item 3): one checkpoint of
``experiment=openkbp_cpu``, the validation patients, and three doses beside the reference:

* ``prediction``: the checkpoint's, as ``predict`` gives it;
* ``floor``: the best the recipe's half-resolution output can do: the reference itself
  average-pooled by the model's factor inside the body (what the network is trained on),
  then upsampled by the model's own path (correction to the prior, full-resolution prior
  added back); a perfect network gives this;
* ``prior``: the prior-dose input channel alone.

For each: the mean signed D95 error of each PTV (Gy) and the mean signed error (Gy) in
shells of the PTVs by distance inside their surface (voxels of the case grid).

    PYTHONPATH=$PWD python experiments/target_edges.py <ckpt> '<case glob>'
"""

from __future__ import annotations

import glob
import json
import sys

import numpy as np
import torch
from scipy import ndimage

from vmatdose.data.case import load_case
from vmatdose.inference import Predictor
from vmatdose.inference.volume import pool_image
from vmatdose.metrics.dvh import dose_at_volume

TARGETS = ("PTV70", "PTV63", "PTV56")
SHELLS = ((0, 1), (1, 2), (2, 4), (4, 1000))  # voxels inside the surface: [a, b)


def d95(dose_gy: np.ndarray, mask: np.ndarray) -> float:
    """D95 (Gy) of one (Z, Y, X) mask, as the challenge's DVH score computes it."""
    return float(dose_at_volume(dose_gy.astype(np.float32), mask[None], 95.0,
                                method="openkbp")[0])


def floor_and_prior(predictor: Predictor, case, path: str) -> tuple[np.ndarray, np.ndarray]:
    """(floor, prior) doses in Gy on the case grid (see the module docstring)."""
    sample = predictor.transform({"path": path, "case": case})
    image, body = sample["image"][None].float(), sample["body"][None].float()
    inference = predictor.module.inference
    scale = predictor.contract.dose_scale_gy
    dose = torch.from_numpy(case.dose.astype(np.float32))[None, None] / scale
    factor = inference.resolution_factor
    inside = (body > 0).float()
    coarse = pool_image(dose * inside, factor) / pool_image(inside, factor).clamp_min(1e-6)
    floor = inference.upsample(coarse, image, body) * inside
    prior = image[:, inference.input_spec.slice("prior")] * inside
    return floor[0, 0].numpy() * scale, prior[0, 0].numpy() * scale


def errors(dose: np.ndarray, case) -> dict:
    """Signed D95 errors per PTV and signed mean errors per shell (all PTVs pooled)."""
    out: dict = {"d95": {}, "shells": {}}
    diff = dose - case.dose
    for target in TARGETS:
        if target not in case.structures or not case.mask(target).any():
            continue
        mask = case.mask(target) > 0
        out["d95"][target] = d95(dose, mask) - d95(case.dose, mask)
        depth = ndimage.distance_transform_edt(mask)  # 1 at the surface voxels
        for a, b in SHELLS:
            shell = mask & (depth > a) & (depth <= b)
            if shell.any():
                out["shells"].setdefault(f"{a}-{b}", []).append(float(diff[shell].mean()))
    return out


def main(ckpt: str, pattern: str) -> None:
    # each case on its own grid (the few outside the training range are left out), so
    # the three doses and the reference share one grid
    predictor = Predictor.from_checkpoint(ckpt, "cpu", spacing_mismatch="resample")
    rows: dict[str, list[dict]] = {"prediction": [], "floor": [], "prior": []}
    for path in sorted(p for part in pattern.split(",") for p in glob.glob(part)):
        case = load_case(path)
        if predictor.on_training_grid(case) is not case:
            continue
        floor, prior = floor_and_prior(predictor, case, path)
        prediction = predictor.predict(path).dose_gy
        for name, dose in (("prediction", prediction), ("floor", floor), ("prior", prior)):
            rows[name].append(errors(dose, case))
    summary = {}
    for name, per_case in rows.items():
        d95s = {t: round(float(np.mean([r["d95"][t] for r in per_case if t in r["d95"]])), 3)
                for t in TARGETS}
        shells = {s: round(float(np.mean([v for r in per_case for v in r["shells"].get(s, [])])),
                           3) for s in (f"{a}-{b}" for a, b in SHELLS)}
        summary[name] = {"patients": len(per_case), "d95_error_gy": d95s,
                         "shell_error_gy": shells}
    print(json.dumps(summary, indent=1))


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
