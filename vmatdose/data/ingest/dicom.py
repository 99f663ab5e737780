"""One DICOM-RT patient folder (CT series, RTSTRUCT, RTDOSE, RTPLAN) -> :class:`Case`.

    settings = DicomIngestSettings(protocol=Protocol.load("head_neck"), id_salt=salt)
    case = ingest_dicom_case("patients/0001", settings=settings)

The treatment-site protocol (:class:`~vmatdose.protocol.Protocol`) is the one source of
the site's facts: canonical structures and their ROI-name synonyms, the external
contour's synonyms, targets and prescriptions, fractions and the required targets.

* CT: the series the RTSTRUCT references (when there are several), sorted along the slice
  normal, head/feet-first and supine/prone flipped into the canonical LPS grid, HU from
  RescaleSlope/Intercept, missing slices interpolated, a spacing varying within the series
  resampled to a uniform one, each reported (:mod:`~vmatdose.data.ingest.dicom_ct`);
* RTSTRUCT on the CT's FrameOfReferenceUID, ROI names mapped to the protocol's canonical
  names by its synonyms, contours rasterised with their boundary, even-odd for holes
  (:mod:`~vmatdose.data.ingest.dicom_struct`, :mod:`~vmatdose.data.ingest.rasterize`);
* RTDOSE scaled by DoseGridScaling, resampled linearly on the CT grid; the PLAN dose, else
  the per-beam (BEAM) doses summed with a warning (:mod:`~vmatdose.data.ingest.dicom_dose`);
* prescriptions from the RTPLAN's DoseReferenceSequence, else the protocol's; the case's
  ``prescriptions_gy`` holds exactly the targets it has (:mod:`~vmatdose.data.ingest.dicom_plan`).

A case lacking the protocol's required targets raises :class:`MissingTargetsError` naming
the folder and what is missing; a case without RTDOSE (when one is required) raises
:class:`~vmatdose.data.ingest.batch.SkipCase`; broken input raises
:class:`DicomIngestError` naming the file (relative to the patient folder).

Privacy: no patient name, ID or birth date reaches the case or a message, and no source
DICOM UID (Study, Series, FrameOfReference, SOP instance) is kept unless
``record_sources=True``. The case id is a salted hash of PatientID and StudyInstanceUID
(an empty salt is refused) unless a mapping gives one (:mod:`vmatdose.data.privacy`). The RTDOSE
export reads identity and UIDs back from the source DICOM
(:mod:`vmatdose.data.export.rtdose`).
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
from scipy import ndimage

from vmatdose.data.case import Case
from vmatdose.data.ingest.batch import SkipCase
from vmatdose.data.ingest.dicom_ct import (
    CanonicalGrid,
    CTSeries,
    choose_ct_series,
    plan_ct_series,
    read_ct_volume,
)
from vmatdose.data.ingest.dicom_dose import DoseOnGrid, dose_on_grid, select_dose_files
from vmatdose.data.ingest.dicom_files import DicomFolder, DicomIngestError, scan_folder
from vmatdose.data.ingest.dicom_plan import (
    plan_beams,
    plan_fractions,
    plan_prescriptions,
    select_plan,
    treatment_beam_numbers,
)
from vmatdose.data.ingest.dicom_struct import (
    StructureSet,
    rasterize_roi,
    read_structure_sets,
    roi_contours,
    select_structure_set,
)
from vmatdose.data.ingest.fingerprint import case_statistics
from vmatdose.data.ingest.structure_names import BODY, StructureNameMap
from vmatdose.data.ingest.training_grid import (
    MARGIN_MM,
    GridSettings,
    body_box,
    canonical_geometry,
    crop_grid,
    full_target_grid,
    resample_ct,
    rtdose_geometry,
)
from vmatdose.data.privacy import anonymous_case_id, patient_keys, require_salt
from vmatdose.protocol import Protocol

__all__ = ["DicomIngestError", "DicomIngestSettings", "MissingTargetsError",
           "ingest_dicom_case"]

class MissingTargetsError(DicomIngestError):
    """A patient folder without the protocol's required targets (``path``: the folder)."""


