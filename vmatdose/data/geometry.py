"""Mask geometry in mm on anisotropic voxel grids (exact Euclidean distance transforms)."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from scipy import ndimage


def signed_distance_mm(mask: np.ndarray, spacing_mm: Sequence[float]) -> np.ndarray:
    """Signed Euclidean distance to the mask boundary in mm: negative inside, positive outside.

    Args:
        mask: (Z, Y, X) binary.
        spacing_mm: (dz, dy, dx).
    Returns:
        (Z, Y, X) float32; an empty mask gives +inf-free large positive values (1e3 mm).
    """
    inside = mask > 0
    if not inside.any():
        return np.full(mask.shape, 1e3, dtype=np.float32)
    if inside.all():
        return np.full(mask.shape, -1e3, dtype=np.float32)
    outside_dist = ndimage.distance_transform_edt(~inside, sampling=spacing_mm)
    inside_dist = ndimage.distance_transform_edt(inside, sampling=spacing_mm)
    return (outside_dist - inside_dist).astype(np.float32)


def dilate_mm(mask: np.ndarray, margin_mm: float, spacing_mm: Sequence[float]) -> np.ndarray:
    """(Z, Y, X) bool: ``mask`` grown isotropically by ``margin_mm`` (Euclidean, anisotropic
    voxels), as a planning margin or an OAR neighbourhood is drawn."""
    mask = np.asarray(mask).astype(bool)
    if not mask.any() or margin_mm <= 0:
        return mask
    return ndimage.distance_transform_edt(~mask, sampling=spacing_mm) <= margin_mm
