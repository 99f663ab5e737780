"""A dose on a case's grid -> a DICOM RTDOSE file a planning system or 3D Slicer can show.

    source = find_source_patient(case.case_id, "patients/", id_salt=salt)  # or None
    write_rtdose(dose_gy, case, "out/case_rtdose.dcm", source=source)

The file is written on the patient's geometry, not the case's (:func:`export_geometry`):
on the grid of the patient's own RTDOSE when the case has one
(``meta["source_grids"]["rtdose"]``: the same ImagePositionPatient, orientation,
PixelSpacing, frames and GridFrameOffsetVector), else on a ``grid_mm`` grid (2.5 mm) over
the body's bounding box in the CT's orientation (``grid_mm=None``: the case's own grid).
The dose is resampled linearly from the case grid (0 outside it).

The file carries DoseUnits GY, DoseType PHYSICAL, DoseSummationType PLAN, 32-bit unsigned
pixels with DoseGridScaling and a relative GridFrameOffsetVector. Case files keep no
patient identity and no source UIDs, so these are read **at export time from the source
DICOM** (:class:`SourcePatient`, found by recomputing the case id of each patient folder
with the salt or mapping used at ingest): PatientName, PatientID, birth date and sex, the
Study and FrameOfReference UIDs, and references to the RTPLAN, RTSTRUCT and CT series, so
a planning system attaches the dose to the right patient and plan. Without a source the
file carries the case id as PatientID and PatientName, UIDs derived from the case id
(stable between exports), and says so in its SeriesDescription.
"""

from __future__ import annotations

import functools
import logging
import os
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

import numpy as np
import pydicom
from pydicom.dataset import Dataset, FileDataset, FileMetaDataset
from pydicom.sequence import Sequence
from pydicom.tag import Tag
from pydicom.uid import (
    PYDICOM_IMPLEMENTATION_UID,
    CTImageStorage,
    ExplicitVRLittleEndian,
    RTDoseStorage,
    RTPlanStorage,
    RTStructureSetStorage,
    generate_uid,
)
from pydicom.valuerep import format_number_as_ds

from vmatdose.data.atomic import atomic_path
from vmatdose.data.case import Case
from vmatdose.data.ingest.dicom_ct import CanonicalGrid
from vmatdose.data.ingest.training_grid import body_box, itk_geometry, resample_to_geometry

log = logging.getLogger(__name__)

#: The largest dose maps to this pixel value: 31 bits keep readers that wrongly assume
#: signed pixels correct, and still resolve 5e-10 of the maximum.
MAX_PIXEL = 2**31 - 1
_HFS = (1.0, 0.0, 0.0, 0.0, 1.0, 0.0)


#: SeriesDescription of a dose exported without its source DICOM (at most 64 characters).
NO_SOURCE_DESCRIPTION = "vmatdose dose; no source DICOM: PatientID is the case id"
#: A case's recorded CT grid and its source CT grid agree to this much (mm).
GRID_TOLERANCE_MM = 1e-3
#: Spacing (mm) of an exported RTDOSE's grid for a case without an RTDOSE of its own.
DOSE_GRID_MM = 2.5


@dataclass(frozen=True)
class SourcePatient:
    """What an exported RTDOSE copies from the case's source DICOM (read at export time).

    Attributes:
        folder: the patient folder.
        patient: PatientName, PatientID, PatientBirthDate, PatientSex and the study's
            StudyDate, StudyTime, StudyID, AccessionNumber, ReferringPhysicianName.
        study_instance_uid, frame_of_reference_uid: of the CT.
        ct_series_instance_uid, ct_sop_instance_uids: the CT series and its slices.
        rtstruct_sop_instance_uid, rtplan_sop_instance_uid: ``""`` when absent.
        image_orientation_patient, patient_position: of the CT.
        grid: the CT's canonical grid (checked against the case's).
    """

    folder: Path
    patient: Mapping[str, str]
    study_instance_uid: str
    frame_of_reference_uid: str
    ct_series_instance_uid: str
    ct_sop_instance_uids: tuple[str, ...]
    rtstruct_sop_instance_uid: str
    rtplan_sop_instance_uid: str
    image_orientation_patient: tuple[float, ...]
    patient_position: str
    grid: CanonicalGrid

    def __repr__(self) -> str:  # never print a patient's identity by accident
        return f"SourcePatient(folder={self.folder.name!r})"


