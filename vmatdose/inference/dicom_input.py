"""Predict straight from DICOM-RT patient folders (``predict dicom_dir=<patients>``).

Each patient folder is ingested on the fly with the checkpoint's own protocol (so names,
targets and channel order are those the model was trained on) onto the grid the model
predicts on: the one its training data's grid rule gives the patient's CT (an OpenKBP
model: in-plane the CT's field of view / 128, the CT's slices;
:mod:`vmatdose.data.grid_rule`: the whole field of view, as the arrays), else the
training spacing (its median), cropped to the body (no 512 x 512 volume reaches the
network, and nothing is resampled twice), into case files in a
temporary folder (kept under ``output_dir/cases`` only with ``keep_cases=true``), predicted,
and written as ``<case_id>.npz`` (on the case grid) plus ``<case_id>_rtdose.dcm`` on the
grid of the patient's own RTDOSE when the folder has one (else ``rtdose_grid_mm`` over
the body, :func:`~vmatdose.data.export.rtdose.export_geometry`). The RTDOSE takes the
patient identity and study/frame/plan references from the patient's own folder (read at
export time, never stored in a case file), so a planning system attaches it to the right
patient and plan.

Case ids follow ingest: a case-id map, else a salted hash (``VMATDOSE_ID_SALT``); without
either, a one-off random salt is used, so ids then differ between runs.
"""

from __future__ import annotations

import logging
import secrets
import tempfile
from collections.abc import Mapping
from pathlib import Path

from tqdm import tqdm

from vmatdose.data.case import save_case
from vmatdose.data.export.rtdose import DOSE_GRID_MM, read_source_patient, write_rtdose
from vmatdose.data.ingest.dicom import DicomIngestError, DicomIngestSettings, ingest_dicom_case
from vmatdose.data.ingest.dicom_files import find_dicom_patients
from vmatdose.data.ingest.training_grid import GridSettings
from vmatdose.data.privacy import case_id_for_folder, load_case_id_map
from vmatdose.errors import InputError
from vmatdose.inference.predictor import Predictor
from vmatdose.inference.writers import write_npz_prediction

log = logging.getLogger(__name__)


def ingest_for_prediction(dicom_dir: Path, predictor: Predictor, cases_dir: Path,
                          salt: str, id_map: Mapping[str, str] | None
                          ) -> dict[Path, Path]:
    """Ingest every patient folder under ``dicom_dir`` with the checkpoint's protocol into
    ``cases_dir``; return case file -> its patient folder. Any folder that cannot be read
    is reported together with the others, before anything is predicted."""
    folders = find_dicom_patients(dicom_dir)
    if not folders:
        raise InputError(f"{dicom_dir}: no DICOM patient folders to predict")
    rule = predictor.contract.grid_rule_obj
    settings = DicomIngestSettings(protocol=predictor.protocol, require_dose=False,
                                   id_salt=salt, grid=GridSettings(
                                       tuple(float(v) for v in predictor.spacing.median_mm),
                                       field_of_view_voxels=rule.field_of_view_voxels))
    cases: dict[Path, Path] = {}
    problems = []
    for folder in tqdm(folders, desc="ingesting DICOM patients", unit="patient"):
        try:
            case_id = case_id_for_folder(folder, salt, id_map)
            case = ingest_dicom_case(folder, case_id, settings)
        except (DicomIngestError, ValueError) as err:
            problems.append(f"{folder.name}: {err}")
            continue
        cases[save_case(case, cases_dir / f"{case.case_id}.npz")] = folder
    if problems:
        raise InputError(f"{len(problems)} of {len(folders)} patient folder(s) of "
                         f"{dicom_dir} cannot be predicted: " + "; ".join(problems))
    return cases


def predict_dicom(cfg: Mapping, predictor: Predictor) -> list[Path]:
    """Predict every patient folder of ``cfg["dicom_dir"]`` into ``cfg["output_dir"]``:
    ``<case_id>.npz`` and ``<case_id>_rtdose.dcm`` each; return the written paths."""
    dicom_dir, output_dir = Path(cfg["dicom_dir"]), Path(cfg["output_dir"])
    id_map = load_case_id_map(cfg["case_id_map"]) if cfg.get("case_id_map") else None
    salt = str(cfg.get("id_salt") or "") or secrets.token_hex(16)
    output_dir.mkdir(parents=True, exist_ok=True)
    written: list[Path] = []
    with tempfile.TemporaryDirectory(prefix="vmatdose-dicom-") as tmp:
        cases_dir = output_dir / "cases" if cfg.get("keep_cases") else Path(tmp)
        cases = ingest_for_prediction(dicom_dir, predictor, cases_dir, salt, id_map)
        for prediction in tqdm(predictor.predict_all(list(cases)), total=len(cases),
                               desc="predict", unit="case"):
            case = prediction.case
            written += write_npz_prediction(prediction, output_dir, {})
            source = read_source_patient(cases[prediction.path])
            written.append(write_rtdose(prediction.dose_gy, case,
                                        output_dir / f"{case.case_id}_rtdose.dcm", source,
                                        grid_mm=cfg.get("rtdose_grid_mm", DOSE_GRID_MM)))
    log.info("wrote %d files to %s", len(written), output_dir)
    return written
