"""The ingest sources ``preprocess`` runs: DICOM-RT folders, OpenKBP patients, phantoms.

``conf/source/<name>.yaml`` names one of these functions (``_target_``); each ingests a
folder of raw patients into case files through
:func:`vmatdose.data.ingest.batch.convert_cases` (parallel, resumable, atomic) and returns
its summary. :func:`run_preprocess` runs the composed ``preprocess`` config.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import os
import time
from collections.abc import Mapping
from pathlib import Path

import hydra
from omegaconf import DictConfig

from vmatdose.config_schema import PHANTOM_SHAPE, PHANTOM_SPACING_MM
from vmatdose.data.atomic import write_json_atomic
from vmatdose.data.ingest.batch import convert_cases, is_complete_case_file
from vmatdose.data.ingest.training_grid import MARGIN_MM, MAX_VOXELS, GridSettings

log = logging.getLogger(__name__)


def preprocess_dicom(input_dir: str | os.PathLike | None, output_dir: str | os.PathLike,
                     protocol, num_workers: int = 2, progress: bool = True,
                     summary_path: str | os.PathLike | None = None,
                     case_id_map: str | None = None, record_sources: bool = False,
                     grid: Mapping | None = None, **settings) -> dict:
    """Every patient folder below ``input_dir`` -> ``output_dir/<case_id>.npz`` on the
    training grid, and ``output_dir/dataset_fingerprint.json``.

    Args:
        protocol: the treatment-site protocol (:class:`~vmatdose.protocol.Protocol` or its
            config): structures, synonyms, targets, prescriptions, fractions.
        case_id_map: mapping file (PatientID or folder name -> case id).
        record_sources: keep source paths in the summary and source DICOM UIDs in the
            case files.
        grid: ``resample`` (false: the native CT grid), ``spacing_mm`` (``(dz, dy, dx)``;
            ``None``: an earlier fingerprint's in ``output_dir``, else chosen from the
            fingerprint, :func:`~vmatdose.data.ingest.fingerprint.choose_spacing`),
            ``margin_mm`` and ``max_voxels``.
        settings: the other :class:`~vmatdose.data.ingest.dicom.DicomIngestSettings`
            fields (``require_dose``, ``body_threshold_hu``, ``id_salt``).

    Raises:
        SaltError: ``id_salt`` is empty and no ``case_id_map`` is given (before any work).
    """
    from vmatdose.data.ingest.dicom import DicomIngestSettings, ingest_dicom_case
    from vmatdose.data.ingest.dicom_files import find_dicom_patients
    from vmatdose.data.ingest.fingerprint import write_fingerprint
    from vmatdose.data.privacy import case_id_for_folder, load_case_id_map, require_salt

    if input_dir is None:
        raise ValueError("source=dicom needs input_dir=<folder of patient folders>")
    grid = dict(grid or {})
    ingest_settings = DicomIngestSettings.from_config(
        {**settings, "record_sources": record_sources}, protocol)
    id_map = load_case_id_map(case_id_map) if case_id_map else None
    require_salt(ingest_settings.id_salt, id_map)
    folders = find_dicom_patients(input_dir)
    jobs = [(case_id_for_folder(f, ingest_settings.id_salt, id_map), f) for f in folders]
    spacing = _target_spacing(grid, folders, output_dir, ingest_settings.protocol, progress)
    ingest_settings = dataclasses.replace(ingest_settings, grid=GridSettings(
        tuple(spacing) if spacing else None, float(grid.get("margin_mm", MARGIN_MM))))
    convert = functools.partial(ingest_dicom_case, settings=ingest_settings)
    log.info("DICOM (protocol %s): %d patient folders -> %s (%s)",
             ingest_settings.protocol.name, len(jobs), output_dir,
             f"training grid {spacing} mm" if spacing else "native CT grids")
    chosen = {"margin_mm": float(grid.get("margin_mm", MARGIN_MM)),
              "max_voxels": int(grid.get("max_voxels", MAX_VOXELS))}
    Path(output_dir).mkdir(parents=True, exist_ok=True)
    write_fingerprint(output_dir, spacing, chosen)  # a killed run keeps its spacing
    summary = convert_cases(jobs, convert, output_dir, num_workers=num_workers,
                            progress=progress, summary_path=summary_path,
                            record_sources=record_sources)
    log.info("dataset fingerprint: %s", write_fingerprint(output_dir, spacing, chosen))
    return summary


def _target_spacing(grid: Mapping, folders: list[Path], output_dir: str | os.PathLike,
                    protocol, progress: bool) -> list[float] | None:
    """The training grid's spacing: ``grid.spacing_mm``, else an earlier fingerprint's in
    ``output_dir``, else chosen from a header-only pass over ``folders``; ``None`` with
    ``grid.resample=false``."""
    from tqdm.auto import tqdm

    from vmatdose.data.ingest.fingerprint import (
        choose_spacing,
        read_fingerprint_spacing,
        source_geometry,
    )

    if not grid.get("resample", True):
        return None
    if grid.get("spacing_mm"):
        spacing = [float(v) for v in grid["spacing_mm"]]
        if len(spacing) != 3 or min(spacing) <= 0:
            raise ValueError(f"source.grid.spacing_mm={spacing}: give 3 positive mm (dz, dy, dx)")
        return spacing
    earlier = read_fingerprint_spacing(output_dir)
    if earlier:
        log.info("target spacing %s mm from the fingerprint in %s", earlier, output_dir)
        return earlier
    geometries = []
    for folder in tqdm(folders, desc="fingerprint (headers)", unit="patient",
                       disable=not progress):
        try:
            geometries.append(source_geometry(folder, protocol))
        except Exception as err:  # the conversion reports this folder's problem
            log.info("fingerprint: %s left out (%s)", folder.name, type(err).__name__)
    if not geometries:
        return None
    spacing = choose_spacing(geometries, float(grid.get("margin_mm", MARGIN_MM)),
                             int(grid.get("max_voxels", MAX_VOXELS)))
    log.info("target spacing %s mm chosen from %d patients' headers", spacing,
             len(geometries))
    return spacing


def preprocess_openkbp(input_dir: str | os.PathLike | None, output_dir: str | os.PathLike,
                       num_workers: int = 2, progress: bool = True,
                       summary_path: str | os.PathLike | None = None,
                       default_input_dir: str | None = None) -> dict:
    """Every OpenKBP patient (``pt_*/``) below ``input_dir`` -> ``openkbp_pt_N.npz``."""
    from vmatdose.data.ingest.openkbp import find_openkbp_patients, import_openkbp_patient

    root = input_dir or default_input_dir
    if root is None:
        raise ValueError("source=openkbp needs input_dir=<OpenKBP root>")
    jobs = [(f"openkbp_{folder.name}", folder) for folder in find_openkbp_patients(root)]
    log.info("OpenKBP: %d patients -> %s", len(jobs), output_dir)
    return convert_cases(jobs, import_openkbp_patient, output_dir, num_workers=num_workers,
                         progress=progress, summary_path=summary_path)


def preprocess_phantom(input_dir: str | os.PathLike | None, output_dir: str | os.PathLike,
                       num_workers: int = 2, progress: bool = True,
                       summary_path: str | os.PathLike | None = None, n_cases: int = 32,
                       shape=PHANTOM_SHAPE, spacing_mm=PHANTOM_SPACING_MM, seed: int = 0) -> dict:
    """Generate ``n_cases`` phantoms (idempotent, see
    :func:`~vmatdose.data.phantom.generate_phantom_dataset`); ``input_dir`` is unused."""
    from vmatdose.data.phantom import generate_phantom_dataset

    started = time.perf_counter()
    output = Path(output_dir)
    existing = {p.stem for p in output.glob("phantom_*.npz") if is_complete_case_file(p)}
    paths = generate_phantom_dataset(output, n_cases, list(shape), list(spacing_mm), seed,
                                     num_workers, progress=progress)
    done = [p.stem for p in paths if p.stem in existing]
    new = [{"case_id": p.stem, "seconds": None} for p in paths if p.stem not in existing]
    summary = {"output_dir": str(output), "num_workers": num_workers,
               "seconds": round(time.perf_counter() - started, 3), "processed": new,
               "already_done": done, "skipped": [], "failed": [], "warnings": [],
               "counts": {"jobs": len(paths), "processed": len(new), "already_done": len(done),
                          "skipped": 0, "failed": 0, "warnings": 0}}
    if summary_path is not None:
        write_json_atomic(summary, summary_path)
    return summary


def run_preprocess(cfg: DictConfig) -> dict:
    """Instantiate ``cfg.source`` (a partial of one of the functions above) and run it."""
    run = hydra.utils.instantiate(cfg.source)
    summary_path = cfg.get("summary_path")
    return run(input_dir=cfg.get("input_dir"), output_dir=cfg.output_dir,
               num_workers=int(cfg.num_workers), progress=bool(cfg.progress),
               summary_path=summary_path)


def failure_line(summary: dict, summary_path: str | os.PathLike | None) -> str | None:
    """The closing line of a batch with failed cases (``None`` when none failed)."""
    failed = summary["counts"]["failed"]
    if not failed:
        return None
    where = f"see {summary_path}" if summary_path else "see the table above"
    return (f"preprocess: {failed} of {summary['counts']['jobs']} case(s) failed; {where} "
            "(allow_failures=true exits 0)")
