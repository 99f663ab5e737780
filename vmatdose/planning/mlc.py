"""Segments as a machine sets them: MLC leaf positions and jaws in millimetres.

Beam's-eye view in the isocentre plane, IEC beam-limiting-device axes: leaves travel
along X (the fluence map's columns, lateral), leaf pairs are stacked along Y (its rows,
longitudinal). Each fluence row of ``bixel_width_mm`` is ``bixel_width_mm /
leaf_width_mm`` leaf pairs that share its gap. A closed leaf pair is parked shut at the
middle of the segment's X jaws; the jaws enclose every open leaf gap.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from vmatdose.errors import InputError
from vmatdose.planning.sequencing import Segment


@dataclass(frozen=True)
class MlcGeometry:
    """One beam's MLC, fitted to its fluence map.

    Attributes:
        boundaries_mm: (n_pairs + 1,) leaf-pair boundaries along Y, increasing.
        column_edges_mm: (columns + 1,) bixel edges along X.
        pairs_per_row: leaf pairs per fluence row.
    """

    boundaries_mm: np.ndarray
    column_edges_mm: np.ndarray
    pairs_per_row: int

    @property
    def n_pairs(self) -> int:
        return len(self.boundaries_mm) - 1


@dataclass(frozen=True)
class SegmentShape:
    """A segment's leaf and jaw positions (mm).

    Attributes:
        leaves_mm: (2, n_pairs): row 0 the X1 (left, -X) bank, row 1 the X2 bank.
        jaw_x_mm, jaw_y_mm: (2,) X1, X2 and Y1, Y2.
    """

    leaves_mm: np.ndarray
    jaw_x_mm: np.ndarray
    jaw_y_mm: np.ndarray


def pairs_per_row(bixel_width_mm: float, leaf_width_mm: float) -> int:
    """How many leaf pairs one bixel row is; ``InputError`` unless a whole number."""
    ratio = float(bixel_width_mm) / float(leaf_width_mm)
    if ratio < 1 - 1e-9 or abs(ratio - round(ratio)) > 1e-6:
        raise InputError(f"planning.bixel_width_mm={bixel_width_mm:g} must be a whole "
                         f"multiple of planning.leaf_width_mm={leaf_width_mm:g} (each "
                         "bixel row is delivered by whole leaf pairs)")
    return int(round(ratio))


def mlc_geometry(shape: tuple[int, int], extent_mm: tuple[float, float, float, float],
                 bixel_width_mm: float, leaf_width_mm: float) -> MlcGeometry:
    """The MLC of a fluence map of ``shape`` (rows, columns) whose bixel edges span
    ``extent_mm`` (lateral min, max, longitudinal min, max)."""
    k = pairs_per_row(bixel_width_mm, leaf_width_mm)
    rows, cols = shape
    lat0, _, long0, _ = extent_mm
    boundaries = long0 + np.arange(rows * k + 1) * (bixel_width_mm / k)
    columns = lat0 + np.arange(cols + 1) * float(bixel_width_mm)
    return MlcGeometry(boundaries, columns, k)


def segment_shape(segment: Segment, mlc: MlcGeometry) -> SegmentShape:
    """Leaf and jaw positions of ``segment`` (an empty aperture is an error)."""
    gaps = segment.gaps
    open_rows = np.flatnonzero(gaps[:, 1] > gaps[:, 0])
    if open_rows.size == 0:
        raise ValueError("a segment with no open bixel has no shape")
    edges = mlc.column_edges_mm
    left, right = edges[gaps[:, 0]], edges[gaps[:, 1]]
    x1, x2 = float(left[open_rows].min()), float(right[open_rows].max())
    park = 0.5 * (x1 + x2)
    closed = gaps[:, 1] <= gaps[:, 0]
    left, right = np.where(closed, park, left), np.where(closed, park, right)
    k = mlc.pairs_per_row
    leaves = np.stack([np.repeat(left, k), np.repeat(right, k)])
    y1 = float(mlc.boundaries_mm[open_rows[0] * k])
    y2 = float(mlc.boundaries_mm[(open_rows[-1] + 1) * k])
    return SegmentShape(leaves, np.array([x1, x2]), np.array([y1, y2]))


def open_area_mm2(shape: SegmentShape, mlc: MlcGeometry) -> float:
    """Open area of a segment inside its jaws (mm^2)."""
    widths = np.diff(mlc.boundaries_mm)
    low = np.clip(mlc.boundaries_mm[:-1], *shape.jaw_y_mm)
    high = np.clip(mlc.boundaries_mm[1:], *shape.jaw_y_mm)
    inside = np.where(widths > 0, (high - low) / widths, 0.0)
    gap = np.clip(shape.leaves_mm[1], *shape.jaw_x_mm) - np.clip(shape.leaves_mm[0],
                                                                  *shape.jaw_x_mm)
    return float(np.sum(np.maximum(gap, 0.0) * widths * inside))
