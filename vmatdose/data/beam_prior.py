"""The beam prior: the dose of open fields shaped to the targets, from the case's beams.

    prior(v) = body(v) * max_t  p_t * D_t(v) / median_{target t} D_t

where ``D_t`` is the summed dose (:mod:`vmatdose.data.beam_model`) of one open field per
beam, each shaped to the beam's-eye-view projection of target ``t`` grown by the
aperture margin, traced through the CT's radiological depth, with penumbra and
scatter; ``p_t`` is the target's prescription. Unlike the distance prior it knows where
the beams enter and leave: the low-dose bath of a plan follows them.

Beams are taken from the case's own arrangement (``meta["beams"]``, see
:mod:`vmatdose.data.beams`) or the protocol's default around the targets' centroid.
Couch angles are ignored (the model traces coplanar beams) and an arc's control points
are thinned to at most ``max_beams`` equally spaced ones.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from vmatdose.data.beam_model import (
    DEFAULT_PARAMS,
    BeamGeometry,
    BeamModelParams,
    depth_dose,
    field_margin_mm,
    gantry_rad,
    in_plane_radius_mm,
    open_leaves,
    penumbra,
    radiological_depth_mm,
    relative_electron_density,
    scatter,
)
from vmatdose.data.beams import BeamArrangement

#: Arc control points traced at most (equally spaced subset); static fields all.
DEFAULT_MAX_BEAMS = 36


def isocentre_from_grid_centre(isocentre_mm: Sequence[float], shape: Sequence[int],
                               spacing_mm: Sequence[float],
                               origin_mm: Sequence[float]) -> np.ndarray:
    """(z, y, x) isocentre in mm relative to the grid's centre (the beam model's frame)."""
    centre = np.asarray(origin_mm, float) + (np.asarray(shape) - 1) / 2.0 * np.asarray(
        spacing_mm, float)
    return np.asarray(isocentre_mm, float) - centre


def traced_gantry_deg(arrangement: BeamArrangement,
                      max_beams: int = DEFAULT_MAX_BEAMS) -> list[float]:
    """The gantry angles the prior traces: every field, or ``max_beams`` equally spaced
    control points of a longer arc."""
    angles = list(arrangement.gantry_deg)
    if len(angles) <= max_beams:
        return angles
    picks = np.round(np.linspace(0, len(angles) - 1, max_beams)).astype(int)
    return [angles[i] for i in picks]


def gantry_sectors(gantry_deg: Sequence[float], sectors: int) -> list[int]:
    """The sector of each gantry angle (deg) among ``sectors`` equal sectors, sector ``k``
    centred on ``k * 360 / sectors`` degrees."""
    width = 360.0 / sectors
    return [int(round((float(g) % 360.0) / width)) % sectors for g in gantry_deg]


def beam_prior_dose(ct_hu: np.ndarray, body: np.ndarray, masks: np.ndarray,
                    levels: Sequence[float], spacing_mm: Sequence[float],
                    origin_mm: Sequence[float], arrangement: BeamArrangement,
                    params: BeamModelParams = DEFAULT_PARAMS,
                    max_beams: int = DEFAULT_MAX_BEAMS) -> np.ndarray:
    """(Z, Y, X) float32 prior dose in the units of ``levels`` (module docstring).

    Args:
        ct_hu: (Z, Y, X) CT in HU; ``body``: (Z, Y, X) region where the prior is non-zero.
        masks: (T, Z, Y, X) target masks; ``levels``: (T,) their prescriptions.
        spacing_mm, origin_mm: the case grid, (dz, dy, dx) and (z, y, x) of voxel 0.
        arrangement: the beams; its isocentre in the case's patient mm.
    """
    return beam_prior_channels(ct_hu, body, masks, levels, spacing_mm, origin_mm,
                               arrangement, params, max_beams)[0]


def beam_prior_channels(ct_hu: np.ndarray, body: np.ndarray, masks: np.ndarray,
                        levels: Sequence[float], spacing_mm: Sequence[float],
                        origin_mm: Sequence[float], arrangement: BeamArrangement,
                        params: BeamModelParams = DEFAULT_PARAMS,
                        max_beams: int = DEFAULT_MAX_BEAMS, sectors: int = 0) -> np.ndarray:
    """(1 + sectors, Z, Y, X) float32: the beam prior (channel 0, :func:`beam_prior_dose`)
    and, per gantry sector (:func:`gantry_sectors`), the dose of that sector's beams
    alone, scaled like the prior (``max_t p_t * D_{t,k} / median_{target t} D_t``, with
    scatter): where each direction's fields enter, cross and leave the patient, which
    the summed prior no longer shows. A sector without beams is zero. Arguments as
    :func:`beam_prior_dose`."""
    body = np.asarray(body) > 0
    masks = np.asarray(masks) > 0
    out = np.zeros((1 + sectors, *body.shape), np.float32)
    present = [t for t in range(len(masks)) if masks[t].any()]
    if not present or not body.any():
        return out
    # Trace only the box that can get a field: the slices of the targets grown by the
    # field's margin, the body's rows and columns (the scatter then spreads the dose).
    box = _field_box(body, masks[present].any(0), float(spacing_mm[0]), params)
    full_centre = (np.asarray(body.shape) - 1) / 2.0
    box_centre = np.asarray([(b.start + b.stop - 1) / 2.0 for b in box])
    iso = isocentre_from_grid_centre(arrangement.isocentre_mm, body.shape, spacing_mm,
                                     origin_mm) - (box_centre - full_centre) * np.asarray(
                                         spacing_mm, float)
    angles = traced_gantry_deg(arrangement, max_beams)
    groups = gantry_sectors(angles, sectors) if sectors else [0] * len(angles)
    doses = _open_field_doses(np.asarray(ct_hu)[box], body[box],
                              masks[present][(slice(None), *box)], spacing_mm, iso, angles,
                              params, groups, max(sectors, 1))
    by_sector = np.zeros((sectors, *doses[0].shape[1:]), np.float32)
    for t, dose_crop in zip(present, doses):
        dose = _scatter_box(dose_crop.sum(0), box, body.shape, spacing_mm, params) * body
        median = float(np.median(dose[masks[t]]))
        if median > 1e-6:
            scale = float(levels[t]) / median
            np.maximum(out[0], dose * scale, out=out[0])
            if sectors:
                np.maximum(by_sector, dose_crop * scale, out=by_sector)
    for k in range(sectors):
        out[1 + k] = _scatter_box(by_sector[k], box, body.shape, spacing_mm, params) * body
    return out


def _scatter_box(crop: np.ndarray, box: tuple[slice, slice, slice], shape: Sequence[int],
                 spacing_mm: Sequence[float], params: BeamModelParams) -> np.ndarray:
    """(Z, Y, X) :func:`scatter` of a dose that is ``crop`` inside ``box`` and zero
    elsewhere, filtered only on the box grown by the Gaussian's reach (scipy truncates
    it at 4 sigma): the whole grid's numbers to the bit, on a fraction of its voxels."""
    reach = [int(4.0 * params.scatter_sigma_mm / s + 0.5) + 1 for s in spacing_mm]
    grown = tuple(slice(max(0, b.start - r), min(n, b.stop + r))
                  for b, n, r in zip(box, shape, reach))
    work = np.zeros([g.stop - g.start for g in grown], np.float32)
    work[tuple(slice(b.start - g.start, b.stop - g.start) for b, g in zip(box, grown))] = crop
    out = np.zeros(tuple(shape), np.float32)
    out[grown] = scatter(work, spacing_mm, params)
    return out


