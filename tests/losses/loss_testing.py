"""Helpers of the loss tests: a small box phantom batch with the phantom's structure list."""

from __future__ import annotations

import torch

#: The phantom data config's structure order (conf/data/phantom.yaml).
STRUCTURES = ["PTV70", "PTV56", "Rectum", "Bladder", "Femur_L", "Femur_R", "Bowel"]
TARGETS = ["PTV70", "PTV56"]
PRESCRIPTIONS = {"PTV70": 70.0, "PTV56": 56.0}
SCALE_GY = 70.0


def box_batch(n_cases: int = 2, size: int = 16, spacing=(3.0, 2.0, 2.0)) -> dict:
    """A collated batch of box 'patients' (keys of vmatdose.data.pipeline).

    Per case (Z = Y = X = ``size``): body = all but a 1-voxel rim; PTV70 a 4^3 cube at the
    centre, PTV56 a 2-voxel shell around it, Rectum a 2x2-voxel bar along z behind them,
    Bladder a 3^3 cube in front; femurs and bowel absent (empty masks). Dose (Gy): 70 in
    PTV70, 56 in PTV56, 20 elsewhere in the body, 0 outside; stored / 70.
    """
    s, c = size, size // 2
    body = torch.zeros(s, s, s)
    body[1:-1, 1:-1, 1:-1] = 1
    ptv70, ptv56 = torch.zeros(s, s, s), torch.zeros(s, s, s)
    ptv70[c - 2:c + 2, c - 2:c + 2, c - 2:c + 2] = 1
    ptv56[c - 4:c + 4, c - 4:c + 4, c - 4:c + 4] = 1
    ptv56 -= ptv70
    rectum, bladder = torch.zeros(s, s, s), torch.zeros(s, s, s)
    rectum[3:-3, c + 5:c + 7, c - 1:c + 1] = 1
    bladder[c - 1:c + 2, c - 7:c - 4, c - 1:c + 2] = 1
    empty = torch.zeros(s, s, s)
    masks = torch.stack([ptv70, ptv56, rectum, bladder, empty, empty, empty])
    dose_gy = body * 20.0
    dose_gy = torch.where(ptv56 > 0, 56.0, dose_gy)
    dose_gy = torch.where(ptv70 > 0, 70.0, dose_gy)
    ct = body * 0.4 + bladder * 0.1
    image = torch.cat([ct[None], masks])
    return {
        "image": image.expand(n_cases, -1, -1, -1, -1).clone(),
        "dose": (dose_gy / SCALE_GY).expand(n_cases, 1, -1, -1, -1).clone(),
        "masks": masks.expand(n_cases, -1, -1, -1, -1).clone(),
        "body": body.expand(n_cases, 1, -1, -1, -1).clone(),
        "spacing_mm": torch.tensor([list(spacing)] * n_cases, dtype=torch.float32),
        "dose_scale_gy": torch.full((n_cases,), SCALE_GY),
        "case_id": [f"box_{i}" for i in range(n_cases)],
    }


def as_samples(batch: dict) -> list[dict]:
    """Split a collated batch back into per-case samples (for a DataLoader)."""
    return [{k: v[i] for k, v in batch.items()} for i in range(batch["image"].shape[0])]
