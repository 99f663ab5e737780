"""CPU gamma backend: a numba kernel, one voxel per loop iteration (the per-voxel early exits
and per-cell pruning are branchy and do not map onto whole-tensor torch ops)."""

from __future__ import annotations

import numba as nb
import numpy as np
import torch
from llvmlite import ir
from numba.core import types as nb_types
from numba.extending import intrinsic

from vmatdose.metrics.gamma.points import PointSet

# finite sentinel: the kernels use fastmath, under which LLVM may assume no infinities
_F32_MAX = np.finfo(np.float32).max


def gamma_sq_numba(ref: np.ndarray, ev: np.ndarray, vox: np.ndarray, inv_tol: np.ndarray,
                    g_sq: np.ndarray, points: PointSet) -> np.ndarray:
    """Squared gamma (V,) of voxels ``vox`` (flat indices) with the numba kernel.

    ``g_sq`` holds the d = 0 values (capped at max_gamma^2) and is updated in place.
    """
    threads = max(1, min(nb.config.NUMBA_NUM_THREADS, torch.get_num_threads()))
    previous = nb.get_num_threads()
    nb.set_num_threads(threads)
    try:
        cmin, cmax = _cell_ranges(ev)
        return _gamma_kernel(ref, ev, cmin, cmax, vox, inv_tol, g_sq, points.cell_off,
                             points.cell_rmin2, points.cell_ptr, points.monomials,
                             points.cell_d2, points.cell_offsets, np.asarray(points.spacing),
                             np.append(points.shell_d2, _F32_MAX),
                             points.cell_shell_end, threads * 64)
    finally:
        nb.set_num_threads(previous)


