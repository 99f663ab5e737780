"""The dataset fingerprint and the target spacing chosen from it (nnU-Net's plan step).

``preprocess source=dicom`` writes ``dataset_fingerprint.json`` beside the case files: per
case (by its anonymous case id, nothing else identifying) the source CT spacing and shape,
the RTDOSE spacing, the body's extent, HU percentiles inside the body and every
structure's volume, and over the dataset their medians, ranges and the target spacing with
the rule that chose it.

The rule (:func:`choose_spacing`), per axis:

1. the median CT voxel spacing over the patients (nnU-Net's target spacing),
2. no finer than the median RTDOSE spacing (the reference dose holds nothing finer, and a
   2.5 mm dose on a 1 mm grid is 16 x the voxels for the same information),
3. coarsened where needed so that the largest body extent plus two margins spans at most
   ``max_voxels`` (256) voxels.

The spacing is chosen before any case is converted, from a header-only pass over the
patient folders (:func:`source_geometry`: CT and RTDOSE headers, the external contour's
points); once written, a fingerprint's spacing is reused, so a restarted or extended
preprocess puts new cases on the same grid.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np

from vmatdose.data.atomic import write_json_atomic
from vmatdose.data.case import list_case_files, read_case_header
from vmatdose.data.ingest.training_grid import MARGIN_MM, MAX_VOXELS

FINGERPRINT_FILE = "dataset_fingerprint.json"
HU_PERCENTILES = (0.5, 50.0, 99.5)
RULE = ("per axis: the median CT spacing, no finer than the median RTDOSE spacing, "
        "coarsened so the largest body extent + 2 margins spans at most max_voxels voxels")


def case_statistics(ct: np.ndarray, body: np.ndarray, masks: Mapping[str, np.ndarray],
                    spacing_mm: Sequence[float]) -> dict:
    """One case's part of the fingerprint, on the grid it is made on: body extent (mm,
    z, y, x, between the outer voxel faces), HU percentiles inside the body, structure
    volumes (cm^3)."""
    voxel_cc = float(np.prod(spacing_mm)) / 1000.0
    inside = ct[body.astype(bool)]
    extent = []
    for axis, step in enumerate(spacing_mm):
        other = tuple(a for a in range(3) if a != axis)
        present = np.flatnonzero(body.any(axis=other))
        extent.append(float((present[-1] - present[0] + 1) * step) if present.size else 0.0)
    percentiles = (np.percentile(inside, HU_PERCENTILES) if inside.size
                   else [float("nan")] * len(HU_PERCENTILES))
    return {"body_extent_mm": [round(v, 2) for v in extent],
            "hu_percentiles": {f"p{p:g}": float(v) for p, v in zip(HU_PERCENTILES,
                                                                    percentiles)},
            "structure_volumes_cc": {name: round(float(np.count_nonzero(m)) * voxel_cc, 3)
                                     for name, m in masks.items()}}


def source_geometry(folder: str | os.PathLike, protocol) -> dict:
    """Header-only geometry of one patient folder: CT ``spacing_mm`` and ``shape`` (z, y,
    x), the RTDOSE ``dose_spacing_mm`` (``None`` without one) and ``body_extent_mm`` (the
    external contour's bounding box; the CT's field of view without one)."""
    from vmatdose.data.ingest.dicom_ct import plan_ct_series, select_ct_series
    from vmatdose.data.ingest.dicom_dose import select_dose_files
    from vmatdose.data.ingest.dicom_files import scan_folder
    from vmatdose.data.ingest.dicom_struct import read_structure_sets, roi_contours
    from vmatdose.data.ingest.structure_names import BODY, StructureNameMap
    from vmatdose.data.ingest.training_grid import rtdose_geometry

    files = scan_folder(folder)
    sets = read_structure_sets(files)
    series = plan_ct_series(files, select_ct_series(
        files, set().union(*(ss.series for ss in sets))))
    grid = series.grid
    frame = str(series.uids["frame_of_reference_uid"])
    extent = np.asarray(grid.shape) * np.asarray(grid.spacing_mm)
    names = StructureNameMap.from_protocol(protocol)
    for ss in (s for s in sets if frame in s.frames):
        chosen, _, _ = names.match(ss.roi_names.values())
        if BODY in chosen:
            number = {name: n for n, name in ss.roi_names.items()}[chosen[BODY]]
            points = roi_contours(ss, number)
            if points:
                xyz = np.concatenate(points)
                extent = (xyz.max(axis=0) - xyz.min(axis=0))[::-1]
            break
    dose_spacing = None
    try:
        doses, _, _ = select_dose_files(files, frame, None)
    except Exception:  # the conversion reports RTDOSE problems, naming the file
        doses = []
    if doses:
        path, ds = doses[0]
        dose_spacing = rtdose_geometry(ds, files.rel(path))["spacing_mm"][::-1]
    return {"spacing_mm": [float(v) for v in grid.spacing_mm], "shape": list(grid.shape),
            "dose_spacing_mm": dose_spacing,
            "body_extent_mm": [round(float(v), 2) for v in extent]}


def choose_spacing(geometries: Sequence[Mapping], margin_mm: float = MARGIN_MM,
                   max_voxels: int = MAX_VOXELS) -> list[float]:
    """The target ``(dz, dy, dx)`` mm of the module's rule, from :func:`source_geometry`
    dicts (rounded up to 0.01 mm)."""
    if not geometries:
        raise ValueError("no patient geometries to choose a target spacing from")
    spacing = np.median([g["spacing_mm"] for g in geometries], axis=0)
    doses = [g["dose_spacing_mm"] for g in geometries if g.get("dose_spacing_mm")]
    if doses:
        spacing = np.maximum(spacing, np.median(doses, axis=0))
    largest = np.max([g["body_extent_mm"] for g in geometries], axis=0) + 2 * margin_mm
    # body_box adds ceil(margin / spacing) voxels each side of the extent's voxels: keep
    # 3 voxels of slack for those roundings
    spacing = np.maximum(spacing, largest / (max_voxels - 3))
    return [float(np.ceil(v * 100 - 1e-6) / 100) for v in spacing]


def read_fingerprint_spacing(output_dir: str | os.PathLike) -> list[float] | None:
    """The target spacing of an earlier fingerprint in ``output_dir``, if any."""
    path = Path(output_dir) / FINGERPRINT_FILE
    if not path.is_file():
        return None
    spacing = json.loads(path.read_text()).get("target_spacing_mm")
    return [float(v) for v in spacing] if spacing else None


def write_fingerprint(output_dir: str | os.PathLike, target_spacing_mm: Sequence[float] | None,
                      settings: Mapping) -> Path:
    """Gather every DICOM case's statistics (case-file headers only) into
    ``output_dir/dataset_fingerprint.json``; return its path."""
    cases = {}
    for path in list_case_files(output_dir):
        header = read_case_header(path)
        meta = header.meta
        if meta.get("source") != "dicom" or "source_grids" not in meta:
            continue
        ct = meta["source_grids"]["ct"]
        dose = meta["source_grids"].get("rtdose")
        cases[header.case_id] = {
            "source_spacing_mm": ct["spacing_mm"][::-1], "source_shape": ct["size"][::-1],
            "dose_spacing_mm": dose["spacing_mm"][::-1] if dose else None,
            "spacing_mm": [float(v) for v in header.spacing_mm],
            "shape": list(header.shapes["ct"]), **meta.get("fingerprint", {})}
    summary = _summary(cases)
    fingerprint = {"cases": len(cases), "target_spacing_mm": (
        [float(v) for v in target_spacing_mm] if target_spacing_mm else None),
        "rule": RULE, "settings": dict(settings), **summary, "per_case": cases}
    path = Path(output_dir) / FINGERPRINT_FILE
    write_json_atomic(fingerprint, path)
    return path


def _summary(cases: Mapping[str, Mapping]) -> dict:
    """Medians and ranges over the cases (z, y, x order)."""
    if not cases:
        return {}
    out = {}
    for key in ("source_spacing_mm", "source_shape", "shape", "body_extent_mm"):
        values = np.asarray([c[key] for c in cases.values() if c.get(key)], float)
        if values.size:
            out[key] = {"median": np.median(values, axis=0).round(3).tolist(),
                        "min": values.min(axis=0).round(3).tolist(),
                        "max": values.max(axis=0).round(3).tolist()}
    hu = [c["hu_percentiles"] for c in cases.values() if "hu_percentiles" in c]
    if hu:
        out["hu_percentiles_median"] = {k: float(np.median([h[k] for h in hu])) for k in hu[0]}
    volumes: dict[str, list[float]] = {}
    for c in cases.values():
        for name, cc in c.get("structure_volumes_cc", {}).items():
            volumes.setdefault(name, []).append(cc)
    out["structure_volumes_cc_median"] = {k: float(np.median(v)) for k, v in volumes.items()}
    out["structure_counts"] = {k: len(v) for k, v in volumes.items()}
    return out
