"""Prediction files: ``<case_id>.npz`` with ``dose`` (Gy, on the case grid), ``dose_std``
(generative models), and the case's ``spacing_mm``, ``origin_mm`` and ``case_id``, and
``grid``: JSON saying which grid the dose is on (``on``: ``case``; ``case_grid``: the
case's ``meta["grid"]``, ``training`` or ``ct`` for DICOM cases; ``shape``, ``spacing_mm``,
``origin_mm``; ``source_grids``: the patient's CT and RTDOSE grids an RTDOSE export goes
back to, when ingest recorded them).

The one module that writes them (predict) and reads them back (evaluate).
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np

from vmatdose.data.atomic import atomic_path
from vmatdose.data.case import Case, load_case, write_npz
from vmatdose.errors import InputError


def prediction_path(folder: str | Path, case_id: str) -> Path:
    return Path(folder) / f"{case_id}.npz"


def save_prediction(case: Case, dose_gy: np.ndarray, std_gy: np.ndarray | None,
                    path: str | Path) -> Path:
    """Atomically write a prediction ``.npz`` (dose in Gy on the case grid)."""
    path = Path(path)
    if not np.all(np.isfinite(dose_gy)):
        raise ValueError(f"{path}: refusing to write a prediction with non-finite doses")
    arrays = {"dose": dose_gy.astype(np.float32), "spacing_mm": case.spacing_mm,
              "origin_mm": case.origin_mm, "case_id": np.asarray(case.case_id),
              "grid": np.asarray(json.dumps(prediction_grid(case)))}
    if std_gy is not None:
        arrays["dose_std"] = std_gy.astype(np.float32)
    with atomic_path(path, ".npz.tmp") as tmp:
        write_npz(tmp, arrays)
    return path


def prediction_grid(case: Case) -> dict:
    """What a prediction file says about the grid its dose is on (the case's)."""
    return {"on": "case", "case_grid": case.meta.get("grid"), "shape": list(case.shape),
            "spacing_mm": [float(v) for v in case.spacing_mm],
            "origin_mm": [float(v) for v in case.origin_mm],
            "source_grids": case.meta.get("source_grids")}


def load_prediction(path: str | Path, case: Case) -> tuple[np.ndarray, np.ndarray | None]:
    """``(dose Gy, dose_std Gy or None)`` of ``case`` from ``path``; errors name the file."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no prediction for case {case.case_id!r}")
    try:
        with np.load(path, allow_pickle=False) as data:
            if "dose" not in data.files:
                raise InputError(f"{path}: no 'dose' array")
            dose = data["dose"].astype(np.float32)
            std = data["dose_std"].astype(np.float32) if "dose_std" in data.files else None
    except (OSError, ValueError) as err:
        if isinstance(err, InputError):
            raise
        raise InputError(f"{path}: not a readable prediction file ({err})") from err
    if not np.all(np.isfinite(dose)):
        raise InputError(f"{path}: predicted dose has non-finite values")
    if dose.shape != case.shape:
        raise InputError(f"{path}: dose shape {dose.shape} differs from case "
                         f"{case.case_id!r} grid {case.shape}")
    return dose, std


def read_predictions(folder: str | Path, case_paths: Sequence[Path]
                     ) -> Iterator[tuple[Case, np.ndarray, np.ndarray | None]]:
    """``(case, dose Gy, std Gy or None)`` for each case file, from ``<folder>/<case_id>.npz``."""
    for path in case_paths:
        case = load_case(path)
        dose, std = load_prediction(prediction_path(folder, case.case_id), case)
        yield case, dose, std
