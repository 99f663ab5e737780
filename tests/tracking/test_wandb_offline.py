"""A smoke run with the W&B logger, offline: config, metric history, images, table."""

from __future__ import annotations

from pathlib import Path

from vmatdose.workflow import run_training as run

from conftest import smoke_config
from wandb_records import config_keys, history_rows


def test_offline_wandb_run_holds_config_metrics_and_images(tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path))
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    run_dir = tmp_path / "run"
    run(smoke_config(tmp_path / "root", run_dir, "logger=wandb", "trainer.max_epochs=2",
                     "callbacks.dose_images.every_n_epochs=1"))
    runs = list((run_dir / "wandb").glob("offline-run-*"))
    assert len(runs) == 1, "one offline run, ready for `wandb sync`"
    run_file = next(runs[0].glob("run-*.wandb"))
    assert {"data", "model", "loss", "trainer", "seed"} <= config_keys(run_file)
    rows = history_rows(run_file)
    val_mae = [r["val/mae_gy"] for r in rows if "val/mae_gy" in r]
    assert len(val_mae) == 2 and all(0 < v < 100 for v in val_mae)
    assert any("test/mae_body_gy" in r for r in rows)
    images = Path(runs[0], "files", "media", "images", "val")
    assert len(list(images.glob("dose_slices_*.png"))) == 2
    assert len(list(images.glob("dvh_*.png"))) == 2
    assert list(Path(runs[0], "files", "media", "table", "test").glob("per_case_*.table.json"))
