"""Steps per second of a run: the last log line, the loggers and throughput.json."""

from __future__ import annotations

import json
import logging

import lightning as L
import pytest
from lightning.pytorch.demos.boring_classes import BoringModel
from lightning.pytorch.loggers import CSVLogger

from vmatdose.training.throughput import ThroughputCallback


def test_steps_and_rate_are_logged_and_written(tmp_path, caplog):
    callback = ThroughputCallback(output_dir=str(tmp_path / "run"))
    trainer = L.Trainer(max_steps=3, limit_val_batches=0, enable_progress_bar=False,
                        enable_model_summary=False, enable_checkpointing=False,
                        logger=CSVLogger(tmp_path), callbacks=[callback])
    with caplog.at_level(logging.INFO, logger="vmatdose.training.throughput"):
        trainer.fit(BoringModel())
    record = json.loads((tmp_path / "run" / "throughput.json").read_text())
    assert record["steps"] == 3 and record["epochs"] == trainer.current_epoch
    # the rate is the steps over the training wall time, as written (rounded) to the file
    assert record["steps_per_s"] == round(callback.steps_per_s, 4) > 0
    assert record["train_s"] == pytest.approx(3 / callback.steps_per_s, abs=0.06)
    assert f"trained 3 steps in {trainer.current_epoch} epochs" in caplog.text
    metrics = (tmp_path / "lightning_logs" / "version_0" / "metrics.csv").read_text()
    assert "train/steps" in metrics.splitlines()[0]
