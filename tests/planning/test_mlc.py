"""Segments as leaf and jaw positions (no planning engine needed)."""

from __future__ import annotations

import numpy as np
import pytest

from vmatdose.errors import InputError
from vmatdose.planning.mlc import mlc_geometry, open_area_mm2, pairs_per_row, segment_shape
from vmatdose.planning.sequencing import SequencingLimits, sequence_fluence


def test_segment_shape_leaves_and_jaws():
    fluence = np.array([[0.0, 1.0, 1.0, 0.0], [0.0, 0.0, 0.0, 0.0], [1.0, 1.0, 1.0, 1.0]])
    [segment] = sequence_fluence(fluence, SequencingLimits(levels=1)).segments
    mlc = mlc_geometry(fluence.shape, (-10.0, 10.0, -7.5, 7.5), 5.0, 2.5)
    shape = segment_shape(segment, mlc)
    assert mlc.n_pairs == 6 and mlc.boundaries_mm.tolist() == [-7.5, -5, -2.5, 0, 2.5, 5, 7.5]
    np.testing.assert_allclose(shape.leaves_mm[0], [-5, -5, 0, 0, -10, -10])
    np.testing.assert_allclose(shape.leaves_mm[1], [5, 5, 0, 0, 10, 10])
    assert shape.jaw_x_mm.tolist() == [-10.0, 10.0] and shape.jaw_y_mm.tolist() == [-7.5, 7.5]
    assert open_area_mm2(shape, mlc) == pytest.approx(10 * 5 + 20 * 5)
    with pytest.raises(InputError, match="whole multiple"):
        pairs_per_row(5.0, 3.0)
