"""The flat keys a runs table groups by: the configs chosen, each loss term's weight, the
seed."""

from __future__ import annotations

from omegaconf import OmegaConf

from vmatdose.records.run_choices import run_choices


def test_choices_and_loss_weights_become_flat_keys():
    cfg = OmegaConf.create({"seed": 2, "loss": {"weighting": "uncertainty", "terms": {
        "voxel": {"weight": 1, "term": {}}, "gradient": {"weight": 0.05, "term": {}},
        "unused": None}}})
    choices = {"experiment": "openkbp_cpu", "loss": "[grad, dvh_match]", "model": "unet",
               "trainer": "cpu"}
    assert run_choices(cfg, choices) == {
        "experiment_name": "openkbp_cpu", "model_name": "unet", "loss_name": "grad+dvh_match",
        "loss_weighting": "uncertainty", "loss_weight_voxel": 1.0,
        "loss_weight_gradient": 0.05, "seed": 2}
    assert run_choices(cfg, {"loss": ["grad", "dvh_match"]})["loss_name"] == "grad+dvh_match"


def test_outside_hydra_only_the_config_is_read():
    cfg = OmegaConf.create({"seed": 0, "loss": {"terms": {"voxel": {"weight": 0.5}}}})
    assert run_choices(cfg) == {"loss_weighting": "fixed", "loss_weight_voxel": 0.5, "seed": 0}
