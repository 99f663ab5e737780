"""Predict a folder of case files with a checkpoint (``python -m vmatdose.predict``)."""

from __future__ import annotations

import logging
import tempfile
from collections.abc import Mapping
from pathlib import Path

from tqdm import tqdm

from vmatdose.data.case import list_case_files
from vmatdose.data.ingest.openkbp import is_openkbp_folder, openkbp_cases
from vmatdose.errors import InputError
from vmatdose.inference.output_folder import prepare_output_folder
from vmatdose.inference.predictor import CHECKPOINT_OVERRIDES, DEFAULT_SPACING_POLICY, Predictor
from vmatdose.inference.writers import chosen_writers

log = logging.getLogger(__name__)


def run_prediction(cfg: Mapping) -> list[Path]:
    """Predict every case file in ``cfg.cases_dir`` into ``cfg.output_dir``; return the
    written paths. Keys: ``ckpt_path``, ``cases_dir``, ``output_dir``, ``accelerator``,
    ``spacing_mismatch``, ``export_rtdose``, ``source_dicom``, ``export_openkbp``,
    ``overwrite``.

    ``cases_dir`` may be an OpenKBP folder (``pt_*/``): its patients are imported with the
    checkpoint's protocol into a temporary folder, removed afterwards (also on failure);
    the folder given is only read.
    """
    if cfg.get("dicom_dir"):
        if cfg.get("cases_dir"):
            raise InputError("give cases_dir (case files) or dicom_dir (DICOM-RT patient "
                             "folders), not both")
        from vmatdose.inference.dicom_input import predict_dicom

        predictor = _predictor(cfg)
        prepare_output_folder(cfg["output_dir"], cfg["ckpt_path"], bool(cfg.get("overwrite")),
                              inputs=(cfg["dicom_dir"],))
        return predict_dicom(cfg, predictor)
    if not cfg.get("cases_dir"):
        raise InputError("predict needs cases_dir=<case files> or dicom_dir=<DICOM folders>")
    if cfg.get("source_dicom") and not cfg.get("export_rtdose"):
        raise InputError("source_dicom is read by the RTDOSE export only; add export_rtdose=true")
    cases_dir = Path(cfg["cases_dir"])
    if not cases_dir.is_dir():
        raise InputError(f"cases_dir={cases_dir}: no such folder")
    paths = list_case_files(cases_dir)
    openkbp = not paths and is_openkbp_folder(cases_dir)
    if not paths and not openkbp:
        raise InputError(f"cases_dir={cases_dir}: no case files (*.npz) and no OpenKBP "
                         "patient folders (pt_*/ct.csv) to predict")
    predictor = _predictor(cfg)
    if not openkbp:
        return _predict_paths(cfg, predictor, paths)
    with tempfile.TemporaryDirectory(prefix="openkbp_") as tmp:
        return _predict_paths(cfg, predictor, openkbp_cases(cases_dir, tmp, predictor.protocol))


def _predictor(cfg: Mapping) -> Predictor:
    return Predictor.from_checkpoint(
        cfg["ckpt_path"], cfg.get("accelerator", "auto"),
        cfg.get("spacing_mismatch", DEFAULT_SPACING_POLICY),
        **{key: cfg.get(key) for key in CHECKPOINT_OVERRIDES})


def _predict_paths(cfg: Mapping, predictor: Predictor, paths: list[Path]) -> list[Path]:
    """Check every case, then predict each into ``cfg.output_dir`` with the chosen writers."""
    predictor.check(paths)  # before anything is written
    writers = chosen_writers(bool(cfg.get("export_rtdose")), bool(cfg.get("export_openkbp")))
    options = {key: cfg.get(key) for key in ("source_dicom", "id_salt", "case_id_map",
                                             "rtdose_grid_mm")}
    output_dir = prepare_output_folder(cfg["output_dir"], cfg["ckpt_path"],
                                       bool(cfg.get("overwrite")), inputs=(cfg["cases_dir"],))
    written: list[Path] = []
    predictions = (predictor.predict(path) for path in paths)  # checked above
    for prediction in tqdm(predictions, total=len(paths), desc="predict", unit="case"):
        for writer in writers:
            written += writer(prediction, output_dir, options)
    log.info("wrote %d files to %s", len(written), output_dir)
    return written
