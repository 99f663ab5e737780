"""Send a finished evaluation (per-case table, summary) to the run's loggers."""

from __future__ import annotations

import math
from collections.abc import Sequence

import pandas as pd
from lightning.pytorch.loggers import Logger, WandbLogger


def summary_metrics(summary: dict) -> dict[str, float]:
    """``test/<metric>`` -> mean over cases, plus the OpenKBP scores (finite values only)."""
    metrics = {f"test/{k}": v["mean"] for k, v in summary.get("metrics", {}).items()}
    metrics.update({f"test/openkbp_{k}": v for k, v in summary.get("openkbp", {}).items()})
    return {k: float(v) for k, v in metrics.items() if v is not None and math.isfinite(v)}


def log_evaluation(loggers: Sequence[Logger], table: pd.DataFrame, summary: dict) -> None:
    """Final test metrics to every logger; the per-case table to W&B as a table."""
    metrics = summary_metrics(summary)
    for logger in loggers:
        logger.log_metrics(metrics)
        if isinstance(logger, WandbLogger):
            logger.log_table(key="test/per_case", dataframe=table)
            logger.experiment.summary.update(metrics)
        logger.save()


def finish_loggers(loggers: Sequence[Logger]) -> None:
    """Close W&B runs (so offline files are complete and a sweep's next run starts fresh)."""
    for logger in loggers:
        logger.finalize("success")
        if isinstance(logger, WandbLogger) and logger._experiment is not None:
            logger.experiment.finish()