_PATIENT_KEYWORDS = ("PatientName", "PatientID", "PatientBirthDate", "PatientSex",
                     "StudyDate", "StudyTime", "StudyID", "AccessionNumber",
                     "ReferringPhysicianName")


def read_source_patient(folder: str | os.PathLike) -> SourcePatient:
    """Identity and UIDs of one patient folder, choosing its CT series, RTSTRUCT and RTPLAN
    as ingest does."""
    from vmatdose.data.ingest.dicom_ct import plan_ct_series, select_ct_series
    from vmatdose.data.ingest.dicom_files import DicomIngestError, scan_folder
    from vmatdose.data.ingest.dicom_plan import select_plan
    from vmatdose.data.ingest.dicom_struct import read_structure_sets, select_structure_set

    files = scan_folder(folder)
    sets = read_structure_sets(files)
    headers = select_ct_series(files, set().union(*(ss.series for ss in sets)))
    series = plan_ct_series(files, headers)
    frame = str(series.uids["frame_of_reference_uid"])
    try:
        rtstruct = select_structure_set(sets, frame, str(series.uids["ct_series_instance_uid"]))
        rtstruct_uid = rtstruct[0].sop_instance_uid
    except DicomIngestError:
        rtstruct_uid = ""
    plan, _ = select_plan(files, frame)
    first = headers[0][1]
    return SourcePatient(
        folder=Path(folder),
        patient={k: str(first.get(k, "") or "") for k in _PATIENT_KEYWORDS},
        study_instance_uid=str(series.uids["study_instance_uid"]),
        frame_of_reference_uid=frame,
        ct_series_instance_uid=str(series.uids["ct_series_instance_uid"]),
        ct_sop_instance_uids=tuple(series.uids["ct_sop_instance_uids"]),
        rtstruct_sop_instance_uid=rtstruct_uid,
        rtplan_sop_instance_uid=str(plan[1].get("SOPInstanceUID", "")) if plan else "",
        image_orientation_patient=tuple(series.uids["image_orientation_patient"]),
        patient_position=str(series.uids["patient_position"]),
        grid=series.grid)


def find_source_patient(case_id: str, source_dicom: str | os.PathLike,
                        id_salt: str | None = None,
                        case_id_map: str | os.PathLike | Mapping[str, str] | None = None
                        ) -> SourcePatient:
    """The patient folder below ``source_dicom`` whose case id is ``case_id``, read.

    The case id of every folder is recomputed as ingest computed it, so give the same
    salt (default: ``$VMATDOSE_ID_SALT``) or case-id map (a file or a mapping).

    Raises:
        LookupError: no folder has that case id (names the folder and how many were tried).
        SaltError: empty salt and no map.
    """
    from vmatdose.data.privacy import SALT_ENV, load_case_id_map, require_salt

    salt = os.environ.get(SALT_ENV, "") if id_salt is None else id_salt
    if isinstance(case_id_map, str | os.PathLike):
        case_id_map = load_case_id_map(case_id_map)
    require_salt(salt, case_id_map)
    index = _source_index(str(Path(source_dicom).resolve()), salt,
                          tuple(sorted((case_id_map or {}).items())))
    if case_id not in index:
        raise LookupError(
            f"{source_dicom}: none of its {len(index)} patient folders has case id "
            f"{case_id!r}; give the {SALT_ENV} salt or case_id_map used at preprocess")
    return read_source_patient(index[case_id])


@functools.lru_cache(maxsize=4)
def _source_index(root: str, salt: str, id_map: tuple[tuple[str, str], ...]
                  ) -> dict[str, Path]:
    """Case id -> patient folder for every folder below ``root`` (cached per batch)."""
    from vmatdose.data.ingest.dicom_files import find_dicom_patients
    from vmatdose.data.privacy import SaltError, case_id_for_folder

    mapping = dict(id_map) or None
    index = {}
    for folder in find_dicom_patients(root):
        try:
            index[case_id_for_folder(folder, salt, mapping)] = folder
        except SaltError:  # not in the map and no salt: it cannot be the case looked for
            continue
    return index


