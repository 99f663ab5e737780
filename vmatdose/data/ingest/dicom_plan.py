"""RTPLAN -> prescriptions (DoseReferenceSequence / TargetPrescriptionDose), fractions and
the beam arrangement (BeamSequence)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from pydicom.dataset import Dataset

from vmatdose.data.beams import BeamArrangement
from vmatdose.data.ingest.dicom_dose import referenced_plan
from vmatdose.data.ingest.dicom_files import DicomFolder, DicomIngestError
from vmatdose.data.ingest.structure_names import StructureNameMap


def select_plan(folder: DicomFolder, frame_uid: str) -> tuple[tuple[Path, Dataset] | None,
                                                              list[str]]:
    """The RTPLAN on the CT's frame of reference (the one the RTDOSEs name, if several).

    Returns:
        ``((path, dataset) or None, warnings)``.
    """
    plans = folder.of("RTPLAN")
    on_frame = [(p, ds) for p, ds in plans if str(ds.get("FrameOfReferenceUID", frame_uid))
                == frame_uid]
    warnings = []
    if len(on_frame) < len(plans):
        warnings.append(f"ignored {len(plans) - len(on_frame)} RTPLAN(s) on another frame of "
                        "reference")
    if len(on_frame) <= 1:
        return (on_frame[0] if on_frame else None), warnings
    named = {referenced_plan(ds) for _, ds in folder.of("RTDOSE")}
    chosen = [(p, ds) for p, ds in on_frame if str(ds.get("SOPInstanceUID", "")) in named]
    if len(chosen) != 1:
        raise DicomIngestError(f"{len(on_frame)} RTPLANs in the patient folder and the RTDOSEs "
                               "do not single one out; keep one plan per folder")
    return chosen[0], warnings


def plan_prescriptions(plan: Dataset, roi_names: dict[int, str], names: StructureNameMap
                       ) -> tuple[dict[str, float], list[str]]:
    """Canonical target -> TargetPrescriptionDose (Gy) from the DoseReferenceSequence.

    The target is the referenced ROI (``ReferencedROINumber`` in the structure set) or,
    failing that, the ``DoseReferenceDescription``, mapped to a canonical name.
    """
    prescriptions: dict[str, float] = {}
    warnings = []
    for item in plan.get("DoseReferenceSequence", []):
        dose = item.get("TargetPrescriptionDose")
        if dose is None or float(dose) <= 0:
            continue
        number = item.get("ReferencedROINumber")
        name = roi_names.get(int(number)) if number is not None else None
        name = name or str(item.get("DoseReferenceDescription", ""))
        canonical = names.canonical_name(name) if name else None
        if canonical is None:
            warnings.append(f"RTPLAN prescription {float(dose):g} Gy for {name!r} matches no "
                            "canonical structure (ignored)")
        elif canonical in prescriptions and prescriptions[canonical] != float(dose):
            warnings.append(f"RTPLAN gives {canonical} two prescriptions; kept "
                            f"{prescriptions[canonical]:g} Gy")
        else:
            prescriptions[canonical] = float(dose)
    return prescriptions, warnings


def treatment_beam_numbers(plan: Dataset) -> list[int | None] | None:
    """BeamNumbers of the plan's treatment beams: the first fraction group's
    ReferencedBeamSequence, else the TREATMENT items of the BeamSequence, else
    ``NumberOfBeams`` unknown numbers (``None``); ``None`` when the plan says nothing
    about its beams."""
    groups = plan.get("FractionGroupSequence") or []
    referenced = groups[0].get("ReferencedBeamSequence") if groups else None
    if referenced:
        return [_int_or_none(item.get("ReferencedBeamNumber")) for item in referenced]
    beams = [beam for beam in plan.get("BeamSequence", [])
             if str(beam.get("TreatmentDeliveryType", "TREATMENT")) == "TREATMENT"]
    if beams:
        return [_int_or_none(beam.get("BeamNumber")) for beam in beams]
    count = groups[0].get("NumberOfBeams") if groups else None
    return [None] * int(count) if count else None


def _int_or_none(value) -> int | None:
    return None if value is None or value == "" else int(value)


def plan_fractions(plan: Dataset) -> int | None:
    """NumberOfFractionsPlanned of the first fraction group, if any."""
    groups = plan.get("FractionGroupSequence") or []
    value = groups[0].get("NumberOfFractionsPlanned") if groups else None
    return int(value) if value else None


#: IEC gantry angle ``a`` -> the gantry angle giving the same beam direction in the
#: patient when the patient lies head first supine (the convention of ``meta["beams"]``).
_HFS_GANTRY = {"HFS": lambda a: a, "FFS": lambda a: 360.0 - a,
               "HFP": lambda a: a + 180.0, "FFP": lambda a: 180.0 - a}


def hfs_gantry_deg(gantry_deg: float, patient_position: str) -> float:
    """The head-first-supine gantry angle (degrees in [0, 360)) of the beam that gantry
    angle ``gantry_deg`` gives a patient lying in ``patient_position`` (HFS, FFS, HFP, FFP).

    Why these four maps. IEC 61217 fixed system, seen from the foot of the couch looking
    at the gantry: X to the right, Y towards the gantry (the rotation axis), Z up. The
    source of gantry angle ``a`` sits at ``(sin a, 0, cos a)`` (0 above the couch, 90 to
    the right, clockwise), so the beam travels along ``-(sin a, 0, cos a)``. A patient is
    placed by the room directions of their head ``H`` and front ``A``; DICOM patient axes
    are then left ``L = H x A``, posterior ``-A`` and superior ``H`` (LPS, right-handed).
    The beam in the patient is ``(d . -A, d . L) = (dy, dx)``:

    ====  ========  ========  ========  =====================  ==================
    pos.  H         A         L         (dy, dx)               HFS angle ``b``
    ====  ========  ========  ========  =====================  ==================
    HFS   +Y        +Z        +X        (cos a, -sin a)        ``a``
    FFS   -Y        +Z        -X        (cos a, +sin a)        ``360 - a``
    HFP   +Y        -Z        -X        (-cos a, +sin a)       ``a + 180``
    FFP   -Y        -Z        +X        (-cos a, -sin a)       ``180 - a``
    ====  ========  ========  ========  =====================  ==================

    with ``b`` solving ``(cos b, -sin b) = (dy, dx)`` (the head-first-supine row). So a
    prone patient is the supine one turned 180 degrees about the head-feet axis: its beam
    is the supine beam turned by 180 degrees (HFP ``a + 180``, FFP ``180 - a`` = FFS
    ``360 - a`` plus 180), not mirrored front to back. Gantry 90 enters from the
    patient's left for HFS and FFP, from the right for FFS and HFP; gantry 0 from the
    front of a supine patient and the back of a prone one. The CT's
    ImageOrientationPatient for each position (HFS ``[1,0,0, 0,1,0]``, FFS
    ``[-1,0,0, 0,1,0]``, HFP ``[-1,0,0, 0,-1,0]``, FFP ``[1,0,0, 0,-1,0]``) are the room's
    image axes (X, then -Z) written in these patient axes, the same geometry.

    Raises:
        KeyError: another position (decubitus, sitting).
    """
    return float(_HFS_GANTRY[str(patient_position).upper()](float(gantry_deg)) % 360.0)


def _delivering(points: list[Dataset]) -> list[bool]:
    """Per control point of an arc: whether meterset is delivered on the segment before or
    after it (CumulativeMetersetWeight rises); all ``True`` without the weights."""
    weights = [point.get("CumulativeMetersetWeight") for point in points]
    if len(points) < 2 or any(w is None for w in weights):
        return [True] * len(points)
    rises = np.diff(np.asarray(weights, dtype=np.float64)) > 0
    before = np.concatenate([[False], rises])
    after = np.concatenate([rises, [False]])
    return (before | after).tolist()


def plan_beams(plan: Dataset, patient_position: str = "HFS"
               ) -> tuple[BeamArrangement | None, list[str]]:
    """The treatment beams of an RTPLAN as a :class:`BeamArrangement` (``None`` without
    photon treatment beams): every static field's gantry angle, every control point's of
    an arc (``GantryRotationDirection`` CW/CC) that delivers meterset on one side (the
    points of a beam-off sector are left out; the arrangement has no weights, so the
    meterset does not weight the rest), as the head-first-supine angle of the same
    direction in the patient (``patient_position`` of the CT: HFS, FFS, HFP, FFP, see
    :func:`hfs_gantry_deg`; other positions give no arrangement and a warning), couch
    angles carried from the previous control point as DICOM does, the first beam's
    isocentre (DICOM patient x, y, z -> the case's z, y, x) and nominal energy.

    Returns:
        ``(arrangement or None, warnings)``.
    """
    position = str(patient_position or "HFS").upper()
    if position not in _HFS_GANTRY:
        return None, [f"RTPLAN beams of a {patient_position} patient are not recorded (only "
                      f"{sorted(_HFS_GANTRY)} map onto the case's beam convention)"]
    gantry: list[float] = []
    couch: list[float] = []
    isocentres: list[tuple[float, float, float]] = []
    energies: list[float] = []
    arcs = beam_off = 0
    for beam in plan.get("BeamSequence", []):
        if str(beam.get("TreatmentDeliveryType", "TREATMENT")) != "TREATMENT" or \
                str(beam.get("RadiationType", "PHOTON")) != "PHOTON":
            continue
        points = list(beam.get("ControlPointSequence", []))
        if not points or points[0].get("GantryAngle") is None:
            continue
        first = points[0]
        is_arc = str(first.get("GantryRotationDirection", "NONE")) in ("CW", "CC")
        arcs += is_arc
        angle, table = float(first.GantryAngle), float(first.get("PatientSupportAngle", 0.0))
        delivering = _delivering(points) if is_arc else [True]
        beam_off += delivering.count(False)
        for point, on in zip(points, delivering):
            angle = float(point.get("GantryAngle", angle))
            table = float(point.get("PatientSupportAngle", table))
            if on:
                gantry.append(hfs_gantry_deg(angle, position))
                couch.append(table)
        if first.get("IsocenterPosition") is not None:
            x, y, z = (float(v) for v in first.IsocenterPosition)
            isocentres.append((z, y, x))
        if first.get("NominalBeamEnergy") is not None:
            energies.append(float(first.NominalBeamEnergy))
    if not gantry or not isocentres:
        return None, ([] if not gantry else ["RTPLAN beams carry no isocentre (ignored)"])
    warnings = []
    if beam_off:
        warnings.append(f"RTPLAN arcs: {beam_off} control point(s) in beam-off sectors (no "
                        "meterset on either side) left out of the beam arrangement")
    if len(set(isocentres)) > 1:
        warnings.append(f"RTPLAN has {len(set(isocentres))} isocentres; the beam "
                        "arrangement keeps the first")
    return BeamArrangement(tuple(gantry), tuple(couch), isocentres[0],
                           energies[0] if energies else 6.0,
                           "arc" if arcs else "static", "rtplan"), warnings
