"""The case file: one compressed ``.npz`` per patient, the contract every part shares.

Geometry convention (all cases, whatever their source):

* arrays are ``(Z, Y, X)`` in C order, in the canonical DICOM patient (LPS) orientation:
  increasing ``x`` index goes towards the patient's left, ``y`` posterior, ``z`` superior.
  Ingest flips feet-first or otherwise mirrored series into this orientation, so no
  direction matrix is needed downstream;
* ``spacing_mm`` is ``(dz, dy, dx)`` in mm, in the same order as the array axes;
* ``origin_mm`` is the patient position ``(z, y, x)`` in mm of the centre of voxel
  ``[0, 0, 0]`` (DICOM ImagePositionPatient reversed).

Writes are atomic (temporary file in the same folder, then ``os.replace``) and every
save and load validates the case, naming the file in the error.
"""

from __future__ import annotations

import json
import os
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from vmatdose.data.atomic import atomic_path

SCHEMA_VERSION = 1
SUPPORTED_SCHEMA_VERSIONS = (1,)
_REQUIRED_KEYS = ("ct", "masks", "structures", "body", "spacing_mm", "origin_mm",
                  "prescriptions_gy", "meta")


class CaseValidationError(ValueError):
    """A case file (or an in-memory case about to be written) breaks the contract."""


@dataclass
class Case:
    """One patient: CT, structures, optional reference dose, geometry and prescription.

    Attributes:
        case_id: anonymous identifier (never a patient name or ID).
        ct: (Z, Y, X) int16, Hounsfield units.
        masks: (S, Z, Y, X) uint8 in {0, 1}, one channel per entry of ``structures``.
        structures: canonical structure names, e.g. ``["PTV70", "PTV56", "Rectum"]``.
        body: (Z, Y, X) uint8 in {0, 1}: the region where dose is scored.
        spacing_mm: (3,) float64 voxel size ``(dz, dy, dx)`` in mm.
        origin_mm: (3,) float64 position ``(z, y, x)`` of voxel ``[0, 0, 0]`` in mm.
        prescriptions_gy: target name -> prescribed dose in Gy.
        dose: (Z, Y, X) float32 reference dose in Gy, or ``None`` for cases to predict.
        meta: free JSON-serialisable metadata (source, fractions, DICOM UIDs, ...).
    """

    case_id: str
    ct: np.ndarray
    masks: np.ndarray
    structures: list[str]
    body: np.ndarray
    spacing_mm: np.ndarray
    origin_mm: np.ndarray
    prescriptions_gy: dict[str, float]
    dose: np.ndarray | None = None
    meta: dict[str, Any] = field(default_factory=dict)

    @property
    def shape(self) -> tuple[int, int, int]:
        """Grid shape ``(Z, Y, X)``."""
        return tuple(self.ct.shape)  # type: ignore[return-value]

    @property
    def voxel_volume_cc(self) -> float:
        """Volume of one voxel in cm^3."""
        return float(np.prod(self.spacing_mm)) / 1000.0

    @property
    def fractions(self) -> int | None:
        """Number of fractions, when the source recorded it."""
        value = self.meta.get("fractions")
        return int(value) if value is not None else None

    def has_structure(self, name: str) -> bool:
        return name in self.structures

    def mask(self, name: str) -> np.ndarray:
        """(Z, Y, X) uint8 mask of ``name``; ``KeyError`` naming the case if absent."""
        if name not in self.structures:
            raise KeyError(f"case {self.case_id!r} has no structure {name!r} "
                           f"(has: {', '.join(self.structures)})")
        return self.masks[self.structures.index(name)]


