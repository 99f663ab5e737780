"""Steps per second of a training run, logged as its last line, so a reader can tell a
slow machine from a bad recipe when a run stops on a wall-clock budget."""

from __future__ import annotations

import logging
import time

import lightning as L

log = logging.getLogger(__name__)


class ThroughputCallback(L.Callback):
    """At the end of training, log ``trained <steps> steps in <epochs> epochs, <min> min:
    <steps/s> steps/s`` (optimizer steps over the wall time of ``fit``'s training loop,
    validation included) and store it in ``trainer.callback_metrics['train/steps_per_s']``."""

    def __init__(self) -> None:
        self.start: float | None = None
        self.steps_per_s: float | None = None

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.start = time.perf_counter()

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self.start is None:
            return
        seconds = time.perf_counter() - self.start
        self.steps_per_s = trainer.global_step / max(seconds, 1e-9)
        log.info("trained %d steps in %d epochs, %.1f min: %.2f steps/s", trainer.global_step,
                 trainer.current_epoch, seconds / 60, self.steps_per_s)
