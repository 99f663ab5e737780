"""A fluence plan sequenced beam by beam (no planning engine needed)."""

from __future__ import annotations

import numpy as np
import pytest

from vmatdose.planning.delivery import delivered_beams, sequence_plan
from vmatdose.planning.fluence import BeamFluence
from vmatdose.planning.sequencing import SequencingLimits


def _beam(gantry, weights):
    positions = np.array([[x, y] for y in (0.0, 5.0) for x in (-5.0, 0.0, 5.0)])
    return BeamFluence(gantry, 0.0, positions, np.asarray(weights, float))


def test_apertures_deliver_the_quantised_fluence_of_every_bixel():
    beams = [_beam(0.0, [1, 1, 2, 2, 2, 2]), _beam(90.0, [3, 0, 3, 3, 3, 3])]
    plan = sequence_plan(beams, 5.0, 5.0, SequencingLimits(levels=10, min_segment_bixels=1))
    assert plan.apertures.shape == (12, len(plan.segment_weights))
    np.testing.assert_allclose(plan.bixel_weights, [1, 1, 2, 2, 2, 2, 3, 0, 3, 3, 3, 3])
    assert [len(b.segments) for b in plan.beams] == [2, 2]
    doubled = plan.with_segment_weights(2 * plan.segment_weights)
    np.testing.assert_allclose(doubled.bixel_weights, 2 * plan.bixel_weights)
    delivered = delivered_beams(doubled, beams, mu_per_weight=100.0, fractions=35)
    assert delivered[0].mu == pytest.approx(2 * 2 * 100 / 35)  # open field 1 + 1 more
    # the row [3, 0, 3] has two gaps, one leaf pair opens them one after the other: 6
    assert delivered[1].mu == pytest.approx(2 * 6 * 100 / 35)
    assert delivered[0].mlc.n_pairs == 2 and delivered[0].shapes[0].leaves_mm.shape == (2, 2)
