"""A dose on an OpenKBP case's grid -> the challenge's sparse submission file ``pt_N.csv``.

The challenge's format (its own ``sparse_vector_function`` and ``load_file``): a CSV with
the header ``,data`` and one row ``flat_index,dose_gy`` per voxel with dose > 0, the flat
index running in C order over the original ``(row, column, slice)`` 128^3 layout; voxels
not listed are 0. :func:`read_submission` is a reader that knows only that format (no
case, no vmatdose orientation), for checking a submission as the challenge would read it.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pandas as pd

from vmatdose.data.atomic import atomic_path
from vmatdose.data.case import Case

GRID_SHAPE = (128, 128, 128)


def to_original(volume: np.ndarray) -> np.ndarray:
    """Canonical ``(Z, Y, X)`` (z superior) -> OpenKBP ``(row, column, slice)``; the inverse
    of :func:`vmatdose.data.ingest.openkbp.to_canonical`."""
    return np.ascontiguousarray(np.transpose(np.asarray(volume)[::-1], (1, 2, 0)))


def submission_name(case: Case) -> str:
    """``pt_N.csv``: the challenge's file name of the case's patient."""
    folder = case.meta.get("source_folder") or case.case_id.removeprefix("openkbp_")
    return f"{folder}.csv"


def write_submission(dose_gy: np.ndarray, case: Case, path: str | os.PathLike) -> Path:
    """Write ``dose_gy`` (Z, Y, X) Gy on ``case``'s canonical grid as the challenge's sparse
    CSV at ``path`` (a file, or a folder to hold :func:`submission_name`), atomically.

    Raises ``ValueError`` naming the case for a grid other than 128^3 or non-finite or
    negative doses.
    """
    dose = np.asarray(dose_gy, dtype=np.float32)
    label = f"case {case.case_id!r}"
    if dose.shape != case.shape or dose.shape != GRID_SHAPE:
        raise ValueError(f"{label}: OpenKBP submissions are {GRID_SHAPE} doses on the case "
                         f"grid, got {dose.shape} for a {case.shape} case")
    if not np.all(np.isfinite(dose)) or (dose < 0).any():
        raise ValueError(f"{label}: refusing to write non-finite or negative doses")
    path = Path(path)
    if path.is_dir():
        path = path / submission_name(case)
    flat = to_original(dose).ravel()
    index = np.flatnonzero(flat > 0)
    table = pd.DataFrame({"data": flat[index]}, index=index)
    with atomic_path(path, ".csv.tmp") as tmp:
        table.to_csv(tmp)
    return path


def read_submission(path: str | os.PathLike, shape: tuple[int, int, int] = GRID_SHAPE
                    ) -> np.ndarray:
    """A challenge-format sparse dose CSV -> dense float32 ``shape`` array in the
    challenge's own ``(row, column, slice)`` layout (what its evaluation reads)."""
    table = pd.read_csv(path, index_col=0)
    if "data" not in table.columns:
        raise ValueError(f"{path}: not an OpenKBP dose file (no 'data' column)")
    dense = np.zeros(int(np.prod(shape)), dtype=np.float32)
    dense[table.index.to_numpy()] = table["data"].to_numpy()
    return dense.reshape(shape)
