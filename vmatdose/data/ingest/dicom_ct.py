"""A CT series -> the canonical grid and the HU volume.

Slices are sorted by their position along the slice normal (row x column cosine) and
placed on a regular canonical grid (z superior, y posterior, x patient left). Gaps that are
whole multiples of the nominal spacing are *missing slices*: they are filled by linear
interpolation between their neighbours and reported. Any other uneven spacing is an error.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from pydicom.dataset import Dataset

from vmatdose.data.ingest.dicom_files import (
    DicomFolder,
    DicomIngestError,
    orientation_axes,
    pixel_array,
    read_full,
    require,
)

#: Relative deviation from the nominal slice spacing still counted as regular.
SPACING_TOLERANCE = 0.02


@dataclass(frozen=True)
class CanonicalGrid:
    """A regular grid in canonical LPS orientation.

    Attributes:
        shape: ``(Z, Y, X)`` voxels.
        spacing_mm: ``(dz, dy, dx)`` in mm.
        origin_mm: ``(z, y, x)`` in mm of the centre of voxel ``[0, 0, 0]``.
    """

    shape: tuple[int, int, int]
    spacing_mm: tuple[float, float, float]
    origin_mm: tuple[float, float, float]

    def continuous_index(self, points_xyz: np.ndarray) -> np.ndarray:
        """(N, 3) patient points ``(x, y, z)`` mm -> (N, 3) continuous indices ``(z, y, x)``."""
        zyx = np.asarray(points_xyz, dtype=np.float64)[:, ::-1]
        return (zyx - np.asarray(self.origin_mm)) / np.asarray(self.spacing_mm)


@dataclass
class CTSeries:
    """Geometry of one CT series on its canonical grid (pixels not read yet).

    Attributes:
        grid: the canonical grid (missing slices included).
        files: canonical slice index -> file, for the slices present.
        missing: canonical slice indices without a file (filled by interpolation).
        flip_x, flip_y: whether stored columns / rows run opposite to canonical x / y.
        uids: FrameOfReference, Study and Series instance UIDs, and the orientation.
    """

    grid: CanonicalGrid
    files: dict[int, Path]
    missing: list[int]
    flip_x: bool
    flip_y: bool
    uids: dict[str, object] = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)


def select_ct_series(folder: DicomFolder, referenced_series: set[str]) -> list[tuple]:
    """The CT headers of the one series to use (the one the RTSTRUCT references if several)."""
    series: dict[str, list] = {}
    for path, ds in folder.of("CT"):
        series.setdefault(str(ds.get("SeriesInstanceUID", "")), []).append((path, ds))
    if not series:
        raise DicomIngestError(f"no CT image files in the patient folder "
                               f"({len(folder.ignored)} other files)")
    if len(series) == 1:
        return next(iter(series.values()))
    chosen = [uid for uid in series if uid in referenced_series]
    if len(chosen) != 1:
        raise DicomIngestError(f"{len(series)} CT series in the patient folder and the "
                               "RTSTRUCT does not single one out; keep one series per folder")
    return series[chosen[0]]


def plan_ct_series(folder: DicomFolder, headers: list[tuple[Path, Dataset]]) -> CTSeries:
    """Sort the slices along the normal and lay out the canonical grid."""
    first_path, first = headers[0]
    label = folder.rel(first_path)
    row, col, normal = orientation_axes(require(first, "ImageOrientationPatient", label), label)
    _check_same_geometry(folder, headers)
    positions = np.array([[float(v) for v in require(ds, "ImagePositionPatient",
                                                       folder.rel(p))] for p, ds in headers])
    along = positions @ normal
    order = np.argsort(along)
    if normal[2] < 0:  # feet first: the normal points inferior, canonical z is superior
        order = order[::-1]
    z = positions[order, 2]
    index, n_slices, dz, warnings = _slice_indices(folder, [headers[i][0] for i in order], z)
    rows, cols = int(first.Rows), int(first.Columns)
    dy, dx = (float(v) for v in require(first, "PixelSpacing", label))
    ipp = positions[order[0]]
    x0 = ipp[0] if row[0] > 0 else ipp[0] - (cols - 1) * dx
    y0 = ipp[1] if col[1] > 0 else ipp[1] - (rows - 1) * dy
    grid = CanonicalGrid((n_slices, rows, cols), (dz, dy, dx), (float(z[0]), y0, x0))
    files = {int(k): headers[i][0] for k, i in zip(index, order)}
    uids = {"frame_of_reference_uid": str(first.get("FrameOfReferenceUID", "")),
            "study_instance_uid": str(first.get("StudyInstanceUID", "")),
            "ct_series_instance_uid": str(first.get("SeriesInstanceUID", "")),
            "image_orientation_patient": [float(v) for v in first.ImageOrientationPatient],
            "patient_position": str(first.get("PatientPosition", "")),
            "ct_sop_instance_uids": [str(headers[i][1].get("SOPInstanceUID", "")) for i in order]}
    missing = sorted(set(range(n_slices)) - set(files))
    return CTSeries(grid, files, missing, bool(row[0] < 0), bool(col[1] < 0), uids, warnings)


def _check_same_geometry(folder: DicomFolder, headers: list[tuple[Path, Dataset]]) -> None:
    """All slices share orientation, matrix size, pixel spacing and in-plane position."""
    _, first = headers[0]
    reference = _slice_signature(first)
    for path, ds in headers[1:]:
        if _slice_signature(ds) != reference:
            raise DicomIngestError(
                "CT slice geometry differs from the first slice (orientation, matrix size or "
                "pixel spacing); mixed series?", folder.rel(path))


def _slice_signature(ds: Dataset) -> tuple:
    iop = tuple(round(float(v), 4) for v in ds.get("ImageOrientationPatient", []))
    spacing = tuple(round(float(v), 4) for v in ds.get("PixelSpacing", []))
    return iop, int(ds.get("Rows", 0)), int(ds.get("Columns", 0)), spacing


def _slice_indices(folder: DicomFolder, paths: list[Path], z: np.ndarray
                   ) -> tuple[np.ndarray, int, float, list[str]]:
    """Canonical slice index of each (sorted) slice, the number of slices and dz.

    Raises:
        DicomIngestError: duplicate positions or spacing that is not a whole multiple of
            the nominal (median) spacing.
    """
    if len(z) < 2:
        raise DicomIngestError(f"a CT series needs at least 2 slices, found {len(z)}",
                               folder.rel(paths[0]))
    gaps = np.diff(z)
    if np.any(gaps <= 1e-3):
        k = int(np.argmax(gaps <= 1e-3))
        raise DicomIngestError(f"two CT slices at the same position z={z[k]:.3f} mm "
                               f"(also {folder.rel(paths[k])})", folder.rel(paths[k + 1]))
    dz = float(np.median(gaps))
    steps = np.rint(gaps / dz)
    deviation = np.abs(gaps - steps * dz)
    if np.any(deviation > SPACING_TOLERANCE * dz):
        bad = np.flatnonzero(deviation > SPACING_TOLERANCE * dz)
        listed = ", ".join(f"{gaps[k]:.3f} mm after z={z[k]:.2f}" for k in bad[:5])
        raise DicomIngestError(
            f"uneven CT slice spacing: nominal {dz:.3f} mm but {len(bad)} gaps are not whole "
            f"multiples of it ({listed})", folder.rel(paths[int(bad[0]) + 1]))
    index = np.concatenate([[0], np.cumsum(steps)]).astype(int)
    warnings = []
    n_missing = int(index[-1] + 1 - len(z))
    if n_missing:
        holes = [f"z={z[k] + dz:.2f}" for k in np.flatnonzero(steps > 1)[:5]]
        warnings.append(f"{n_missing} missing CT slice(s) (gap starting at "
                        f"{', '.join(holes)} mm), filled by linear interpolation")
    return index, int(index[-1] + 1), dz, warnings


def read_ct_volume(folder: DicomFolder, series: CTSeries) -> np.ndarray:
    """(Z, Y, X) int16 HU on the canonical grid; missing slices linearly interpolated."""
    volume = np.empty(series.grid.shape, dtype=np.float32)
    for k, path in series.files.items():
        ds = read_full(folder, path)
        label = folder.rel(path)
        pixels = pixel_array(ds, label)
        if pixels.shape != series.grid.shape[1:]:
            raise DicomIngestError(f"pixel data shape {pixels.shape} does not match Rows x "
                                   f"Columns {series.grid.shape[1:]}", label)
        slope = float(ds.get("RescaleSlope", 1.0) or 1.0)
        intercept = float(ds.get("RescaleIntercept", 0.0) or 0.0)
        hu = pixels.astype(np.float32) * slope + intercept
        volume[k] = hu[::-1 if series.flip_y else 1, ::-1 if series.flip_x else 1]
    _fill_missing(volume, series.missing)
    return np.clip(np.rint(volume), -32768, 32767).astype(np.int16)


def _fill_missing(volume: np.ndarray, missing: list[int]) -> None:
    """Linear interpolation along z between the nearest present slices, in place."""
    missing_set = set(missing)
    for k in missing:
        below = max(i for i in range(k) if i not in missing_set)
        above = min(i for i in range(k + 1, volume.shape[0]) if i not in missing_set)
        w = (k - below) / (above - below)
        volume[k] = (1 - w) * volume[below] + w * volume[above]
