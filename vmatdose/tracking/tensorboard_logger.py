"""A TensorBoard logger whose run folder is named after the run.

Event files go to ``<save_dir>/tensorboard/<run name>``, so ``tensorboard --logdir
multirun/<task>/<date>`` shows a sweep's runs side by side under readable names, and the
evaluation's hyperparameters and test metrics fill its HParams tab
(:func:`vmatdose.tracking.evaluation_log.log_evaluation`).
"""

from __future__ import annotations

from lightning.pytorch.loggers import TensorBoardLogger

from vmatdose.tracking.naming import path_safe, run_name


def make_tensorboard_logger(save_dir: str, task_name: str = "train", name: str = "tensorboard",
                            version: str | None = None) -> TensorBoardLogger:
    """Build a :class:`TensorBoardLogger`; ``version=None`` names the run folder from the
    task and its overrides."""
    version = version or path_safe(run_name(task_name))
    return TensorBoardLogger(save_dir=save_dir, name=name, version=version,
                             default_hp_metric=False)
