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
import torch.nn.functional as F
from scipy import ndimage

from vmatdose.data.geometry import dilate_mm
from vmatdose.data.phantom.anatomy import BOOST, ELECTIVE, Anatomy, grid_mm

_MU_PER_MM = 0.0045  # effective attenuation of a 6 MV beam in water (~4.5 %/cm)
_BUILDUP_MM = 6.0  # e-folding length of the build-up under the skin
_PENUMBRA_SIGMA_MM = 3.5
_APERTURE_MARGIN_MM = 6.0  # leaves open beyond the target projection, so its edge is covered
_SCATTER_SIGMA_MM = 4.0
_OAR_SPARING = 0.55  # fraction of fluence removed on rays fully blocked by rectum/bladder
_BOOST_FLUENCE = 0.25  # initial boost segment, relative to the elective one
_RELAXATION = 0.8  # exponent of the per-ray fluence correction
_ELECTIVE_GOAL = 0.9  # elective goal in the modulation, relative to its prescription


def relative_electron_density(hu: np.ndarray) -> np.ndarray:
    """Piecewise-linear HU -> electron density relative to water (air 0, bone ~1.6)."""
    return np.interp(hu, [-1000.0, 0.0, 100.0, 1600.0], [0.0, 1.0, 1.07, 1.9])


class BeamGeometry:
    """Parallel beams of a coplanar arc: resampling between the patient grid and beam frames.

    The frame of beam ``b`` is a ``(V, U)`` grid in the axial plane centred on the
    isocentre: rows run along the beam direction (depth), columns across it (lateral),
    with the finer in-plane spacing as pixel size. Depth covers ``depth_radius_mm`` (the
    body), lateral only ``lateral_radius_mm`` (the targets plus penumbra): no fluence
    leaves the collimator elsewhere. Each axial slice is resampled independently (beams
    are coplanar), so ``Z`` rides along as the channel dimension.
    """

    def __init__(self, shape: Sequence[int], spacing_mm: Sequence[float],
                 isocentre_mm: np.ndarray, n_beams: int, depth_radius_mm: float,
                 lateral_radius_mm: float):
        _, ny, nx = shape
        dy, dx = spacing_mm[1], spacing_mm[2]
        self.pixel_mm = min(dy, dx)
        half_y, half_x = (ny - 1) / 2 * dy, (nx - 1) / 2 * dx
        self.n_v = 2 * int(math.ceil(depth_radius_mm / self.pixel_mm)) + 1
        self.n_u = 2 * int(math.ceil(lateral_radius_mm / self.pixel_mm)) + 1
        half_v, half_u = (self.n_v - 1) / 2 * self.pixel_mm, (self.n_u - 1) / 2 * self.pixel_mm
        angles = torch.arange(n_beams, dtype=torch.float64) * (2 * math.pi / n_beams)
        cos, sin = torch.cos(angles)[:, None, None], torch.sin(angles)[:, None, None]
        v, w = torch.meshgrid(torch.linspace(-half_v, half_v, self.n_v, dtype=torch.float64),
                              torch.linspace(-half_u, half_u, self.n_u, dtype=torch.float64),
                              indexing="ij")
        # beam direction (y, x) = (cos, sin): angle 0 enters from anterior, heading posterior
        py = isocentre_mm[1] + v * cos - w * sin
        px = isocentre_mm[2] + v * sin + w * cos
        self.to_beam = torch.stack([px / half_x, py / half_y], dim=-1).float()  # (B, V, U, 2)
        gy, gx = torch.meshgrid(
            torch.linspace(-half_y, half_y, ny, dtype=torch.float64) - isocentre_mm[1],
            torch.linspace(-half_x, half_x, nx, dtype=torch.float64) - isocentre_mm[2],
            indexing="ij")
        depth = gy[None] * cos + gx[None] * sin
        lateral = -gy[None] * sin + gx[None] * cos
        self.to_patient = torch.stack([lateral / half_u, depth / half_v], -1).float()

    def into_beams(self, volume: torch.Tensor) -> torch.Tensor:
        """(C, Y, X) patient slices -> (B, C, V, U) beam frames (zero outside the grid)."""
        batch = volume[None].expand(self.to_beam.shape[0], *volume.shape)
        return F.grid_sample(batch, self.to_beam, mode="bilinear", padding_mode="zeros",
                             align_corners=True)

    def into_patient(self, frames: torch.Tensor) -> torch.Tensor:
        """(B, C, V, U) beam frames -> (C, Y, X), summed over beams (zero off the frames)."""
        return F.grid_sample(frames, self.to_patient, mode="bilinear", padding_mode="zeros",
                             align_corners=True).sum(0)


