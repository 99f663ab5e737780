"""Composable dose-prediction losses (see :class:`CompositeLoss`)."""

from vmatdose.losses.composite import CompositeLoss
from vmatdose.losses.voxel import VoxelLoss

__all__ = ["CompositeLoss", "VoxelLoss"]