@nb.njit(cache=True, parallel=True)
def _cell_ranges(ev: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Min and max of the 8 corners of the cell whose lower corner is each voxel.

    Returns two (Z, Y, X) float32 volumes; the last plane of each axis is not a cell's
    lower corner and is left 0 (never read).
    """
    nz, ny, nx = ev.shape
    cmin = np.zeros_like(ev)
    cmax = np.zeros_like(ev)
    for z in nb.prange(nz - 1):
        for y in range(ny - 1):
            for x in range(nx - 1):
                lo = ev[z, y, x]
                hi = lo
                for dz in range(2):
                    for dy in range(2):
                        for dx in range(2):
                            v = ev[z + dz, y + dy, x + dx]
                            lo = min(lo, v)
                            hi = max(hi, v)
                cmin[z, y, x] = lo
                cmax[z, y, x] = hi
    return cmin, cmax


@intrinsic
def _float_bits(typingctx, x):
    """Reinterpret a float32 as int32 (order-preserving for non-negative floats)."""
    def codegen(context, builder, signature, args):
        return builder.bitcast(args[0], ir.IntType(32))
    return nb_types.int32(nb_types.float32), codegen


@intrinsic
def _bits_float(typingctx, x):
    """Inverse of _float_bits."""
    def codegen(context, builder, signature, args):
        return builder.bitcast(args[0], ir.FloatType())
    return nb_types.float32(nb_types.int32), codegen


# cache=True keeps the compiled kernels on disk (first call otherwise compiles for seconds)
@nb.njit(cache=True, fastmath=True, inline="always")
def _cell_min(m, d2, start, stop, c0, cz, cy, cx, czy, czx, cyx, czyx, best):
    """Min of best and squared gamma over points start:stop of one interior cell.

    The trilinear dose is written as c0 + cz*uz + ... + czyx*uz*uy*ux with coefficients
    already shifted by Dr and scaled by 1/dD, so the loop is branch-free. LLVM does not
    vectorise float min-reductions under numba, but squared gammas are >= 0, whose bit
    patterns order like int32, and the int32 min-reduction vectorises (~3x faster).
    Unsigned indices spare numba's negative-index wraparound, which blocks vectorising.
    """
    bits = _float_bits(np.float32(best))
    for p in range(nb.uint64(start), nb.uint64(stop)):
        f = (c0 + cz * m[0, p] + cy * m[1, p] + cx * m[2, p] + czy * m[3, p]
             + czx * m[4, p] + cyx * m[5, p] + czyx * m[6, p])
        bits = min(bits, _float_bits(np.float32(f * f + d2[p])))
    return _bits_float(bits)


@nb.njit(cache=True, fastmath=True)
def _edge_cell_min(ev, r, inv, iz, iy, ix, z, y, x, m, d2, offsets, spacing, start, stop,
                   best):
    """Like _cell_min for a cell touching the grid faces, with an exact bounds test.

    pymedphys drops points whose float64 coordinate ``i * spacing + offset`` leaves
    [0, (n - 1) * spacing]; offsets such as ``r * sin(pi)`` are ~1e-16 mm, so whether such
    a point counts on a face voxel depends on that rounding, which is reproduced here.
    """
    nz, ny, nx = ev.shape
    bz, by, bx = iz * spacing[0], iy * spacing[1], ix * spacing[2]
    tz, ty, tx = (nz - 1) * spacing[0], (ny - 1) * spacing[1], (nx - 1) * spacing[2]
    z0, y0, x0 = min(max(z, 0), nz - 1), min(max(y, 0), ny - 1), min(max(x, 0), nx - 1)
    z1, y1, x1 = min(z0 + 1, nz - 1), min(y0 + 1, ny - 1), min(x0 + 1, nx - 1)
    for p in range(start, stop):
        if d2[p] >= best:
            break
        pz, py, px = bz + offsets[0, p], by + offsets[1, p], bx + offsets[2, p]
        if pz < 0 or py < 0 or px < 0 or pz > tz or py > ty or px > tx:
            continue
        uz, uy, ux = m[0, p], m[1, p], m[2, p]
        f = ((ev[z0, y0, x0] * (1 - ux) + ev[z0, y0, x1] * ux) * (1 - uy)
             + (ev[z0, y1, x0] * (1 - ux) + ev[z0, y1, x1] * ux) * uy) * (1 - uz) \
            + ((ev[z1, y0, x0] * (1 - ux) + ev[z1, y0, x1] * ux) * (1 - uy)
               + (ev[z1, y1, x0] * (1 - ux) + ev[z1, y1, x1] * ux) * uy) * uz
        g = (f - r) * inv
        best = min(best, g * g + d2[p])
    return best


@nb.njit(cache=True, fastmath=True, parallel=True)
def _gamma_kernel(ref, ev, cmin, cmax, vox, inv_tol, g_sq, cell_off, cell_rmin2, cell_ptr,
                  m, d2, offsets, spacing, shell_d2, cell_shell_end, nblocks):
    """Per-voxel branch and bound; g_sq holds the d=0 squared gamma and is updated."""
    nz, ny, nx = ev.shape
    n = vox.shape[0]
    ncell = cell_off.shape[0]
    # interleaved blocks: heavy (failing) voxels cluster in space, spread them out
    for block in nb.prange(nblocks):
        for k in range(block, n, nblocks):
            flat = vox[k]
            iz = flat // (ny * nx)
            iy = (flat // nx) % ny
            ix = flat % nx
            r = ref[iz, iy, ix]
            inv = inv_tol[k]
            best = g_sq[k]
            for c in range(ncell):
                if cell_rmin2[c] >= best:
                    break  # cells are sorted by their nearest point
                z = iz + cell_off[c, 0]
                y = iy + cell_off[c, 1]
                x = ix + cell_off[c, 2]
                if z < -1 or y < -1 or x < -1 or z >= nz or y >= ny or x >= nx:
                    continue  # every point of the cell is off the grid
                start, stop = cell_ptr[c], cell_ptr[c + 1]
                if z < 1 or y < 1 or x < 1 or z > nz - 3 or y > ny - 3 or x > nx - 3:
                    best = _edge_cell_min(ev, r, inv, iz, iy, ix, z, y, x, m, d2, offsets,
                                          spacing, start, stop, best)
                    continue
                # a trilinear value never leaves the range of its cell's 8 corners
                lb = max(cmin[z, y, x] - r, r - cmax[z, y, x], 0.0) * inv
                limit = best - lb * lb
                if limit <= cell_rmin2[c]:
                    continue
                shell = 0
                while shell_d2[shell + 1] < limit:  # shell_d2 ends with a float32-max sentinel
                    shell += 1
                stop = cell_shell_end[c, shell]
                v000 = ev[z, y, x]
                v001 = ev[z, y, x + 1]
                v010 = ev[z, y + 1, x]
                v011 = ev[z, y + 1, x + 1]
                v100 = ev[z + 1, y, x]
                v101 = ev[z + 1, y, x + 1]
                v110 = ev[z + 1, y + 1, x]
                v111 = ev[z + 1, y + 1, x + 1]
                best = _cell_min(
                    m, d2, start, stop, (v000 - r) * inv, (v100 - v000) * inv,
                    (v010 - v000) * inv, (v001 - v000) * inv,
                    (v110 - v100 - v010 + v000) * inv, (v101 - v100 - v001 + v000) * inv,
                    (v011 - v010 - v001 + v000) * inv,
                    (v111 - v110 - v101 - v011 + v100 + v010 + v001 - v000) * inv, best)
            g_sq[k] = best
    return g_sq
