"""A case on another voxel grid, in patient coordinates (mm), for prediction off the
training spacing.

Volumes are sampled at the new grid's voxel centres by their patient position (linear
interpolation, clamped at the outermost voxel centres), never by index: a case at 1.2 mm
and one at 3.9 mm over the same patient land on the same voxels. Masks and the body are
interpolated linearly and cut at 0.5 (partial volume, like a contour rasterised on the
coarser grid); nearest-neighbour picking would shift them by up to half a source voxel.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace

import numpy as np

from vmatdose.data.case import Case


@dataclass(frozen=True)
class Grid:
    """A canonical (Z, Y, X) grid: ``shape``, ``spacing_mm`` (dz, dy, dx) and
    ``origin_mm`` (z, y, x of voxel [0, 0, 0])."""

    shape: tuple[int, int, int]
    spacing_mm: tuple[float, float, float]
    origin_mm: tuple[float, float, float]

    @classmethod
    def of(cls, case: Case) -> Grid:
        return cls(tuple(int(n) for n in case.shape),
                   tuple(float(s) for s in case.spacing_mm),
                   tuple(float(o) for o in case.origin_mm))

    def at_spacing(self, spacing_mm: Sequence[float]) -> Grid:
        """The grid at ``spacing_mm`` over the same extent (voxel edge to edge), centred
        on it: ``round(extent / spacing)`` voxels per axis (at least one)."""
        spacing = np.asarray(spacing_mm, float)
        extent = np.asarray(self.shape) * np.asarray(self.spacing_mm)
        shape = np.maximum(1, np.round(extent / spacing)).astype(int)
        centre = np.asarray(self.origin_mm) + (np.asarray(self.shape) - 1) / 2 * \
            np.asarray(self.spacing_mm)
        origin = centre - (shape - 1) / 2 * spacing
        return Grid(tuple(int(n) for n in shape), tuple(float(s) for s in spacing),
                    tuple(float(o) for o in origin))


def resample_volume(volume: np.ndarray, source: Grid, target: Grid) -> np.ndarray:
    """(Z, Y, X) ``volume`` on ``source`` -> float32 (Z, Y, X) on ``target``, trilinear in
    patient coordinates (one axis at a time), clamped at the outermost source voxel
    centres."""
    out = np.asarray(volume, np.float32)
    for axis in range(3):
        positions = target.origin_mm[axis] + target.spacing_mm[axis] * np.arange(
            target.shape[axis])
        index = np.clip((positions - source.origin_mm[axis]) / source.spacing_mm[axis], 0,
                        source.shape[axis] - 1)
        low = np.floor(index).astype(int)
        high = np.minimum(low + 1, source.shape[axis] - 1)
        view = [1, 1, 1]
        view[axis] = -1
        weight = (index - low).astype(np.float32).reshape(view)
        out = np.take(out, low, axis=axis) * (1 - weight) + np.take(out, high, axis=axis) \
            * weight
    return out


def resample_mask(mask: np.ndarray, source: Grid, target: Grid) -> np.ndarray:
    """A binary (Z, Y, X) mask on ``target``: linear partial volume cut at 0.5, uint8."""
    return (resample_volume(mask, source, target) >= 0.5).astype(np.uint8)


def resample_case(case: Case, spacing_mm: Sequence[float]) -> Case:
    """``case`` at ``spacing_mm`` over the same patient extent (:meth:`Grid.at_spacing`):
    CT (HU, rounded) and dose (Gy) linear, masks and body by partial volume. ``meta``
    (beams and their isocentre in patient mm included) is kept."""
    return resample_case_onto(case, Grid.of(case).at_spacing(spacing_mm))


def resample_case_onto(case: Case, target: Grid) -> Case:
    """``case`` on ``target`` (as :func:`resample_case`; beyond the case's extent each
    volume continues its outermost voxels: air and zero masks for a case cropped to its
    body with a margin)."""
    source = Grid.of(case)
    ct = np.rint(resample_volume(case.ct, source, target)).astype(case.ct.dtype)
    masks = np.stack([resample_mask(m, source, target) for m in case.masks]) \
        if len(case.masks) else np.zeros((0, *target.shape), np.uint8)
    return replace(case, ct=ct, masks=masks, body=resample_mask(case.body, source, target),
                   dose=None if case.dose is None else resample_volume(case.dose, source,
                                                                       target),
                   spacing_mm=np.asarray(target.spacing_mm),
                   origin_mm=np.asarray(target.origin_mm))
