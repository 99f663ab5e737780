"""Predict a folder of case files with a checkpoint (``python -m vmatdose.predict``)."""

from __future__ import annotations

import logging
from collections.abc import Mapping
from pathlib import Path

from tqdm import tqdm

from vmatdose.data.case import list_case_files
from vmatdose.data.ingest.openkbp import is_openkbp_folder, openkbp_cases
from vmatdose.errors import InputError
from vmatdose.inference.predictor import Predictor
from vmatdose.inference.writers import chosen_writers

log = logging.getLogger(__name__)


def run_prediction(cfg: Mapping) -> list[Path]:
    """Predict every case file in ``cfg.cases_dir`` into ``cfg.output_dir``; return the
    written paths. Keys: ``ckpt_path``, ``cases_dir``, ``output_dir``, ``accelerator``,
    ``spacing_mismatch``, ``export_rtdose``, ``source_dicom``, ``export_openkbp``."""
    if cfg.get("dicom_dir"):
        if cfg.get("cases_dir"):
            raise InputError("give cases_dir (case files) or dicom_dir (DICOM-RT patient "
                             "folders), not both")
        from vmatdose.inference.dicom_input import predict_dicom

        predictor = Predictor.from_checkpoint(cfg["ckpt_path"], cfg.get("accelerator", "auto"),
                                              cfg.get("spacing_mismatch", "resample"))
        return predict_dicom(cfg, predictor)
    if not cfg.get("cases_dir"):
        raise InputError("predict needs cases_dir=<case files> or dicom_dir=<DICOM folders>")
    cases_dir = Path(cfg["cases_dir"])
    paths = list_case_files(cases_dir)
    if not paths and is_openkbp_folder(cases_dir):
        paths = openkbp_cases(cases_dir)  # imported on the fly into a temporary folder
    if not paths:
        raise InputError(f"{cases_dir}: no case files (*.npz) to predict")
    if cfg.get("source_dicom") and not cfg.get("export_rtdose"):
        raise InputError("source_dicom is read by the RTDOSE export only; add export_rtdose=true")
    predictor = Predictor.from_checkpoint(cfg["ckpt_path"], cfg.get("accelerator", "auto"),
                                          cfg.get("spacing_mismatch", "resample"))
    writers = chosen_writers(bool(cfg.get("export_rtdose")), bool(cfg.get("export_openkbp")))
    options = {key: cfg.get(key) for key in ("source_dicom", "id_salt", "case_id_map")}
    output_dir = Path(cfg["output_dir"])
    output_dir.mkdir(parents=True, exist_ok=True)
    written: list[Path] = []
    for prediction in tqdm(predictor.predict_all(paths), total=len(paths), desc="predict",
                           unit="case"):
        for writer in writers:
            written += writer(prediction, output_dir, options)
    log.info("wrote %d files to %s", len(written), output_dir)
    return written
