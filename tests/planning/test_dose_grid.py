"""The dose-grid -> case-grid interpolation matrix is SimpleITK's linear resampling."""

from __future__ import annotations

import numpy as np

from vmatdose.planning.dose_grid import (
    DoseGrid,
    interpolation_matrix,
    resample_to_case,
    voxel_centres_mm,
)


def test_matrix_equals_the_linear_resampler_everywhere_even_past_the_grid():
    rng = np.random.default_rng(0)
    grid = DoseGrid((5, 6, 7), np.array([-3.0, 2.0, 1.0]), np.array([5.0, 4.5, 5.0]))
    values = rng.uniform(0.0, 10.0, grid.size)
    shape, origin, spacing = (12, 11, 13), np.array([-6.0, 0.0, -1.0]), np.array([2, 2.5, 3])
    full = resample_to_case(grid, values, shape, origin, spacing)
    idx = np.argwhere(np.ones(shape, bool))
    matrix = interpolation_matrix(grid, voxel_centres_mm(idx, origin, spacing))
    np.testing.assert_allclose((matrix @ values).reshape(shape), full, atol=1e-5)
    assert (full == 0).any() and (full > 0).any()  # some case voxels lie past the grid
    rows = np.asarray(matrix.sum(axis=1)).ravel()
    assert np.all((np.abs(rows - 1) < 1e-9) | (rows == 0))  # weights sum to 1 (or 0 outside)