def write_rtdose(dose_gy: np.ndarray, case: Case, path: str | os.PathLike,
                 source: SourcePatient | None = None,
                 grid_mm: float | None = DOSE_GRID_MM) -> Path:
    """Write ``dose_gy`` as a DICOM RTDOSE on the patient's geometry, atomically; return
    the path.

    Args:
        dose_gy: (Z, Y, X) dose in Gy on the case grid (canonical LPS orientation);
            negative values (a network's undershoot) are written as 0.
        case: the case the dose belongs to (grid, source grids; orientation from
            ``meta["dicom"]``).
        path: the ``.dcm`` file to write.
        source: the case's source DICOM (:func:`find_source_patient`): patient identity,
            study and frame UIDs and references come from it; ``None``: the case id.
        grid_mm: the dose grid's spacing for a case without an RTDOSE of its own
            (:func:`export_geometry`); ``None``: the case's grid.

    Raises:
        ValueError: dose off the case grid or not finite, or a ``source`` whose CT grid is
            not the case's (another patient).
    """
    path = Path(path)
    dose = np.asarray(dose_gy, dtype=np.float64)
    if dose.shape != case.shape:
        raise ValueError(f"{path}: dose shape {dose.shape} is not the case grid {case.shape}")
    if not np.all(np.isfinite(dose)):
        raise ValueError(f"{path}: refusing to write a dose with non-finite values")
    if source is not None:
        _check_source_grid(source, case, path)
    if np.any(dose < 0):
        log.info("%s: %d negative dose voxels written as 0", path, int(np.sum(dose < 0)))
    recorded = dict(case.meta.get("dicom") or {})
    iop = _orientation(source.image_orientation_patient if source
                       else recorded.get("image_orientation_patient"))
    geometry = export_geometry(case, iop, grid_mm)
    native = resample_to_geometry(np.maximum(dose, 0.0), case_grid(case), geometry)
    position = source.patient_position if source else recorded.get("patient_position")
    ds = _dataset(case, source, iop, position)
    _set_geometry(ds, geometry)
    _set_pixels(ds, native)
    return _save_atomic(ds, path)


def case_grid(case: Case) -> CanonicalGrid:
    """The case's own canonical grid."""
    return CanonicalGrid(tuple(case.shape), tuple(float(v) for v in case.spacing_mm),
                         tuple(float(v) for v in case.origin_mm))


def recorded_ct_grid(case: Case) -> CanonicalGrid:
    """The source CT's canonical grid ingest recorded (``meta["source_grids"]["ct"]``);
    the case grid for cases without one."""
    ct = (case.meta.get("source_grids") or {}).get("ct")
    if not ct:
        return case_grid(case)
    return CanonicalGrid(tuple(int(v) for v in ct["size"][::-1]),
                         tuple(float(v) for v in ct["spacing_mm"][::-1]),
                         tuple(float(v) for v in ct["origin_mm"][::-1]))


def export_geometry(case: Case, iop: tuple[float, ...], grid_mm: float | None = DOSE_GRID_MM
                    ) -> dict:
    """The grid an exported RTDOSE is written on, as an
    :func:`~vmatdose.data.ingest.training_grid.itk_geometry` dict: the patient's own
    RTDOSE grid when ingest recorded one; else ``grid_mm`` (isotropic) over the body's
    bounding box, frames, rows and columns stored in ``iop``'s order; ``grid_mm=None``:
    the case grid in that order."""
    own = (case.meta.get("source_grids") or {}).get("rtdose")
    if own:
        return own
    grid = case_grid(case) if grid_mm is None else body_dose_grid(case, float(grid_mm))
    return stored_geometry(grid, iop)


def body_dose_grid(case: Case, spacing_mm: float) -> CanonicalGrid:
    """A ``spacing_mm`` grid from the first to past the last body voxel centre of the case
    (the whole case when its body is empty)."""
    grid = case_grid(case)
    body = case.body > 0
    if not body.any():
        body = np.ones(case.shape, bool)
    box = body_box(body, grid, 0.0)
    low = np.array([o + b.start * s for o, b, s in zip(grid.origin_mm, box, grid.spacing_mm)])
    high = np.array([o + (b.stop - 1) * s for o, b, s in zip(grid.origin_mm, box,
                                                              grid.spacing_mm)])
    shape = np.floor((high - low) / spacing_mm + 1e-6).astype(int) + 1
    shape += (low + (shape - 1) * spacing_mm < high - 1e-6)  # reach the last body voxel
    return CanonicalGrid(tuple(int(v) for v in shape), (spacing_mm,) * 3,
                         tuple(float(v) for v in low))


