"""Evaluate a checkpoint, or a folder of predicted doses, on a split of case files.

    python -m vmatdose.evaluate ckpt_path=<run>/checkpoints/last.ckpt
    python -m vmatdose.evaluate predictions_dir=<dir> data.cases_dir=<dir> split=all

Writes ``per_case.csv``, ``dvh.csv``, ``constraints.csv``, ``summary.json``, ``figures/``
and ``report.html`` into the run folder.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path

import hydra
import numpy as np
import pandas as pd
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf, open_dict

from vmatdose.config import CONFIG_DIR
from vmatdose.data.case import Case, load_case
from vmatdose.evaluation.baseline import StructureMeanBaseline
from vmatdose.evaluation.inference import (
    INPUT_CONTRACT_KEYS,
    load_module,
    predict_cases,
    resolve_device,
)
from vmatdose.evaluation.suite import EvaluationSettings, run_suite

log = logging.getLogger(__name__)


def evaluate_predictions(pairs: Iterable[tuple[Case, np.ndarray]], data_cfg: DictConfig,
                         evaluation_cfg: DictConfig | dict | None, output_dir: str | Path,
                         baseline: StructureMeanBaseline | None = None,
                         total: int | None = None) -> tuple[pd.DataFrame, dict]:
    """The full clinical evaluation of ``(case, predicted dose Gy)`` pairs into
    ``output_dir`` (tables, figures, report.html; see :mod:`vmatdose.evaluation.suite`)."""
    settings = EvaluationSettings.from_config(
        data_cfg.targets, OmegaConf.to_container(data_cfg.get("constraints") or []),
        OmegaConf.to_container(evaluation_cfg) if isinstance(evaluation_cfg, DictConfig)
        else evaluation_cfg)
    return run_suite(pairs, settings, output_dir, baseline, total)


def read_predictions(predictions_dir: str | Path, case_paths: Sequence[Path]
                     ) -> Iterator[tuple[Case, np.ndarray, np.ndarray | None]]:
    """Pair each case with ``<predictions_dir>/<case_id>.npz`` (key ``dose``, Gy, and
    ``dose_std`` when a generative model wrote one)."""
    predictions_dir = Path(predictions_dir)
    for path in case_paths:
        case = load_case(path)
        pred_path = predictions_dir / f"{case.case_id}.npz"
        if not pred_path.is_file():
            raise FileNotFoundError(f"{pred_path}: no prediction for case {case.case_id!r}")
        with np.load(pred_path) as data:
            if "dose" not in data.files:
                raise ValueError(f"{pred_path}: no 'dose' array")
            dose = data["dose"].astype(np.float32)
            std = data["dose_std"].astype(np.float32) if "dose_std" in data.files else None
        if not np.all(np.isfinite(dose)):
            raise ValueError(f"{pred_path}: predicted dose has non-finite values")
        if dose.shape != case.shape:
            raise ValueError(f"{pred_path}: dose shape {dose.shape} differs from case "
                             f"{case.case_id!r} grid {case.shape}")
        yield case, dose, std


def _data_config(cfg: DictConfig, ckpt_cfg: DictConfig | None) -> DictConfig:
    """The eval data config, with the checkpoint's input contract when there is one."""
    data_cfg = cfg.data.copy()
    with open_dict(data_cfg):
        data_cfg.split_output = None
        if cfg.get("split_file"):
            data_cfg.split.file = cfg.split_file
        if ckpt_cfg is not None:
            for key in INPUT_CONTRACT_KEYS:
                if key in ckpt_cfg.data:
                    data_cfg[key] = ckpt_cfg.data[key]
    return data_cfg


def run_evaluation(cfg: DictConfig, output_dir: str | Path) -> tuple[pd.DataFrame, dict]:
    """Evaluate ``cfg.ckpt_path`` or ``cfg.predictions_dir`` on ``cfg.split``."""
    if bool(cfg.get("ckpt_path")) == bool(cfg.get("predictions_dir")):
        raise ValueError("give exactly one of ckpt_path=<checkpoint> or "
                         "predictions_dir=<folder of predicted doses>")
    module = ckpt_cfg = None
    device = resolve_device(cfg.get("accelerator", "auto"))
    if cfg.get("ckpt_path"):
        module, ckpt_cfg = load_module(cfg.ckpt_path, device)
        split_json = Path(cfg.ckpt_path).resolve().parents[1] / "split.json"
        if not cfg.get("split_file") and split_json.is_file():
            cfg = cfg.copy()
            with open_dict(cfg):
                cfg.split_file = str(split_json)
    data_cfg = _data_config(cfg, ckpt_cfg)
    datamodule = hydra.utils.instantiate(data_cfg)
    datamodule.prepare_data()
    paths = datamodule.paths_of(cfg.split)
    baseline = None
    if cfg.split != "all" and datamodule.paths_of("train"):
        baseline = StructureMeanBaseline(data_cfg.structures).fit(
            load_case(p) for p in datamodule.paths_of("train"))
    if module is not None:
        pairs = predict_cases(module, data_cfg, paths, device, with_uncertainty=True)
    else:
        pairs = read_predictions(cfg.predictions_dir, paths)
    table, summary = evaluate_predictions(pairs, data_cfg, cfg.get("evaluation"), output_dir,
                                          baseline, total=len(paths))
    log.info("evaluated %d cases -> %s", len(table), output_dir)
    return table, summary


@hydra.main(version_base="1.3", config_path=CONFIG_DIR, config_name="eval")
def main(cfg: DictConfig) -> None:
    output_dir = HydraConfig.get().runtime.output_dir
    table, summary = run_evaluation(cfg, output_dir)
    metrics = summary["metrics"]
    print(OmegaConf.to_yaml({k: round(v["mean"], 3) for k, v in metrics.items()}))


if __name__ == "__main__":
    main()
