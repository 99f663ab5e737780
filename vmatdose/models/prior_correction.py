"""A dose-predicting denoiser as the prior dose plus a learned correction.

The OpenKBP inputs carry a prior-dose channel (open fields of the plan's beams traced
through the CT, blended with a falloff of the distance to each target). A U-Net reads it
and learns the residual; a denoiser that predicts the clean dose (x-prediction) can start
from it outright: :class:`PriorCorrectionNet` adds the prior channel of its own input,
mapped to the diffusion range, to the wrapped network's output, so an untrained network
(output 0 Gy, :class:`~vmatdose.models.noise_level.NoiseLevelChannelNet` with
``output_offset=-1``) predicts the prior and training only has to learn the correction.
"""

from __future__ import annotations

import torch
from torch import nn

from vmatdose.models.noise_level import downsampling_factor


class PriorCorrectionNet(nn.Module):
    """``net(x, timesteps) + (2 / dose_max) x[:, prior_channel]``, MONAI's diffusion-network call
    signature (``net(x, timesteps, context=None)``).

    Args:
        net: a denoiser predicting the dose in the diffusion range [-1, 1] (x-prediction),
            e.g. a :class:`~vmatdose.models.noise_level.NoiseLevelChannelNet` with
            ``output_offset=-1`` (output 0 Gy when untrained).
        prior_channel: index of the prior dose in the input ``x`` = [diffused dose,
            image]: its index in the image plus one (the generative module adds the one
            to ``model.prior_channel``).
        dose_max: the normalised dose the diffusion maps to +1 (the module's, as
            ``[0, dose_max]`` -> ``[-1, 1]``): the prior is added in those units, so a zero
            correction predicts the prior.
    """

    def __init__(self, net: nn.Module, prior_channel: int, dose_max: float):
        super().__init__()
        inner = getattr(net, "in_channels", None)
        if inner is not None and not 0 < int(prior_channel) < int(inner):
            raise ValueError(f"prior_channel={prior_channel} is not an image channel of an "
                             f"input of {inner} channels (channel 0 is the diffused dose)")
        self.net = net
        self.prior_channel = int(prior_channel)
        if dose_max <= 0:
            raise ValueError(f"dose_max must be > 0, not {dose_max}")
        self.scale = 2.0 / float(dose_max)

    @property
    def in_channels(self) -> int:
        """Channels of ``x``: the diffused dose and the image."""
        return int(self.net.in_channels)

    @property
    def downsampling_factor(self) -> int:
        return downsampling_factor(self.net)

    def forward(self, x: torch.Tensor, timesteps: torch.Tensor,
                context: torch.Tensor | None = None) -> torch.Tensor:
        """``x`` (B, C, Z, Y, X), ``timesteps`` (B,) or (1,) -> the dose estimate
        (B, 1, Z, Y, X) in the diffusion range: the prior plus the network's output."""
        prior = x[:, self.prior_channel:self.prior_channel + 1]
        return self.net(x, timesteps, context) + self.scale * prior.to(x.dtype)
