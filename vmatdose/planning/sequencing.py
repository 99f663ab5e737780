"""Step-and-shoot leaf sequencing: a beam's fluence map -> MLC segments (apertures x MU).

The algorithm is the unidirectional leaf sweep of Bortfeld et al. (1994), in the form of
Siochi's (1999) "rod pushing" without the tongue-and-groove correction, followed by his
extraction of segments from the layers of the pushed intensity solid:

1. the fluence is quantised into integer levels of ``step = max / levels``;
2. in each leaf-pair row ``q[0..n)`` the left leaf reaches column ``j`` at level
   ``L[j] = sum_{i<=j} max(q[i] - q[i-1], 0)`` and the right leaf at ``R[j] = L[j] - q[j]``
   (both non-decreasing in ``j``), so at level ``m`` the row is open exactly on the
   columns ``R[j] < m <= L[j]``: one contiguous gap, and the row's monitor units
   ``L[-1]`` are the fewest any decomposition of that row can use;
3. consecutive levels with the same aperture (every row's gap) form one segment of
   ``count x step``; identical apertures at different levels are merged.

Constraints (:class:`SequencingLimits`): leaf width (each fluence row is
``bixel_width / leaf_width`` leaf pairs), the fewest monitor units a segment may have
(the level step is never below it), the smallest open area a segment may have (smaller
segments are dropped and their share of the fluence is lost, which the recomputed dose
shows), and at most ``max_segments`` per beam (fewer levels until it fits; if even one level has
more, the segments of least weight x area are dropped).

A uniform field is one segment; ``[1, 1, 2, 2]`` is the open field plus the right half,
one unit each.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from vmatdose.errors import InputError


@dataclass(frozen=True)
class SequencingLimits:
    """What the machine allows (fluence units: the optimiser's bixel weights).

    Attributes:
        levels: intensity levels the fluence is quantised into at most.
        max_segments: segments per beam at most.
        min_segment_weight: the fewest fluence units (monitor units up to a factor) a
            segment may deliver.
        min_segment_bixels: the smallest open area of a segment, in bixels.
    """

    levels: int = 10
    max_segments: int = 20
    min_segment_weight: float = 0.0
    min_segment_bixels: int = 1

    def __post_init__(self) -> None:
        for key in ("levels", "max_segments", "min_segment_bixels"):
            if int(getattr(self, key)) < 1:
                raise InputError(f"planning.{key} must be >= 1, got {getattr(self, key)}")
        if self.min_segment_weight < 0:
            raise InputError(f"planning.min_segment_weight must be >= 0, got "
                             f"{self.min_segment_weight}")


@dataclass(frozen=True)
class Segment:
    """One static MLC aperture and its fluence.

    Attributes:
        aperture: (rows, columns) bool, open bixels of the fluence grid (each row one
            leaf-pair row of the fluence map).
        weight: fluence units delivered through the aperture.
    """

    aperture: np.ndarray
    weight: float

    @property
    def gaps(self) -> np.ndarray:
        """(rows, 2) int: each row's open columns ``[first, last + 1)``; ``(0, 0)`` closed."""
        out = np.zeros((self.aperture.shape[0], 2), dtype=np.int64)
        for r, row in enumerate(self.aperture):
            open_cols = np.flatnonzero(row)
            if open_cols.size:
                out[r] = open_cols[0], open_cols[-1] + 1
        return out


@dataclass(frozen=True)
class SequencedBeam:
    """A beam's segments and what sequencing did to its fluence.

    Attributes:
        segments: in delivery order.
        fluence: (rows, columns) the fluence the segments deliver (sum of aperture x
            weight).
        levels: intensity levels used.
        dropped_weight: fluence units of segments dropped for being too small.
    """

    segments: list[Segment]
    fluence: np.ndarray
    levels: int
    dropped_weight: float

    @property
    def total_weight(self) -> float:
        """Fluence units of the beam (its monitor units up to a factor)."""
        return float(sum(s.weight for s in self.segments))


def row_sweep(levels_row: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Rod pushing of one row of integer levels (n,): ``(L, R)``, the level at which the
    left and the right leaf pass each column; the column is open for ``R < m <= L``."""
    q = np.asarray(levels_row, dtype=np.int64)
    rises = np.maximum(np.diff(q, prepend=0), 0)
    left = np.cumsum(rises)
    return left, left - q


def sweep_apertures(levels: np.ndarray) -> list[tuple[np.ndarray, int]]:
    """(rows, columns) integer levels -> ``[(aperture, count), ...]``: consecutive levels
    with the same aperture grouped, identical apertures merged, in level order."""
    levels = np.asarray(levels, dtype=np.int64)
    if levels.size == 0 or levels.max() <= 0:
        return []
    sweeps = [row_sweep(row) for row in levels]
    top = int(max(left[-1] for left, _ in sweeps))
    merged: dict[bytes, list] = {}
    previous = None
    for m in range(1, top + 1):
        aperture = np.stack([(right < m) & (m <= left) for left, right in sweeps])
        key = aperture.tobytes()
        if key == previous:
            merged[key][1] += 1
        elif key in merged:
            merged[key][1] += 1
        else:
            merged[key] = [aperture, 1]
        previous = key
    return [(a, c) for a, c in merged.values() if a.any()]


def sequence_fluence(fluence: np.ndarray, limits: SequencingLimits) -> SequencedBeam:
    """Segments of one beam's fluence map (rows = leaf pairs, columns = leaf travel; NaN
    or <= 0: no fluence) within ``limits``."""
    grid = np.nan_to_num(np.asarray(fluence, dtype=np.float64), nan=0.0)
    grid = np.maximum(grid, 0.0)
    peak = float(grid.max()) if grid.size else 0.0
    if peak <= 0:
        return SequencedBeam([], np.zeros_like(grid), 0, 0.0)
    levels = int(limits.levels)
    if limits.min_segment_weight > 0:
        levels = max(1, min(levels, int(np.floor(peak / limits.min_segment_weight))))
    while True:
        step = peak / levels
        groups = sweep_apertures(np.rint(grid / step))
        if len(groups) <= limits.max_segments or levels == 1:
            break
        levels -= 1
    segments, dropped = [], 0.0
    for aperture, count in groups:
        if aperture.sum() < limits.min_segment_bixels:
            dropped += count * step
            continue
        segments.append(Segment(aperture, count * step))
    if len(segments) > limits.max_segments:  # even one level has too many gaps
        keep = sorted(range(len(segments)), key=lambda i: -segments[i].weight
                      * segments[i].aperture.sum())[:limits.max_segments]
        dropped += sum(s.weight for i, s in enumerate(segments) if i not in keep)
        segments = [s for i, s in enumerate(segments) if i in keep]
    delivered = np.zeros_like(grid)
    for s in segments:
        delivered += s.aperture * s.weight
    return SequencedBeam(segments, delivered, levels, dropped)
