"""A CT series -> the canonical grid and the HU volume.

Slices are sorted by their position along the slice normal (row x column cosine) and
placed on a regular canonical grid (z superior, y posterior, x patient left); head-first
and feet-first, supine and prone series (ImageOrientationPatient rows along +-x, columns
along +-y) all come out in the same canonical orientation. Gaps that are whole multiples of
the nominal spacing are *missing slices*: they are filled by linear interpolation between
their neighbours and reported. A spacing that varies otherwise within the series (finer
slices through the target, say) is *resampled*: the grid takes a uniform spacing (the
smallest gap, at least half the median, fitted to the scanned length), the CT is
interpolated linearly between the stored slices and each grid slice takes the contours of
the nearest stored slice; one warning says so.

When a folder holds several CT series, the one the RTSTRUCT references is used
(RTReferencedSeriesSequence, else the series of the images its ContourImageSequence names,
else the only series on its frame of reference), and a warning says so.
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
        stored_z_mm: ``None`` when every stored slice lies on the grid; for a series of
            varying spacing resampled onto the grid, (S,) z mm of the stored slices, and
            ``files`` maps stored slice index ``0..S-1`` (sorted by z) -> file.
    """

    grid: CanonicalGrid
    files: dict[int, Path]
    missing: list[int]
    flip_x: bool
    flip_y: bool
    uids: dict[str, object] = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)
    stored_z_mm: np.ndarray | None = None

    @property
    def resampled(self) -> bool:
        """Whether the grid resamples stored slices of varying spacing."""
        return self.stored_z_mm is not None

    def nearest_stored_slice(self) -> np.ndarray:
        """(Z,) index of the stored slice nearest each grid slice (resampled series)."""
        z = self.grid.origin_mm[0] + self.grid.spacing_mm[0] * np.arange(self.grid.shape[0])
        return np.abs(z[:, None] - self.stored_z_mm[None, :]).argmin(1)

    def stored_slice_grid(self) -> CanonicalGrid:
        """The grid of the stored slices in slice-index units along z (resampled series):
        a point of z mm lies at ``stored_slice_index(z)`` on it."""
        n = len(self.stored_z_mm)
        return CanonicalGrid((n, *self.grid.shape[1:]), (1.0, *self.grid.spacing_mm[1:]),
                             (0.0, *self.grid.origin_mm[1:]))

    def stored_slice_index(self, z_mm: np.ndarray) -> np.ndarray:
        """Continuous stored-slice index of patient z positions (linear between slices,
        extrapolated with the end gaps beyond them)."""
        z = self.stored_z_mm
        index = np.interp(z_mm, z, np.arange(len(z), dtype=np.float64))
        below, above = z_mm < z[0], z_mm > z[-1]
        index[below] = (z_mm[below] - z[0]) / (z[1] - z[0])
        index[above] = len(z) - 1 + (z_mm[above] - z[-1]) / (z[-1] - z[-2])
        return index


def select_ct_series(folder: DicomFolder, referenced_series: set[str]) -> list[tuple]:
    """The CT headers of the one series to use (the one the RTSTRUCT references if several)."""
    return choose_ct_series(folder, referenced_series)[0]


def choose_ct_series(folder: DicomFolder, referenced_series: set[str],
                     referenced_frames: set[str] = frozenset()
                     ) -> tuple[list[tuple[Path, Dataset]], list[str]]:
    """The CT headers of the one series to use, and a warning when there was a choice.

    With several series: the one the RTSTRUCT references (``referenced_series``: series
    UIDs named by it or holding the images it names), else the only one on a frame of
    reference it names (``referenced_frames``).

    Raises:
        DicomIngestError: no CT, or several series and nothing singles one out.
    """
    series: dict[str, list] = {}
    for path, ds in folder.of("CT"):
        series.setdefault(str(ds.get("SeriesInstanceUID", "")), []).append((path, ds))
    if not series:
        raise DicomIngestError(f"no CT image files in the patient folder "
                               f"({len(folder.ignored)} other files)")
    if len(series) == 1:
        return next(iter(series.values())), []
    chosen, how = [uid for uid in series if uid in referenced_series], "references"
    if not chosen:
        chosen = [uid for uid, headers in series.items()
                  if str(headers[0][1].get("FrameOfReferenceUID", "")) in referenced_frames]
        how = "is on the frame of reference of"
    if len(chosen) != 1:
        raise DicomIngestError(f"{len(series)} CT series in the patient folder and the "
                               "RTSTRUCT does not single one out; keep one series per folder")
    headers = series[chosen[0]]
    others = sum(len(h) for uid, h in series.items() if uid != chosen[0])
    example = folder.rel(min(p for p, _ in headers))
    return headers, [f"{len(series)} CT series in the patient folder: used the one the "
                     f"RTSTRUCT {how} ({len(headers)} slices, e.g. {example}); ignored "
                     f"{len(series) - 1} other series ({others} files)"]


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
    paths = [headers[i][0] for i in order]
    _check_distinct(folder, paths, z)
    stored_z = None
    if _regular(z):
        index, n_slices, dz, warnings = _slice_indices(z)
    else:
        index, n_slices, dz, warnings = _resampled_slices(z)
        stored_z = z.copy()
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
    missing = [] if stored_z is not None else sorted(set(range(n_slices)) - set(files))
    return CTSeries(grid, files, missing, bool(row[0] < 0), bool(col[1] < 0), uids, warnings,
                    stored_z)


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


