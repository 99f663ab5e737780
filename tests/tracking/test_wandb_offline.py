"""A smoke run with the W&B logger, offline: config, metric history, images, table."""

from __future__ import annotations

from pathlib import Path

from vmatdose.workflow import run_training as run

from conftest import smoke_config
from wandb_records import config_keys, config_values, history_rows, run_info, summary_values


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


def test_a_sweep_run_carries_flat_choices_and_the_openkbp_scores(tmp_path, monkeypatch):
    """What a W&B runs table groups and plots by, without editing: the loss chosen, each
    term's weight and the seed as top-level config keys; the OpenKBP scores and gamma
    pass rates as summary values; the sweep's group."""
    from hydra.core.hydra_config import HydraConfig

    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path))
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    run_dir = tmp_path / "run"
    overrides = ("logger=wandb", "loss=grad", "loss.terms.gradient.weight=0.2", "seed=3",
                 "evaluation=fast", "logger.wandb.group=loss_study")
    hydra_cfg = smoke_config(tmp_path / "root", run_dir, *overrides, return_hydra=True)
    monkeypatch.setattr(HydraConfig.instance(), "cfg", None)
    HydraConfig.instance().set_config(hydra_cfg)  # as inside `python -m vmatdose.train`
    run(smoke_config(tmp_path / "root", run_dir, *overrides))
    run_file = next(run_dir.glob("wandb/offline-run-*/run-*.wandb"))
    config = config_values(run_file)
    assert config["loss_name"] == "grad" and config["seed"] == 3
    assert config["loss_weight_gradient"] == 0.2 and config["loss_weight_voxel"] == 1.0
    assert config["loss_weighting"] == "fixed" and config["data_name"] == "phantom"
    summary = summary_values(run_file)
    assert summary["test/openkbp_dose_score_gy"] > 0 and summary["test/openkbp_dvh_score_gy"] > 0
    assert 0 <= summary["test/gamma_3pct_3mm_low_dose_pass"] <= 100
    assert "test/d95_PTV70_error_gy" in summary
    assert run_info(run_file)["group"] == "loss_study"
