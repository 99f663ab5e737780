"""RTDOSE -> dose in Gy on the canonical CT grid (SimpleITK, linear), per-beam doses summed.

Which RTDOSEs make the plan dose (of the chosen RTPLAN's, when the folder has one):

* one PLAN (or MULTI_PLAN) dose: that one; per-beam doses beside it are ignored, said;
* several PLAN doses of one plan: refused, naming them (which one is the plan's is not
  knowable from the files: a re-calculation, another algorithm...);
* per-beam doses (BEAM) only: summed, said; refused when two are of one beam
  (ReferencedBeamNumber) or when they are not one per treatment beam of the RTPLAN;
* per-fraction doses (FRACTION): summed and multiplied by the number of fractions.

GridFrameOffsetVector is read in both forms the standard allows: *relative* (first element
0, offsets along the slice normal from ImagePositionPatient) and *absolute* (first element
equal to the z of ImagePositionPatient, values are patient z positions).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import SimpleITK as sitk
from pydicom.dataset import Dataset

from vmatdose.data.ingest.dicom_ct import CanonicalGrid
from vmatdose.data.ingest.dicom_files import (
    DicomFolder,
    DicomIngestError,
    pixel_array,
    read_full,
    require,
)

_PLAN_TYPES = ("PLAN", "MULTI_PLAN")
_SUMMED_TYPES = ("BEAM", "FRACTION")


@dataclass
class DoseOnGrid:
    """Reference dose resampled on the CT grid.

    Attributes:
        dose: (Z, Y, X) float32 Gy, 0 outside the dose grid.
        covered: (Z, Y, X) bool, voxels inside the dose grid.
        sop_instance_uids: the RTDOSE files used.
        summation: how they were combined (``PLAN``, ``BEAM`` sum, ...).
    """

    dose: np.ndarray
    covered: np.ndarray
    sop_instance_uids: list[str]
    summation: str
    warnings: list[str] = field(default_factory=list)


def referenced_plan(ds: Dataset) -> str:
    """SOPInstanceUID of the RTPLAN an RTDOSE (or RTSTRUCT user) refers to, or ``""``."""
    refs = ds.get("ReferencedRTPlanSequence") or []
    return str(refs[0].get("ReferencedSOPInstanceUID", "")) if refs else ""


def referenced_beam(ds: Dataset) -> int | None:
    """ReferencedBeamNumber a per-beam RTDOSE names (ReferencedRTPlanSequence >
    ReferencedFractionGroupSequence > ReferencedBeamSequence), or ``None``."""
    for plan in ds.get("ReferencedRTPlanSequence") or []:
        for group in plan.get("ReferencedFractionGroupSequence") or []:
            for beam in group.get("ReferencedBeamSequence") or []:
                if beam.get("ReferencedBeamNumber") is not None:
                    return int(beam.ReferencedBeamNumber)
    return None


def select_dose_files(folder: DicomFolder, frame_uid: str, plan_uid: str | None,
                      plan_beams: list[int | None] | None = None
                      ) -> tuple[list[tuple[Path, Dataset]], str, list[str]]:
    """The RTDOSE files making the plan dose, and how to combine them (module docstring).

    Args:
        plan_beams: the beam numbers (``None``: unknown) of the treatment beams of the
            RTPLAN ``plan_uid``, when known: per-beam doses of that plan must be one per
            beam.

    Returns:
        ``(files, summation, warnings)``; ``files`` is empty when the folder has no RTDOSE.

    Raises:
        DicomIngestError: RTDOSEs only on another frame of reference, of several plans, or
            of an unsupported DoseSummationType.
    """
    all_doses = folder.of("RTDOSE")
    on_frame = [str(ds.get("FrameOfReferenceUID", "")) == frame_uid for _, ds in all_doses]
    doses = [entry for entry, ok in zip(all_doses, on_frame) if ok]
    warnings = []
    if len(doses) < len(all_doses):
        others = [folder.rel(p) for (p, _), ok in zip(all_doses, on_frame) if not ok]
        if not doses:
            raise DicomIngestError("every RTDOSE is on another frame of reference than the CT "
                                   "(FrameOfReferenceUID differs)", others[0])
        warnings.append(f"ignored RTDOSE on another frame of reference: {', '.join(others)}")
    of_plan = bool(plan_uid) and any(referenced_plan(ds) == plan_uid for _, ds in doses)
    if of_plan:
        doses = [(p, ds) for p, ds in doses if referenced_plan(ds) == plan_uid]
    plans = {referenced_plan(ds) for _, ds in doses}
    if len(plans) > 1:
        raise DicomIngestError(f"RTDOSEs of {len(plans)} different plans in the patient folder; "
                               "keep the dose of one plan per folder")
    files, summation, more = _combine(folder, doses, plan_beams if of_plan else None)
    return files, summation, warnings + more


def _summation(ds: Dataset) -> str:
    return str(ds.get("DoseSummationType", "PLAN")).upper()


def _combine(folder: DicomFolder, doses: list, plan_beams: list[int | None] | None
             ) -> tuple[list, str, list[str]]:
    """``(files, summation, warnings)`` of one plan's RTDOSEs (module docstring)."""
    if not doses:
        return [], "PLAN", []
    plan_doses = [(p, ds) for p, ds in doses if _summation(ds) in _PLAN_TYPES]
    if plan_doses:
        if len(plan_doses) > 1:
            names = ", ".join(folder.rel(p) for p, _ in plan_doses)
            raise DicomIngestError(f"several plan-summed RTDOSEs for one plan ({names}): "
                                   "which is the plan's dose is not known; keep one per "
                                   "folder")
        others = len(doses) - 1
        return plan_doses, "PLAN", ([f"used the plan dose {folder.rel(plan_doses[0][0])}; "
                                     f"ignored {others} per-beam/fraction RTDOSE(s) beside it"]
                                    if others else [])
    kinds = {_summation(ds) for _, ds in doses}
    if kinds - set(_SUMMED_TYPES) or len(kinds) > 1:
        raise DicomIngestError(f"cannot combine RTDOSE DoseSummationType {sorted(kinds)} "
                               f"(supported: one PLAN dose, or BEAM / FRACTION doses to sum)",
                               folder.rel(doses[0][0]))
    kind = kinds.pop()
    if kind != "BEAM":
        return doses, kind, []
    return doses, kind, [_check_beam_doses(folder, doses, plan_beams)]


