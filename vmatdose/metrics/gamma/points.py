"""The gamma search points: pymedphys' shells, grouped by the grid cell they fall in."""

from __future__ import annotations

from functools import lru_cache

import numpy as np

MAX_SEARCH_POINTS = 20_000_000  # refuse uncapped searches that would need more points




def pymedphys_search_radii(distance_mm: float, interp_fraction: float, max_gamma: float,
                           limit_mm: float) -> list[tuple[float, float]]:
    """(radius, step) of every shell pymedphys' ``gamma_loop`` visits, up to ``limit_mm``.

    Reproduces the float arithmetic of the loop: constant step ``distance_mm /
    interp_fraction`` (or ``radius / interp_fraction / max_gamma`` if larger), and the
    radius snapped to ``distance_mm`` once it first reaches it.
    """
    step = distance_mm / interp_fraction
    forced: float | None = distance_mm
    radius, shells = 0.0, []
    while radius <= limit_mm:
        shells.append((radius, step))
        step = max(radius / interp_fraction / max_gamma, distance_mm / interp_fraction)
        radius += step
        if forced is not None and radius >= forced:
            radius, forced = forced, None
    return shells


def pymedphys_shell(radius: float, step: float) -> np.ndarray:
    """(P, 3) offsets in mm of one pymedphys 3D shell, columns in array-axis order.

    Same construction as ``pymedphys._utilities.createshells.calculate_coordinates_shell_3d``
    (rows of constant elevation, no gap wider than ``step``); its x/y/z columns pair with
    array axes 0/1/2.
    """
    rows = int(np.ceil(np.pi * radius / step)) + 1
    elevation = np.linspace(0, np.pi, rows)
    in_row = np.ceil(2 * np.pi * radius * np.sin(elevation) / step).astype(int) + 1
    parts = []
    for phi, count in zip(elevation, in_row):
        azimuth = np.linspace(0, 2 * np.pi, count + 1)[:-1]
        parts.append(np.stack([radius * np.sin(phi) * np.cos(azimuth),
                               radius * np.sin(phi) * np.sin(azimuth),
                               radius * np.cos(phi) * np.ones_like(azimuth)], axis=1))
    return np.concatenate(parts)


class PointSet:
    """All search points (radius > 0) split into grid cells relative to the voxel.

    For point offset ``o`` (mm) the interpolation cell is ``c = floor(o / spacing)`` and the
    fractional position ``u = o / spacing - c`` in [0, 1). Arrays:

    * per shell (torch path): ``shell_d2`` (normalised squared radius, (K,)),
      ``shell_ptr`` (K+1,) into the point arrays sorted by shell.
    * per cell (numba path): ``cell_off`` (C, 3) int, ``cell_rmin2`` (C,), ``cell_ptr``
      (C+1,), points sorted by cell (cells by nearest point) then radius.
    """

    def __init__(self, spacing: tuple[float, float, float], distance_mm: float,
                 interp_fraction: float, max_gamma: float, limit_mm: float):
        shells = [s for s in pymedphys_search_radii(distance_mm, interp_fraction, max_gamma,
                                                    limit_mm) if s[0] > 0]
        offsets = [pymedphys_shell(r, step) for r, step in shells]
        counts = np.array([len(o) for o in offsets], dtype=np.int64)
        if counts.sum() > MAX_SEARCH_POINTS:
            raise ValueError(f"gamma search would need {counts.sum()} points per voxel; "
                             "use a finite max_gamma")
        offs = np.concatenate(offsets) if offsets else np.zeros((0, 3))
        radius = np.repeat([r for r, _ in shells], counts)
        idx = offs / np.asarray(spacing)
        cell = np.floor(idx)
        u = idx - cell
        carry = u >= 1.0  # rounding of tiny negative offsets, e.g. sin(pi) * r
        cell[carry] += 1
        u[carry] = 0.0
        d2 = (radius / distance_mm) ** 2
        self.shell_d2 = ((np.array([r for r, _ in shells]) / distance_mm) ** 2).astype(
            np.float32)
        self.shell_ptr = np.concatenate([[0], np.cumsum(counts)])
        self.cell = cell.astype(np.int64)  # (P, 3), shell order
        self.u = u.astype(np.float32)
        self.d2 = d2.astype(np.float32)
        self.offsets = offs  # (P, 3) float64 mm, for the exact bounds test at the edges
        self.spacing = spacing
        self._build_cells(cell.astype(np.int64), u, d2, offs)

    def _build_cells(self, cell: np.ndarray, u: np.ndarray, d2: np.ndarray,
                     offs: np.ndarray) -> None:
        keys, inverse = np.unique(cell, axis=0, return_inverse=True)
        inverse = inverse.ravel()
        rmin2 = np.full(len(keys), np.inf)
        np.minimum.at(rmin2, inverse, d2)
        cell_rank = np.empty(len(keys), np.int64)
        cell_rank[np.argsort(rmin2, kind="stable")] = np.arange(len(keys))
        order = np.lexsort((d2, cell_rank[inverse]))
        self.cell_off = keys[np.argsort(rmin2, kind="stable")].astype(np.int64)
        self.cell_rmin2 = np.sort(rmin2).astype(np.float32)
        counts = np.bincount(cell_rank[inverse], minlength=len(keys))
        self.cell_ptr = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
        uz, uy, ux = (u[order, i] for i in range(3))
        # monomials of the trilinear polynomial, see _cell_min
        self.monomials = np.ascontiguousarray(
            np.stack([uz, uy, ux, uz * uy, uz * ux, uy * ux, uz * uy * ux]), dtype=np.float32)
        self.cell_d2 = np.ascontiguousarray(d2[order], dtype=np.float32)
        self.cell_offsets = np.ascontiguousarray(offs[order].T)  # (3, P) float64
        # cell_shell_end[c, k]: end of cell c's points on shells 0..k (shell_d2 ascending)
        shell_of = np.searchsorted(self.shell_d2, self.cell_d2)
        cell_of = np.repeat(np.arange(len(keys)), counts)
        ends = np.zeros((len(keys), len(self.shell_d2)), np.int64)
        np.add.at(ends, (cell_of, shell_of), 1)
        self.cell_shell_end = np.cumsum(ends, axis=1) + self.cell_ptr[:-1, None]


@lru_cache(maxsize=16)
def point_set(spacing: tuple[float, float, float], distance_mm: float,
               interp_fraction: float, max_gamma: float, limit_mm: float) -> PointSet:
    return PointSet(spacing, distance_mm, interp_fraction, max_gamma, limit_mm)
