"""The noise level as an input channel: what the wrapped network reads, its checks, and
the downsampling factor the generative modules pad to."""

from __future__ import annotations

import pytest
import torch
from monai.networks.nets import DiffusionModelUNet, UNet
from torch import nn

from vmatdose.models.noise_level import NoiseLevelChannelNet, downsampling_factor


class Echo(nn.Module):
    """Returns its whole input, so a test sees what the wrapped network was given."""

    in_channels = 4

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x


def test_the_network_reads_the_input_then_t_over_T():
    net = NoiseLevelChannelNet(Echo(), in_channels=3, num_train_timesteps=1000)
    x = torch.rand(2, 3, 4, 5, 6)
    seen = net(x, torch.tensor([250, 1000]))
    torch.testing.assert_close(seen[:, :3], x)
    assert torch.all(seen[0, 3] == 0.25) and torch.all(seen[1, 3] == 1.0)
    # MONAI's sampling loop passes one timestep for the whole batch
    seen = net(x, torch.tensor([500.0]))
    assert torch.all(seen[:, 3] == 0.5)


def test_the_output_offset_is_added():
    net = NoiseLevelChannelNet(Echo(), in_channels=3, output_offset=-1.0)
    x = torch.zeros(1, 3, 2, 2, 2)
    assert torch.all(net(x, torch.tensor([0]))[:, :3] == -1.0)


def test_channel_counts_and_cross_attention_are_refused():
    with pytest.raises(ValueError, match="in_channels \\+ 1 = 5"):
        NoiseLevelChannelNet(Echo(), in_channels=4)
    net = NoiseLevelChannelNet(Echo(), in_channels=3)
    with pytest.raises(ValueError, match="concat"):
        net(torch.zeros(1, 3, 2, 2, 2), torch.tensor([1]), context=torch.zeros(1, 1, 4))


def test_downsampling_factor_of_each_network():
    unet = UNet(3, 4, 1, channels=(8, 16, 16, 16), strides=(2, 2, 2))
    assert downsampling_factor(unet) == 8
    assert downsampling_factor(NoiseLevelChannelNet(unet, in_channels=3)) == 8
    diffusion = DiffusionModelUNet(3, 2, 1, channels=(8, 8), attention_levels=(False, False),
                                   num_res_blocks=1, norm_num_groups=8)
    assert downsampling_factor(diffusion) == 2
    with pytest.raises(ValueError, match="Echo"):
        downsampling_factor(Echo())


def test_a_wrapped_unet_trains_through_monai_diffusion_inferer():
    from monai.inferers import DiffusionInferer
    from monai.networks.schedulers import DDPMScheduler

    torch.manual_seed(0)
    net = NoiseLevelChannelNet(UNet(3, 4, 1, channels=(8, 16), strides=(2,)), in_channels=3)
    inferer = DiffusionInferer(DDPMScheduler(1000))
    clean, noise = torch.rand(2, 1, 8, 8, 8), torch.randn(2, 1, 8, 8, 8)
    out = inferer(clean, net, noise, torch.tensor([5, 900]), condition=torch.rand(2, 2, 8, 8, 8),
                  mode="concat")
    assert out.shape == clean.shape
    out.mean().backward()
    assert all(p.grad is not None for p in net.parameters())
