"""Fluence maps laid out from bixel positions (no planning engine needed)."""

from __future__ import annotations

import numpy as np

from vmatdose.planning.fluence import fluence_figure, fluence_map, save_fluence_arrays
from vmatdose.planning.optimise import BeamFluence


def _beam() -> BeamFluence:
    positions = np.array([[-5.0, 0.0], [0.0, 0.0], [5.0, 0.0], [0.0, 5.0]])
    return BeamFluence(40.0, 0.0, positions, np.array([1.0, 2.0, 3.0, 4.0]))


def test_map_places_each_weight_at_its_bixel():
    grid, extent = fluence_map(_beam(), 5.0)
    assert grid.shape == (2, 3)  # rows: longitudinal 0, 5 mm; columns: lateral -5, 0, 5 mm
    np.testing.assert_array_equal(grid[0], [1.0, 2.0, 3.0])
    assert np.isnan(grid[1, 0]) and grid[1, 1] == 4.0 and np.isnan(grid[1, 2])
    assert extent == (-7.5, 7.5, -2.5, 7.5)


def test_arrays_round_trip_and_figure(tmp_path):
    path = save_fluence_arrays([_beam(), _beam()], 5.0, tmp_path / "fluence.npz")
    with np.load(path) as data:
        assert data["gantry_deg"].tolist() == [40.0, 40.0]
        np.testing.assert_array_equal(data["weights_1"], [1.0, 2.0, 3.0, 4.0])
        assert data["beam_0"].shape == (2, 3)
    fig = fluence_figure([_beam()] * 3, 5.0, "t")
    assert len([ax for ax in fig.axes if ax.images]) == 3
