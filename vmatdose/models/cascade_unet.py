"""Two 3D U-Nets in cascade (the OpenKBP 2020 winner's design, Liu et al. "C3D"): the
first predicts a coarse dose from the inputs; the second sees the inputs and that dose
and predicts the final one.

In training mode the network returns both doses stacked on dim 1, final first:
(B, 2, 1, Z, Y, X), so :class:`vmatdose.training.deep_supervision.DeepSupervisionDoseModule`
puts the loss on both stages (``head_weights``); in eval mode only the final dose
(B, 1, Z, Y, X).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from monai.networks.nets import UNet
from torch import nn


class CascadeUNet(nn.Module):
    """Stage 1: ``in_channels`` -> dose; stage 2: ``in_channels`` + 1 -> dose.

    Args:
        in_channels: input channels (CT, masks, ...).
        channels, strides, num_res_units, norm, dropout: MONAI :class:`UNet` settings of
            the first stage; ``second_channels`` those of the second (default: the same).
        detach_first: stop the second stage's gradient from flowing into the first (each
            stage then learns only from its own loss).
    """

    def __init__(self, in_channels: int, channels: Sequence[int] = (16, 32, 64, 128),
                 strides: Sequence[int] = (2, 2, 2), num_res_units: int = 2,
                 norm: str = "INSTANCE", dropout: float = 0.0,
                 second_channels: Sequence[int] | None = None, detach_first: bool = False):
        super().__init__()
        common = dict(spatial_dims=3, out_channels=1, strides=tuple(strides),
                      num_res_units=num_res_units, norm=norm, dropout=dropout)
        self.first = UNet(in_channels=in_channels, channels=tuple(channels), **common)
        self.second = UNet(in_channels=in_channels + 1,
                           channels=tuple(second_channels or channels), **common)
        self.detach_first = detach_first
        self.downsample_factor = int(torch.prod(torch.tensor(list(strides))))

    def stages(self, image: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(first-stage dose, final dose), each (B, 1, Z, Y, X)."""
        coarse = self.first(image)
        cue = coarse.detach() if self.detach_first else coarse
        return coarse, self.second(torch.cat([image, cue], dim=1))

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        coarse, final = self.stages(image)
        if self.training:
            return torch.stack([final, coarse], dim=1)
        return final
