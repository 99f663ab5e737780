"""RTPLAN -> prescriptions (DoseReferenceSequence / TargetPrescriptionDose) and fractions."""

from __future__ import annotations

from pathlib import Path

from pydicom.dataset import Dataset

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
