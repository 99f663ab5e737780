"""A fluence plan made deliverable: every beam sequenced into MLC segments, the segments
as one aperture matrix (bixels x segments) so the engine recomputes their dose
(``dose = D @ (apertures @ segment_weights)``), and the beams as a machine runs them
(leaf positions, monitor units per fraction) for the RT Plan.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace

import numpy as np
import scipy.sparse as sp

from vmatdose.planning.fluence import BeamFluence, bixel_cells, fluence_map
from vmatdose.planning.mlc import MlcGeometry, mlc_geometry, segment_shape
from vmatdose.planning.rtplan import DeliveredBeam
from vmatdose.planning.sequencing import SequencedBeam, SequencingLimits, sequence_fluence


@dataclass(frozen=True)
class SequencedPlan:
    """Every beam's segments.

    Attributes:
        beams: per beam, its :class:`SequencedBeam`.
        mlcs: per beam, its MLC fitted to its fluence map.
        apertures: (bixels, segments) sparse 0/1: segment ``k`` opens bixel ``i``;
            segments numbered beam after beam, in each beam's delivery order.
    """

    beams: list[SequencedBeam]
    mlcs: list[MlcGeometry]
    apertures: sp.csc_matrix

    @property
    def segment_weights(self) -> np.ndarray:
        """(segments,) fluence units of each segment."""
        return np.array([s.weight for b in self.beams for s in b.segments], dtype=np.float64)

    @property
    def bixel_weights(self) -> np.ndarray:
        """(bixels,) the fluence the segments deliver to each bixel."""
        return np.asarray(self.apertures @ self.segment_weights).ravel()

    def with_segment_weights(self, weights: np.ndarray) -> SequencedPlan:
        """The same apertures with other segment ``weights`` (segments,)."""
        weights = np.asarray(weights, np.float64)
        beams, k = [], 0
        for beam in self.beams:
            segments = [replace(s, weight=float(weights[k + i]))
                        for i, s in enumerate(beam.segments)]
            fluence = sum((s.aperture * s.weight for s in segments),
                          np.zeros_like(beam.fluence))
            beams.append(replace(beam, segments=segments, fluence=fluence))
            k += len(segments)
        return replace(self, beams=beams)


def sequence_plan(fluences: Sequence[BeamFluence], bixel_width_mm: float,
                  leaf_width_mm: float, limits: SequencingLimits) -> SequencedPlan:
    """Sequence every beam of a fluence plan (bixels numbered beam after beam)."""
    beams, mlcs, columns, start = [], [], [], 0
    for fluence in fluences:
        grid, extent = fluence_map(fluence, bixel_width_mm)
        cells, _ = bixel_cells(fluence, bixel_width_mm)
        sequenced = sequence_fluence(grid, limits)
        for segment in sequenced.segments:
            opened = segment.aperture[cells[:, 0], cells[:, 1]]
            columns.append(start + np.flatnonzero(opened))
        beams.append(sequenced)
        mlcs.append(mlc_geometry(grid.shape, extent, bixel_width_mm, leaf_width_mm))
        start += len(fluence.weights)
    rows = np.concatenate(columns) if columns else np.zeros(0, np.int64)
    cols = np.concatenate([np.full(len(c), k) for k, c in enumerate(columns)]) \
        if columns else np.zeros(0, np.int64)
    apertures = sp.csc_matrix((np.ones(len(rows)), (rows, cols)),
                              shape=(start, len(columns)))
    return SequencedPlan(beams, mlcs, apertures)


def delivered_beams(plan: SequencedPlan, fluences: Sequence[BeamFluence],
                    mu_per_weight: float, fractions: int) -> list[DeliveredBeam]:
    """The beams as the machine runs them: segment shapes and MU per fraction
    (``weight x mu_per_weight / fractions``)."""
    out = []
    for beam, mlc, fluence in zip(plan.beams, plan.mlcs, fluences):
        shapes = [segment_shape(s, mlc) for s in beam.segments]
        mu = np.array([s.weight for s in beam.segments]) * mu_per_weight / fractions
        out.append(DeliveredBeam(fluence.gantry_deg, fluence.couch_deg, mlc, shapes, mu))
    return out