def _check_beam_doses(folder: DicomFolder, doses: list,
                      plan_beams: list[int | None] | None) -> str:
    """The warning for summed per-beam doses, after checking they are one per beam.

    Raises:
        DicomIngestError: two doses of one beam, or not one per treatment beam of the plan.
    """
    numbers = [referenced_beam(ds) for _, ds in doses]
    seen: dict[int, Path] = {}
    for (path, _), number in zip(doses, numbers):
        if number is not None and number in seen:
            raise DicomIngestError(f"two per-beam RTDOSEs of beam {number} (also "
                                   f"{folder.rel(seen[number])})", folder.rel(path))
        if number is not None:
            seen[number] = path
    if plan_beams is not None:
        named = None not in numbers and None not in plan_beams
        if len(doses) != len(plan_beams) or (named and sorted(seen) != sorted(plan_beams)):
            got = f"beams {sorted(seen)}" if named else f"{len(doses)} beams"
            wanted = (f"treatment beams {sorted(plan_beams)}" if named
                      else f"{len(plan_beams)} treatment beams")
            raise DicomIngestError(f"per-beam RTDOSEs of {got} but the RTPLAN has {wanted}: "
                                   "their sum would not be the plan dose",
                                   folder.rel(doses[0][0]))
    checked = ("one per treatment beam of the RTPLAN" if plan_beams is not None
               else "no RTPLAN of theirs to check that every beam has one")
    return (f"no plan-summed RTDOSE: summed {len(doses)} per-beam RTDOSEs (DoseSummationType "
            f"BEAM; {checked})")


