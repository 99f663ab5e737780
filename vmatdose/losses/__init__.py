"""Composable dose-prediction losses (see :class:`CompositeLoss`)."""

from vmatdose.losses.asymmetric_ptv import AsymmetricPTVLoss
from vmatdose.losses.composite import CompositeLoss
from vmatdose.losses.dvh import DVHLoss, DVHMatchLoss
from vmatdose.losses.gradient import GradientLoss
from vmatdose.losses.perceptual import PerceptualLoss
from vmatdose.losses.structure_weighted import StructureWeightedLoss
from vmatdose.losses.vgg import VGG16Features
from vmatdose.losses.voxel import VoxelLoss

__all__ = [
    "AsymmetricPTVLoss",
    "CompositeLoss",
    "DVHLoss",
    "DVHMatchLoss",
    "GradientLoss",
    "PerceptualLoss",
    "StructureWeightedLoss",
    "VGG16Features",
    "VoxelLoss",
]