def _in_plane_radius_mm(mask: np.ndarray, spacing_mm: Sequence[float],
                        centre_mm: np.ndarray) -> float:
    """Largest in-plane distance (mm) from ``centre_mm`` (z, y, x) to a voxel of ``mask``."""
    _, y, x = grid_mm(mask.shape, spacing_mm)
    r2 = (y - centre_mm[1]) ** 2 + (x - centre_mm[2]) ** 2
    return float(np.sqrt(np.broadcast_to(r2, mask.shape)[mask].max())) if mask.any() else 0.0


def _depth_dose(radiological_depth_mm: torch.Tensor, inside: torch.Tensor) -> torch.Tensor:
    buildup = 1.0 - 0.7 * torch.exp(-radiological_depth_mm / _BUILDUP_MM)
    return buildup * torch.exp(-_MU_PER_MM * radiological_depth_mm) * inside


def _open_leaves(projection: torch.Tensor, pixel_mm: tuple[float, float]) -> torch.Tensor:
    """Beam's-eye-view apertures (B, Z, U): the target projection grown by the aperture
    margin (Euclidean, in mm) within each beam."""
    sampling = (1e6, *pixel_mm)  # no growth across beams
    distance = ndimage.distance_transform_edt(~projection.numpy(), sampling=sampling)
    return torch.from_numpy(distance <= _APERTURE_MARGIN_MM)


def _blur_fluence(fluence: torch.Tensor, sigmas_px: tuple[float, float]) -> torch.Tensor:
    """Gaussian penumbra on (B, Z, U) fluence maps, sigma per axis in pixels."""
    arr = ndimage.gaussian_filter(fluence.numpy(), sigma=(0.0, *sigmas_px), mode="constant")
    return torch.from_numpy(arr)


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
    margin = 3 * max(_PENUMBRA_SIGMA_MM, spacing_mm[1], spacing_mm[2]) + _APERTURE_MARGIN_MM
    geo = BeamGeometry(shape, spacing_mm, iso, n_beams,
                       depth_radius_mm=_in_plane_radius_mm(anatomy.body, spacing_mm, iso),
                       lateral_radius_mm=_in_plane_radius_mm(targets, spacing_mm, iso) + margin)
    density = relative_electron_density(anatomy.hu) * anatomy.body
    oar = (m["Rectum"] | m["Bladder"]) & ~dilate_mm(targets, 3.0, spacing_mm)
    stack = np.stack([density, targets, m[BOOST], oar]).astype(np.float32)
    frames = geo.into_beams(torch.from_numpy(stack).reshape(-1, *shape[1:]))
    frames = frames.reshape(n_beams, 4, shape[0], geo.n_v, geo.n_u)  # (B, 4, Z, V, U)
    rho = frames[:, 0]
    depth = (torch.cumsum(rho, dim=2) - 0.5 * rho) * geo.pixel_mm
    ddose = _depth_dose(depth, (rho > 0.05).float())  # (B, Z, V, U)

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
    margin = (spacing_mm[0], pixel_mm)
    boost = _open_leaves(frames[:, 2].amax(dim=2) > 0.5, margin).float()
    elective = _open_leaves(frames[:, 1].amax(dim=2) > 0.5, margin).float()
    oar_path = frames[:, 3].sum(dim=2) * pixel_mm  # mm of OAR crossed per ray
    sparing = 1.0 - _OAR_SPARING * torch.clamp(oar_path / 30.0, 0.0, 1.0)
    sigmas = (_PENUMBRA_SIGMA_MM / spacing_mm[0], _PENUMBRA_SIGMA_MM / pixel_mm)
    return _blur_fluence(elective * sparing + _BOOST_FLUENCE * boost, sigmas)


def _deliver(geo: BeamGeometry, depth_dose: torch.Tensor, fluence: torch.Tensor,
             spacing_mm: Sequence[float], body: np.ndarray, boost: np.ndarray,
             boost_gy: float) -> np.ndarray:
    """Dose (Z, Y, X) Gy of ``fluence`` (B, Z, U): beams summed in the patient, lateral
    scatter, zero outside the body, normalised to a median of ``boost_gy`` in ``boost``."""
    beams = depth_dose * fluence[:, :, None, :]  # (B, Z, V, U)
    dose = geo.into_patient(beams).numpy()
    dose = ndimage.gaussian_filter(dose, [_SCATTER_SIGMA_MM / s for s in spacing_mm],
                                   mode="constant") * body
    median = float(np.median(dose[boost])) if boost.any() else float(dose.max())
    return (dose * (boost_gy / max(median, 1e-6))).astype(np.float32)