def read_dose_image(folder: DicomFolder, path: Path) -> tuple[sitk.Image, list[str]]:
    """One RTDOSE file -> SimpleITK image in Gy with its patient geometry."""
    ds = read_full(folder, path)
    label = folder.rel(path)
    units = str(ds.get("DoseUnits", "GY")).upper()
    if units != "GY":
        raise DicomIngestError(f"DoseUnits {units!r}: only absolute dose (GY) can be used", label)
    frames = pixel_array(ds, label).astype(np.float32)
    if frames.ndim == 2:
        frames = frames[None]
    frames *= float(ds.get("DoseGridScaling", 1.0) or 1.0)
    iop = np.asarray([float(v) for v in require(ds, "ImageOrientationPatient", label)])
    row, col = iop[:3] / np.linalg.norm(iop[:3]), iop[3:] / np.linalg.norm(iop[3:])
    normal = np.cross(row, col)
    ipp = np.asarray([float(v) for v in require(ds, "ImagePositionPatient", label)])
    offsets, warnings = frame_offsets(ds, ipp, normal, len(frames), label)
    order = np.argsort(offsets)
    frames, offsets = frames[order], offsets[order]
    dz = _uniform_step(offsets, ds, label)
    dy, dx = (float(v) for v in require(ds, "PixelSpacing", label))
    image = sitk.GetImageFromArray(np.ascontiguousarray(frames))
    image.SetOrigin(tuple(float(v) for v in ipp + offsets[0] * normal))
    image.SetSpacing((dx, dy, dz))
    image.SetDirection(tuple(float(v) for v in np.column_stack([row, col, normal]).ravel()))
    return image, warnings


def frame_offsets(ds: Dataset, ipp: np.ndarray, normal: np.ndarray, n_frames: int,
                  label: str) -> tuple[np.ndarray, list[str]]:
    """Offsets (mm) of the frames along the slice normal from ImagePositionPatient."""
    gfov = ds.get("GridFrameOffsetVector")
    if gfov is None or len(gfov) == 0:
        if n_frames == 1:
            return np.zeros(1), []
        raise DicomIngestError("multi-frame RTDOSE without GridFrameOffsetVector", label)
    values = np.asarray([float(v) for v in gfov], dtype=np.float64)
    if len(values) != n_frames:
        raise DicomIngestError(f"GridFrameOffsetVector has {len(values)} values for "
                               f"{n_frames} frames", label)
    if values[0] == 0.0:
        return values, []  # relative
    if abs(values[0] - ipp[2]) < 1e-3 and abs(normal[2]) > 0.999:
        return (values - ipp[2]) / normal[2], []  # absolute z positions
    return values, [f"{label}: GridFrameOffsetVector starts at {values[0]:g}, neither 0 "
                    "(relative) nor ImagePositionPatient z (absolute); read as relative"]


def _uniform_step(offsets: np.ndarray, ds: Dataset, label: str) -> float:
    if len(offsets) == 1:
        return float(ds.get("SliceThickness", 1.0) or 1.0)
    steps = np.diff(offsets)
    if steps.min() <= 0 or np.ptp(steps) > 1e-3 * max(1.0, float(steps.mean())):
        raise DicomIngestError(f"RTDOSE frames are not evenly spaced (steps "
                               f"{np.unique(steps.round(3)).tolist()} mm)", label)
    return float(steps.mean())


def resample_to_grid(image: sitk.Image, grid: CanonicalGrid) -> tuple[np.ndarray, np.ndarray]:
    """Linear resampling onto the canonical grid (only over the part the dose grid covers).

    Returns:
        ``(dose, covered)``: (Z, Y, X) float32 Gy (0 outside) and bool coverage.
    """
    dose = np.zeros(grid.shape, dtype=np.float32)
    axes = _covered_axes(image, grid)
    if axes is None:  # dose grid not axis-aligned: resample everything, coverage by ITK
        dose[...] = _resample(image, grid.shape, grid.spacing_mm, grid.origin_mm)
        return dose, _covered_by_itk(image, grid)
    covered = axes[0][:, None, None] & axes[1][None, :, None] & axes[2][None, None, :]
    if not all(a.any() for a in axes):
        return dose, covered
    box = tuple(slice(int(np.argmax(a)), int(len(a) - np.argmax(a[::-1]))) for a in axes)
    shape = tuple(b.stop - b.start for b in box)
    origin = tuple(o + b.start * s for o, b, s in zip(grid.origin_mm, box, grid.spacing_mm))
    dose[box] = _resample(image, shape, grid.spacing_mm, origin)
    return dose, covered


