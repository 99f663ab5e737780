"""A training run end to end: record, fit, then evaluate the best checkpoint.

The one module above both training and evaluation (``docs/architecture.md``, layers):
``python -m vmatdose.train`` composes the config and calls :func:`run_training`.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from pathlib import Path

import lightning as L
from omegaconf import DictConfig, OmegaConf

from vmatdose.evaluation.pipeline import evaluate_checkpoint
from vmatdose.metrics.registry import summary_line
from vmatdose.protocol import Protocol
from vmatdose.tracking.evaluation_log import finish_loggers, log_evaluation
from vmatdose.training.fit import best_checkpoint, fit, optimized_metric

log = logging.getLogger(__name__)


def evaluate_best(cfg: DictConfig, trainer: L.Trainer, output_dir: Path) -> dict | None:
    """Evaluate the best checkpoint on the test split of its own data into
    ``output_dir/eval`` (as ``python -m vmatdose.evaluate ckpt_path=<it>`` does) and send
    the results to the run's loggers; return the summary (``None`` without checkpoint)."""
    ckpt = best_checkpoint(trainer)
    if ckpt is None:
        log.warning("no checkpoint was saved; skipping evaluation")
        return None
    evaluation = OmegaConf.to_container(cfg.evaluation) if cfg.get("evaluation") else None
    table, summary = evaluate_checkpoint(ckpt, output_dir / "eval", evaluation=evaluation,
                                         accelerator=cfg.trainer.accelerator,
                                         spacing_mismatch=cfg.spacing_mismatch)
    log_evaluation(trainer.loggers, table, summary, output_dir / "eval")
    return summary


def run_training(cfg: DictConfig, overrides: list[str] | None = None,
                 report: Callable[[str], None] = log.info) -> float | None:
    """Fit (the run record is written once every case file passed its checks), evaluate;
    return the optimised metric (for sweepers). ``report`` gets the one-line summary of
    the evaluation (the entry point prints it)."""
    start = time.perf_counter()
    output_dir = Path(cfg.paths.output_dir)
    trainer, _ = fit(cfg, output_dir, overrides)
    metric = optimized_metric(trainer, cfg.get("optimized_metric"))
    if not trainer.is_global_zero:
        return metric
    if cfg.evaluate_after_training:
        summary = evaluate_best(cfg, trainer, output_dir)
        if summary is not None:
            primary = Protocol.from_dict(cfg.protocol).targets[0]
            means = {k: v["mean"] for k, v in summary["metrics"].items()}
            report(summary_line(cfg.task_name, means, primary, time.perf_counter() - start))
    finish_loggers(trainer.loggers)
    return metric