@dataclass
class DicomIngestSettings:
    """How DICOM cases are read; the site's facts come from ``protocol``.

    Attributes:
        protocol: the treatment-site protocol (structures, synonyms, targets,
            prescriptions, fractions, required targets).
        require_dose: skip cases without RTDOSE (``False`` for cases to predict).
        body_threshold_hu: external from the CT (largest component above it, holes
            filled) when the RTSTRUCT has no body contour.
        id_salt: secret mixed into the case-id hash (keep it private, keep it fixed).
        record_sources: keep the source DICOM UIDs in ``meta["dicom"]`` (off: a case file
            must not let a guessed patient be confirmed offline).
        grid: the target grid (:class:`~vmatdose.data.ingest.training_grid.GridSettings`;
            default: the native CT grid).
    """

    protocol: Protocol
    require_dose: bool = True
    body_threshold_hu: float = -500.0
    id_salt: str = ""
    record_sources: bool = False
    grid: GridSettings = GridSettings()

    @classmethod
    def from_config(cls, cfg: Mapping, protocol: Protocol | Mapping) -> DicomIngestSettings:
        """From a plain mapping (e.g. the resolved ``source`` config; unknown keys ignored)
        and the protocol (a :class:`Protocol` or its config)."""
        if not isinstance(protocol, Protocol):
            protocol = Protocol.from_dict(protocol)
        known = {k: cfg[k] for k in cls.__dataclass_fields__
                 if k != "protocol" and k in cfg and cfg[k] is not None}
        if isinstance(known.get("grid"), Mapping):
            grid = known["grid"]
            spacing = grid.get("spacing_mm")
            voxels = grid.get("field_of_view_voxels")
            known["grid"] = GridSettings(
                tuple(float(v) for v in spacing) if spacing is not None else None,
                float(grid.get("margin_mm", MARGIN_MM)),
                None if voxels is None else int(voxels))
        return cls(protocol=protocol, **known)


def ingest_dicom_case(folder: str | os.PathLike, case_id: str | None = None,
                      settings: DicomIngestSettings | None = None) -> Case:
    """Read one patient folder into a :class:`Case` (arrays on the CT grid, dose in Gy).

    Args:
        folder: the patient folder (searched recursively).
        case_id: anonymous case id; by default :func:`anonymous_case_id` of the CT (needs
            a non-empty ``settings.id_salt``).
        settings: see :class:`DicomIngestSettings` (required: it carries the protocol).

    Raises:
        MissingTargetsError: the protocol's required targets are missing (names the folder).
        SkipCase: the reference dose is missing and required.
        DicomIngestError: anything unreadable or inconsistent, naming the file.
        SaltError: no ``case_id`` and an empty salt.
    """
    if settings is None:
        raise TypeError("ingest_dicom_case needs settings=DicomIngestSettings(protocol=...)")
    if case_id is None:
        require_salt(settings.id_salt)
    protocol = settings.protocol
    names = StructureNameMap.from_protocol(protocol)
    files = scan_folder(folder)
    sets = read_structure_sets(files)
    ct_headers, notes = choose_ct_series(files, set().union(*(ss.series for ss in sets)),
                                         set().union(*(ss.frames for ss in sets)))
    series = plan_ct_series(files, ct_headers)
    case_id = case_id or anonymous_case_id(*patient_keys(ct_headers[0][1]), settings.id_salt)
    frame = str(series.uids["frame_of_reference_uid"])
    notes += series.warnings
    ss, more = select_structure_set(sets, frame, str(series.uids["ct_series_instance_uid"]))
    notes += more
    rois, roi_meta = _choose_rois(files, ss, frame, names, protocol, notes)
    plan, more = select_plan(files, frame)
    notes += more
    dose_files, summation, more = select_dose_files(
        files, frame, str(plan[1].get("SOPInstanceUID", "")) if plan else None,
        treatment_beam_numbers(plan[1]) if plan else None)
    notes += more
    if not dose_files and settings.require_dose:
        raise SkipCase("no RTDOSE in the patient folder (set source.require_dose=false to "
                       "ingest cases to predict)")
    ct, grid = placed_ct(read_ct_volume(files, series), series.grid, settings.grid)
    body = _body(ss, rois, series, grid, ct, settings, notes)
    if settings.grid.crops:  # crop to the body with the margin
        box = body_box(body, grid, settings.grid.margin_mm)
        grid, ct, body = crop_grid(grid, box), ct[box], body[box]
    masks = _rasterize(ss, rois, series, grid, notes)
    _require_targets(files, protocol, masks, sorted(ss.roi_names.values()),
                     "on the CT grid " if grid is series.grid else "on the training grid ")
    prescriptions, fractions, source = _prescriptions(plan, ss, names, protocol, masks, notes)
    dose = None
    if dose_files:
        on_grid = dose_on_grid(files, grid, dose_files, summation, fractions)
        _check_coverage(on_grid, masks, body, protocol, files.rel(dose_files[0][0]), notes)
        dose = on_grid.dose
    beams, more = (plan_beams(plan[1], series.uids["patient_position"]) if plan
                   else (None, []))
    notes += more
    meta = _meta(series, ss, plan, dose_files, summation, settings, fractions, source,
                 roi_meta, notes)
    if beams is not None:
        meta["beams"] = beams.to_meta()
    meta["grid"] = "training" if settings.grid.resamples else "ct"
    meta["source_grids"] = {
        "ct": canonical_geometry(series.grid),
        "rtdose": (rtdose_geometry(dose_files[0][1], files.rel(dose_files[0][0]))
                   if dose_files else None)}
    meta["fingerprint"] = case_statistics(ct, body, masks, grid.spacing_mm)
    return Case(case_id=case_id, ct=ct, masks=np.stack(list(masks.values())).view(np.uint8),
                structures=list(masks), body=body.view(np.uint8),
                spacing_mm=np.asarray(grid.spacing_mm, float),
                origin_mm=np.asarray(grid.origin_mm, float),
                prescriptions_gy=prescriptions, dose=dose, meta=meta)