def stored_geometry(grid: CanonicalGrid, iop: tuple[float, ...]) -> dict:
    """A canonical grid as stored in ``iop``'s order (frames along the row x column
    normal): the ``itk_geometry`` whose first voxel is the canonical corner that order
    starts from."""
    row, col = np.asarray(iop[:3], float), np.asarray(iop[3:], float)
    normal = np.cross(row, col)
    flips = (normal[2] < 0, col[1] < 0, row[0] < 0)  # along z, y, x
    first = np.array([n - 1 if f else 0 for n, f in zip(grid.shape, flips)], float)
    zyx = np.asarray(grid.origin_mm, float) + first * np.asarray(grid.spacing_mm, float)
    return itk_geometry(zyx[::-1], grid.spacing_mm[::-1], grid.shape[::-1],
                        np.column_stack([row, col, normal]).ravel())


def _check_source_grid(source: SourcePatient, case: Case, path: Path) -> None:
    grid, recorded = source.grid, recorded_ct_grid(case)
    same = (tuple(grid.shape) == tuple(recorded.shape)
            and np.allclose(grid.spacing_mm, recorded.spacing_mm, atol=GRID_TOLERANCE_MM)
            and np.allclose(grid.origin_mm, recorded.origin_mm, atol=GRID_TOLERANCE_MM))
    if not same:
        raise ValueError(f"{path}: the CT of source folder {source.folder.name} "
                         f"({grid.shape}, spacing {grid.spacing_mm} mm) is not the CT grid of "
                         f"case {case.case_id!r} ({recorded.shape}, spacing "
                         f"{recorded.spacing_mm} mm): wrong source patient?")


def _orientation(iop) -> tuple[float, ...]:
    """The CT's ImageOrientationPatient when it is axis-aligned, else head-first supine."""
    if iop is None or len(iop) != 6:
        return _HFS
    values = np.rint(np.asarray(iop, dtype=float))
    if (abs(values[0]) == 1 and abs(values[4]) == 1
            and not np.any(values[[1, 2, 3, 5]])):
        return tuple(float(v) for v in values)
    return _HFS


def identity_dataset(case: Case, source: SourcePatient | None, sop_class: str,
                     modality: str, description: str, series_number: int) -> FileDataset:
    """A new DICOM object of ``sop_class``: file meta, SOP common, patient, study, series
    and frame of reference, equipment. With ``source`` the patient's identity and
    study/frame UIDs (``description`` as SeriesDescription); without, the case id as
    PatientID and :data:`NO_SOURCE_DESCRIPTION` (UIDs derived from the case id). Shared by
    the RTDOSE here and the RT Plan of :mod:`vmatdose.planning.rtplan`."""
    sop_uid = generate_uid()
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = sop_class
    meta.MediaStorageSOPInstanceUID = sop_uid
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    meta.ImplementationClassUID = PYDICOM_IMPLEMENTATION_UID
    ds = FileDataset("", {}, file_meta=meta, preamble=b"\0" * 128)
    now = datetime.now()
    date, time = now.strftime("%Y%m%d"), now.strftime("%H%M%S")
    ds.SOPClassUID, ds.SOPInstanceUID = sop_class, sop_uid
    ds.Modality = modality
    ds.InstanceCreationDate, ds.InstanceCreationTime = date, time
    if source is not None:
        for keyword, value in source.patient.items():
            setattr(ds, keyword, value)
        ds.StudyInstanceUID = source.study_instance_uid
        ds.FrameOfReferenceUID = source.frame_of_reference_uid
        ds.SeriesDescription = description
    else:
        ds.PatientName = case.case_id  # anonymous: the case id, never patient data
        ds.PatientID = case.case_id
        ds.PatientBirthDate, ds.PatientSex = "", ""
        ds.StudyDate, ds.StudyTime = date, time
        ds.ReferringPhysicianName, ds.StudyID, ds.AccessionNumber = "", "", ""
        ds.StudyInstanceUID = generate_uid(entropy_srcs=[case.case_id, "study"])
        ds.FrameOfReferenceUID = generate_uid(entropy_srcs=[case.case_id, "frame"])
        ds.SeriesDescription = NO_SOURCE_DESCRIPTION
    ds.SeriesInstanceUID = generate_uid()
    ds.SeriesNumber, ds.InstanceNumber = series_number, 1
    ds.PositionReferenceIndicator = ""
    ds.Manufacturer = "vmatdose"
    return ds


