"""RTSTRUCT -> ROIs matched to the CT by FrameOfReferenceUID, rasterised on the CT grid.

Contour points (patient mm) are converted to continuous indices of the canonical CT grid;
each contour goes to the nearest CT slice, and all CLOSED_PLANAR contours of a ROI on one
slice are filled together: voxel centres inside by the even-odd rule (holes, several
polygons) or on a contour (see :mod:`~vmatdose.data.ingest.rasterize` for why).
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from pydicom.dataset import Dataset
from pydicom.tag import Tag

from vmatdose.data.ingest.dicom_ct import CanonicalGrid
from vmatdose.data.ingest.dicom_files import DicomFolder, DicomIngestError
from vmatdose.data.ingest.rasterize import rasterize_polygons

_CONTOUR_DATA = Tag(0x3006, 0x0050)
#: A contour further than this (in slices) from a CT slice is reported.
OFF_SLICE_TOLERANCE = 0.25


@dataclass
class StructureSet:
    """One RTSTRUCT: its ROIs and the frames of reference / CT series it refers to.

    Attributes:
        label: file name relative to the patient folder.
        roi_names: ROI number -> name.
        roi_frames: ROI number -> FrameOfReferenceUID of the ROI.
        frames: every FrameOfReferenceUID the structure set refers to.
        series: CT SeriesInstanceUIDs it refers to: named in RTReferencedSeriesSequence or,
            when the folder holds several CT series, holding an image a
            ContourImageSequence names.
    """

    path: Path
    label: str
    ds: Dataset
    roi_names: dict[int, str] = field(default_factory=dict)
    roi_frames: dict[int, str] = field(default_factory=dict)
    frames: set[str] = field(default_factory=set)
    series: set[str] = field(default_factory=set)

    @property
    def sop_instance_uid(self) -> str:
        return str(self.ds.get("SOPInstanceUID", ""))


def read_structure_sets(folder: DicomFolder) -> list[StructureSet]:
    """Every RTSTRUCT of the folder, with its ROI table."""
    series_of_image = {str(ds.get("SOPInstanceUID", "")): str(ds.get("SeriesInstanceUID", ""))
                       for _, ds in folder.of("CT")}
    several_series = len(set(series_of_image.values())) > 1
    sets = []
    for path, ds in folder.of("RTSTRUCT"):
        ss = StructureSet(path, folder.rel(path), ds)
        for ref in ds.get("ReferencedFrameOfReferenceSequence", []):
            ss.frames.add(str(ref.get("FrameOfReferenceUID", "")))
            for study in ref.get("RTReferencedStudySequence", []):
                for series in study.get("RTReferencedSeriesSequence", []):
                    ss.series.add(str(series.get("SeriesInstanceUID", "")))
        for roi in ds.get("StructureSetROISequence", []):
            number = int(roi.ROINumber)
            ss.roi_names[number] = str(roi.get("ROIName", f"ROI{number}")).strip()
            ss.roi_frames[number] = str(roi.get("ReferencedFrameOfReferenceUID", ""))
        ss.frames.update(f for f in ss.roi_frames.values() if f)
        if several_series:
            ss.series.update(series_of_image[uid] for uid in _contour_images(ds)
                             if uid in series_of_image)
        sets.append(ss)
    return sets


def _contour_images(ds: Dataset) -> set[str]:
    """SOPInstanceUIDs of the images an RTSTRUCT's ContourImageSequences name (in its
    referenced series and on its contours)."""
    found: set[str] = set()
    for ref in ds.get("ReferencedFrameOfReferenceSequence", []):
        for study in ref.get("RTReferencedStudySequence", []):
            for series in study.get("RTReferencedSeriesSequence", []):
                found.update(str(image.get("ReferencedSOPInstanceUID", ""))
                             for image in series.get("ContourImageSequence", []))
    for roi in ds.get("ROIContourSequence", []):
        for contour in roi.get("ContourSequence", []):
            found.update(str(image.get("ReferencedSOPInstanceUID", ""))
                         for image in contour.get("ContourImageSequence", []))
    return found


def select_structure_set(sets: list[StructureSet], frame_uid: str,
                         series_uid: str) -> tuple[StructureSet, list[str]]:
    """The RTSTRUCT on the CT's frame of reference (preferring one naming the CT series).

    Raises:
        DicomIngestError: no RTSTRUCT, or none on the CT's frame of reference.
    """
    if not sets:
        raise DicomIngestError("no RTSTRUCT in the patient folder: cannot make the masks")
    matching = [ss for ss in sets if frame_uid in ss.frames]
    if not matching:  # UIDs are not quoted: they must not leave ingest
        other = ", ".join(ss.label for ss in sets)
        raise DicomIngestError(f"no RTSTRUCT on the CT's frame of reference (FrameOfReferenceUID "
                               f"differs; RTSTRUCTs: {other})", sets[0].label)
    warnings = []
    if len(matching) > 1:
        preferred = [ss for ss in matching if series_uid in ss.series] or matching
        chosen = max(preferred, key=lambda ss: (str(ss.ds.get("StructureSetDate", "")),
                                                str(ss.ds.get("StructureSetTime", ""))))
        warnings.append(f"{len(matching)} RTSTRUCTs on the CT's frame of reference; "
                        f"used the latest, {chosen.label}")
        return chosen, warnings
    return matching[0], warnings


def roi_contours(ss: StructureSet, roi_number: int) -> list[np.ndarray]:
    """(N, 3) arrays of patient points ``(x, y, z)`` mm of the CLOSED_PLANAR contours
    (N >= 1: exported masks one voxel wide give contours of one or two points)."""
    contours = []
    for item in ss.ds.get("ROIContourSequence", []):
        if int(item.get("ReferencedROINumber", -1)) != roi_number:
            continue
        for contour in item.get("ContourSequence", []):
            if str(contour.get("ContourGeometricType", "CLOSED_PLANAR")) != "CLOSED_PLANAR":
                continue
            points = _contour_points(contour)
            if points.size >= 3:  # one or two points: a dot or a line of voxels
                contours.append(points.reshape(-1, 3))
    return contours


def _contour_points(contour: Dataset) -> np.ndarray:
    """ContourData as a flat float array, parsing the raw bytes when still unparsed.

    Converting to pydicom's ``DSfloat`` objects one by one is the slow part of reading a
    large RTSTRUCT; the raw backslash-separated text parses ~10x faster in numpy.
    """
    element = contour.get_item(_CONTOUR_DATA)
    if element is None:
        return np.zeros(0)
    raw = element.value
    if isinstance(raw, bytes | bytearray):
        text = bytes(raw).rstrip(b"\x00 ").decode("ascii")
        return np.array(text.split("\\"), dtype=np.float64) if text else np.zeros(0)
    return np.asarray(contour.ContourData, dtype=np.float64)


def rasterize_roi(contours: list[np.ndarray], grid: CanonicalGrid, name: str,
                  target: CanonicalGrid | None = None, missing: Sequence[int] = ()
                  ) -> tuple[np.ndarray, list[str]]:
    """Fill of a ROI's contours (boundary included, even-odd holes) on ``target`` (default:
    the CT's canonical ``grid``).

    Each contour belongs to its nearest CT slice of ``grid``. On another ``target`` grid
    (the training grid, :mod:`~vmatdose.data.ingest.training_grid`) the polygons are
    filled in-plane at the target's own pixels (exact, no mask resampling) and each target
    slice takes the fill of its nearest CT slice; a ``missing`` CT slice takes its nearest
    present neighbour's (as :func:`~vmatdose.data.ingest.dicom.fill_missing_slices`).

    Returns:
        ``(mask, warnings)``: (Z, Y, X) bool mask on ``target`` and messages about
        contours off the CT slices, outside the grid or not transverse.
    """
    by_slice, warnings = _contours_by_slice(contours, grid, name)
    target = target or grid
    mask = np.zeros(target.shape, dtype=bool)
    if target is grid:
        for k, polygons in by_slice.items():
            mask[k] = _fill(polygons, grid)
        return mask, warnings
    source = _source_slices(grid.shape[0], missing)
    z_target = target.origin_mm[0] + np.arange(target.shape[0]) * target.spacing_mm[0]
    nearest = np.rint((z_target - grid.origin_mm[0]) / grid.spacing_mm[0]).astype(int)
    planes: dict[int, np.ndarray] = {}
    for t, k in enumerate(nearest):
        k = int(source[k]) if 0 <= k < grid.shape[0] else -1
        if k in by_slice:
            if k not in planes:
                planes[k] = _fill(by_slice[k], target)
            mask[t] = planes[k]
    return mask, warnings


def _fill(polygons: list[np.ndarray], grid: CanonicalGrid) -> np.ndarray:
    """(Y, X) bool fill of (N, 3) patient-point polygons on ``grid``'s pixels."""
    return rasterize_polygons([grid.continuous_index(p)[:, [2, 1]] for p in polygons],
                              grid.shape[1:])