def _check_distinct(folder: DicomFolder, paths: list[Path], z: np.ndarray) -> None:
    """At least two slices, no two at one position (``z`` sorted).

    Raises:
        DicomIngestError: naming the file.
    """
    if len(z) < 2:
        raise DicomIngestError(f"a CT series needs at least 2 slices, found {len(z)}",
                               folder.rel(paths[0]))
    gaps = np.diff(z)
    if np.any(gaps <= 1e-3):
        k = int(np.argmax(gaps <= 1e-3))
        raise DicomIngestError(f"two CT slices at the same position z={z[k]:.3f} mm "
                               f"(also {folder.rel(paths[k])})", folder.rel(paths[k + 1]))


def _regular(z: np.ndarray) -> bool:
    """Every gap a whole multiple of the nominal (median) spacing (missing slices allowed)."""
    gaps = np.diff(z)
    dz = float(np.median(gaps))
    return bool(np.all(np.abs(gaps - np.rint(gaps / dz) * dz) <= SPACING_TOLERANCE * dz))


def _slice_indices(z: np.ndarray) -> tuple[np.ndarray, int, float, list[str]]:
    """Canonical slice index of each (sorted, regular) slice, the number of slices and dz."""
    gaps = np.diff(z)
    dz = float(np.median(gaps))
    steps = np.rint(gaps / dz)
    index = np.concatenate([[0], np.cumsum(steps)]).astype(int)
    warnings = []
    n_missing = int(index[-1] + 1 - len(z))
    if n_missing:
        holes = [f"z={z[k] + dz:.2f}" for k in np.flatnonzero(steps > 1)[:5]]
        warnings.append(f"{n_missing} missing CT slice(s) (gap starting at "
                        f"{', '.join(holes)} mm), filled by linear interpolation")
    return index, int(index[-1] + 1), dz, warnings


def _resampled_slices(z: np.ndarray) -> tuple[np.ndarray, int, float, list[str]]:
    """The uniform grid for stored slices of varying spacing: stored slice indices
    ``0..S-1``, the number of grid slices and their spacing (the smallest gap, at least
    half the median gap, shrunk so that the scanned length is a whole number of them)."""
    gaps = np.diff(z)
    target = max(float(gaps.min()), 0.5 * float(np.median(gaps)))
    extent = float(z[-1] - z[0])
    intervals = int(np.ceil(extent / target - 1e-6))
    dz = extent / intervals
    warning = (f"CT slice spacing varies within the series ({gaps.min():.2f} to "
               f"{gaps.max():.2f} mm between {len(z)} slices): resampled to a uniform "
               f"{dz:.2f} mm ({intervals + 1} slices; CT linear, contours from the nearest "
               "stored slice)")
    return np.arange(len(z)), intervals + 1, dz, [warning]


def read_ct_volume(folder: DicomFolder, series: CTSeries) -> np.ndarray:
    """(Z, Y, X) int16 HU on the canonical grid; missing slices linearly interpolated, a
    series of varying spacing linearly resampled."""
    shape = (len(series.files), *series.grid.shape[1:]) if series.resampled \
        else series.grid.shape
    volume = np.empty(shape, dtype=np.float32)
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
    if series.resampled:
        volume = _resample_slices(volume, series)
    return np.clip(np.rint(volume), -32768, 32767).astype(np.int16)


def _resample_slices(stored: np.ndarray, series: CTSeries) -> np.ndarray:
    """(S, Y, X) stored slices -> (Z, Y, X) on the uniform grid, linear along z."""
    z = series.grid.origin_mm[0] + series.grid.spacing_mm[0] * np.arange(series.grid.shape[0])
    index = np.clip(series.stored_slice_index(z), 0, len(stored) - 1)
    below = np.minimum(np.floor(index).astype(int), len(stored) - 2)
    out = np.empty((len(z), *stored.shape[1:]), dtype=np.float32)
    for k, (i, w) in enumerate(zip(below, (index - below).astype(np.float32))):
        out[k] = (1 - w) * stored[i] + w * stored[i + 1]  # one slice at a time: memory
    return out


def _fill_missing(volume: np.ndarray, missing: list[int]) -> None:
    """Linear interpolation along z between the nearest present slices, in place."""
    missing_set = set(missing)
    for k in missing:
        below = max(i for i in range(k) if i not in missing_set)
        above = min(i for i in range(k + 1, volume.shape[0]) if i not in missing_set)
        w = (k - below) / (above - below)
        volume[k] = (1 - w) * volume[below] + w * volume[above]