def _choose_rois(files: DicomFolder, ss: StructureSet, frame: str, names: StructureNameMap,
                 protocol: Protocol, notes: list[str]) -> tuple[dict[str, int], dict]:
    """Canonical name -> ROI number of the ROIs to rasterise (``BODY`` included if found).

    Raises:
        MissingTargetsError: the required targets have no ROI on the CT's frame of
            reference.
    """
    on_frame = {n: name for n, name in ss.roi_names.items()
                if ss.roi_frames.get(n, frame) in (frame, "")}
    off_frame = sorted(set(ss.roi_names.values()) - set(on_frame.values()))
    if off_frame:
        notes.append(f"ROIs on another frame of reference than the CT (dropped): {off_frame}")
    chosen, unmapped, duplicates = names.match(on_frame.values())
    if duplicates:
        notes.append(f"ROIs mapping to an already matched canonical name (dropped): "
                     f"{duplicates}")
    _require_targets(files, protocol, chosen, sorted(ss.roi_names.values()))
    absent = [s for s in protocol.structures if s not in chosen]
    if absent:
        notes.append(f"no ROI for {absent}")
    number = {name: n for n, name in on_frame.items()}
    rois = {c: number[chosen[c]] for c in [*protocol.structures, BODY] if c in chosen}
    return rois, {"roi_names": {c: chosen[c] for c in rois}, "unmapped_rois": unmapped}


def _require_targets(files: DicomFolder, protocol: Protocol, present, roi_names: list[str],
                     where: str = "") -> None:
    """Raise :class:`MissingTargetsError` naming the folder when required targets lack."""
    missing = protocol.missing_targets(present)
    if missing:
        have = [t for t in protocol.targets if t in present]
        raise MissingTargetsError(
            f"missing required target(s) {', '.join(missing)} {where}(protocol "
            f"{protocol.name} needs {protocol.requirement_text()}; found targets: "
            f"{', '.join(have) or 'none'}; ROIs in the RTSTRUCT: {roi_names}). Add the "
            f"ROI names as synonyms in conf/protocol/{protocol.name}.yaml or choose "
            "another protocol=", files.root.name)


