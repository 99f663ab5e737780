"""Send a finished evaluation (per-case table, summary, figures) to the run's loggers.

W&B gets the test metrics (history and run summary), the per-case table and every
evaluation figure (``eval/<kind>``, one image per case); TensorBoard gets the metrics,
the figures, the per-case table (text), and the run's hyperparameters written together
with the test metrics so a sweep fills its HParams tab.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path

import matplotlib.image as mpimg
import pandas as pd
from lightning.pytorch.loggers import Logger, TensorBoardLogger, WandbLogger

from vmatdose.tracking.compare import to_markdown


def summary_metrics(summary: dict) -> dict[str, float]:
    """``test/<metric>`` -> mean over cases, plus the OpenKBP scores (finite values only)."""
    metrics = {f"test/{k}": v["mean"] for k, v in summary.get("metrics", {}).items()}
    metrics.update({f"test/openkbp_{k}": v for k, v in summary.get("openkbp", {}).items()})
    return {k: float(v) for k, v in metrics.items() if v is not None and math.isfinite(v)}


def evaluation_figures(eval_dir: str | Path | None) -> dict[str, list[Path]]:
    """``kind`` -> PNGs of ``<eval_dir>/figures``: ``<case>_slices.png`` under
    ``slices``, ``<case>_dvh.png`` under ``dvh``, other figures under their own stem."""
    if eval_dir is None or not (Path(eval_dir) / "figures").is_dir():
        return {}
    kinds: dict[str, list[Path]] = {}
    for path in sorted((Path(eval_dir) / "figures").glob("*.png")):
        stem = path.stem
        kind = next((k for k in ("slices", "dvh") if stem.endswith(f"_{k}")), stem)
        kinds.setdefault(kind, []).append(path)
    return kinds


def _caption(path: Path, kind: str) -> str:
    return path.stem[: -len(kind) - 1] if path.stem.endswith(f"_{kind}") else path.stem


def log_evaluation(loggers: Sequence[Logger], table: pd.DataFrame, summary: dict,
                   eval_dir: str | Path | None = None) -> None:
    """Final test metrics to every logger; to W&B the per-case table, and to W&B and
    TensorBoard the figures of ``eval_dir`` and (TensorBoard) the hyperparameters with
    the test metrics."""
    metrics = summary_metrics(summary)
    figures = evaluation_figures(eval_dir)
    for logger in loggers:
        if isinstance(logger, TensorBoardLogger):
            # hparams + metrics in one summary: what the HParams tab reads
            logger.log_hyperparams(logger.hparams, metrics=metrics)
            logger.experiment.add_text("test/per_case", to_markdown(table))
        else:
            logger.log_metrics(metrics)
        if isinstance(logger, WandbLogger):
            logger.log_table(key="test/per_case", dataframe=table)
            logger.experiment.summary.update(metrics)
            for kind, paths in figures.items():
                logger.log_image(key=f"eval/{kind}", images=[str(p) for p in paths],
                                 caption=[_caption(p, kind) for p in paths])
        elif isinstance(logger, TensorBoardLogger):
            for kind, paths in figures.items():
                for path in paths:
                    image = mpimg.imread(path)[..., :3]
                    logger.experiment.add_image(f"eval/{kind}/{_caption(path, kind)}", image,
                                                dataformats="HWC")
        logger.save()


def finish_loggers(loggers: Sequence[Logger]) -> None:
    """Close W&B runs (so offline files are complete and a sweep's next run starts fresh)."""
    for logger in loggers:
        logger.finalize("success")
        if isinstance(logger, WandbLogger) and logger._experiment is not None:
            logger.experiment.finish()
