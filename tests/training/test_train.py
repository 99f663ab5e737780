"""End-to-end training on tiny phantom volumes (debug=smoke)."""

import json

import pandas as pd
import pytest
import torch

from vmatdose.train import fit, run

from conftest import smoke_config


@pytest.fixture(scope="module")
def data_root(tmp_path_factory):
    return tmp_path_factory.mktemp("root")


smoke_cfg = smoke_config


def test_two_epochs_lower_val_mae_below_initialisation(data_root, tmp_path):
    cfg = smoke_cfg(data_root, tmp_path / "run", "trainer.max_epochs=2",
                    "evaluate_after_training=false", "data.augment.flip_lr=0")
    trainer, model = fit(cfg, tmp_path / "run")
    datamodule = trainer.datamodule
    after = trainer.validate(model, datamodule=datamodule, verbose=False)[0]["val/mae_gy"]
    torch.manual_seed(0)
    fresh = type(model)(**{**_init_kwargs(model), "net": _fresh_net(cfg)})
    before = trainer.validate(fresh, datamodule=datamodule, verbose=False)[0]["val/mae_gy"]
    assert after < 0.8 * before, (before, after)


def _fresh_net(cfg):
    import hydra

    return hydra.utils.instantiate(cfg.model.net)


def _init_kwargs(model):
    return dict(loss=model.loss, optimizer=model.optimizer_factory,
                scheduler=model.scheduler_factory, val_gamma=None)


def test_run_writes_record_split_checkpoints_and_evaluation(data_root, tmp_path):
    run_dir = tmp_path / "run"
    run(smoke_cfg(data_root, run_dir))
    record = json.loads((run_dir / "run_record.json").read_text())
    assert record["seed"] == 42 and "torch" in record["packages"]
    assert record["config"]["data"]["structures"][0] == "PTV70"
    assert "commit" in record["git"]
    split = json.loads((run_dir / "split.json").read_text())
    assert len(split["test"]) == 1
    assert (run_dir / "checkpoints" / "last.ckpt").is_file()
    table = pd.read_csv(run_dir / "eval" / "per_case.csv")
    assert list(table["case_id"]) == split["test"]
    assert table["mae_body_gy"].between(0, 70).all()
    summary = json.loads((run_dir / "eval" / "summary.json").read_text())
    assert summary["metrics"]["mae_body_gy"]["n"] == 1


def test_resume_from_last_checkpoint_continues_the_epoch_count(data_root, tmp_path):
    first = tmp_path / "first"
    run(smoke_cfg(data_root, first, "evaluate_after_training=false"))
    second = tmp_path / "second"
    cfg = smoke_cfg(data_root, second, "trainer.max_epochs=2", "evaluate_after_training=false",
                    f"ckpt_path={first / 'checkpoints' / 'last.ckpt'}")
    trainer, _ = fit(cfg, second)
    assert trainer.current_epoch == 2
    metrics = pd.read_csv(second / "csv" / "metrics.csv")
    assert set(metrics["epoch"].dropna().astype(int)) == {1}, "only the second epoch is trained"


def test_same_seed_gives_same_numbers_on_cpu(data_root, tmp_path):
    values = []
    for name in ("a", "b"):
        cfg = smoke_cfg(data_root, tmp_path / name, "evaluate_after_training=false")
        trainer, _ = fit(cfg, tmp_path / name)
        values.append(float(trainer.callback_metrics["val/mae_gy"]))
    assert values[0] == values[1]
