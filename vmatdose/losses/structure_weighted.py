"""Structure-weighted voxel loss: errors count more in targets and near organ surfaces.

Weights per voxel (all configurable), the first region that applies wins:

1. outside the body: ``outside_weight`` (0: ignored);
2. inside any target: ``target_weight`` (2);
3. within ``band_mm`` of an organ-at-risk surface, on either side: ``band_weight`` (1.5),
   where the dose gradient between target and organ decides the plan;
4. the rest of the body: ``body_weight`` (0.5).

The band comes from one Euclidean distance transform per case (scipy, on CPU) of the OAR
surface voxels (mask voxels with a face-neighbour outside the mask), with the case's
anisotropic spacing: about 15 ms for 64^3, whatever the number of organs.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
import torch
from scipy import ndimage
from torch import nn

from vmatdose.losses.voxel import masked_mean, voxel_error


def surface_voxels(masks: np.ndarray) -> np.ndarray:
    """(S, Z, Y, X) bool -> (Z, Y, X) bool: union of the structures' boundary voxels
    (inside the mask, a 6-neighbour outside; the volume edge is not a boundary)."""
    surface = np.zeros(masks.shape[1:], dtype=bool)
    for mask in masks:
        surface |= mask & ~ndimage.binary_erosion(mask, border_value=1)
    return surface


def distance_to_surface_mm(masks: np.ndarray, spacing_mm: Sequence[float]) -> np.ndarray:
    """(S, Z, Y, X) bool -> (Z, Y, X) float32 Euclidean distance (mm) from every voxel
    centre to the nearest surface voxel centre of any structure (inf without surfaces)."""
    surface = surface_voxels(masks)
    if not surface.any():
        return np.full(surface.shape, np.inf, dtype=np.float32)
    return ndimage.distance_transform_edt(~surface, sampling=spacing_mm).astype(np.float32)


class StructureWeightedLoss(nn.Module):
    """Voxel error weighted by region; a weighted mean, so only weight ratios matter.

    Args:
        structures: channel order of ``batch["masks"]`` (``${data.structures}``).
        targets: target names (``${data.targets}``); every other structure is an OAR.
        target_weight, band_weight, body_weight, outside_weight: region weights.
        band_mm: half-width of the band around OAR surfaces, in mm.
        kind: ``l1``, ``mse`` or ``huber`` voxel error.
        huber_delta: Huber transition point (normalised dose).
    """

    def __init__(self, structures: Sequence[str], targets: Sequence[str],
                 target_weight: float = 2.0, band_weight: float = 1.5, band_mm: float = 5.0,
                 body_weight: float = 0.5, outside_weight: float = 0.0, kind: str = "l1",
                 huber_delta: float = 0.05):
        super().__init__()
        structures = list(structures)
        unknown = sorted(set(targets) - set(structures))
        if unknown:
            raise ValueError(f"targets {unknown} are not in structures {structures}")
        weights = (target_weight, band_weight, body_weight, outside_weight)
        if min(weights) < 0 or band_mm < 0:
            raise ValueError("region weights and band_mm must be non-negative")
        voxel_error(torch.zeros(1), torch.zeros(1), kind)  # fail early on an unknown kind
        self.target_channels = [structures.index(t) for t in targets]
        self.oar_channels = [i for i, s in enumerate(structures) if s not in targets]
        self.target_weight, self.band_weight = float(target_weight), float(band_weight)
        self.body_weight, self.outside_weight = float(body_weight), float(outside_weight)
        self.band_mm, self.kind, self.huber_delta = float(band_mm), kind, huber_delta

    def oar_band(self, batch: Mapping) -> torch.Tensor:
        """(B, 1, Z, Y, X) bool: within ``band_mm`` of an OAR surface."""
        masks = batch["masks"][:, self.oar_channels].detach().cpu().numpy() > 0.5
        spacing = batch["spacing_mm"].detach().cpu().numpy().astype(np.float64)
        bands = [distance_to_surface_mm(m, s) <= self.band_mm for m, s in zip(masks, spacing)]
        return torch.from_numpy(np.stack(bands)[:, None]).to(batch["masks"].device)

    def weight_map(self, batch: Mapping) -> torch.Tensor:
        """(B, 1, Z, Y, X) float32 voxel weights (see the module docstring)."""
        body = batch["body"] > 0.5
        masks = batch["masks"] > 0.5
        target = masks[:, self.target_channels].any(dim=1, keepdim=True)
        weights = torch.full(body.shape, self.body_weight, device=body.device)
        weights = torch.where(self.oar_band(batch), self.band_weight, weights)
        weights = torch.where(target, self.target_weight, weights)
        return torch.where(body, weights, self.outside_weight)

    def forward(self, pred: torch.Tensor, batch: Mapping) -> torch.Tensor:
        """``pred``, ``batch["dose"]``: (B, 1, Z, Y, X) normalised dose -> scalar."""
        error = voxel_error(pred, batch["dose"], self.kind, self.huber_delta)
        return masked_mean(error, self.weight_map(batch).to(error.dtype))
