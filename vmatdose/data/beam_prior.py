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
    body = np.asarray(body) > 0
    masks = np.asarray(masks) > 0
    prior = np.zeros(body.shape, np.float32)
    present = [t for t in range(len(masks)) if masks[t].any()]
    if not present or not body.any():
        return prior
    # Trace only the box that can get a field: the slices of the targets grown by the
    # field's margin, the body's rows and columns (the scatter then spreads the dose).
    box = _field_box(body, masks[present].any(0), float(spacing_mm[0]), params)
    full_centre = (np.asarray(body.shape) - 1) / 2.0
    box_centre = np.asarray([(b.start + b.stop - 1) / 2.0 for b in box])
    iso = isocentre_from_grid_centre(arrangement.isocentre_mm, body.shape, spacing_mm,
                                     origin_mm) - (box_centre - full_centre) * np.asarray(
                                         spacing_mm, float)
    doses = _open_field_doses(np.asarray(ct_hu)[box], body[box],
                              masks[present][(slice(None), *box)], spacing_mm, iso,
                              arrangement, params, max_beams)
    for t, dose_crop in zip(present, doses):
        dose = np.zeros(body.shape, np.float32)
        dose[box] = dose_crop
        dose = scatter(dose, spacing_mm, params) * body
        median = float(np.median(dose[masks[t]]))
        if median > 1e-6:
            np.maximum(prior, dose * (float(levels[t]) / median), out=prior)
    return prior


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
                      arrangement: BeamArrangement, params: BeamModelParams,
                      max_beams: int) -> list[np.ndarray]:
    """Per target mask (T, Z, Y, X): the (Z, Y, X) dose of one open field per beam shaped
    to it, summed over beams, before scatter (``iso`` relative to this grid's centre)."""
    shape = body.shape
    geo = BeamGeometry(shape, spacing_mm, iso, gantry_rad(traced_gantry_deg(arrangement,
                                                                            max_beams)),
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
    doses = []
    for k in range(len(masks)):
        # a ray through at least half a target voxel (bilinear) is in the projection
        aperture = open_leaves(frames[:, 1 + k].amax(dim=2) >= 0.5, pixels, params)
        fluence = penumbra(aperture.float(), pixels, params)  # (B, Z, U)
        doses.append(geo.into_patient(ddose * fluence[:, :, None, :]).numpy())
    return doses