def _source_slices(n_slices: int, missing: Sequence[int]) -> np.ndarray:
    """CT slice -> the slice whose contours it shows: itself, or for a missing slice
    between present ones the nearest present slice (the lower one on a tie)."""
    absent = set(missing)
    present = np.array([k for k in range(n_slices) if k not in absent])
    source = np.arange(n_slices)
    for k in absent:
        below, above = present[present < k], present[present > k]
        if below.size and above.size:
            source[k] = below[-1] if k - below[-1] <= above[0] - k else above[0]
    return source


def _contours_by_slice(contours: list[np.ndarray], grid: CanonicalGrid, name: str
                       ) -> tuple[dict[int, list[np.ndarray]], list[str]]:
    """CT slice index -> the (N, 3) patient-point polygons on it, and warnings."""
    by_slice: dict[int, list[np.ndarray]] = defaultdict(list)
    off_slice = outside = oblique = 0
    for points in contours:
        index = grid.continuous_index(points)  # (N, 3) as (z, y, x)
        if np.ptp(index[:, 0]) > 0.5:
            oblique += 1
            continue
        z = float(np.mean(index[:, 0]))
        k = int(np.rint(z))
        if not 0 <= k < grid.shape[0]:
            outside += 1
            continue
        off_slice += abs(z - k) > OFF_SLICE_TOLERANCE
        by_slice[k].append(points)
    warnings = []
    for count, what in ((off_slice, "between CT slices (put on the nearest)"),
                        (outside, "outside the CT's slice range (dropped)"),
                        (oblique, "not transverse (dropped)")):
        if count:
            warnings.append(f"{name}: {count} contour(s) {what}")
    return by_slice, warnings
