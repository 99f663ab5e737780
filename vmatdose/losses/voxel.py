"""Voxel-wise dose losses: L1, MSE, Huber, optionally restricted to the body."""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import nn
from torch.nn import functional as F

_KINDS = ("l1", "mse", "huber")


def masked_mean(values: torch.Tensor, weights: torch.Tensor | None) -> torch.Tensor:
    """Mean of ``values`` weighted by ``weights`` (broadcast); plain mean when ``None``."""
    if weights is None:
        return values.mean()
    weights = weights.expand_as(values)
    return (values * weights).sum() / weights.sum().clamp_min(1e-8)


def voxel_error(pred: torch.Tensor, target: torch.Tensor, kind: str,
                huber_delta: float = 0.05) -> torch.Tensor:
    """Per-voxel error map (same shape as ``pred``) of the given kind."""
    if kind == "l1":
        return (pred - target).abs()
    if kind == "mse":
        return (pred - target).square()
    if kind == "huber":
        return F.huber_loss(pred, target, reduction="none", delta=huber_delta)
    raise ValueError(f"unknown voxel loss kind {kind!r}; choose one of {_KINDS}")


class VoxelLoss(nn.Module):
    """Voxel-wise error between predicted and reference normalised dose.

    Args:
        kind: ``l1``, ``mse`` or ``huber``.
        in_body: average over the body only (outside voxels do not count).
        huber_delta: Huber transition point, in units of the highest prescription.
    """

    def __init__(self, kind: str = "l1", in_body: bool = False, huber_delta: float = 0.05):
        super().__init__()
        if kind not in _KINDS:
            raise ValueError(f"unknown voxel loss kind {kind!r}; choose one of {_KINDS}")
        self.kind, self.in_body, self.huber_delta = kind, in_body, huber_delta

    def forward(self, pred: torch.Tensor, batch: Mapping) -> torch.Tensor:
        error = voxel_error(pred, batch["dose"], self.kind, self.huber_delta)
        return masked_mean(error, batch["body"] if self.in_body else None)
