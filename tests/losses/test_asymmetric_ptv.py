"""Asymmetric PTV loss: target voxels only, under-dose weighted more than over-dose."""

import pytest
import torch

from vmatdose.losses import AsymmetricPTVLoss

from loss_testing import STRUCTURES, TARGETS, box_batch


def _target(batch):
    return batch["masks"][:, :2].amax(dim=1, keepdim=True) > 0.5


@pytest.mark.parametrize("kind, power", [("mse", 2), ("l1", 1)])
def test_underdose_costs_underdose_weight_times_the_same_overdose(kind, power):
    batch = box_batch(n_cases=2, size=16)
    loss = AsymmetricPTVLoss(STRUCTURES, TARGETS, underdose_weight=2.5, kind=kind)
    delta = 0.1
    cold = loss(batch["dose"] - delta, batch)
    hot = loss(batch["dose"] + delta, batch)
    assert hot.item() == pytest.approx(delta ** power, rel=1e-5)
    assert cold.item() == pytest.approx(2.5 * delta ** power, rel=1e-5)


def test_only_target_voxels_count_and_mixed_errors_average_over_the_targets():
    batch = box_batch(n_cases=1, size=16)
    loss = AsymmetricPTVLoss(STRUCTURES, TARGETS, underdose_weight=3.0, kind="l1")
    inside = _target(batch)
    outside_only = torch.where(inside, batch["dose"], batch["dose"] + 0.5)
    assert loss(outside_only, batch).item() == 0.0
    # PTV70 (64 voxels) 0.2 cold, the PTV56 shell (448 voxels) 0.1 hot
    ptv70 = batch["masks"][:, :1] > 0.5
    pred = torch.where(ptv70, batch["dose"] - 0.2, batch["dose"] + 0.1)
    expected = (64 * 3.0 * 0.2 + 448 * 0.1) / (64 + 448)
    assert loss(pred, batch).item() == pytest.approx(expected, rel=1e-5)


def test_bad_settings_are_refused():
    with pytest.raises(ValueError, match="not in structures"):
        AsymmetricPTVLoss(["Rectum"], ["PTV70"])
    with pytest.raises(ValueError, match="underdose_weight"):
        AsymmetricPTVLoss(STRUCTURES, TARGETS, underdose_weight=0.0)
    with pytest.raises(ValueError, match="kind"):
        AsymmetricPTVLoss(STRUCTURES, TARGETS, kind="huber")
