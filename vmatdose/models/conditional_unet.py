"""A time-conditioned 3D U-Net that sees the patient through channel concatenation."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from monai.networks.nets import DiffusionModelUNet
from torch import nn


class ConditionalDiffusionUNet(nn.Module):
    """MONAI :class:`DiffusionModelUNet` whose input is ``[noisy dose, condition]``.

    The network input has ``dose_channels + condition_channels`` channels: the noisy dose
    (diffusion / flow state) first, then the CT and structure channels of the batch
    ``image``. The output has ``dose_channels`` channels (noise, velocity or dose, depending
    on how the training module reads it).

    Args:
        condition_channels: channels of the conditioning ``image`` (CT + masks (+ SDFs)).
        channels: feature channels per level; each a multiple of ``norm_num_groups``. The
            network downsamples ``len(channels) - 1`` times by 2.
        attention_levels: self-attention per level (MONAI always adds one in the middle
            block); defaults to none, since 3D attention is costly at full resolution.
        num_res_blocks: residual blocks per level.
        norm_num_groups: GroupNorm groups.
        num_head_channels: channels per attention head.
        dose_channels: channels of the diffused quantity (1: the dose).
        **unet_kwargs: further :class:`DiffusionModelUNet` arguments.
    """

    def __init__(
        self,
        condition_channels: int,
        channels: Sequence[int] = (16, 32, 64, 64),
        attention_levels: Sequence[bool] | None = None,
        num_res_blocks: Sequence[int] | int = 1,
        norm_num_groups: int = 8,
        num_head_channels: int | Sequence[int] = 32,
        dose_channels: int = 1,
        **unet_kwargs,
    ):
        super().__init__()
        self.condition_channels = condition_channels
        self.dose_channels = dose_channels
        levels = list(attention_levels) if attention_levels is not None else [False] * len(
            channels)
        self.unet = DiffusionModelUNet(
            spatial_dims=3, in_channels=dose_channels + condition_channels,
            out_channels=dose_channels, channels=list(channels), attention_levels=levels,
            num_res_blocks=num_res_blocks, norm_num_groups=norm_num_groups,
            num_head_channels=num_head_channels, **unet_kwargs)

    @property
    def downsample_factor(self) -> int:
        """Spatial sizes must be multiples of this (2 ** number of downsamplings)."""
        return 2 ** (len(self.unet.block_out_channels) - 1)

    def forward(self, state: torch.Tensor, condition: torch.Tensor,
                timesteps: torch.Tensor) -> torch.Tensor:
        """Args:
            state: (B, dose_channels, Z, Y, X) noisy dose in the model's [-1, 1] range.
            condition: (B, condition_channels, Z, Y, X) CT and structure channels.
            timesteps: (B,) float or int time values (DDPM step index, or flow time scaled
                to the same range).
        Returns:
            (B, dose_channels, Z, Y, X).
        """
        if condition.shape[1] != self.condition_channels:
            raise ValueError(f"expected {self.condition_channels} condition channels, "
                             f"got {condition.shape[1]}")
        x = torch.cat([state, condition.to(state.dtype)], dim=1)
        return self.unet(x, timesteps)
