"""The prior-plus-correction denoiser: the prior channel added in diffusion units, and a
flow module built with it samples the prior exactly when the correction is zero."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from vmatdose.models.noise_level import NoiseLevelChannelNet, downsampling_factor
from vmatdose.models.prior_correction import PriorCorrectionNet
from vmatdose.training.generative import dose_to_model

from model_testing import N_CHANNELS, build_model


class Constant(nn.Module):
    """A network reading ``in_channels`` channels that outputs ``value`` everywhere."""

    def __init__(self, in_channels: int, value: float):
        super().__init__()
        self.in_channels, self.value, self.strides = in_channels, value, (2, 2)
        self.weight = nn.Parameter(torch.zeros(()))

    def forward(self, x):
        return torch.full_like(x[:, :1], self.value) + self.weight


def test_the_prior_channel_is_added_in_diffusion_units():
    inner = NoiseLevelChannelNet(Constant(5, 0.0), in_channels=4, output_offset=-1.0)
    net = PriorCorrectionNet(inner, prior_channel=3, dose_max=1.2)
    x = torch.rand(2, 4, 4, 4, 4)
    out = net(x, torch.tensor([10, 900]))
    # zero correction: the estimate is the prior (normalised dose) in the [-1, 1] range
    torch.testing.assert_close(out, dose_to_model(x[:, 3:4], 1.2))
    assert net.in_channels == 4 and downsampling_factor(net) == 4


def test_a_prior_channel_outside_the_image_is_refused():
    inner = NoiseLevelChannelNet(Constant(5, 0.0), in_channels=4)
    for bad in (0, 4):  # 0 is the diffused dose, 4 past the input
        with pytest.raises(ValueError, match="prior_channel"):
            PriorCorrectionNet(inner, prior_channel=bad, dose_max=1.2)
    with pytest.raises(ValueError, match="dose_max"):
        PriorCorrectionNet(inner, prior_channel=1, dose_max=0.0)


def test_flow_with_a_zero_correction_samples_the_prior(tmp_path):
    """prior_channel=last image channel; EMA and trained networks both output a zero
    correction: every Euler step's x-prediction is the prior, so every member ends on it
    whatever its noise."""
    model, _ = build_model("flow_matching", tmp_path, "model.net.net.channels=[8,16,16,16]",
                           "model.val_gamma=null", f"model.prior_channel={N_CHANNELS - 1}")
    assert isinstance(model.net, PriorCorrectionNet) and isinstance(model.ema_net,
                                                                    PriorCorrectionNet)
    for net in (model.net, model.ema_net):
        net.net = NoiseLevelChannelNet(Constant(N_CHANNELS + 2, 0.0), N_CHANNELS + 1,
                                       output_offset=-1.0)
    image = torch.rand(1, N_CHANNELS, 16, 16, 16, generator=torch.Generator().manual_seed(1))
    samples = model.eval().sample_doses(image, steps=4, ensemble_size=3)
    for member in samples:
        torch.testing.assert_close(member, image[:, -1:], atol=1e-5, rtol=0)


def test_prior_correction_needs_x_prediction(tmp_path):
    with pytest.raises(Exception, match="prediction=data"):
        build_model("flow_matching", tmp_path, "model.net.net.channels=[8,16,16,16]",
                    "model.prediction=velocity", f"model.prior_channel={N_CHANNELS - 1}")
