"""A dose on a case's grid -> a DICOM RTDOSE file a planning system or 3D Slicer can show.

The file carries DoseUnits GY, DoseType PHYSICAL, DoseSummationType PLAN, 32-bit unsigned
pixels with DoseGridScaling, a relative GridFrameOffsetVector and, when the case came from
DICOM (``case.meta["dicom"]``), the CT's FrameOfReferenceUID, StudyInstanceUID and
orientation, and references to the RTPLAN, RTSTRUCT and CT series. Cases from other
sources get UIDs derived from the case id (stable between exports) and a head-first
supine orientation.
"""

from __future__ import annotations

import logging
import os
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

log = logging.getLogger(__name__)

#: The largest dose maps to this pixel value: 31 bits keep readers that wrongly assume
#: signed pixels correct, and still resolve 5e-10 of the maximum.
MAX_PIXEL = 2**31 - 1
_HFS = (1.0, 0.0, 0.0, 0.0, 1.0, 0.0)


def write_rtdose(dose: np.ndarray, case: Case, path: str | os.PathLike) -> Path:
    """Write ``dose`` as a DICOM RTDOSE on ``case``'s geometry, atomically; return the path.

    Args:
        dose: (Z, Y, X) dose in Gy on the case grid (canonical LPS orientation); negative
            values (a network's undershoot) are written as 0.
        case: the case the dose belongs to (grid, ``meta["dicom"]`` UIDs when known).
        path: the ``.dcm`` file to write.
    """
    path = Path(path)
    dose = np.asarray(dose, dtype=np.float64)
    if dose.shape != case.shape:
        raise ValueError(f"{path}: dose shape {dose.shape} is not the case grid {case.shape}")
    if not np.all(np.isfinite(dose)):
        raise ValueError(f"{path}: refusing to write a dose with non-finite values")
    if np.any(dose < 0):
        log.info("%s: %d negative dose voxels written as 0", path, int(np.sum(dose < 0)))
    dicom = dict(case.meta.get("dicom") or {})
    iop = _orientation(dicom.get("image_orientation_patient"))
    native, ipp = to_native(np.maximum(dose, 0.0), case, iop)
    ds = _dataset(case, dicom, iop)
    _set_geometry(ds, native.shape, ipp, iop, case.spacing_mm)
    _set_pixels(ds, native)
    return _save_atomic(ds, path)


def _orientation(iop) -> tuple[float, ...]:
    """The CT's ImageOrientationPatient when it is axis-aligned, else head-first supine."""
    if iop is None or len(iop) != 6:
        return _HFS
    values = np.rint(np.asarray(iop, dtype=float))
    if (abs(values[0]) == 1 and abs(values[4]) == 1
            and not np.any(values[[1, 2, 3, 5]])):
        return tuple(float(v) for v in values)
    return _HFS


def to_native(dose: np.ndarray, case: Case, iop: tuple[float, ...]
              ) -> tuple[np.ndarray, np.ndarray]:
    """Canonical (Z, Y, X) -> stored (frames, rows, columns) order of ``iop``, and the
    ImagePositionPatient ``(x, y, z)`` mm of the first stored voxel.

    Frames run along the slice normal (row x column cosine), as the relative
    GridFrameOffsetVector ``[0, dz, 2 dz, ...]`` says.
    """
    row, col = np.asarray(iop[:3]), np.asarray(iop[3:])
    normal = np.cross(row, col)
    flips = (normal[2] < 0, col[1] < 0, row[0] < 0)  # along z, y, x
    native = dose[tuple(slice(None, None, -1) if f else slice(None) for f in flips)]
    first = np.array([n - 1 if f else 0 for n, f in zip(dose.shape, flips)], float)
    zyx = np.asarray(case.origin_mm, float) + first * np.asarray(case.spacing_mm, float)
    return np.ascontiguousarray(native), zyx[::-1].copy()