def _dataset(case: Case, source: SourcePatient | None, iop: tuple[float, ...],
             position: str | None) -> FileDataset:
    """Patient, study, series, frame of reference, equipment and reference attributes."""
    ds = identity_dataset(case, source, RTDoseStorage, "RTDOSE", "vmatdose predicted dose",
                          900)
    ds.ContentDate, ds.ContentTime = ds.InstanceCreationDate, ds.InstanceCreationTime
    ds.PatientPosition = _patient_position(position, iop)
    if source is not None:
        _set_references(ds, source)
    return ds


def _patient_position(recorded: str | None, iop: tuple[float, ...]) -> str:
    if recorded:
        return str(recorded)
    feet_first = np.cross(iop[:3], iop[3:])[2] < 0
    supine = iop[4] > 0
    return ("FF" if feet_first else "HF") + ("S" if supine else "P")


def _set_references(ds: Dataset, source: SourcePatient) -> None:
    """References to the source's RTPLAN, RTSTRUCT and CT series."""
    if source.rtplan_sop_instance_uid:
        ds.ReferencedRTPlanSequence = Sequence(
            [_reference(RTPlanStorage, source.rtplan_sop_instance_uid)])
    if source.rtstruct_sop_instance_uid:
        ds.ReferencedStructureSetSequence = Sequence(
            [_reference(RTStructureSetStorage, source.rtstruct_sop_instance_uid)])
    series = Dataset()
    series.SeriesInstanceUID = source.ct_series_instance_uid
    series.ReferencedInstanceSequence = Sequence(
        [_reference(CTImageStorage, uid) for uid in source.ct_sop_instance_uids])
    ds.ReferencedSeriesSequence = Sequence([series])


def _reference(sop_class: str, sop_instance: str) -> Dataset:
    item = Dataset()
    item.ReferencedSOPClassUID = sop_class
    item.ReferencedSOPInstanceUID = sop_instance
    return item


def _set_geometry(ds: Dataset, geometry: dict) -> None:
    """Image plane and multi-frame attributes of an ``itk_geometry`` grid; frames
    ``k * dz`` along the normal (relative GridFrameOffsetVector)."""
    dx, dy, dz = (float(v) for v in geometry["spacing_mm"])
    columns, rows, frames = (int(v) for v in geometry["size"])
    direction = np.asarray(geometry["direction"], float).reshape(3, 3)
    ds.ImagePositionPatient = [_ds(v) for v in geometry["origin_mm"]]
    ds.ImageOrientationPatient = [_ds(v) for v in (*direction[:, 0], *direction[:, 1])]
    ds.PixelSpacing = [_ds(dy), _ds(dx)]
    ds.SliceThickness = _ds(dz)
    ds.NumberOfFrames = frames
    ds.FrameIncrementPointer = Tag(0x3004, 0x000C)
    ds.GridFrameOffsetVector = [_ds(k * dz) for k in range(frames)]
    ds.Rows, ds.Columns = rows, columns


def _set_pixels(ds: Dataset, native: np.ndarray) -> None:
    """32-bit unsigned pixels and the DoseGridScaling (Gy per pixel unit) that reads them."""
    peak = float(native.max()) if native.size else 0.0
    scaling = float(_ds(peak / MAX_PIXEL)) if peak > 0 else 1.0
    pixels = np.clip(np.rint(native / scaling), 0, 2**32 - 1).astype("<u4")
    ds.DoseUnits, ds.DoseType, ds.DoseSummationType = "GY", "PHYSICAL", "PLAN"
    ds.DoseComment = "predicted by vmatdose"
    ds.DoseGridScaling = _ds(scaling)
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 32, 32, 31, 0
    ds.PixelData = pixels.tobytes()


def _ds(value: float) -> str:
    """A decimal string of at most 16 characters (the DS limit)."""
    return format_number_as_ds(float(value))


def _save_atomic(ds: FileDataset, path: Path) -> Path:
    with atomic_path(path, ".dcm.tmp") as tmp:
        pydicom.dcmwrite(tmp, ds, enforce_file_format=True)
    return path
