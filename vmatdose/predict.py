"""Predict doses for case files with a trained checkpoint.

    python -m vmatdose.predict ckpt_path=<ckpt> cases_dir=<dir> output_dir=<dir> export_rtdose=true

Writes ``<case_id>.npz`` (``dose`` in Gy, plus ``dose_std`` for generative models, and
the case's geometry) per case and, with ``export_rtdose=true``, ``<case_id>_rtdose.dcm``.
"""

from __future__ import annotations

import logging
from pathlib import Path

import hydra
import numpy as np
from omegaconf import DictConfig
from tqdm import tqdm

from vmatdose.config import CONFIG_DIR
from vmatdose.data.atomic import atomic_path
from vmatdose.data.case import Case, list_case_files, write_npz
from vmatdose.evaluation.inference import load_module, predict_cases, resolve_device

log = logging.getLogger(__name__)


def save_prediction(case: Case, dose_gy: np.ndarray, std_gy: np.ndarray | None,
                    path: str | Path) -> Path:
    """Atomically write a case-style prediction ``.npz`` (dose in Gy on the case grid)."""
    path = Path(path)
    if not np.all(np.isfinite(dose_gy)):
        raise ValueError(f"{path}: refusing to write a prediction with non-finite doses")
    arrays = {"dose": dose_gy.astype(np.float32), "spacing_mm": case.spacing_mm,
              "origin_mm": case.origin_mm, "case_id": np.asarray(case.case_id)}
    if std_gy is not None:
        arrays["dose_std"] = std_gy.astype(np.float32)
    with atomic_path(path, ".npz.tmp") as tmp:
        write_npz(tmp, arrays)
    return path


def run_prediction(cfg: DictConfig) -> list[Path]:
    """Predict every case file in ``cfg.cases_dir`` into ``cfg.output_dir``."""
    paths = list_case_files(cfg.cases_dir)
    if not paths:
        raise FileNotFoundError(f"{cfg.cases_dir}: no case files (*.npz) to predict")
    device = resolve_device(cfg.get("accelerator", "auto"))
    module, ckpt_cfg = load_module(cfg.ckpt_path, device)
    output_dir = Path(cfg.output_dir)
    written = []
    results = predict_cases(module, ckpt_cfg.data, paths, device, with_uncertainty=True)
    for case, dose, std in tqdm(results, total=len(paths), desc="predict", unit="case"):
        written.append(save_prediction(case, dose, std, output_dir / f"{case.case_id}.npz"))
        if cfg.get("export_rtdose"):
            from vmatdose.data.export.rtdose import write_rtdose

            written.append(write_rtdose(dose, case, output_dir / f"{case.case_id}_rtdose.dcm"))
    log.info("wrote %d files to %s", len(written), output_dir)
    return written


@hydra.main(version_base="1.3", config_path=CONFIG_DIR, config_name="predict")
def main(cfg: DictConfig) -> None:
    for path in run_prediction(cfg):
        print(path)


if __name__ == "__main__":
    main()