def _prescriptions(plan, ss: StructureSet, names: StructureNameMap, protocol: Protocol,
                   masks: Mapping[str, np.ndarray], notes: list[str]
                   ) -> tuple[dict[str, float], int | None, str]:
    """Target -> Gy for exactly the targets the case has (RTPLAN first, then the
    protocol's), fractions (RTPLAN, then the protocol's), and where they came from."""
    from_plan: dict[str, float] = {}
    fractions = None
    if plan is not None:
        from_plan, more = plan_prescriptions(plan[1], ss.roi_names, names)
        notes += more
        fractions = plan_fractions(plan[1])
    present = [t for t in protocol.targets if t in masks]
    prescriptions = {t: float(from_plan[t]) for t in present if t in from_plan}
    fallback = [t for t in present if t not in prescriptions]
    for target in fallback:
        prescriptions[target] = float(protocol.prescriptions_gy[target])
    if fallback and plan is not None:
        notes.append(f"RTPLAN has no prescription for {fallback}; used protocol "
                     f"{protocol.name}'s")
    differ = [f"{t} {g:g} Gy" for t, g in prescriptions.items()
              if t not in fallback and g != protocol.prescriptions_gy[t]]
    if differ:
        notes.append(f"RTPLAN prescriptions differ from protocol {protocol.name}: "
                     f"{', '.join(differ)} (kept the RTPLAN's)")
    source = "rtplan" if not fallback else ("protocol" if not from_plan else "rtplan+protocol")
    return prescriptions, fractions or protocol.fractions, source


def placed_ct(ct: np.ndarray, ct_grid: CanonicalGrid, grid: GridSettings
              ) -> tuple[np.ndarray, CanonicalGrid]:
    """The CT on the grid the case is made on: native, or resampled (linear) onto the full
    field of view at the target spacing (cropped afterwards)."""
    if not grid.resamples:
        return ct, ct_grid
    target = full_target_grid(ct_grid, grid.spacing_for(ct_grid))
    return resample_ct(ct, ct_grid, target), target


def _body(ss: StructureSet, rois: dict[str, int], series: CTSeries, grid: CanonicalGrid,
          ct: np.ndarray, settings: DicomIngestSettings, notes: list[str]) -> np.ndarray:
    """(Z, Y, X) bool body on ``grid``: the external contour, else CT above the threshold."""
    if BODY in rois:
        body, more = rasterize_roi(roi_contours(ss, rois[BODY]), series.grid, BODY,
                                   target=grid, missing=series.missing)
        if grid is series.grid:
            fill_missing_slices(body, series.missing)
        notes += more
        if body.any():
            return body
        notes.append(f"{BODY}: empty on the CT grid (dropped)")
    notes.append(f"no body contour: body = CT above {settings.body_threshold_hu:g} HU")
    return body_from_ct(ct, settings.body_threshold_hu)


def _rasterize(ss: StructureSet, rois: dict[str, int], series: CTSeries,
               grid: CanonicalGrid, notes: list[str]) -> dict[str, np.ndarray]:
    """Canonical name -> (Z, Y, X) bool mask on ``grid`` (non-empty ones, body apart)."""
    masks: dict[str, np.ndarray] = {}
    for name, number in rois.items():
        if name == BODY:
            continue
        mask, more = _roi_mask(roi_contours(ss, number), series, name, grid)
        notes += more
        if not mask.any():
            notes.append(f"{name}: empty on the {'CT' if grid is series.grid else 'training'}"
                         " grid (dropped)")
        else:
            masks[name] = mask
    return masks


def _roi_mask(contours: list[np.ndarray], series: CTSeries, name: str,
              grid: CanonicalGrid) -> tuple[np.ndarray, list[str]]:
    """(Z, Y, X) bool mask of one ROI's contours (patient points ``(x, y, z)`` mm) on
    ``grid`` (the CT grid or the training grid): filled at ``grid``'s own pixels, each
    slice taking the contours of its nearest CT slice (empty missing slices filled from
    their neighbours); for a resampled series (stored slices of varying spacing), the
    nearest *stored* slice's."""
    if not series.resampled:
        mask, notes = rasterize_roi(contours, series.grid, name, target=grid,
                                    missing=series.missing)
        if grid is series.grid:
            fill_missing_slices(mask, series.missing)
        return mask, notes
    on_stored = [np.column_stack([c[:, :2], series.stored_slice_index(c[:, 2])])
                 for c in contours]
    n_stored = len(series.stored_z_mm)
    # the stored slices filled at grid's in-plane pixels (z in stored-slice index units)
    planes = CanonicalGrid((n_stored, *grid.shape[1:]), (1.0, *grid.spacing_mm[1:]),
                           (0.0, *grid.origin_mm[1:]))
    stored, notes = rasterize_roi(on_stored, series.stored_slice_grid(), name, target=planes)
    z = grid.origin_mm[0] + grid.spacing_mm[0] * np.arange(grid.shape[0])
    nearest = np.abs(z[:, None] - series.stored_z_mm[None, :]).argmin(1)
    return stored[nearest], notes


