"""An OpenKBP case written as a clinic's DICOM-RT export, for route-invariance checks.

    grid = clinical_grid(case, inplane_mm=1.2)
    written = write_case_as_dicom(case, tmp_path / "pt", grid)

The case's anatomy and dose on another, clinical-like grid (default 1.2 mm in-plane, the
case's own slices): the CT resampled linearly (HU, even integers: the builders store
them through RescaleSlope 2), an RTSTRUCT drawn by rt-utils from the masks resampled
linearly and cut at 0.5, an External contour (the CT above -500 HU, the largest region,
holes filled: what a planning system draws) or the case's possible-dose mask, an RTDOSE
on a 2.5 mm grid, and an RTPLAN with the case's beams (``meta["beams"]``: OpenKBP's nine
fields at the targets' centroid) and its prescriptions. Patient coordinates are the
case's (an OpenKBP case is centred on its grid), so points map one to one.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
from pydicom.dataset import Dataset
from pydicom.sequence import Sequence
from pydicom.tag import Tag
from pydicom.uid import RTDoseStorage, RTPlanStorage, generate_uid

from vmatdose.data.beams import BeamArrangement
from vmatdose.data.case import Case
from vmatdose.data.ingest.dicom import body_from_ct
from vmatdose.data.resample import Grid, resample_volume

from dicom_builders import (
    ORIENTATIONS,
    GridSpec,
    PatientSpec,
    _ds,
    _file_dataset,
    _first_voxel_xyz,
    _native,
    _set_image,
    write_ct,
    write_rt_utils_rtstruct,
    write_rtplan,
)

EXTERNAL_THRESHOLD_HU = -500.0


@dataclass
class WrittenCase:
    """The clinical grid and the volumes written on it (canonical (Z, Y, X))."""

    grid: GridSpec
    ct: np.ndarray
    masks: dict[str, np.ndarray]
    body: np.ndarray
    dose_grid: GridSpec


def clinical_grid(case: Case, inplane_mm: float = 1.2, slice_mm: float | None = None
                  ) -> GridSpec:
    """A grid over the same patient extent (voxel edges) as ``case``, at ``inplane_mm``
    in-plane and ``slice_mm`` (default: the case's) between slices."""
    spacing = np.array([slice_mm or case.spacing_mm[0], inplane_mm, inplane_mm], float)
    low = np.asarray(case.origin_mm) - np.asarray(case.spacing_mm) / 2
    extent = np.asarray(case.shape) * np.asarray(case.spacing_mm)
    shape = np.maximum(1, np.floor(extent / spacing)).astype(int)
    origin = low + (extent - shape * spacing) / 2 + spacing / 2
    return GridSpec(tuple(int(n) for n in shape), tuple(spacing), tuple(origin))


def resample(volume: np.ndarray, origin_mm, spacing_mm, grid: GridSpec) -> np.ndarray:
    """``volume`` (Z, Y, X on ``origin_mm``/``spacing_mm``) sampled linearly at ``grid``'s
    voxel centres (clamped at the outermost source voxel centres)."""
    source = Grid(tuple(volume.shape), tuple(spacing_mm), tuple(origin_mm))
    return resample_volume(volume, source, Grid(grid.shape, grid.spacing, grid.origin))


def dose_grid_over(grid: GridSpec, spacing_mm: float = 2.5) -> GridSpec:
    """A ``spacing_mm`` grid covering all of ``grid``'s voxel centres, its first voxel a
    third of a voxel before the first CT voxel (the two grids never line up)."""
    extent = (np.asarray(grid.shape) - 1) * np.asarray(grid.spacing)
    shape = np.ceil(extent / spacing_mm + 1 / 3).astype(int) + 1
    origin = np.asarray(grid.origin) - spacing_mm / 3
    return GridSpec(tuple(int(n) for n in shape), (spacing_mm,) * 3, tuple(origin))


def write_case_as_dicom(case: Case, folder: str | Path, grid: GridSpec,
                        body: str = "external", dose_spacing_mm: float = 2.5
                        ) -> WrittenCase:
    """Write ``case`` as a HFS DICOM-RT patient folder on ``grid`` (module docstring).

    Args:
        body: ``external`` (contour of the CT's outline) or ``possible_dose`` (the case's
            ``body``, OpenKBP's possible-dose mask, as the External contour).
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    origin, spacing = case.origin_mm, case.spacing_mm
    hu = resample(case.ct.astype(np.float32) + 1024.0, origin, spacing, grid) - 1024.0
    ct = (2 * np.round(hu / 2)).clip(-1024, 3070).astype(np.int16)
    masks = {name: resample(case.masks[i], origin, spacing, grid) >= 0.5
             for i, name in enumerate(case.structures)}
    if body == "external":
        outline = body_from_ct(ct, EXTERNAL_THRESHOLD_HU)
    elif body == "possible_dose":
        outline = resample(case.body, origin, spacing, grid) >= 0.5
    else:
        raise ValueError(f"body must be 'external' or 'possible_dose', not {body!r}")
    uids = {"study": generate_uid(), "frame": generate_uid(), "ct_series": generate_uid(),
            "plan": generate_uid()}
    scene = {name: (name, [], (0.0, 1.0)) for name in [*masks, "External"]}
    spec = PatientSpec(orientation="HFS", scene=scene, ct=grid,
                       structures=tuple(scene), plan_prescriptions=dict(case.prescriptions_gy),
                       fractions=int(case.meta.get("fractions") or 35),
                       beams=_plan_beams(case))
    write_ct(folder, spec, ct, uids)
    write_rt_utils_rtstruct(folder, {**masks, "External": outline}, "HFS",
                            approximate_contours=False)
    dose_grid = dose_grid_over(grid, dose_spacing_mm)
    if case.dose is not None:
        _write_rtdose(folder, resample(case.dose, origin, spacing, dose_grid), dose_grid,
                      uids)
    write_rtplan(folder, spec, uids)
    return WrittenCase(grid, ct, masks, outline, dose_grid)


def _plan_beams(case: Case) -> tuple[dict, ...]:
    """RTPLAN beams of the case's arrangement (static fields; isocentre in DICOM x, y, z)."""
    arrangement = BeamArrangement.from_meta(case.meta["beams"])
    iso_zyx = np.asarray(arrangement.isocentre_mm, float)
    return tuple({"gantry_deg": [float(g)], "couch_deg": float(c),
                  "isocentre_xyz": tuple(iso_zyx[::-1]), "energy_mv": arrangement.energy_mv}
                 for g, c in zip(arrangement.gantry_deg, arrangement.couch_deg))


def _write_rtdose(folder: Path, dose: np.ndarray, grid: GridSpec, uids: dict) -> Path:
    """One PLAN RTDOSE (Gy, uint32 through DoseGridScaling) of ``dose`` on ``grid``, HFS."""
    native, flips = _native(dose, "HFS")
    ds = _file_dataset(RTDoseStorage, "RTDOSE", uids)
    scaling = float(_ds(max(float(native.max()), 1e-3) / 60000.0))
    _set_image(ds, np.rint(np.clip(native, 0, None) / scaling).astype("<u4"), bits=32)
    ds.ImagePositionPatient = [_ds(v) for v in _first_voxel_xyz(grid, flips)]
    ds.ImageOrientationPatient = list(ORIENTATIONS["HFS"])
    ds.PixelSpacing = [_ds(grid.spacing[1]), _ds(grid.spacing[2])]
    ds.NumberOfFrames = grid.shape[0]
    ds.FrameIncrementPointer = Tag(0x3004, 0x000C)
    ds.GridFrameOffsetVector = [_ds(v) for v in np.arange(grid.shape[0]) * grid.spacing[0]]
    ds.DoseGridScaling = _ds(scaling)
    ds.DoseUnits, ds.DoseType, ds.DoseSummationType = "GY", "PHYSICAL", "PLAN"
    plan_ref = Dataset()
    plan_ref.ReferencedSOPClassUID = RTPlanStorage
    plan_ref.ReferencedSOPInstanceUID = uids["plan"]
    ds.ReferencedRTPlanSequence = Sequence([plan_ref])
    path = folder / "RD_plan.dcm"
    ds.save_as(path, enforce_file_format=True)
    return path
