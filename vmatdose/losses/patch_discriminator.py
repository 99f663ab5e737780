"""3D PatchGAN discriminator (pix2pix's 70x70 PatchGAN, Isola et al. 2017, made 3D).

It scores overlapping patches of (inputs, dose) pairs instead of whole volumes, so it
judges local texture such as fall-off sharpness; the output is a map of logits.
"""

from __future__ import annotations

import torch
from torch import nn


def _block(in_ch: int, out_ch: int, stride: int, norm: bool) -> list[nn.Module]:
    kernel, padding = (4, 1) if stride == 2 else (3, 1)
    layers: list[nn.Module] = [nn.Conv3d(in_ch, out_ch, kernel, stride, padding, bias=not norm)]
    if norm:
        layers.append(nn.InstanceNorm3d(out_ch, affine=True))
    layers.append(nn.LeakyReLU(0.2))
    return layers


class PatchDiscriminator3D(nn.Module):
    """Conditional 3D PatchGAN.

    ``n_layers`` stride-2 4^3 convolutions (channels doubling from ``base_channels``, at
    most 8x), one stride-1 3^3 convolution, then a 3^3 convolution to one logit per patch.
    Stride-1 layers keep their size, so a 16^3 input with ``n_layers=3`` gives 2^3 patches;
    inputs need at least ``2 ** (n_layers + 1)`` voxels a side (instance norm needs more than
    one voxel per channel).

    Args:
        image_channels: channels of the network input it is conditioned on (CT + masks...).
        dose_channels: channels of the dose (1).
        base_channels: width of the first layer.
        n_layers: stride-2 downsamplings.
    """

    def __init__(self, image_channels: int, dose_channels: int = 1, base_channels: int = 16,
                 n_layers: int = 3):
        super().__init__()
        if n_layers < 1:
            raise ValueError(f"n_layers must be >= 1, got {n_layers}")
        layers = _block(image_channels + dose_channels, base_channels, 2, norm=False)
        channels = base_channels
        for i in range(1, n_layers):
            out = base_channels * min(2 ** i, 8)
            layers += _block(channels, out, 2, norm=True)
            channels = out
        out = base_channels * min(2 ** n_layers, 8)
        layers += _block(channels, out, 1, norm=True)
        layers.append(nn.Conv3d(out, 1, kernel_size=3, stride=1, padding=1))
        self.model = nn.Sequential(*layers)

    def forward(self, image: torch.Tensor, dose: torch.Tensor) -> torch.Tensor:
        """(B, C, Z, Y, X) inputs and (B, 1, Z, Y, X) dose -> (B, 1, z, y, x) patch logits."""
        return self.model(torch.cat([image, dose.to(image.dtype)], dim=1))