def validate_case(case: Case, where: str | os.PathLike | None = None) -> None:
    """Check every rule of the contract; raise :class:`CaseValidationError` naming ``where``."""
    label = f"{where}" if where is not None else f"case {case.case_id!r}"

    def fail(problem: str) -> None:
        raise CaseValidationError(f"{label}: {problem}")

    if not case.case_id:
        fail("empty case_id")
    if case.ct.ndim != 3:
        fail(f"ct must be 3-D (Z, Y, X), got shape {case.ct.shape}")
    shape = case.ct.shape
    if case.masks.ndim != 4 or case.masks.shape[1:] != shape:
        fail(f"masks shape {case.masks.shape} does not match ct shape (S, *{shape})")
    if case.masks.shape[0] != len(case.structures):
        fail(f"{case.masks.shape[0]} mask channels but {len(case.structures)} structure names")
    if len(set(case.structures)) != len(case.structures):
        fail(f"duplicate structure names in {case.structures}")
    if case.body.shape != shape:
        fail(f"body shape {case.body.shape} does not match ct shape {shape}")
    _check_binary(case.masks, "masks", fail)
    _check_binary(case.body, "body", fail)
    for name, arr in (("spacing_mm", case.spacing_mm), ("origin_mm", case.origin_mm)):
        if np.shape(arr) != (3,) or not np.all(np.isfinite(arr)):
            fail(f"{name} must be 3 finite numbers, got {arr!r}")
    if np.any(np.asarray(case.spacing_mm) <= 0):
        fail(f"spacing_mm must be positive, got {case.spacing_mm!r}")
    if case.dose is not None:
        if case.dose.shape != shape:
            fail(f"dose shape {case.dose.shape} does not match ct shape {shape}")
        if not np.all(np.isfinite(case.dose)):
            fail(f"dose has {int(np.sum(~np.isfinite(case.dose)))} non-finite voxels (NaN/inf)")
        if np.any(case.dose < 0):
            fail(f"dose has negative values (min {float(case.dose.min()):.4g} Gy)")
    for target, gy in case.prescriptions_gy.items():
        if target not in case.structures:
            fail(f"prescription names target {target!r} but the case has no such structure "
                 f"(has: {', '.join(case.structures)})")
        if not np.isfinite(gy) or gy <= 0:
            fail(f"prescription for {target!r} must be a positive dose in Gy, got {gy!r}")
    version = case.meta.get("schema_version", SCHEMA_VERSION)
    if version not in SUPPORTED_SCHEMA_VERSIONS:
        fail(f"unknown schema version {version!r} (this vmatdose reads {SUPPORTED_SCHEMA_VERSIONS})")


def _check_binary(arr: np.ndarray, name: str, fail) -> None:
    if arr.dtype == bool:
        return
    if arr.size and (arr.min() < 0 or arr.max() > 1):
        fail(f"{name} must be binary (0/1), found values in [{arr.min()}, {arr.max()}]")


def save_case(case: Case, path: str | os.PathLike) -> Path:
    """Validate ``case`` and write it atomically to ``path`` (a ``.npz``); return the path.

    Nothing is left at ``path`` if validation or writing fails.
    """
    path = Path(path)
    validate_case(case, path)
    meta = {**case.meta, "schema_version": SCHEMA_VERSION, "case_id": case.case_id}
    arrays: dict[str, np.ndarray] = {
        "ct": np.asarray(case.ct, dtype=np.int16),
        "masks": np.asarray(case.masks, dtype=np.uint8),
        "structures": np.asarray(case.structures, dtype=np.str_),
        "body": np.asarray(case.body, dtype=np.uint8),
        "spacing_mm": np.asarray(case.spacing_mm, dtype=np.float64),
        "origin_mm": np.asarray(case.origin_mm, dtype=np.float64),
        "prescriptions_gy": np.asarray(json.dumps({k: float(v) for k, v in
                                                   case.prescriptions_gy.items()})),
        "meta": np.asarray(json.dumps(meta)),
    }
    if case.dose is not None:
        arrays["dose"] = np.asarray(case.dose, dtype=np.float32)
    with atomic_path(path, ".npz.tmp") as tmp:
        write_npz(tmp, arrays)
    return path


def write_npz(path: str | os.PathLike, arrays: dict[str, np.ndarray]) -> None:
    """``np.savez_compressed`` at deflate level 1: a 150 x 512 x 512 case writes in a third
    of the time for a few % more bytes (np.load reads it like any .npz)."""
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_DEFLATED,
                         compresslevel=1) as archive:
        for name, array in arrays.items():
            with archive.open(f"{name}.npy", "w", force_zip64=True) as member:
                np.lib.format.write_array(member, np.asanyarray(array), allow_pickle=False)


def load_case(path: str | os.PathLike, *, load_dose: bool = True) -> Case:
    """Read and validate a case file; errors name the file and the problem."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such case file")
    try:
        with np.load(path, allow_pickle=False) as data:
            missing = [k for k in _REQUIRED_KEYS if k not in data.files]
            if missing:
                raise CaseValidationError(f"{path}: missing keys {missing}")
            meta = json.loads(str(data["meta"]))
            case = Case(
                case_id=str(meta.get("case_id", path.stem)),
                ct=data["ct"],
                masks=data["masks"],
                structures=[str(s) for s in data["structures"]],
                body=data["body"],
                spacing_mm=data["spacing_mm"].astype(np.float64),
                origin_mm=data["origin_mm"].astype(np.float64),
                prescriptions_gy={k: float(v) for k, v in
                                  json.loads(str(data["prescriptions_gy"])).items()},
                dose=data["dose"] if (load_dose and "dose" in data.files) else None,
                meta=meta,
            )
    except CaseValidationError:
        raise
    except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile) as err:
        # np.load raises a zoo of errors on truncated or foreign files.
        raise CaseValidationError(f"{path}: not a readable case file ({err})") from err
    validate_case(case, path)
    return case


def list_case_files(folder: str | os.PathLike) -> list[Path]:
    """Case files in ``folder`` (sorted by name), ignoring temporary files."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    return sorted(p for p in folder.glob("*.npz") if not p.name.startswith("."))
