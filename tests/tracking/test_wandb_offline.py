"""A smoke run with the W&B logger, offline: config (with the flat choice keys a runs table
groups by), metric history, images, table, summary scores, group."""

from __future__ import annotations

from pathlib import Path

import pytest
from hydra.core.hydra_config import HydraConfig

from vmatdose.workflow import run_training as run

from conftest import smoke_config
from wandb_records import config_keys, config_values, history_rows, run_info, summary_values


@pytest.mark.slow
def test_offline_wandb_run_holds_config_choices_metrics_images_and_scores(tmp_path,
                                                                          monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path))
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    run_dir = tmp_path / "run"
    overrides = ("logger=wandb", "trainer.max_epochs=2", "callbacks.dose_images.every_n_epochs=1",
                 "loss=grad", "loss.terms.gradient.weight=0.2", "seed=3",
                 "logger.wandb.group=loss_study")
    hydra_cfg = smoke_config(tmp_path / "root", run_dir, *overrides, return_hydra=True)
    monkeypatch.setattr(HydraConfig.instance(), "cfg", None)
    HydraConfig.instance().set_config(hydra_cfg)  # as inside `python -m vmatdose.train`
    run(smoke_config(tmp_path / "root", run_dir, *overrides))
    runs = list((run_dir / "wandb").glob("offline-run-*"))
    assert len(runs) == 1, "one offline run, ready for `wandb sync`"
    run_file = next(runs[0].glob("run-*.wandb"))
    assert {"data", "model", "loss", "trainer", "seed"} <= config_keys(run_file)
    # what a W&B runs table groups and plots by, without editing: flat top-level keys
    config = config_values(run_file)
    assert config["loss_name"] == "grad" and config["seed"] == 3
    assert config["loss_weight_gradient"] == 0.2 and config["loss_weight_voxel"] == 1.0
    assert config["loss_weighting"] == "fixed" and config["data_name"] == "phantom"
    rows = history_rows(run_file)
    val_mae = [r["val/mae_gy"] for r in rows if "val/mae_gy" in r]
    assert len(val_mae) == 2 and all(0 < v < 100 for v in val_mae)
    assert any("test/mae_body_gy" in r for r in rows)
    images = Path(runs[0], "files", "media", "images", "val")
    assert len(list(images.glob("dose_slices_*.png"))) == 2
    assert len(list(images.glob("dvh_*.png"))) == 2
    assert list(Path(runs[0], "files", "media", "table", "test").glob("per_case_*.table.json"))
    # the final scores as summary values, the sweep's group
    summary = summary_values(run_file)
    assert summary["test/openkbp_dose_score_gy"] > 0 and summary["test/openkbp_dvh_score_gy"] > 0
    assert 0 <= summary["test/gamma_3pct_3mm_low_dose_pass"] <= 100
    assert "test/d95_PTV70_error_gy" in summary and summary["train/steps"] > 0
    assert run_info(run_file)["group"] == "loss_study"
