"""RTPLAN -> prescriptions (DoseReferenceSequence / TargetPrescriptionDose), fractions and
the beam arrangement (BeamSequence)."""

from __future__ import annotations

from pathlib import Path

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


def plan_fractions(plan: Dataset) -> int | None:
    """NumberOfFractionsPlanned of the first fraction group, if any."""
    groups = plan.get("FractionGroupSequence") or []
    value = groups[0].get("NumberOfFractionsPlanned") if groups else None
    return int(value) if value else None


#: IEC gantry angle -> the angle that gives the same beam direction in the patient for a
#: head-first-supine patient (the convention of ``meta["beams"]``): feet first mirrors
#: left/right, prone mirrors anterior/posterior.
_HFS_GANTRY = {"HFS": lambda a: a, "FFS": lambda a: -a, "HFP": lambda a: 180.0 - a,
               "FFP": lambda a: 180.0 + a}


def plan_beams(plan: Dataset, patient_position: str = "HFS"
               ) -> tuple[BeamArrangement | None, list[str]]:
    """The treatment beams of an RTPLAN as a :class:`BeamArrangement` (``None`` without
    photon treatment beams): every static field's gantry angle, every control point's of
    an arc (``GantryRotationDirection`` CW/CC), as the head-first-supine angle of the same
    direction in the patient (``patient_position`` of the CT: HFS, FFS, HFP, FFP; other
    positions give no arrangement and a warning), couch angles carried from the previous
    control point as DICOM does, the first beam's isocentre (DICOM patient x, y, z -> the
    case's z, y, x) and nominal energy.

    Returns:
        ``(arrangement or None, warnings)``.
    """
    to_hfs = _HFS_GANTRY.get(str(patient_position or "HFS").upper())
    if to_hfs is None:
        return None, [f"RTPLAN beams of a {patient_position} patient are not recorded (only "
                      f"{sorted(_HFS_GANTRY)} map onto the case's beam convention)"]
    gantry: list[float] = []
    couch: list[float] = []
    isocentres: list[tuple[float, float, float]] = []
    energies: list[float] = []
    arcs = 0
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
        for point in points if is_arc else points[:1]:
            angle = float(point.get("GantryAngle", angle))
            table = float(point.get("PatientSupportAngle", table))
            gantry.append(to_hfs(angle) % 360.0)
            couch.append(table)
        if first.get("IsocenterPosition") is not None:
            x, y, z = (float(v) for v in first.IsocenterPosition)
            isocentres.append((z, y, x))
        if first.get("NominalBeamEnergy") is not None:
            energies.append(float(first.NominalBeamEnergy))
    if not gantry or not isocentres:
        return None, ([] if not gantry else ["RTPLAN beams carry no isocentre (ignored)"])
    warnings = []
    if len(set(isocentres)) > 1:
        warnings.append(f"RTPLAN has {len(set(isocentres))} isocentres; the beam "
                        "arrangement keeps the first")
    return BeamArrangement(tuple(gantry), tuple(couch), isocentres[0],
                           energies[0] if energies else 6.0,
                           "arc" if arcs else "static", "rtplan"), warnings
