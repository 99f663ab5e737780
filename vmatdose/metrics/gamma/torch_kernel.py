"""Torch gamma backend (CUDA, or ``backend="torch"``): the shells swept in increasing radius
over compacted lists of still-unresolved voxels, pruned by a per-voxel dose-range bound."""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F

from vmatdose.metrics.gamma.points import PointSet


def gamma_sq_torch(ref: torch.Tensor, ev: torch.Tensor, vox: torch.Tensor,
                    inv_tol: torch.Tensor, g_sq: torch.Tensor, points: PointSet,
                    max_elements: int | None = None) -> torch.Tensor:
    """Squared gamma of voxels ``vox`` by sweeping the shells in increasing radius.

    A voxel takes part in shell k only while it can still improve: its best squared gamma
    exceeds ``lb_k^2 + d_k^2``, where ``lb_k`` is the distance (in units of dD) from its
    reference dose to the range of evaluated doses within reach of shell k (any
    interpolated value lies in that range). Participants are compacted index lists, and
    work is chunked to ``max_elements`` voxel-points.
    """
    device = ref.device
    if max_elements is None:
        max_elements = 1 << (25 if device.type == "cuda" else 20)
    shape = torch.tensor(ref.shape, device=device)
    coords = torch.stack(torch.unravel_index(vox, tuple(ref.shape)), dim=1)  # (V, 3)
    r = ref.ravel()[vox]
    reach = _shell_reach(points)  # (K, 3) voxels
    levels, level_of_shell = np.unique(reach, axis=0, return_inverse=True)
    lb_sq = torch.stack([_range_lower_bound(ev, vox, r, inv_tol, tuple(w)) for w in levels])
    margin = torch.from_numpy(levels.max(axis=0) + 1).to(device) if len(levels) else 0
    interior = ((coords >= margin) & (coords <= shape - 1 - margin)).all(dim=1)
    geometry = _ShellGeometry(ev.ravel(), shape, points, device)
    g_sq = g_sq.clone()
    for k in range(len(points.shell_d2)):
        needed = g_sq > lb_sq[int(level_of_shell.ravel()[k])] + float(points.shell_d2[k])
        if not bool(needed.any()):
            if bool((g_sq > float(points.shell_d2[k])).any()):
                continue  # later shells may still need some voxels
            break
        lo, hi = int(points.shell_ptr[k]), int(points.shell_ptr[k + 1])
        step = max(1, max_elements // (hi - lo))
        for edge in (False, True):
            active = torch.nonzero(needed & (interior != edge)).ravel()
            for start in range(0, active.numel(), step):
                idx = active[start:start + step]
                best = geometry.shell_min(coords[idx], r[idx], inv_tol[idx], lo, hi, edge)
                g_sq[idx] = torch.minimum(g_sq[idx], best)
    return g_sq


def _shell_reach(points: PointSet) -> np.ndarray:
    """(K, 3) per shell and axis: farthest grid index offset its interpolation touches."""
    corner = np.maximum(np.abs(points.cell), np.abs(points.cell + 1))
    reach = np.zeros((len(points.shell_d2), 3), np.int64)
    for k in range(len(points.shell_d2)):
        reach[k] = corner[points.shell_ptr[k]:points.shell_ptr[k + 1]].max(axis=0)
    return np.maximum.accumulate(reach, axis=0) if len(reach) else reach


def _range_lower_bound(ev: torch.Tensor, vox: torch.Tensor, r: torch.Tensor,
                       inv_tol: torch.Tensor, reach: tuple[int, int, int]) -> torch.Tensor:
    """Squared distance (units of dD) from each Dr to the evaluated range in a box.

    The box spans ``reach`` voxels each way; min/max pools are separable and ignore
    the outside of the grid (max_pool pads with -inf). Returns (V,).
    """
    hi, neg_lo = ev[None, None], -ev[None, None]
    for axis, w in enumerate(reach):
        kernel, pad = [1, 1, 1], [0, 0, 0]
        kernel[axis], pad[axis] = 2 * int(w) + 1, int(w)
        hi = F.max_pool3d(hi, tuple(kernel), stride=1, padding=tuple(pad))
        neg_lo = F.max_pool3d(neg_lo, tuple(kernel), stride=1, padding=tuple(pad))
    above = -neg_lo.ravel()[vox] - r
    below = r - hi.ravel()[vox]
    return (torch.clamp(torch.maximum(above, below), min=0) * inv_tol).square()


class _ShellGeometry:
    """Shell points on the device and the gather arithmetic for one shell at a time."""

    def __init__(self, ev_flat: torch.Tensor, shape: torch.Tensor, points: PointSet,
                 device: torch.device):
        self.ev_flat, self.shape = ev_flat, shape
        self.strides = torch.tensor([int(shape[1] * shape[2]), int(shape[2]), 1],
                                    device=device)
        self.cell = torch.from_numpy(points.cell).to(device)
        u = torch.from_numpy(points.u).to(device)
        self.d2 = torch.from_numpy(points.d2).to(device)
        self.offsets = torch.from_numpy(points.offsets).to(device)
        self.spacing = torch.tensor(points.spacing, dtype=torch.float64, device=device)
        # corners (z, y, x bits), flat offset of each point's lower corner, its 8 weights;
        # integer products are elementwise: integer matmul does not exist on CUDA
        self.bits = [[(c >> (2 - a)) & 1 for a in range(3)] for c in range(8)]
        bits = torch.tensor(self.bits, device=device)
        self.flat_offset = (self.cell * self.strides).sum(dim=-1)
        self.corner_shift = (bits * self.strides).sum(dim=-1).tolist()
        self.weights = torch.where(bits[None].bool(), u[:, None, :],
                                   1 - u[:, None, :]).prod(dim=-1)  # (P, 8)

    def shell_min(self, coords: torch.Tensor, r: torch.Tensor, inv_tol: torch.Tensor,
                  lo: int, hi: int, edge: bool) -> torch.Tensor:
        """Min over points lo:hi (one shell) of squared gamma for A voxels, (A,).

        For ``edge`` voxels, points off the grid are dropped by testing the float64
        coordinate ``i * spacing + offset`` against [0, (n - 1) * spacing] as pymedphys
        does (axes ``np.arange(n) * spacing``), so the grid faces agree exactly.
        """
        if not edge:
            base = (coords * self.strides).sum(dim=-1)
            lower_flat = base[:, None] + self.flat_offset[None, lo:hi]
            value = torch.zeros(lower_flat.shape, dtype=torch.float32, device=coords.device)
            for corner, shift in enumerate(self.corner_shift):
                value += self.weights[None, lo:hi, corner] * self.ev_flat[lower_flat + shift]
            g = ((value - r[:, None]) * inv_tol[:, None]).square() + self.d2[None, lo:hi]
            return g.amin(dim=1)
        lower = coords[:, None, :] + self.cell[None, lo:hi]  # (A, P, 3) lower cell corner
        lower = lower.clamp(min=torch.zeros_like(self.shape), max=self.shape - 1)
        upper = torch.minimum(lower + 1, self.shape - 1)
        value = torch.zeros(lower.shape[:2], dtype=torch.float32, device=coords.device)
        for corner, bits in enumerate(self.bits):
            index = sum((upper if b else lower)[..., a] * self.strides[a]
                        for a, b in enumerate(bits))
            value += self.weights[None, lo:hi, corner] * self.ev_flat[index]
        g = ((value - r[:, None]) * inv_tol[:, None]).square() + self.d2[None, lo:hi]
        position = (coords * self.spacing)[:, None, :] + self.offsets[None, lo:hi]
        top = (self.shape - 1) * self.spacing
        valid = ((position >= 0) & (position <= top)).all(dim=-1)
        return g.masked_fill(~valid, math.inf).amin(dim=1)
