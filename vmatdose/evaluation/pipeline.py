"""An evaluation run as library functions: a checkpoint or a folder of predicted doses,
on a split of case files, through the clinical suite (:mod:`vmatdose.evaluation.suite`).

``python -m vmatdose.evaluate`` composes the config and calls :func:`run_evaluation`;
training calls :func:`evaluate_checkpoint` on its best checkpoint.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path

import pandas as pd
from omegaconf import DictConfig, OmegaConf

from vmatdose.data.case import list_case_files, load_case
from vmatdose.data.datamodule import read_split
from vmatdose.data.split_listing import split_case_paths
from vmatdose.data.validation import check_cases
from vmatdose.errors import InputError
from vmatdose.evaluation.baseline import StructureMeanBaseline
from vmatdose.evaluation.suite import EvaluationSettings, run_suite
from vmatdose.inference.predictions import prediction_path, read_predictions
from vmatdose.inference.predictor import CHECKPOINT_OVERRIDES, DEFAULT_SPACING_POLICY, Predictor
from vmatdose.protocol import Protocol

log = logging.getLogger(__name__)

#: Where evaluate takes its case files from: ``checkpoint`` (the folder and split the
#: checkpoint was trained on) or ``config`` (the composed ``data`` config).
DATA_SOURCES = ("checkpoint", "config")


def evaluate_pairs(pairs: Iterable[tuple], protocol: Protocol, evaluation: Mapping | None,
                   output_dir: str | Path, baseline: StructureMeanBaseline | None = None,
                   total: int | None = None) -> tuple[pd.DataFrame, dict]:
    """The clinical evaluation of ``(case, predicted dose Gy[, std Gy])`` pairs with the
    protocol's targets and constraints into ``output_dir`` (tables, figures, report)."""
    settings = EvaluationSettings.from_config(protocol.targets, list(protocol.constraints),
                                              dict(evaluation or {}))
    return run_suite(pairs, settings, output_dir, baseline, total)


def first_cases(paths: Sequence[Path], evaluation: Mapping | None) -> list[Path]:
    """The first ``evaluation["max_cases"]`` of ``paths`` (every one when it is unset)."""
    limit = (evaluation or {}).get("max_cases")
    if limit is None or limit >= len(paths):
        return list(paths)
    log.info("evaluating the first %d of the %d cases (evaluation.max_cases)", limit,
             len(paths))
    return list(paths)[:limit]


def fit_baseline(structures: Sequence[str], train_paths: Sequence[Path]
                 ) -> StructureMeanBaseline | None:
    """The mean-dose-per-structure baseline of the training cases (``None`` without any)."""
    if not train_paths:
        return None
    return StructureMeanBaseline(list(structures)).fit(load_case(p) for p in train_paths)


def evaluate_checkpoint(ckpt_path: str | Path, output_dir: str | Path, *, split: str = "test",
                        data_cfg: DictConfig | None = None, split_file: str | None = None,
                        evaluation: Mapping | None = None, accelerator: str = "auto",
                        spacing_mismatch: str = DEFAULT_SPACING_POLICY,
                        **overrides: float | int | None) -> tuple[pd.DataFrame, dict]:
    """Evaluate a checkpoint on ``split`` of the data it was trained on (``data_cfg``
    ``None``: its folder and split, or ``split_file``) or of ``data_cfg``'s case files;
    ``overrides`` (keys of :data:`~vmatdose.inference.predictor.CHECKPOINT_OVERRIDES`)
    replace the model's inference settings (``None``: the checkpoint's own)."""
    predictor = Predictor.from_checkpoint(ckpt_path, accelerator, spacing_mismatch, **overrides)
    contract = predictor.contract
    if data_cfg is None:
        paths, train = _checkpoint_split(contract, split, split_file)
    else:
        paths, train = _config_split(data_cfg, split, split_file)
    paths = first_cases(paths, evaluation)
    predictor.check(paths)  # before the baseline reads the training cases
    trained = {Path(p).name for p in train}
    in_sample = sum(Path(p).name in trained for p in paths)
    if in_sample and split not in ("train", "all"):
        log.warning("%d of the %d %s cases were trained on (data.split.train_on): their "
                    "scores are in-sample", in_sample, len(paths), split)
    baseline = fit_baseline(contract.structures, train) if split != "all" else None
    pairs = ((p.case, p.dose_gy, p.std_gy) for p in predictor.predict_all(paths))
    table, summary = evaluate_pairs(pairs, predictor.protocol, evaluation, output_dir,
                                    baseline, total=len(paths))
    log.info("evaluated %d cases of %s -> %s", len(table), ckpt_path, output_dir)
    return table, summary


