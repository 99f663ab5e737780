"""Leaf sequencing on known fluences (no planning engine needed)."""

from __future__ import annotations

import numpy as np
import pytest

from vmatdose.errors import InputError
from vmatdose.planning.sequencing import (
    SequencingLimits,
    row_sweep,
    sequence_fluence,
    sweep_apertures,
)


def _weights_and_apertures(beam):
    return [(s.weight, s.aperture.astype(int).tolist()) for s in beam.segments]


def test_uniform_field_is_one_segment():
    fluence = np.full((4, 6), 2.5)
    beam = sequence_fluence(fluence, SequencingLimits(levels=10))
    assert len(beam.segments) == 1
    assert beam.segments[0].aperture.all()
    assert beam.segments[0].weight == pytest.approx(2.5)
    np.testing.assert_allclose(beam.fluence, fluence)


def test_two_level_step_is_open_field_plus_half_field():
    """[1 1 2 2] in every row: what a physicist draws, the open field for one unit and
    the right half for one more (2 units in all, not 1 + 2 = 3 with two halves)."""
    fluence = np.tile([1.0, 1.0, 2.0, 2.0], (3, 1))
    beam = sequence_fluence(fluence, SequencingLimits(levels=10))
    got = sorted(_weights_and_apertures(beam), key=lambda t: -np.sum(t[1]))
    assert len(got) == 2
    assert got[0][0] == pytest.approx(1.0) and got[0][1] == [[1, 1, 1, 1]] * 3
    assert got[1][0] == pytest.approx(1.0) and got[1][1] == [[0, 0, 1, 1]] * 3
    assert beam.total_weight == pytest.approx(2.0)
    np.testing.assert_allclose(beam.fluence, fluence)


def test_row_sweep_uses_the_fewest_monitor_units_of_the_row():
    left, right = row_sweep(np.array([2, 5, 3, 4, 0]))
    # rises 2 + 3 + 1: the row needs 6 units, open where right < m <= left
    assert left.tolist() == [2, 5, 5, 6, 6] and right.tolist() == [0, 0, 2, 2, 6]
    groups = sweep_apertures(np.array([[2, 5, 3, 4, 0]]))
    rebuilt = sum(a.astype(int) * c for a, c in groups)
    assert rebuilt.tolist() == [[2, 5, 3, 4, 0]]
    assert sum(c for _, c in groups) == 6
    for aperture, _ in groups:  # one contiguous gap per row
        cols = np.flatnonzero(aperture[0])
        assert np.all(np.diff(cols) == 1)


def test_sum_of_segments_reproduces_a_modulated_fluence_within_half_a_level():
    rng = np.random.default_rng(0)
    fluence = rng.uniform(0.0, 3.0, (8, 12))
    fluence[:, :2] = np.nan  # no bixels there
    beam = sequence_fluence(fluence, SequencingLimits(levels=8, max_segments=100))
    step = np.nanmax(fluence) / beam.levels
    assert beam.levels == 8 and beam.dropped_weight == 0.0
    assert np.all(np.abs(beam.fluence - np.nan_to_num(fluence)) <= step / 2 + 1e-9)
    for segment in beam.segments:
        assert segment.weight >= step - 1e-9
        for row, (first, stop) in zip(segment.aperture, segment.gaps):
            assert row.sum() == stop - first  # one gap per leaf pair


def test_segment_cap_minimum_weight_and_minimum_area_are_respected():
    rng = np.random.default_rng(1)
    fluence = rng.uniform(0.0, 1.0, (10, 10))
    free = sequence_fluence(fluence, SequencingLimits(levels=10, max_segments=1000))
    capped = sequence_fluence(fluence, SequencingLimits(levels=10, max_segments=5))
    assert len(free.segments) > 5 and len(capped.segments) <= 5
    assert capped.levels < 10
    heavy = sequence_fluence(fluence, SequencingLimits(levels=10, max_segments=1000,
                                                       min_segment_weight=0.3))
    assert min(s.weight for s in heavy.segments) >= 0.3 - 1e-9
    # a single hot bixel beside a broad field: its segment is under 2 bixels, dropped
    spot = np.zeros((3, 5))
    spot[:, :4] = 1.0
    spot[1, 4] = 2.0
    beam = sequence_fluence(spot, SequencingLimits(levels=2, min_segment_bixels=2))
    assert all(s.aperture.sum() >= 2 for s in beam.segments)
    assert beam.dropped_weight == pytest.approx(1.0)


def test_empty_fluence_and_bad_limits():
    assert sequence_fluence(np.zeros((3, 3)), SequencingLimits()).segments == []
    with pytest.raises(InputError, match="max_segments"):
        SequencingLimits(max_segments=0)
