"""Per-beam fluence maps: the optimised bixel weights laid out on each beam's bixel grid
(beam's-eye view in the isocentre plane), as arrays and as one figure."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import matplotlib.pyplot as plt
import numpy as np

from vmatdose.data.atomic import atomic_path
from vmatdose.data.case import write_npz


@dataclass(frozen=True)
class BeamFluence:
    """The optimised weights of one beam's bixels.

    Attributes:
        gantry_deg, couch_deg: the beam's angles (IEC degrees).
        positions_mm: (N, 2) bixel centres in the isocentre plane, beam's-eye view
            (lateral, longitudinal) mm.
        weights: (N,) optimised bixel weights (>= 0).
    """

    gantry_deg: float
    couch_deg: float
    positions_mm: np.ndarray
    weights: np.ndarray


def bixel_cells(beam: BeamFluence, bixel_width_mm: float) -> tuple[np.ndarray, np.ndarray]:
    """(N, 2) (row, column) of each bixel in :func:`fluence_map`'s grid, and that grid's
    (rows, columns) shape."""
    cells = np.round(beam.positions_mm / bixel_width_mm).astype(np.int64)
    low = cells.min(0)
    shape = cells.max(0) - low + 1
    return np.stack([cells[:, 1] - low[1], cells[:, 0] - low[0]], 1), \
        np.array([shape[1], shape[0]])


def fluence_map(beam: BeamFluence, bixel_width_mm: float
                ) -> tuple[np.ndarray, tuple[float, float, float, float]]:
    """(rows = longitudinal, columns = lateral) map of ``beam``'s weights, NaN where the
    beam has no bixel, and its extent ``(lateral min, max, longitudinal min, max)`` mm of
    the bixel edges."""
    rc, (rows, cols) = bixel_cells(beam, bixel_width_mm)
    low = np.round(beam.positions_mm / bixel_width_mm).astype(np.int64).min(0)
    shape = np.array([cols, rows])
    grid = np.full((rows, cols), np.nan)
    grid[rc[:, 0], rc[:, 1]] = beam.weights
    half = bixel_width_mm / 2.0
    lat0, long0 = low * bixel_width_mm
    extent = (lat0 - half, lat0 + shape[0] * bixel_width_mm - half,
              long0 - half, long0 + shape[1] * bixel_width_mm - half)
    return grid, tuple(float(v) for v in extent)


def save_fluence_arrays(beams: Sequence[BeamFluence], bixel_width_mm: float,
                        path: str | Path) -> Path:
    """``fluence.npz``: ``beam_<i>`` maps (NaN: no bixel), ``extent_<i>`` (mm),
    ``gantry_deg``, ``couch_deg``, ``bixel_width_mm``, and the raw ``positions_<i>`` (N, 2)
    mm and ``weights_<i>`` (N,) per beam."""
    arrays: dict[str, np.ndarray] = {
        "gantry_deg": np.array([b.gantry_deg for b in beams]),
        "couch_deg": np.array([b.couch_deg for b in beams]),
        "bixel_width_mm": np.asarray(float(bixel_width_mm))}
    for i, beam in enumerate(beams):
        grid, extent = fluence_map(beam, bixel_width_mm)
        arrays.update({f"beam_{i}": grid, f"extent_{i}": np.asarray(extent),
                       f"positions_{i}": beam.positions_mm, f"weights_{i}": beam.weights})
    path = Path(path)
    with atomic_path(path, ".npz.tmp") as tmp:
        write_npz(tmp, arrays)
    return path


def fluence_figure(beams: Sequence[BeamFluence], bixel_width_mm: float,
                   title: str) -> plt.Figure:
    """One panel per beam, a shared colour scale of bixel weight."""
    n = len(beams)
    cols = min(n, 5)
    rows = int(np.ceil(n / cols))
    fig, axes = plt.subplots(rows, cols, figsize=(3.0 * cols + 1.0, 3.0 * rows + 0.6),
                             squeeze=False, constrained_layout=True)
    top = max((float(np.max(b.weights)) for b in beams if b.weights.size), default=1.0)
    image = None
    for ax, beam in zip(axes.flat, beams):
        grid, extent = fluence_map(beam, bixel_width_mm)
        image = ax.imshow(grid, origin="lower", extent=extent, cmap="viridis",
                          vmin=0.0, vmax=top or 1.0, interpolation="nearest")
        ax.set_title(f"gantry {beam.gantry_deg:g}°"
                     + (f", couch {beam.couch_deg:g}°" if beam.couch_deg else ""), fontsize=9)
        ax.set_xlabel("lateral (mm)", fontsize=8)
        ax.set_ylabel("longitudinal (mm)", fontsize=8)
        ax.tick_params(labelsize=7)
    for ax in list(axes.flat)[n:]:
        ax.axis("off")
    if image is not None:
        fig.colorbar(image, ax=axes, shrink=0.8, label="bixel weight")
    fig.suptitle(title)
    return fig