def _resample(image: sitk.Image, shape, spacing_zyx, origin_zyx) -> np.ndarray:
    """SimpleITK linear resampling onto an identity-direction grid, (Z, Y, X) float32 >= 0."""
    reference = sitk.Image([int(n) for n in shape[::-1]], sitk.sitkUInt8)
    reference.SetSpacing(tuple(float(v) for v in spacing_zyx[::-1]))
    reference.SetOrigin(tuple(float(v) for v in origin_zyx[::-1]))
    out = sitk.Resample(image, reference, sitk.Transform(), sitk.sitkLinear, 0.0,
                        sitk.sitkFloat32)
    return np.maximum(sitk.GetArrayFromImage(out), 0.0)


def _covered_axes(image: sitk.Image, grid: CanonicalGrid) -> list[np.ndarray] | None:
    """Per canonical axis (z, y, x), which grid positions fall inside the dose grid, or
    ``None`` when the dose grid is not aligned with the patient axes.

    Inside means a continuous dose index in ``[-0.5, N - 0.5)``, ITK's buffer test.
    """
    direction = np.asarray(image.GetDirection()).reshape(3, 3)
    if not np.allclose(np.abs(direction), np.eye(3), atol=1e-6):
        return None
    axes = []
    for dim in (2, 1, 0):  # ITK x, y, z -> canonical z, y, x order of the output list
        k = 2 - dim
        positions = grid.origin_mm[k] + np.arange(grid.shape[k]) * grid.spacing_mm[k]
        index = ((positions - image.GetOrigin()[dim])
                 / (image.GetSpacing()[dim] * direction[dim, dim]))
        size = image.GetSize()[dim]
        axes.append((index >= -0.5) & (index < size - 0.5))
    return axes


def _covered_by_itk(image: sitk.Image, grid: CanonicalGrid) -> np.ndarray:
    ones = sitk.Image(image.GetSize(), sitk.sitkUInt8) + 1
    ones.CopyInformation(image)
    reference = sitk.Image([int(n) for n in grid.shape[::-1]], sitk.sitkUInt8)
    reference.SetSpacing(tuple(float(v) for v in grid.spacing_mm[::-1]))
    reference.SetOrigin(tuple(float(v) for v in grid.origin_mm[::-1]))
    covered = sitk.Resample(ones, reference, sitk.Transform(), sitk.sitkNearestNeighbor, 0)
    return sitk.GetArrayFromImage(covered).astype(bool)


def _sum_same_geometry(images: list[sitk.Image]) -> list[sitk.Image]:
    """Add images that share one grid (per-beam doses usually do): one resampling each."""
    groups: dict[tuple, sitk.Image] = {}
    for image in images:
        key = tuple(np.round(np.concatenate([image.GetOrigin(), image.GetSpacing(),
                                             image.GetDirection()]), 4)) + image.GetSize()
        groups[key] = groups[key] + image if key in groups else image
    return list(groups.values())


def dose_on_grid(folder: DicomFolder, grid: CanonicalGrid, files: list[tuple[Path, Dataset]],
                 summation: str, fractions: int | None) -> DoseOnGrid:
    """Read, resample and combine the selected RTDOSE files.

    BEAM doses are summed; FRACTION doses are summed and multiplied by ``fractions``.
    """
    images, warnings = [], []
    for path, _ in files:
        image, notes = read_dose_image(folder, path)
        images.append(image)
        warnings += notes
    total = np.zeros(grid.shape, dtype=np.float32)
    covered = np.ones(grid.shape, dtype=bool)
    for image in _sum_same_geometry(images):
        dose, inside = resample_to_grid(image, grid)
        total += dose
        covered &= inside
    if summation == "FRACTION":
        if not fractions:
            raise DicomIngestError("per-fraction RTDOSE but no number of fractions (RTPLAN or "
                                   "config)", folder.rel(files[0][0]))
        total *= fractions
    uids = [str(ds.get("SOPInstanceUID", "")) for _, ds in files]
    return DoseOnGrid(total, covered, uids, summation, warnings)
