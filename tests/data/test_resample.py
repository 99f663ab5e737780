"""A case on another voxel grid, sampled in patient mm (no shift, linear exact)."""

from __future__ import annotations

import numpy as np
import pytest

from vmatdose.data.case import Case
from vmatdose.data.resample import Grid, resample_case, resample_volume

COARSE = Grid((12, 16, 16), (2.5, 3.9, 3.9), (-13.75, -29.25, -29.25))


def positions(grid: Grid) -> list[np.ndarray]:
    return np.meshgrid(*[o + s * np.arange(n) for o, s, n in
                         zip(grid.origin_mm, grid.spacing_mm, grid.shape)], indexing="ij")


def ramp(grid: Grid) -> np.ndarray:
    """0.5 z + 2 y - x (patient mm), float32."""
    z, y, x = positions(grid)
    return (0.5 * z + 2 * y - x).astype(np.float32)


def test_grid_at_another_spacing_keeps_extent_and_centre():
    fine = COARSE.at_spacing((2.5, 1.2, 1.2))
    assert fine.shape == (12, 52, 52)
    centre = [o + (n - 1) / 2 * s for o, s, n in
              zip(fine.origin_mm, fine.spacing_mm, fine.shape)]
    np.testing.assert_allclose(centre, [-13.75 + 5.5 * 2.5, 0.0, 0.0], atol=1e-9)


def test_linear_field_is_reproduced_inside_and_clamped_at_the_edges():
    fine = COARSE.at_spacing((2.5, 1.2, 1.2))
    out = resample_volume(ramp(COARSE), COARSE, fine)
    z, y, x = positions(fine)
    inside = (np.abs(y) <= 29.25) & (np.abs(x) <= 29.25)
    np.testing.assert_allclose(out[inside], ramp(fine)[inside], atol=1e-4)
    # beyond the outermost coarse voxel centres: the edge value (no extrapolation)
    assert out[0, 0, 0] == pytest.approx(ramp(COARSE)[0, 0, 0], abs=1e-4)


def test_masks_keep_their_position_between_grids():
    """A sphere at 3.9 mm -> 1.2 mm -> 3.9 mm: its centroid does not move (nearest picking
    by index would shift it by up to half a voxel) and the mask comes back."""
    z, y, x = positions(COARSE)
    sphere = ((z - 1.0) ** 2 + (y - 4.0) ** 2 + (x + 6.0) ** 2 <= 12.0 ** 2).astype(np.uint8)
    case = Case(case_id="c", ct=np.rint(ramp(COARSE)).astype(np.int16),
                masks=sphere[None], structures=["PTV70"], body=np.ones_like(sphere),
                spacing_mm=np.asarray(COARSE.spacing_mm), origin_mm=np.asarray(COARSE.origin_mm),
                prescriptions_gy={"PTV70": 70.0}, dose=ramp(COARSE), meta={"source": "x"})
    fine = resample_case(case, (2.5, 1.2, 1.2))
    assert fine.shape == (12, 52, 52) and fine.masks.dtype == np.uint8
    fz, fy, fx = positions(Grid.of(fine))
    inside = fine.masks[0] > 0
    np.testing.assert_allclose([fz[inside].mean(), fy[inside].mean(), fx[inside].mean()],
                               [1.0, 4.0, -6.0], atol=0.3)
    back = resample_case(fine, COARSE.spacing_mm)
    assert back.shape == COARSE.shape
    np.testing.assert_allclose(back.origin_mm, COARSE.origin_mm, atol=1e-9)
    assert np.count_nonzero(back.masks[0] != sphere) <= 0.02 * sphere.sum()
    # linear dose exact away from the outermost voxels (clamped there)
    np.testing.assert_allclose(back.dose[:, 1:-1, 1:-1], case.dose[:, 1:-1, 1:-1], atol=1e-3)
    assert back.meta == case.meta
