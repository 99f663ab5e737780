"""Learned (homoscedastic uncertainty) loss weights, their optimizer groups, calibration."""

import math

import pytest
import torch
from torch import nn

from vmatdose.losses import CompositeLoss, VoxelLoss
from vmatdose.losses.calibration import (
    sigmas_from_magnitudes,
    term_magnitudes,
    write_sigmas_yaml,
)
from vmatdose.training.module import DoseModule, weight_decay_groups

from loss_testing import box_batch


class Constant(nn.Module):
    """A loss term that returns a fixed value (whatever the prediction)."""

    def __init__(self, value: float):
        super().__init__()
        self.value = value

    def forward(self, pred, batch):
        return pred.sum() * 0 + self.value


def test_total_is_term_over_two_sigma_squared_plus_log_sigma():
    loss = CompositeLoss({"a": {"weight": 2.0, "term": Constant(0.3)},
                          "b": {"weight": 1.0, "term": Constant(0.05)}},
                         weighting="uncertainty", initial_sigmas={"a": 0.5})
    total, values = loss(torch.zeros(1, 1, 2, 2, 2), {})
    expected = (2.0 * 0.3 / (2 * 0.25) + math.log(0.5)) + (0.05 / 2 + 0.0)
    assert total.item() == pytest.approx(expected, rel=1e-6)
    assert values["a"].item() == pytest.approx(0.3)  # logged unweighted
    assert loss.sigmas() == pytest.approx({"a": 0.5, "b": 1.0})


def test_sigmas_learn_the_square_root_of_each_terms_magnitude():
    # d/ds [L e^{-2s} / 2 + s] = 0 at sigma^2 = L: a term 100x larger gets sigma 10x larger
    loss = CompositeLoss({"big": {"weight": 1.0, "term": Constant(1.0)},
                          "small": {"weight": 1.0, "term": Constant(0.01)}},
                         weighting="uncertainty")
    optimizer = torch.optim.Adam(loss.parameters(), lr=0.05)
    for _ in range(600):
        optimizer.zero_grad()
        loss(torch.zeros(1), {})[0].backward()
        optimizer.step()
    assert loss.sigmas()["big"] == pytest.approx(1.0, rel=0.02)
    assert loss.sigmas()["small"] == pytest.approx(0.1, rel=0.02)


def test_fixed_weighting_has_no_sigmas_and_bad_settings_are_refused():
    fixed = CompositeLoss({"a": {"weight": 1.0, "term": Constant(0.2)}})
    assert list(fixed.parameters()) == [] and fixed.sigmas() == {}
    with pytest.raises(ValueError, match="weighting"):
        CompositeLoss({"a": {"term": Constant(0.2)}}, weighting="learned")
    with pytest.raises(ValueError, match="lacks.*'c'"):
        CompositeLoss({"a": {"term": Constant(0.2)}}, weighting="uncertainty",
                      initial_sigmas={"c": 1.0})
    with pytest.raises(ValueError, match="positive"):
        CompositeLoss({"a": {"term": Constant(0.2)}}, weighting="uncertainty",
                      initial_sigmas={"a": 0.0})


def test_sigmas_are_excluded_from_weight_decay():
    loss = CompositeLoss({"voxel": {"weight": 1.0, "term": VoxelLoss()}},
                         weighting="uncertainty")
    net = nn.Conv3d(8, 1, 3, padding=1)
    module = DoseModule(net, loss, optimizer=lambda params: torch.optim.AdamW(
        params, lr=0.1, weight_decay=0.5))
    optimizer = module.configure_optimizers()
    groups = optimizer.param_groups
    assert [g["weight_decay"] for g in groups] == [0.5, 0.0]
    assert groups[1]["params"] == [loss.log_sigmas["voxel"]]
    assert len(groups[0]["params"]) == 2  # conv weight and bias
    # a zero gradient: only decay would move a parameter
    loss.log_sigmas["voxel"].grad = torch.zeros(())
    for p in net.parameters():
        p.grad = torch.zeros_like(p)
    before_w, before_s = net.weight.detach().clone(), loss.log_sigmas["voxel"].item()
    optimizer.step()
    assert loss.log_sigmas["voxel"].item() == before_s
    assert not torch.equal(net.weight, before_w)
    assert len(weight_decay_groups(list(net.named_parameters()))) == 1


def test_calibration_sets_sigma_to_the_root_of_the_mean_weighted_magnitude(tmp_path):
    batch = box_batch(n_cases=1, size=16)
    loss = CompositeLoss({"voxel": {"weight": 0.5, "term": VoxelLoss(kind="l1")},
                          "off": {"weight": 0.0, "term": VoxelLoss()}})
    offsets = iter([0.1, 0.3])
    magnitudes = term_magnitudes(loss, lambda image: batch["dose"] + next(offsets),
                                 [batch, batch])
    assert magnitudes == pytest.approx({"voxel": 0.5 * 0.2})  # mean of 0.1 and 0.3
    sigmas = sigmas_from_magnitudes(magnitudes)
    assert sigmas == {"voxel": pytest.approx(math.sqrt(0.1), rel=1e-3)}
    clipped = term_magnitudes(loss, lambda image: batch["dose"] * 0 - 5.0, [batch], 1.5)
    assert clipped["voxel"] == pytest.approx(0.5 * batch["dose"].mean().item(), rel=1e-5)
    path = write_sigmas_yaml(sigmas, tmp_path / "initial_sigmas" / "x.yaml", "cmd")
    assert path.read_text().splitlines()[0] == "# @package loss.initial_sigmas"
    with pytest.raises(ValueError, match="no batches"):
        term_magnitudes(loss, lambda image: image, [])
