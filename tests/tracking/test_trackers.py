"""Trackers: a 2-value multirun with W&B (offline) gives two named runs in one group with
evaluation images; TensorBoard event files hold hyperparameters with the test metrics;
every run folder gets training_curves.png."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from vmatdose.tracking.naming import describing_overrides, path_safe, run_name
from vmatdose.workflow import run_training as run

from conftest import REPO_ROOT, smoke_config
from wandb_records import run_info


def test_run_names_come_from_the_task_and_the_describing_overrides():
    overrides = ["debug=smoke", "loss=grad", "paths.root_dir=/x", "logger=wandb",
                 "+model.extra=1", "tags=[a]"]
    assert describing_overrides(overrides) == ["debug=smoke", "loss=grad", "+model.extra=1"]
    assert run_name("train", overrides) == "train: debug=smoke,loss=grad,+model.extra=1"
    assert run_name("train", ["paths.root_dir=/x"]) == "train"
    assert path_safe("train: loss=grad,model=unet32") == "train-loss=grad,model=unet32"


@pytest.mark.cli
def test_wandb_multirun_gives_two_named_runs_in_one_group_with_evaluation_images(tmp_path):
    env = {**os.environ, "WANDB_MODE": "offline", "WANDB_DIR": str(tmp_path),
           "VMATDOSE_ROOT": str(tmp_path), "PYTHONPATH": str(REPO_ROOT)}
    env.pop("WANDB_API_KEY", None)
    command = [sys.executable, "-m", "vmatdose.train", "-m", "debug=smoke", "logger=wandb",
               "loss=l1,mse", "tags=[sweep_test]", "evaluation.dpi=50",
               "evaluation.gamma=[{dose_percent:3.0,distance_mm:3.0}]"]
    done = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    sweeps = tmp_path / "outputs" / "debug" / "multirun" / "train"  # debug=smoke's place
    files = sorted(sweeps.glob("*/*/wandb/offline-run-*/run-*.wandb"))
    assert len(files) == 2, files
    infos = [run_info(f) for f in files]
    assert {i["name"] for i in infos} == {
        "train: debug=smoke,loss=l1,evaluation.dpi=50,"
        "evaluation.gamma=[{dose_percent:3.0,distance_mm:3.0}]".replace("loss=l1", name)
        for name in ("loss=l1", "loss=mse")}
    sweep = next(sweeps.iterdir()).name
    assert {i["group"] for i in infos} == {f"train/{sweep}"}
    assert all(i["tags"] == ["sweep_test"] for i in infos)
    for file in files:
        media = file.parent / "files" / "media" / "images"
        assert len(list((media / "eval").glob("slices_*.png"))) == 1, "one test case"
        assert list((media / "eval").glob("dvh_*.png"))
        assert list((media / "val").glob("dose_slices_*.png")), "last epoch < every_n_epochs"
        assert (file.parents[2] / "training_curves.png").is_file()


@pytest.mark.slow
def test_tensorboard_event_files_hold_hparams_and_test_metrics(tmp_path):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from tensorboard.plugins.hparams import plugin_data_pb2

    run_dir = tmp_path / "run"
    run(smoke_config(tmp_path / "root", run_dir, "logger=tensorboard", "evaluation=fast"))
    folders = list((run_dir / "tensorboard").iterdir())
    assert [f.name for f in folders] == ["train"], "named from the task (no overrides)"
    events = EventAccumulator(str(folders[0]), size_guidance={"scalars": 0}).Reload()
    test_mae = events.Scalars("test/mae_body_gy")
    assert len(test_mae) == 1 and 0 < test_mae[0].value < 70
    content = events.PluginTagToContent("hparams")
    session = plugin_data_pb2.HParamsPluginData.FromString(
        content["_hparams_/session_start_info"]).session_start_info
    assert session.hparams["loss/terms/voxel/weight"].number_value == 1.0
    assert session.hparams["model/optimizer/lr"].number_value > 0
    experiment = plugin_data_pb2.HParamsPluginData.FromString(
        content["_hparams_/experiment"]).experiment
    assert "test/mae_body_gy" in {m.name.tag for m in experiment.metric_infos}
    assert any(t.startswith("test/per_case") for t in events.Tags()["tensors"])
    assert (run_dir / "training_curves.png").is_file()
