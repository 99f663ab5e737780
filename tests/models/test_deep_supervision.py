"""Deep supervision: weighted loss over stacked heads, prediction from the main head."""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn

from vmatdose.losses import CompositeLoss, VoxelLoss
from vmatdose.training.deep_supervision import (
    DeepSupervisionDoseModule,
    normalised_weights,
)

from model_testing import (
    N_CHANNELS,
    build_model,
    synthetic_batch,
)


class ConstantHeads(nn.Module):
    """Returns heads filled with fixed values, stacked like DynUNet in training mode."""

    def __init__(self, values: list[float]):
        super().__init__()
        self.values = values
        self.scale = nn.Parameter(torch.ones(()))

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        b, _, *spatial = image.shape
        heads = [torch.full((b, 1, *spatial), v) * self.scale for v in self.values]
        return torch.stack(heads, dim=1) if self.training else heads[0]


def _module(values: list[float], head_weights=None) -> DeepSupervisionDoseModule:
    loss = CompositeLoss({"voxel": {"weight": 1.0, "term": VoxelLoss("l1")}})
    return DeepSupervisionDoseModule(ConstantHeads(values), loss, torch.optim.Adam,
                                     head_weights=head_weights)


def test_weights_are_normalised_and_halving_by_default():
    assert _module([0.1, 0.3, 0.7]).weights_for(3) == pytest.approx([1 / 1.75, 0.5 / 1.75,
                                                                    0.25 / 1.75])
    assert normalised_weights([1.0, 0.5, 0.5]) == [0.5, 0.25, 0.25]
    with pytest.raises(ValueError):
        normalised_weights([1.0, -0.5])


@pytest.mark.parametrize(("weights", "expected"), [
    (None, (1.0 * 0.1 + 0.5 * 0.3 + 0.25 * 0.7) / 1.75),
    ([1.0, 0.0, 0.0], 0.1),
    ([0.0, 1.0, 1.0], 0.5),
])
def test_training_loss_is_the_weighted_mean_of_head_losses(weights, expected):
    batch = synthetic_batch(n_cases=2, size=8)
    batch["dose"] = torch.zeros_like(batch["dose"])
    module = _module([0.1, 0.3, 0.7], weights).train()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # self.log without a trainer
        total = module.training_step(batch, 0)
    assert float(total.detach()) == pytest.approx(expected, rel=1e-5)
    total.backward()
    assert module.net.scale.grad is not None


def test_forward_and_prediction_use_the_main_head_in_both_modes():
    image = torch.rand(1, N_CHANNELS, 8, 8, 8)
    module = _module([0.1, 0.3, 0.7]).train()
    assert torch.allclose(module(image), torch.full((1, 1, 8, 8, 8), 0.1))
    assert torch.allclose(module.eval().predict_dose(image), torch.full((1, 1, 8, 8, 8), 0.1))


def test_head_weight_count_must_match_the_network():
    module = _module([0.1, 0.3], head_weights=[1.0, 0.5, 0.25])
    with pytest.raises(ValueError, match="head_weights"):
        module.weights_for(2)


def test_dynunet_config_trains_on_three_heads_and_predicts_the_main_one(tmp_path):
    torch.manual_seed(0)
    module, cfg = build_model("dynunet", tmp_path)
    assert cfg.model.net.deep_supr_num == 2 and list(cfg.model.head_weights) == [1, 0.5, 0.25]
    image = torch.rand(1, N_CHANNELS, 32, 32, 32)
    module.train()
    stacked = module.net(image)
    assert stacked.shape == (1, 3, 1, 32, 32, 32)
    torch.testing.assert_close(module(image), stacked[:, 0])
    assert module.eval()(image).shape == (1, 1, 32, 32, 32)