def _field_box(body: np.ndarray, targets: np.ndarray, dz_mm: float,
               params: BeamModelParams) -> tuple[slice, slice, slice]:
    """(z, y, x) slices of the box a coplanar field shaped to ``targets`` (Z, Y, X) can
    reach: the targets' slices grown by the field margin, the rows and columns of the body
    and the targets."""
    zs = np.flatnonzero(targets.any((1, 2)))
    grow = int(np.ceil((params.aperture_margin_mm + 3 * params.penumbra_sigma_mm) / dz_mm))
    z = slice(max(0, int(zs[0]) - grow), min(targets.shape[0], int(zs[-1]) + grow + 1))
    cover = body[z] | targets[z]
    ys, xs = np.flatnonzero(cover.any((0, 2))), np.flatnonzero(cover.any((0, 1)))
    # two voxels of air around, so the bilinear resampling at the box's edge sees the
    # same neighbours as on the whole grid
    ny, nx = body.shape[1:]
    return z, slice(max(0, int(ys[0]) - 2), min(ny, int(ys[-1]) + 3)), \
        slice(max(0, int(xs[0]) - 2), min(nx, int(xs[-1]) + 3))


def _open_field_doses(ct_hu: np.ndarray, body: np.ndarray, masks: np.ndarray,
                      spacing_mm: Sequence[float], iso: np.ndarray,
                      gantry_deg: Sequence[float], params: BeamModelParams,
                      groups: Sequence[int], n_groups: int) -> list[np.ndarray]:
    """Per target mask (T, Z, Y, X): the (G, Z, Y, X) dose of one open field per beam
    shaped to it, summed over the beams of each group (``groups``: (B,) group of each of
    the ``gantry_deg`` beams, ``n_groups`` = G), before scatter (``iso`` relative to this
    grid's centre)."""
    shape = body.shape
    geo = BeamGeometry(shape, spacing_mm, iso, gantry_rad(gantry_deg),
                       depth_radius_mm=in_plane_radius_mm(body, spacing_mm, iso),
                       lateral_radius_mm=in_plane_radius_mm(masks.any(0), spacing_mm, iso)
                       + field_margin_mm(spacing_mm, params))
    density = relative_electron_density(ct_hu.astype(np.float32)) * body
    stack = np.concatenate([density[None], masks]).astype(np.float32)
    frames = geo.into_beams(torch.from_numpy(stack).reshape(-1, *shape[1:]))
    frames = frames.reshape(geo.n_beams, len(stack), shape[0], geo.n_v, geo.n_u)
    rho = frames[:, 0]
    ddose = depth_dose(radiological_depth_mm(rho, geo.pixel_mm), (rho > 0.05).float(),
                       params)  # (B, Z, V, U)
    pixels = (float(spacing_mm[0]), geo.pixel_mm)
    index = torch.as_tensor(list(groups), dtype=torch.long)
    doses = []
    for k in range(len(masks)):
        # a ray through at least half a target voxel (bilinear) is in the projection
        aperture = open_leaves(frames[:, 1 + k].amax(dim=2) >= 0.5, pixels, params)
        fluence = penumbra(aperture.float(), pixels, params)  # (B, Z, U)
        per_beam = geo.into_patient_per_beam(ddose * fluence[:, :, None, :])  # (B, Z, Y, X)
        grouped = torch.zeros(n_groups, *per_beam.shape[1:]).index_add_(0, index, per_beam)
        doses.append(grouped.numpy())
    return doses
