"""Reading a patient folder of DICOM files: headers by modality, clear errors per file.

Every error names the file relative to the patient folder (never the patient), through
:class:`DicomIngestError`. Pydicom's value-validation warnings are silenced while reading
because they can quote element values (patient name, ID).
"""

from __future__ import annotations

import os
import warnings
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pydicom
from pydicom.dataset import Dataset
from pydicom.errors import InvalidDicomError

_MODALITIES = ("CT", "RTSTRUCT", "RTDOSE", "RTPLAN")


class DicomIngestError(ValueError):
    """A patient folder that cannot become a case; ``path`` names the offending file."""

    def __init__(self, message: str, path: str | None = None):
        super().__init__(f"{path}: {message}" if path else message)
        self.path = path


@dataclass
class DicomFolder:
    """The DICOM objects of one patient folder, by modality.

    Attributes:
        root: the patient folder.
        headers: modality -> list of ``(path, dataset)``; CT and RTDOSE datasets are read
            without pixel data (read again with :func:`read_full`), RTSTRUCT and RTPLAN
            completely.
        ignored: names (relative paths) of files that are not DICOM or of other modalities.
    """

    root: Path
    headers: dict[str, list[tuple[Path, Dataset]]] = field(default_factory=dict)
    ignored: list[str] = field(default_factory=list)

    def of(self, modality: str) -> list[tuple[Path, Dataset]]:
        return self.headers.get(modality, [])

    def rel(self, path: Path) -> str:
        """``path`` relative to the patient folder (for messages)."""
        try:
            return str(path.relative_to(self.root))
        except ValueError:
            return path.name


def read_dataset(path: Path, label: str, headers_only: bool) -> Dataset:
    """``dcmread`` with errors as :class:`DicomIngestError` naming ``label``.

    Raises:
        InvalidDicomError: the file is not DICOM at all (no preamble / DICM prefix).
    """
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            return pydicom.dcmread(path, stop_before_pixels=headers_only)
        except InvalidDicomError:
            raise
        except Exception as err:  # pydicom raises a zoo of errors on truncated files
            raise DicomIngestError(f"unreadable DICOM file ({type(err).__name__}: {err})",
                                   label) from err


def scan_folder(root: str | Path) -> DicomFolder:
    """Read the headers of every file below ``root`` and sort them by modality."""
    root = Path(root)
    if not root.is_dir():
        raise DicomIngestError(f"{root}: patient folder not found")
    folder = DicomFolder(root)
    headers: dict[str, list] = defaultdict(list)
    for path in sorted(p for p in root.rglob("*") if p.is_file()):
        if path.name.startswith("."):
            continue
        try:
            ds = read_dataset(path, folder.rel(path), headers_only=True)
        except InvalidDicomError:
            folder.ignored.append(folder.rel(path))
            continue
        modality = str(ds.get("Modality", ""))
        if modality in _MODALITIES:
            headers[modality].append((path, ds))
        else:
            folder.ignored.append(folder.rel(path))
    folder.headers = dict(headers)
    return folder


def read_full(folder: DicomFolder, path: Path) -> Dataset:
    """Read one file completely (pixel data included)."""
    return read_dataset(path, folder.rel(path), headers_only=False)


def pixel_array(ds: Dataset, label: str) -> np.ndarray:
    """``ds.pixel_array`` with a truncated or missing pixel data as a clear error."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return ds.pixel_array
    except Exception as err:
        raise DicomIngestError(f"cannot decode pixel data ({type(err).__name__}: {err}); "
                               "truncated or corrupt file?", label) from err


def require(ds: Dataset, keyword: str, label: str):
    """``ds.<keyword>`` or a :class:`DicomIngestError` naming the file and attribute."""
    value = ds.get(keyword)
    if value is None or value == "":
        raise DicomIngestError(f"missing required attribute {keyword}", label)
    return value


def orientation_axes(iop, label: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """ImageOrientationPatient -> unit row, column and slice-normal vectors (patient LPS).

    Only axis-aligned transverse orientations are accepted: row direction along +-x and
    column direction along +-y (head/feet first, supine/prone). Others (oblique, decubitus)
    raise a :class:`DicomIngestError` naming the file.
    """
    values = np.asarray([float(v) for v in iop], dtype=np.float64)
    if values.shape != (6,):
        raise DicomIngestError(f"ImageOrientationPatient must have 6 values, got {list(iop)}",
                               label)
    row, col = values[:3], values[3:]
    tol = 1e-3
    axis_aligned = (abs(abs(row[0]) - 1) < tol and abs(abs(col[1]) - 1) < tol
                    and np.all(np.abs(row[1:]) < tol) and abs(col[0]) < tol
                    and abs(col[2]) < tol)
    if not axis_aligned:
        raise DicomIngestError(
            f"unsupported ImageOrientationPatient {values.round(4).tolist()}: only "
            "transverse head-first/feet-first (supine or prone) series are supported "
            "([+-1,0,0, 0,+-1,0])", label)
    row = np.array([np.sign(row[0]), 0.0, 0.0])
    col = np.array([0.0, np.sign(col[1]), 0.0])
    return row, col, np.cross(row, col)


def find_dicom_patients(input_dir: str | os.PathLike) -> list[Path]:
    """Patient folders: the sub-folders of ``input_dir`` holding files (``input_dir``
    itself when it holds files but no sub-folders)."""
    root = Path(input_dir)
    if not root.is_dir():
        raise FileNotFoundError(f"{root}: DICOM input folder not found")
    folders = sorted(p for p in root.iterdir()
                     if p.is_dir() and not p.name.startswith(".") and _has_files(p))
    if not folders and any(p.is_file() for p in root.iterdir()):
        folders = [root]
    if not folders:
        raise FileNotFoundError(f"{root}: no patient folders (one sub-folder per patient "
                                "holding its CT, RTSTRUCT, RTDOSE, RTPLAN files)")
    return folders


def _has_files(folder: Path) -> bool:
    return any(p.is_file() for p in folder.rglob("*"))
