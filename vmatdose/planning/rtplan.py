"""A sequenced plan -> a DICOM RT Plan (step-and-shoot IMRT) a planning system imports.

    write_rtplan(case, beams, isocentre_mm, prescriptions_gy, fractions,
                 "out/case_rtplan.dcm", source=source)

Modules of the RT Plan IOD written: Patient, General Study, RT Series, Frame of
Reference, General Equipment, RT General Plan, RT Prescription (``DoseReferenceSequence``:
each target's prescription), RT Patient Setup, RT Fraction Scheme (``BeamMeterset`` of
each beam, MU per fraction), RT Beams and SOP Common.

Each beam has its own ``MLCX`` fitted to its fluence map (``LeafPositionBoundaries``,
``NumberOfLeafJawPairs`` leaf pairs) and ``ASYMX`` / ``ASYMY`` jaws; a segment is two
control points with the same leaf and jaw positions, the first at the cumulative meterset
weight before it and the second after it, so the weights rise from 0 to 1. Identity and
references come from the source DICOM as in :mod:`vmatdose.data.export.rtdose` (the
patient, the study, the frame of reference, the RTSTRUCT); without one the case id.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from pydicom.dataset import Dataset, FileDataset
from pydicom.sequence import Sequence as DicomSequence
from pydicom.uid import (
    RTPlanStorage,
    RTStructureSetStorage,
    generate_uid,
)

from vmatdose.data.case import Case
from vmatdose.data.export.rtdose import (
    SourcePatient,
    _ds,
    _reference,
    _save_atomic,
    identity_dataset,
)
from vmatdose.planning.mlc import MlcGeometry, SegmentShape

#: SeriesDescription of a plan exported without its source DICOM (at most 64 characters).
NO_SOURCE_DESCRIPTION = "vmatdose plan; no source DICOM: PatientID is the case id"
MACHINE_NAME = "Generic6MV"
SOURCE_AXIS_DISTANCE_MM = 1000.0


@dataclass(frozen=True)
class DeliveredBeam:
    """One beam as delivered.

    Attributes:
        gantry_deg, couch_deg: IEC angles.
        mlc: the beam's MLC (:func:`~vmatdose.planning.mlc.mlc_geometry`).
        shapes: its segments' leaf and jaw positions, in delivery order.
        segment_mu: (segments,) monitor units of each segment per fraction.
    """

    gantry_deg: float
    couch_deg: float
    mlc: MlcGeometry
    shapes: Sequence[SegmentShape]
    segment_mu: np.ndarray

    @property
    def mu(self) -> float:
        return float(np.sum(self.segment_mu))


def write_rtplan(case: Case, beams: Sequence[DeliveredBeam], isocentre_mm: Sequence[float],
                 prescriptions_gy: Mapping[str, float], fractions: int,
                 path: str | os.PathLike, source: SourcePatient | None = None,
                 energy_mv: float = 6.0) -> Path:
    """Write the plan atomically; return the path.

    Args:
        case: the planned case (its id names the plan; its patient position).
        beams: beams with at least one segment each (a beam without is left out).
        isocentre_mm: (z, y, x) in the case's (DICOM patient) coordinates.
        prescriptions_gy: target -> total prescribed dose (Gy).
        fractions: number of fractions; ``segment_mu`` are per fraction.
        source: the case's source DICOM (identity, study, frame, RTSTRUCT); ``None``: the
            case id.
    """
    path = Path(path)
    beams = [b for b in beams if len(b.shapes)]
    if not beams:
        raise ValueError(f"{path}: no beam has a segment, nothing to deliver")
    if int(fractions) < 1:
        raise ValueError(f"{path}: fractions must be >= 1, got {fractions}")
    ds = _plan_dataset(case, source)
    ds.DoseReferenceSequence = DicomSequence(
        [_dose_reference(i, name, gy) for i, (name, gy) in
         enumerate(prescriptions_gy.items(), start=1)])
    setup = Dataset()
    setup.PatientSetupNumber = 1
    setup.PatientPosition = str((case.meta.get("dicom") or {}).get("patient_position")
                                or "HFS")
    ds.PatientSetupSequence = DicomSequence([setup])
    iso = [float(v) for v in list(isocentre_mm)[::-1]]
    ds.BeamSequence = DicomSequence(
        [_beam(n, b, iso, energy_mv) for n, b in enumerate(beams, start=1)])
    ds.FractionGroupSequence = DicomSequence([_fraction_group(beams, int(fractions))])
    return _save_atomic(ds, path)


def _plan_dataset(case: Case, source: SourcePatient | None) -> FileDataset:
    """Patient, study, series, frame, equipment, general plan and SOP common."""
    ds = identity_dataset(case, source, RTPlanStorage, "RTPLAN", "vmatdose sequenced plan",
                          901)
    date, time = ds.InstanceCreationDate, ds.InstanceCreationTime
    ds.RTPlanLabel = "vmatdose"
    ds.RTPlanName = "sequenced IMRT"
    ds.RTPlanDate, ds.RTPlanTime = date, time
    if source is not None and source.rtstruct_sop_instance_uid:
        ds.RTPlanGeometry = "PATIENT"
        ds.ReferencedStructureSetSequence = DicomSequence(
            [_reference(RTStructureSetStorage, source.rtstruct_sop_instance_uid)])
    else:
        ds.RTPlanGeometry = "TREATMENT_DEVICE"
    ds.ApprovalStatus = "UNAPPROVED"
    return ds


def _dose_reference(number: int, name: str, gy: float) -> Dataset:
    item = Dataset()
    item.DoseReferenceNumber = number
    item.DoseReferenceUID = generate_uid()
    item.DoseReferenceStructureType = "SITE"
    item.DoseReferenceDescription = str(name)[:64]
    item.DoseReferenceType = "TARGET"
    item.TargetPrescriptionDose = _ds(gy)
    return item


def _device(kind: str, pairs: int, boundaries: np.ndarray | None = None) -> Dataset:
    item = Dataset()
    item.RTBeamLimitingDeviceType = kind
    item.NumberOfLeafJawPairs = pairs
    if boundaries is not None:
        item.LeafPositionBoundaries = [_ds(v) for v in boundaries]
    return item


def _positions(kind: str, values: Sequence[float]) -> Dataset:
    item = Dataset()
    item.RTBeamLimitingDeviceType = kind
    item.LeafJawPositions = [_ds(v) for v in values]
    return item


def _control_point(index: int, shape: SegmentShape, cumulative: float) -> Dataset:
    cp = Dataset()
    cp.ControlPointIndex = index
    cp.CumulativeMetersetWeight = _ds(cumulative)
    cp.BeamLimitingDevicePositionSequence = DicomSequence([
        _positions("ASYMX", shape.jaw_x_mm), _positions("ASYMY", shape.jaw_y_mm),
        _positions("MLCX", np.concatenate([shape.leaves_mm[0], shape.leaves_mm[1]]))])
    return cp


def _beam(number: int, beam: DeliveredBeam, iso_xyz: list[float], energy_mv: float
          ) -> Dataset:
    item = Dataset()
    item.BeamNumber = number
    item.BeamName = f"G{beam.gantry_deg:g}"[:16]
    item.BeamType = "DYNAMIC" if len(beam.shapes) > 1 else "STATIC"
    item.RadiationType = "PHOTON"
    item.TreatmentMachineName = MACHINE_NAME
    item.PrimaryDosimeterUnit = "MU"
    item.SourceAxisDistance = _ds(SOURCE_AXIS_DISTANCE_MM)
    item.TreatmentDeliveryType = "TREATMENT"
    item.BeamLimitingDeviceSequence = DicomSequence([
        _device("ASYMX", 1), _device("ASYMY", 1),
        _device("MLCX", beam.mlc.n_pairs, beam.mlc.boundaries_mm)])
    item.NumberOfWedges = item.NumberOfCompensators = 0
    item.NumberOfBoli = item.NumberOfBlocks = 0
    item.ReferencedPatientSetupNumber = 1
    cumulative = np.concatenate([[0.0], np.cumsum(beam.segment_mu) / beam.mu])
    cumulative[-1] = 1.0
    points = []
    for i, shape in enumerate(beam.shapes):
        points += [_control_point(2 * i, shape, cumulative[i]),
                   _control_point(2 * i + 1, shape, cumulative[i + 1])]
    first = points[0]
    first.NominalBeamEnergy = _ds(energy_mv)
    first.GantryAngle = _ds(beam.gantry_deg % 360.0)
    first.GantryRotationDirection = "NONE"
    first.BeamLimitingDeviceAngle = _ds(0.0)
    first.BeamLimitingDeviceRotationDirection = "NONE"
    first.PatientSupportAngle = _ds(beam.couch_deg % 360.0)
    first.PatientSupportRotationDirection = "NONE"
    first.TableTopEccentricAngle = _ds(0.0)
    first.TableTopEccentricRotationDirection = "NONE"
    first.IsocenterPosition = [_ds(v) for v in iso_xyz]
    item.FinalCumulativeMetersetWeight = _ds(1.0)
    item.NumberOfControlPoints = len(points)
    item.ControlPointSequence = DicomSequence(points)
    return item


def _fraction_group(beams: Sequence[DeliveredBeam], fractions: int) -> Dataset:
    group = Dataset()
    group.FractionGroupNumber = 1
    group.NumberOfFractionsPlanned = fractions
    group.NumberOfBeams = len(beams)
    group.NumberOfBrachyApplicationSetups = 0
    refs = []
    for number, beam in enumerate(beams, start=1):
        ref = Dataset()
        ref.ReferencedBeamNumber = number
        ref.BeamMeterset = _ds(beam.mu)
        refs.append(ref)
    group.ReferencedBeamSequence = DicomSequence(refs)
    return group
