"""OpenKBP (AAPM 2020 challenge) patients -> case files.

The challenge ships each patient as sparse CSVs on a 128^3 grid (see the sample's README):
``ct.csv``, ``dose.csv``, ``possible_dose_mask.csv``, ``voxel_dimensions.csv`` and one
``<ROI>.csv`` per contoured structure. The flat index is C order over axes
``(row, column, slice)``: rows run anterior -> posterior, columns patient right -> left,
slices superior -> inferior (checked on the sample: Mandible anterior of SpinalCord,
LeftParotid at higher columns, Brainstem above SpinalCord). Import reorders to the
canonical ``(Z, Y, X)`` (z superior, y posterior, x left).

CT values are stored with a +1024 offset (some files in 16-bit): clipped to [0, 4095]
then shifted to HU. The possible-dose mask becomes ``body``, the scoring region of the
OpenKBP dose score.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import numpy as np
import pandas as pd

from vmatdose.data.case import Case, list_case_files

log = logging.getLogger(__name__)

GRID_SHAPE = (128, 128, 128)
TARGETS_GY = {"PTV70": 70.0, "PTV63": 63.0, "PTV56": 56.0}
OARS = ["Brainstem", "SpinalCord", "RightParotid", "LeftParotid", "Esophagus", "Larynx",
        "Mandible"]
STRUCTURES = [*TARGETS_GY, *OARS]
FRACTIONS = 35
CT_OFFSET_HU = 1024
REQUIRED_FILES = ("ct.csv", "dose.csv", "possible_dose_mask.csv", "voxel_dimensions.csv")


class OpenKBPFormatError(ValueError):
    """A patient folder that does not follow the OpenKBP layout."""


def read_sparse(path: Path, shape: tuple[int, int, int] = GRID_SHAPE,
                dtype: type = np.float32) -> np.ndarray:
    """A sparse ``flat_index,value`` CSV -> dense array in the file's axis order.

    Files without values (masks) give 1 at every listed index.
    """
    try:
        table = pd.read_csv(path, index_col=0)
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as err:
        raise OpenKBPFormatError(f"{path}: not a sparse OpenKBP CSV ({err})") from err
    index = table.index.to_numpy()
    if index.size and (index.min() < 0 or index.max() >= np.prod(shape)):
        raise OpenKBPFormatError(f"{path}: flat index outside a {shape} grid")
    values = table["data"].to_numpy() if "data" in table else np.array([])
    if values.size == 0 or np.all(np.isnan(values)):
        values = np.ones(index.size)
    if not np.all(np.isfinite(values)):
        raise OpenKBPFormatError(f"{path}: {int(np.sum(~np.isfinite(values)))} non-finite values")
    dense = np.zeros(int(np.prod(shape)), dtype=dtype)
    dense[index] = values
    return dense.reshape(shape)


def to_canonical(volume: np.ndarray) -> np.ndarray:
    """OpenKBP ``(row=y, column=x, slice=-z)`` -> canonical ``(Z, Y, X)``, z superior."""
    return np.ascontiguousarray(np.transpose(volume, (2, 0, 1))[::-1])


def import_openkbp_patient(patient_dir: str | os.PathLike, case_id: str | None = None) -> Case:
    """One OpenKBP patient folder (``pt_N/``) -> :class:`Case` (dose in Gy, CT in HU).

    Prescriptions are the challenge's 70/63/56 Gy for the targets the patient has.
    """
    folder = Path(patient_dir)
    missing = [name for name in REQUIRED_FILES if not (folder / name).is_file()]
    if missing:
        raise OpenKBPFormatError(f"{folder}: not an OpenKBP patient folder, missing {missing}")
    spacing_xyz = np.loadtxt(folder / "voxel_dimensions.csv")
    if spacing_xyz.shape != (3,) or np.any(spacing_xyz <= 0):
        raise OpenKBPFormatError(f"{folder / 'voxel_dimensions.csv'}: expected 3 positive "
                                 f"voxel sizes, got {spacing_xyz}")
    spacing = np.array([spacing_xyz[2], spacing_xyz[0], spacing_xyz[1]], float)
    ct = np.clip(read_sparse(folder / "ct.csv"), 0, 4095) - CT_OFFSET_HU
    present = [name for name in STRUCTURES if (folder / f"{name}.csv").is_file()]
    masks = np.stack([to_canonical(read_sparse(folder / f"{n}.csv", dtype=np.uint8))
                      for n in present]) if present else np.zeros((0, *GRID_SHAPE), np.uint8)
    shape = np.asarray(GRID_SHAPE)
    return Case(
        case_id=case_id or f"openkbp_{folder.name}",
        ct=to_canonical(ct).astype(np.int16),
        masks=masks,
        structures=present,
        body=to_canonical(read_sparse(folder / "possible_dose_mask.csv", dtype=np.uint8)),
        spacing_mm=spacing,
        origin_mm=-(shape - 1) / 2.0 * spacing,  # OpenKBP keeps no patient position
        prescriptions_gy={t: gy for t, gy in TARGETS_GY.items() if t in present},
        dose=to_canonical(read_sparse(folder / "dose.csv")),
        meta={"source": "openkbp", "fractions": FRACTIONS, "source_folder": folder.name},
    )


def find_openkbp_patients(source_dir: str | os.PathLike) -> list[Path]:
    """Patient folders (``pt_*`` holding ``ct.csv``) anywhere below ``source_dir``, sorted."""
    root = Path(source_dir)
    if not root.is_dir():
        raise FileNotFoundError(f"{root}: OpenKBP folder not found (expected the challenge's "
                                "train-pats/ and validation-pats/ below it)")
    folders = sorted(p.parent for p in root.glob("**/ct.csv"))
    if not folders:
        raise FileNotFoundError(f"{root}: no OpenKBP patient folders (pt_*/ct.csv) below it")
    return folders


def import_openkbp_dataset(output_dir: str | os.PathLike, source_dir: str | os.PathLike,
                           num_workers: int = 2, progress: bool = True) -> list[Path]:
    """Import every patient below ``source_dir`` into ``output_dir/openkbp_pt_N.npz``.

    Idempotent: patients whose case file already exists and loads are not re-read.
    """
    from vmatdose.data.ingest.batch import convert_cases

    jobs = [(f"openkbp_{folder.name}", folder) for folder in find_openkbp_patients(source_dir)]
    summary = convert_cases(jobs, import_openkbp_patient, output_dir, num_workers=num_workers,
                            progress=progress and "importing OpenKBP patients")
    if summary.get("failed"):
        log.warning("OpenKBP import: %d patients failed: %s", len(summary["failed"]),
                    summary["failed"])
    return list_case_files(output_dir)
