"""Steps per second of a training run, logged as its last line, so a reader can tell a
slow machine from a bad recipe when a run stops on a wall-clock budget."""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path

import lightning as L

log = logging.getLogger(__name__)


class ThroughputCallback(L.Callback):
    """At the end of training, log ``trained <steps> steps in <epochs> epochs, <min> min:
    <steps/s> steps/s`` (optimizer steps over the wall time of ``fit``'s training loop,
    validation included), send ``train/steps`` and ``train/steps_per_s`` to the loggers
    (W&B: summary values) and, with ``output_dir``, write them to
    ``<output_dir>/throughput.json`` (what ``compare --stats`` reports per run)."""

    def __init__(self, output_dir: str | None = None) -> None:
        self.output_dir = Path(output_dir) if output_dir else None
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
        if not trainer.is_global_zero:
            return
        record = {"steps": int(trainer.global_step), "epochs": int(trainer.current_epoch),
                  "train_s": round(seconds, 1), "steps_per_s": round(self.steps_per_s, 4)}
        for logger in trainer.loggers:
            logger.log_metrics({"train/steps": record["steps"],
                                "train/steps_per_s": record["steps_per_s"]})
        if self.output_dir is not None:
            self.output_dir.mkdir(parents=True, exist_ok=True)
            (self.output_dir / "throughput.json").write_text(json.dumps(record) + "\n")