def _checkpoint_split(contract, split: str, split_file: str | None
                      ) -> tuple[list[Path], list[Path]]:
    if split_file is None:
        if split != "all" and split not in contract.split:
            raise InputError(f"split={split!r}: the checkpoint knows {sorted(contract.split)}")
        return contract.split_paths(split), contract.split_paths("train")
    files = {p.stem: p for p in list_case_files(contract.cases_dir)}
    try:
        ids = read_split(split_file, list(files))
    except ValueError as err:
        raise InputError(str(err)) from None
    chosen = list(files.values()) if split == "all" else [files[i] for i in ids[split]]
    return chosen, [files[i] for i in ids["train"]]


def _config_split(data_cfg: DictConfig, split: str, split_file: str | None
                  ) -> tuple[list[Path], list[Path]]:
    """The case files of ``split`` of the data config, listed read-only (no import, no
    generation, no split file written into a folder the user only asked to read)."""
    return split_case_paths(data_cfg, split, split_file)


def evaluate_prediction_folder(predictions_dir: str | Path, data_cfg: DictConfig,
                               protocol: Protocol, output_dir: str | Path, *,
                               split: str = "all", split_file: str | None = None,
                               evaluation: Mapping | None = None
                               ) -> tuple[pd.DataFrame, dict]:
    """Evaluate ``<predictions_dir>/<case_id>.npz`` against ``split`` of ``data_cfg``'s
    case files (each checked against ``protocol`` first)."""
    paths, train = _config_split(data_cfg, split, split_file)
    paths = first_cases(paths, evaluation)
    check_cases(paths, protocol, list(data_cfg.structures))
    missing = [p.stem for p in paths if not prediction_path(predictions_dir, p.stem).is_file()]
    if missing:  # before any case is scored or drawn
        raise InputError(f"predictions_dir={predictions_dir}: no prediction for {len(missing)} "
                         f"of the {len(paths)} cases ({', '.join(missing[:5])}"
                         f"{', ...' if len(missing) > 5 else ''})")
    baseline = fit_baseline(list(data_cfg.structures), train)
    pairs = read_predictions(predictions_dir, paths)
    return evaluate_pairs(pairs, protocol, evaluation, output_dir, baseline, total=len(paths))


def run_evaluation(cfg: DictConfig, output_dir: str | Path,
                   data_from: str = "checkpoint") -> tuple[pd.DataFrame, dict]:
    """Evaluate ``cfg.ckpt_path`` or ``cfg.predictions_dir`` on ``cfg.split``.

    ``data_from``: with a checkpoint, ``checkpoint`` evaluates the data it was trained on
    and ``config`` the composed ``cfg.data``; a folder of predictions always uses
    ``cfg.data`` (its ``cases_dir``) and ``cfg.protocol``.
    """
    if bool(cfg.get("ckpt_path")) == bool(cfg.get("predictions_dir")):
        raise InputError("give exactly one of ckpt_path=<checkpoint> or "
                         "predictions_dir=<folder of predicted doses>")
    if data_from not in DATA_SOURCES:
        raise ValueError(f"data_from must be one of {DATA_SOURCES}, not {data_from!r}")
    evaluation = OmegaConf.to_container(cfg.evaluation) if cfg.get("evaluation") else None
    if cfg.get("ckpt_path"):
        return evaluate_checkpoint(
            cfg.ckpt_path, output_dir, split=cfg.split, split_file=cfg.get("split_file"),
            data_cfg=cfg.data if data_from == "config" else None, evaluation=evaluation,
            accelerator=cfg.get("accelerator", "auto"),
            spacing_mismatch=cfg.get("spacing_mismatch", DEFAULT_SPACING_POLICY),
            **{key: cfg.get(key) for key in CHECKPOINT_OVERRIDES})
    return evaluate_prediction_folder(cfg.predictions_dir, cfg.data,
                                      Protocol.from_dict(cfg.protocol), output_dir,
                                      split=cfg.split, split_file=cfg.get("split_file"),
                                      evaluation=evaluation)


def data_source(overrides: Sequence[str]) -> str:
    """``config`` when the command line overrides the data (``data=...``,
    ``data.cases_dir=...``), else ``checkpoint``."""
    keys = [o.lstrip("+~").split("=", 1)[0] for o in overrides]
    return "config" if any(k == "data" or k.startswith("data.") for k in keys) else "checkpoint"
