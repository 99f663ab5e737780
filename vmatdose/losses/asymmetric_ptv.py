"""Asymmetric target loss: under-dosing a target costs more than over-dosing it.

Inside the union of the targets, each voxel's error ``e = pred - ref`` (normalised dose)
counts ``underdose_weight`` times more when ``e < 0`` (a cold spot in the PTV: lost tumour
control) than when ``e > 0`` (a hot spot, which the plan's hot-spot goals limit anyway).
The mean runs over target voxels only; a batch without target voxels gives 0.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
from torch import nn

from vmatdose.losses.voxel import masked_mean

_KINDS = ("l1", "mse")


class AsymmetricPTVLoss(nn.Module):
    """Target-only voxel error with under-dose weighted ``underdose_weight`` times more.

    Args:
        structures: channel order of ``batch["masks"]`` (``${protocol.structures}``).
        targets: the target names (``${protocol.targets}``).
        underdose_weight: weight of voxels predicted below the reference (over-dose: 1).
        kind: ``l1`` (absolute) or ``mse`` (squared) error.
    """

    def __init__(self, structures: Sequence[str], targets: Sequence[str],
                 underdose_weight: float = 2.5, kind: str = "mse"):
        super().__init__()
        structures = list(structures)
        unknown = sorted(set(targets) - set(structures))
        if unknown:
            raise ValueError(f"targets {unknown} are not in structures {structures}")
        if underdose_weight <= 0:
            raise ValueError(f"underdose_weight must be positive, not {underdose_weight}")
        if kind not in _KINDS:
            raise ValueError(f"unknown asymmetric PTV loss kind {kind!r}; choose one of {_KINDS}")
        self.target_channels = [structures.index(t) for t in targets]
        self.underdose_weight = float(underdose_weight)
        self.kind = kind

    def forward(self, pred: torch.Tensor, batch: Mapping) -> torch.Tensor:
        """``pred``, ``batch["dose"]``: (B, 1, Z, Y, X) normalised dose -> scalar."""
        error = pred - batch["dose"]
        magnitude = error.abs() if self.kind == "l1" else error.square()
        side = torch.where(error < 0, self.underdose_weight, 1.0).to(error.dtype)
        inside = (batch["masks"][:, self.target_channels] > 0.5).any(dim=1, keepdim=True)
        return masked_mean(magnitude * side, inside.to(error.dtype))
