"""The engine's dose grid and the case grid: linear interpolation as a sparse matrix.

The engine computes dose on its own grid (``planning.dose_grid_mm``) and the plan is
judged on the case grid, where the clinical criteria (V95 at a target's edge) are
decided. ``interpolation_matrix`` is the trilinear interpolation that SimpleITK's linear
resampler applies (the engine's own ``compute_result_ct_grid``), restricted to chosen
case voxels, so an optimiser can judge its dose exactly where the criteria are evaluated:
``case_dose[voxels] = P @ (dij @ weights)``.

Dose-grid voxels are numbered as the engine's matrix rows: C order of the (Z, Y, X)
array. Both grids are axis-aligned (identity direction).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import scipy.sparse as sp
import SimpleITK as sitk


@dataclass(frozen=True)
class DoseGrid:
    """An axis-aligned grid.

    Attributes:
        shape: (Z, Y, X) voxels.
        origin_mm: (z, y, x) of the first voxel centre.
        spacing_mm: (dz, dy, dx).
    """

    shape: tuple[int, int, int]
    origin_mm: np.ndarray
    spacing_mm: np.ndarray

    @classmethod
    def from_engine(cls, grid) -> DoseGrid:
        """From pyRadPlan's ``Grid`` (``dimensions``, ``origin``, ``resolution_vector`` in
        x, y, z order)."""
        return cls(tuple(int(v) for v in grid.dimensions[::-1]),
                   np.asarray(grid.origin, float)[::-1].copy(),
                   np.asarray(grid.resolution_vector, float)[::-1].copy())

    @property
    def size(self) -> int:
        return int(np.prod(self.shape))

    def image(self, values: np.ndarray) -> sitk.Image:
        """A flat (size,) array in C order as a SimpleITK image on this grid."""
        image = sitk.GetImageFromArray(np.asarray(values, np.float32).reshape(self.shape))
        image.SetOrigin([float(v) for v in self.origin_mm[::-1]])
        image.SetSpacing([float(v) for v in self.spacing_mm[::-1]])
        return image


def interpolation_matrix(grid: DoseGrid, points_mm: np.ndarray) -> sp.csr_matrix:
    """(N, grid.size) trilinear interpolation at ``points_mm`` (N, 3) (z, y, x).

    As SimpleITK's linear interpolator: a point more than half a voxel outside the grid
    gets 0; inside, neighbours past the last voxel are clamped to it."""
    points = np.asarray(points_mm, float).reshape(-1, 3)
    u = (points - grid.origin_mm) / grid.spacing_mm  # continuous index (z, y, x)
    shape = np.asarray(grid.shape)
    inside = np.all((u >= -0.5) & (u <= shape - 0.5), axis=1)
    base = np.floor(u).astype(np.int64)
    frac = u - base
    rows, cols, vals = [], [], []
    n = len(points)
    for corner in range(8):
        offset = np.array([(corner >> 2) & 1, (corner >> 1) & 1, corner & 1])
        idx = np.clip(base + offset, 0, shape - 1)
        weight = np.prod(np.where(offset == 1, frac, 1.0 - frac), axis=1) * inside
        flat = (idx[:, 0] * shape[1] + idx[:, 1]) * shape[2] + idx[:, 2]
        rows.append(np.arange(n))
        cols.append(flat)
        vals.append(weight)
    matrix = sp.csr_matrix((np.concatenate(vals), (np.concatenate(rows), np.concatenate(cols))),
                           shape=(n, grid.size))
    matrix.sum_duplicates()
    return matrix


def voxel_centres_mm(indices: np.ndarray, origin_mm: np.ndarray, spacing_mm: np.ndarray
                     ) -> np.ndarray:
    """(N, 3) (z, y, x) mm of voxel ``indices`` (N, 3) of a grid."""
    return np.asarray(origin_mm, float) + np.asarray(indices, float) * np.asarray(spacing_mm,
                                                                                   float)


def resample_to_case(grid: DoseGrid, values: np.ndarray, shape: tuple[int, int, int],
                     origin_mm: np.ndarray, spacing_mm: np.ndarray) -> np.ndarray:
    """A flat dose-grid array (grid.size,) on a case grid (Z, Y, X), linear (as the
    engine's ``compute_result_ct_grid``); float32."""
    resampler = sitk.ResampleImageFilter()
    resampler.SetInterpolator(sitk.sitkLinear)
    resampler.SetOutputOrigin([float(v) for v in np.asarray(origin_mm)[::-1]])
    resampler.SetOutputSpacing([float(v) for v in np.asarray(spacing_mm)[::-1]])
    resampler.SetSize([int(v) for v in shape[::-1]])
    out = resampler.Execute(grid.image(values))
    return sitk.GetArrayFromImage(out).astype(np.float32)