def _dataset(case: Case, dicom: dict, iop: tuple[float, ...]) -> FileDataset:
    """Patient, study, series, frame of reference, equipment and reference attributes."""
    sop_uid = generate_uid()
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = RTDoseStorage
    meta.MediaStorageSOPInstanceUID = sop_uid
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    meta.ImplementationClassUID = PYDICOM_IMPLEMENTATION_UID
    ds = FileDataset("", {}, file_meta=meta, preamble=b"\0" * 128)
    now = datetime.now()
    date, time = now.strftime("%Y%m%d"), now.strftime("%H%M%S")
    ds.SOPClassUID, ds.SOPInstanceUID = RTDoseStorage, sop_uid
    ds.Modality = "RTDOSE"
    ds.PatientName = case.case_id  # anonymous: the case id, never the source's patient data
    ds.PatientID = case.case_id
    ds.PatientBirthDate, ds.PatientSex = "", ""
    ds.StudyInstanceUID = (dicom.get("study_instance_uid")
                           or generate_uid(entropy_srcs=[case.case_id, "study"]))
    ds.StudyDate, ds.StudyTime, ds.ContentDate, ds.ContentTime = date, time, date, time
    ds.InstanceCreationDate, ds.InstanceCreationTime = date, time
    ds.ReferringPhysicianName, ds.StudyID, ds.AccessionNumber = "", "", ""
    ds.SeriesInstanceUID = generate_uid()
    ds.SeriesNumber, ds.InstanceNumber = 900, 1
    ds.SeriesDescription = "vmatdose predicted dose"
    ds.FrameOfReferenceUID = (dicom.get("frame_of_reference_uid")
                              or generate_uid(entropy_srcs=[case.case_id, "frame"]))
    ds.PositionReferenceIndicator = ""
    ds.Manufacturer = "vmatdose"
    ds.PatientPosition = _patient_position(dicom.get("patient_position"), iop)
    _set_references(ds, dicom)
    return ds


def _patient_position(recorded: str | None, iop: tuple[float, ...]) -> str:
    if recorded:
        return str(recorded)
    feet_first = np.cross(iop[:3], iop[3:])[2] < 0
    supine = iop[4] > 0
    return ("FF" if feet_first else "HF") + ("S" if supine else "P")


def _set_references(ds: Dataset, dicom: dict) -> None:
    """References to the RTPLAN, RTSTRUCT and CT series of the source, when known."""
    if dicom.get("rtplan_sop_instance_uid"):
        ds.ReferencedRTPlanSequence = Sequence([_reference(RTPlanStorage,
                                                           dicom["rtplan_sop_instance_uid"])])
    if dicom.get("rtstruct_sop_instance_uid"):
        ds.ReferencedStructureSetSequence = Sequence(
            [_reference(RTStructureSetStorage, dicom["rtstruct_sop_instance_uid"])])
    if dicom.get("ct_series_instance_uid"):
        series = Dataset()
        series.SeriesInstanceUID = dicom["ct_series_instance_uid"]
        series.ReferencedInstanceSequence = Sequence(
            [_reference(CTImageStorage, uid) for uid in dicom.get("ct_sop_instance_uids", [])])
        ds.ReferencedSeriesSequence = Sequence([series])


def _reference(sop_class: str, sop_instance: str) -> Dataset:
    item = Dataset()
    item.ReferencedSOPClassUID = sop_class
    item.ReferencedSOPInstanceUID = sop_instance
    return item


def _set_geometry(ds: Dataset, shape: tuple[int, int, int], ipp: np.ndarray,
                  iop: tuple[float, ...], spacing_mm: np.ndarray) -> None:
    """Image plane and multi-frame attributes; frames ``k * dz`` along the normal."""
    dz, dy, dx = (float(v) for v in spacing_mm)
    ds.ImagePositionPatient = [_ds(v) for v in ipp]
    ds.ImageOrientationPatient = [_ds(v) for v in iop]
    ds.PixelSpacing = [_ds(dy), _ds(dx)]
    ds.SliceThickness = _ds(dz)
    ds.NumberOfFrames = int(shape[0])
    ds.FrameIncrementPointer = Tag(0x3004, 0x000C)
    ds.GridFrameOffsetVector = [_ds(k * dz) for k in range(shape[0])]
    ds.Rows, ds.Columns = int(shape[1]), int(shape[2])


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
