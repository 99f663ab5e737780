"""Phantom dose: a physics-inspired 2-level SIB VMAT plan on a phantom anatomy.

What the dose model captures (not a treatment planning system):

* a coplanar arc sampled by ``n_beams`` parallel beams around the target;
* attenuation along the *radiological* depth through the CT (electron density from HU),
  with a build-up region under the skin;
* fluence shaped per beam to the beam's-eye-view projection of the targets, with a
  Gaussian penumbra: a boost segment on rays through the boost target (PTV70) and an
  elective segment on rays through the elective one (PTV56) only, its fluence reduced
  where rays cross the rectum or bladder (what plan optimisation does to spare them);
* lateral scatter as a Gaussian blur of the summed dose;
* fluence modulation by a few multiplicative updates per ray (the mean ratio of goal to
  delivered dose over the targets the ray crosses), a miniature inverse planning that
  makes both dose levels uniform; normalised to a boost median at its prescription.
  Steep fall-off outside the targets and a low-dose bath where the arc enters follow.

What it ignores: beam divergence and inverse-square, heterogeneity effects on scatter,
multi-leaf-collimator mechanics, and real optimisation objectives.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import numpy as np
import torch

from vmatdose.data.beam_model import (
    DEFAULT_PARAMS,
    BeamGeometry,
    depth_dose,
    field_margin_mm,
    in_plane_radius_mm,
    open_leaves,
    penumbra,
    radiological_depth_mm,
    relative_electron_density,
    scatter,
)
from vmatdose.data.geometry import dilate_mm
from vmatdose.data.phantom.anatomy import BOOST, ELECTIVE, Anatomy

_OAR_SPARING = 0.55  # fraction of fluence removed on rays fully blocked by rectum/bladder
_BOOST_FLUENCE = 0.25  # initial boost segment, relative to the elective one
_RELAXATION = 0.8  # exponent of the per-ray fluence correction
_ELECTIVE_GOAL = 0.9  # elective goal in the modulation, relative to its prescription
_BEAM = DEFAULT_PARAMS  # the shared beam model's 6 MV defaults


def compute_vmat_dose(anatomy: Anatomy, spacing_mm: Sequence[float],
                      prescriptions_gy: Mapping[str, float], n_beams: int = 36,
                      iterations: int = 5) -> np.ndarray:
    """Dose (Z, Y, X) in Gy of a SIB arc plan on the phantom ``anatomy``.

    Args:
        prescriptions_gy: the boost (``PTV70``) and elective (``PTV56``) levels in Gy
            (the names are the phantom's structures; the levels may be any).
    """
    shape = anatomy.body.shape
    m = anatomy.masks
    iso = anatomy.isocentre_mm
    targets = m[BOOST] | m[ELECTIVE]
    # arc sampled at phi = 0, 360/n, ... degrees counter-clockwise from anterior
    # (IEC gantry -phi: the same set of directions, in the order the phantom always used)
    gantry = -(torch.arange(n_beams, dtype=torch.float64) * (2 * math.pi / n_beams))
    geo = BeamGeometry(shape, spacing_mm, iso, gantry,
                       depth_radius_mm=in_plane_radius_mm(anatomy.body, spacing_mm, iso),
                       lateral_radius_mm=in_plane_radius_mm(targets, spacing_mm, iso)
                       + field_margin_mm(spacing_mm, _BEAM))
    density = relative_electron_density(anatomy.hu) * anatomy.body
    oar = (m["Rectum"] | m["Bladder"]) & ~dilate_mm(targets, 3.0, spacing_mm)
    stack = np.stack([density, targets, m[BOOST], oar]).astype(np.float32)
    frames = geo.into_beams(torch.from_numpy(stack).reshape(-1, *shape[1:]))
    frames = frames.reshape(n_beams, 4, shape[0], geo.n_v, geo.n_u)  # (B, 4, Z, V, U)
    rho = frames[:, 0]
    depth = radiological_depth_mm(rho, geo.pixel_mm)
    ddose = depth_dose(depth, (rho > 0.05).float(), _BEAM)  # (B, Z, V, U)

    fluence = _initial_fluence(frames, spacing_mm, geo.pixel_mm)
    # Rays through PTV70 cross the PTV56 shell around it too, so the shell ends up hotter
    # than its goal: asking for less there puts its median near the prescription.
    goal = np.where(m[BOOST], prescriptions_gy[BOOST],
                    np.where(m[ELECTIVE], _ELECTIVE_GOAL * prescriptions_gy[ELECTIVE], 0.0))
    on_ray = frames[:, 1].sum(dim=2)  # (B, Z, U): target path per ray (pixels)
    for _ in range(iterations):
        dose = _deliver(geo, ddose, fluence, spacing_mm, anatomy.body, m[BOOST],
                        prescriptions_gy[BOOST])
        ratio = np.where(targets, goal / np.maximum(dose, 1e-3), 0.0).clip(0.0, 2.0)
        ray_ratio = geo.into_beams(torch.from_numpy(ratio.astype(np.float32))).sum(dim=2)
        correction = torch.where(on_ray > 0.5, ray_ratio / on_ray.clamp(min=0.5), 1.0)
        fluence = fluence * correction.clamp(0.5, 2.0) ** _RELAXATION
    return _deliver(geo, ddose, fluence, spacing_mm, anatomy.body, m[BOOST],
                    prescriptions_gy[BOOST])


def _initial_fluence(frames: torch.Tensor, spacing_mm: Sequence[float],
                     pixel_mm: float) -> torch.Tensor:
    """(B, Z, U) fluence before modulation: open on the targets (grown by the aperture
    margin), a boost on PTV70, less on rays that cross rectum or bladder; penumbra."""
    pixels = (spacing_mm[0], pixel_mm)
    boost = open_leaves(frames[:, 2].amax(dim=2) > 0.5, pixels, _BEAM).float()
    elective = open_leaves(frames[:, 1].amax(dim=2) > 0.5, pixels, _BEAM).float()
    oar_path = frames[:, 3].sum(dim=2) * pixel_mm  # mm of OAR crossed per ray
    sparing = 1.0 - _OAR_SPARING * torch.clamp(oar_path / 30.0, 0.0, 1.0)
    return penumbra(elective * sparing + _BOOST_FLUENCE * boost, pixels, _BEAM)


def _deliver(geo: BeamGeometry, depth_dose: torch.Tensor, fluence: torch.Tensor,
             spacing_mm: Sequence[float], body: np.ndarray, boost: np.ndarray,
             boost_gy: float) -> np.ndarray:
    """Dose (Z, Y, X) Gy of ``fluence`` (B, Z, U): beams summed in the patient, lateral
    scatter, zero outside the body, normalised to a median of ``boost_gy`` in ``boost``."""
    beams = depth_dose * fluence[:, :, None, :]  # (B, Z, V, U)
    dose = geo.into_patient(beams).numpy()
    dose = scatter(dose, spacing_mm, _BEAM) * body
    median = float(np.median(dose[boost])) if boost.any() else float(dose.max())
    return (dose * (boost_gy / max(median, 1e-6))).astype(np.float32)