def fill_missing_slices(mask: np.ndarray, missing: Sequence[int]) -> None:
    """Give empty (Z, Y, X) mask slices at missing CT slices the nearest present slice's
    contour, in place (contours are drawn on the CT slices that exist)."""
    absent = set(missing)
    for k in missing:
        if mask[k].any():
            continue
        below = max((i for i in range(k) if i not in absent), default=None)
        above = min((i for i in range(k + 1, mask.shape[0]) if i not in absent), default=None)
        if below is None or above is None:
            continue
        mask[k] = mask[below] if k - below <= above - k else mask[above]


def body_from_ct(ct: np.ndarray, threshold_hu: float) -> np.ndarray:
    """(Z, Y, X) bool: the largest connected region above ``threshold_hu``, holes filled
    slice by slice."""
    above = ct > threshold_hu
    labels, n = ndimage.label(above)
    if n == 0:
        return above
    sizes = np.bincount(labels.ravel())
    sizes[0] = 0
    body = labels == int(np.argmax(sizes))
    for k in range(body.shape[0]):
        body[k] = ndimage.binary_fill_holes(body[k])
    return body


def _check_coverage(on_grid: DoseOnGrid, masks: dict[str, np.ndarray], body: np.ndarray,
                    protocol: Protocol, label: str, notes: list[str]) -> None:
    """Every target must lie inside the dose grid; body voxels outside it are reported."""
    notes += on_grid.warnings
    if not on_grid.covered.any():
        raise DicomIngestError("the dose grid does not overlap the CT at all", label)
    for target in (t for t in protocol.targets if t in masks):
        outside = int(np.count_nonzero(masks[target] & ~on_grid.covered))
        if outside:
            share = 100.0 * outside / np.count_nonzero(masks[target])
            raise DicomIngestError(f"the dose grid does not cover the CT region of {target}: "
                                   f"{share:.1f} % of its voxels lie outside it", label)
    outside = int(np.count_nonzero(body & ~on_grid.covered))
    if outside:
        notes.append(f"{100.0 * outside / max(1, np.count_nonzero(body)):.1f} % of the body "
                     "lies outside the dose grid (dose 0 there)")


def _meta(series: CTSeries, ss: StructureSet, plan, dose_files: list, summation: str,
          settings: DicomIngestSettings, fractions: int | None, prescription_source: str,
          roi_meta: dict, notes: list[str]) -> dict:
    """JSON metadata: protocol, provenance, warnings; no patient data, and source UIDs
    only with ``record_sources`` (the RTDOSE export reads them from the source DICOM)."""
    dicom = {"image_orientation_patient": series.uids["image_orientation_patient"],
             "patient_position": series.uids["patient_position"],
             "dose_summation": summation if dose_files else None,
             "rtdose_files": len(dose_files), "ct_slices": len(series.files)}
    if settings.record_sources:
        dicom.update({key: value for key, value in series.uids.items()
                      if key.endswith(("_uid", "_uids"))})
        dicom["rtstruct_sop_instance_uid"] = ss.sop_instance_uid
        dicom["rtplan_sop_instance_uid"] = (str(plan[1].get("SOPInstanceUID", ""))
                                            if plan else "")
        dicom["rtdose_sop_instance_uids"] = [str(ds.get("SOPInstanceUID", ""))
                                             for _, ds in dose_files]
    return {"source": "dicom", "protocol": settings.protocol.name, "fractions": fractions,
            "prescription_source": prescription_source, "dicom": dicom,
            "missing_slices": len(series.missing), **roi_meta, "warnings": list(notes)}
