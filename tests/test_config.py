"""Every config group composes, resolves and instantiates what it names."""

from pathlib import Path

import hydra
import pytest
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from vmatdose.config import CONFIG_DIR

GROUP_DIRS = [p for p in Path(CONFIG_DIR).iterdir() if p.is_dir() and p.name != "hydra"]


def compose_train(tmp_path, overrides=()):
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        return compose("train", overrides=[f"paths.root_dir={tmp_path}",
                                           f"paths.output_dir={tmp_path}/run", *overrides])


def options(group: str) -> list[str]:
    return sorted(p.stem for p in (Path(CONFIG_DIR) / group).glob("*.yaml"))


# the groups with many options compose for seconds each: the slow tier
@pytest.mark.parametrize("group", [
    "data", pytest.param("model", marks=pytest.mark.slow), "optimizer",
    pytest.param("loss", marks=pytest.mark.slow), "trainer", "logger", "callbacks",
    "evaluation", pytest.param("experiment", marks=pytest.mark.slow), "debug",
    "hparams_search"])
def test_every_option_of_every_group_composes_and_resolves(tmp_path, group):
    opts = options(group)
    if group in ("data", "model", "optimizer", "loss", "trainer", "logger", "callbacks"):
        assert opts, f"config group {group} is empty"
    for option in opts:
        cfg = compose_train(tmp_path, [f"{group}={option}"])
        OmegaConf.resolve(cfg)  # every interpolation resolves


def test_default_train_config_instantiates_every_object(tmp_path):
    cfg = compose_train(tmp_path)
    datamodule = hydra.utils.instantiate(cfg.data)
    assert datamodule.structures[:2] == ["PTV70", "PTV56"]
    assert datamodule.dose_scale_gy == 70.0
    model = hydra.utils.instantiate(cfg.model, loss=hydra.utils.instantiate(cfg.loss))
    assert model.net.in_channels == 1 + len(cfg.data.structures)
    assert cfg.trainer.precision == "auto"  # resolved by vmatdose.training.precision


@pytest.mark.parametrize("model, lr", [("unet", 2e-3), ("dynunet", 2e-3), ("ddpm", 1e-3),
                                       ("flow_matching", 1e-3)])
def test_optimizer_group_feeds_every_model_which_may_set_its_learning_rate(tmp_path, model, lr):
    cfg = compose_train(tmp_path, [f"model={model}", "trainer.max_epochs=7"])
    assert cfg.model.optimizer._target_ == "torch.optim.AdamW"
    assert (cfg.model.optimizer.lr, cfg.model.optimizer.weight_decay) == (lr, 1e-4)
    assert cfg.model.scheduler.T_max == 7
    constant = compose_train(tmp_path, [f"model={model}", "optimizer=adamw_constant"])
    assert constant.model.scheduler is None and constant.model.optimizer.lr == lr


def test_user_config_folder_via_searchpath(tmp_path):
    extra = tmp_path / "myconf" / "loss"
    extra.mkdir(parents=True)
    (extra / "mine.yaml").write_text(
        "_target_: vmatdose.losses.CompositeLoss\nterms:\n  voxel:\n    weight: 3.0\n"
        "    term: {_target_: vmatdose.losses.VoxelLoss, kind: mse}\n")
    cfg = compose_train(tmp_path, [f"hydra.searchpath=[file://{tmp_path / 'myconf'}]",
                                   "loss=mine"])
    assert cfg.loss.terms.voxel.weight == 3.0


def test_config_typo_is_an_error(tmp_path):
    with pytest.raises(Exception, match="modle|Could not override"):
        compose_train(tmp_path, ["modle=unet"])


def test_slurm_launcher_takes_its_resources_from_config(tmp_path):
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        cfg = compose("train", return_hydra_config=True,
                      overrides=["hydra/launcher=slurm", "hydra.launcher.partition=gpu",
                                 "hydra.launcher.gpus_per_node=4", "hydra.launcher.mem_gb=32"])
    launcher = cfg.hydra.launcher
    assert launcher._target_.endswith("submitit_launcher.SlurmLauncher")
    assert (launcher.partition, launcher.gpus_per_node, launcher.mem_gb) == ("gpu", 4, 32)
    assert launcher.tasks_per_node == 4, "one task per GPU for DDP"


def test_ddp_trainer_config_builds_a_ddp_strategy(tmp_path):
    cfg = compose_train(tmp_path, ["trainer=ddp", "trainer.accelerator=cpu",
                                   "trainer.devices=2", "trainer.num_nodes=3"])
    strategy = hydra.utils.instantiate(cfg.trainer.strategy)
    assert type(strategy).__name__ == "DDPStrategy"
    assert (cfg.trainer.devices, cfg.trainer.num_nodes) == (2, 3)


def test_the_loss_study_recipe_is_the_cpu_recipe_on_its_short_budget(tmp_path):
    """``experiment=openkbp_loss_study`` is exactly the overrides the published study ran
    (experiments/openkbp_loss_study.md), tags aside."""
    study = compose_train(tmp_path, ["experiment=openkbp_loss_study", "loss=grad"])
    ran = compose_train(tmp_path, ["experiment=openkbp_cpu", "budget_minutes=08",
                                   "evaluate_after_training=true", "evaluation=fast",
                                   "loss=grad"])
    study, ran = OmegaConf.to_container(study, resolve=True), OmegaConf.to_container(ran, resolve=True)
    assert study.pop("tags") == ["openkbp", "cpu", "loss_study"]
    ran.pop("tags")
    assert study == ran
    assert study["trainer"]["max_time"] == "00:00:08:00"


@pytest.mark.parametrize("fmt", ["contiguous", "channels_last"])
def test_memory_format_and_precision_are_overridable_without_plus(tmp_path, fmt):
    cfg = compose_train(tmp_path, [f"callbacks.memory_format.format={fmt}",
                                   "trainer.precision=32-true"])
    assert cfg.callbacks.memory_format.format == fmt
    assert compose_train(tmp_path).callbacks.memory_format.format == "auto"
    assert cfg.trainer.precision == "32-true"
