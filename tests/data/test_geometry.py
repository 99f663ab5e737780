"""Margins in mm on anisotropic grids."""

import numpy as np

from vmatdose.data.geometry import dilate_mm


def test_dilation_follows_the_spacing_of_each_axis():
    mask = np.zeros((9, 9, 9), bool)
    mask[4, 4, 4] = True
    grown = dilate_mm(mask, 2.5, (1.0, 2.0, 3.0))  # reaches 2 voxels in z, 1 in y, 0 in x
    assert grown[:, 4, 4].sum() == 5 and grown[4, :, 4].sum() == 3 and grown[4, 4, :].sum() == 1
    assert grown[5, 5, 4] == (np.hypot(1.0, 2.0) <= 2.5)
    assert not grown[4, 5, 5]  # hypot(2, 3) = 3.6 mm > 2.5
    assert np.array_equal(dilate_mm(mask, 0.0, (1, 1, 1)), mask)
