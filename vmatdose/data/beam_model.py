"""A photon beam model for coplanar fields: ray tracing through the CT's radiological
depth, depth dose, aperture, penumbra and scatter. Used by the phantom plans
(:mod:`vmatdose.data.phantom.dose`) and by the beam prior (:mod:`vmatdose.data.beam_prior`).

Written here rather than taken from a planning library because both users need it on
every case in well under a second, on torch tensors, and a pencil-beam engine
(pyRadPlan, see ``vmatdose.planning``) takes minutes and a dose-influence matrix per case.

What it models: parallel beams (no divergence, no inverse-square), an exponential
attenuation with the radiological depth (electron density from HU) times a build-up
under the skin, open fields shaped to the beam's-eye view of a target grown by a margin,
a Gaussian penumbra across the field and a Gaussian lateral scatter of the summed dose.

Geometry convention (IEC 61217, head-first supine, case arrays ``(Z, Y, X)`` with y
running anterior -> posterior and x right -> left of the patient, as DICOM's LPS): the
beam of gantry angle theta travels along ``(dy, dx) = (cos theta, -sin theta)``:
gantry 0 enters from anterior, gantry 90 from the patient's left (high x), gantry 270
from the right.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from scipy import ndimage


@dataclass(frozen=True)
class BeamModelParams:
    """Beam model constants (6 MV photons in water, mm).

    Attributes:
        attenuation_per_mm: effective attenuation coefficient (4.5 %/cm for 6 MV).
        buildup_mm: e-folding length of the build-up under the skin.
        penumbra_sigma_mm: Gaussian sigma of the field edge, across the beam.
        aperture_margin_mm: leaves open beyond the target's projection.
        scatter_sigma_mm: Gaussian sigma of the lateral scatter of the summed dose.
    """

    attenuation_per_mm: float = 0.0045
    buildup_mm: float = 6.0
    penumbra_sigma_mm: float = 3.5
    aperture_margin_mm: float = 6.0
    scatter_sigma_mm: float = 4.0


#: The 6 MV defaults every user of the model starts from.
DEFAULT_PARAMS = BeamModelParams()


def relative_electron_density(hu: np.ndarray) -> np.ndarray:
    """Piecewise-linear HU -> electron density relative to water (air 0, bone ~1.6)."""
    return np.interp(hu, [-1000.0, 0.0, 100.0, 1600.0], [0.0, 1.0, 1.07, 1.9])


def gantry_rad(gantry_deg: Sequence[float]) -> torch.Tensor:
    """(B,) float64 IEC gantry angles in radians."""
    return torch.deg2rad(torch.as_tensor(list(gantry_deg), dtype=torch.float64))


class BeamGeometry:
    """Parallel coplanar beams: resampling between the patient grid and beam frames.

    The frame of beam ``b`` is a ``(V, U)`` grid in the axial plane centred on the
    isocentre: rows run along the beam direction (depth, V), columns across it (lateral,
    U), with the finer in-plane spacing as pixel size. Depth covers ``depth_radius_mm``
    (the body), lateral only ``lateral_radius_mm`` (the targets plus penumbra): no fluence
    leaves the collimator elsewhere. Each axial slice is resampled independently (beams
    are coplanar), so ``Z`` rides along as the channel dimension.

    Args:
        shape: (Z, Y, X) of the patient grid.
        spacing_mm: (dz, dy, dx).
        isocentre_mm: (z, y, x) isocentre in mm relative to the grid's centre.
        gantry: (B,) IEC gantry angles in radians (see the module docstring).
    """

    def __init__(self, shape: Sequence[int], spacing_mm: Sequence[float],
                 isocentre_mm: Sequence[float], gantry: torch.Tensor, depth_radius_mm: float,
                 lateral_radius_mm: float):
        _, ny, nx = shape
        dy, dx = spacing_mm[1], spacing_mm[2]
        self.pixel_mm = min(dy, dx)
        half_y, half_x = (ny - 1) / 2 * dy, (nx - 1) / 2 * dx
        self.n_beams = int(gantry.numel())
        self.n_v = 2 * int(math.ceil(depth_radius_mm / self.pixel_mm)) + 1
        self.n_u = 2 * int(math.ceil(lateral_radius_mm / self.pixel_mm)) + 1
        half_v, half_u = (self.n_v - 1) / 2 * self.pixel_mm, (self.n_u - 1) / 2 * self.pixel_mm
        # beam direction (y, x) = (cos, sin) of phi = -gantry
        cos = torch.cos(-gantry)[:, None, None]
        sin = torch.sin(-gantry)[:, None, None]
        v, w = torch.meshgrid(torch.linspace(-half_v, half_v, self.n_v, dtype=torch.float64),
                              torch.linspace(-half_u, half_u, self.n_u, dtype=torch.float64),
                              indexing="ij")
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
        return self.into_patient_per_beam(frames).sum(0)

    def into_patient_per_beam(self, frames: torch.Tensor) -> torch.Tensor:
        """(B, C, V, U) beam frames -> (B, C, Y, X), one patient grid per beam."""
        return F.grid_sample(frames, self.to_patient, mode="bilinear", padding_mode="zeros",
                             align_corners=True)


def in_plane_radius_mm(mask: np.ndarray, spacing_mm: Sequence[float],
                       centre_mm: Sequence[float]) -> float:
    """Largest in-plane distance (mm) from ``centre_mm`` (z, y, x; relative to the grid
    centre) to a voxel of ``mask`` (Z, Y, X)."""
    axes = [(np.arange(n) - (n - 1) / 2.0) * s for n, s in zip(mask.shape, spacing_mm)]
    r2 = (axes[1][:, None] - centre_mm[1]) ** 2 + (axes[2][None, :] - centre_mm[2]) ** 2
    in_plane = np.asarray(mask).any(0)
    return float(np.sqrt(r2[in_plane].max())) if in_plane.any() else 0.0


def radiological_depth_mm(density_frames: torch.Tensor, pixel_mm: float) -> torch.Tensor:
    """(B, Z, V, U) water-equivalent depth (mm) at each pixel's centre, along V."""
    return (torch.cumsum(density_frames, dim=2) - 0.5 * density_frames) * pixel_mm


def depth_dose(radiological_depth: torch.Tensor, inside: torch.Tensor,
               params: BeamModelParams = DEFAULT_PARAMS) -> torch.Tensor:
    """Relative dose on the beam axis: build-up x exponential attenuation, zero where
    ``inside`` is 0 (same shapes)."""
    buildup = 1.0 - 0.7 * torch.exp(-radiological_depth / params.buildup_mm)
    return buildup * torch.exp(-params.attenuation_per_mm * radiological_depth) * inside


def open_leaves(projection: torch.Tensor, pixel_mm: tuple[float, float],
                params: BeamModelParams = DEFAULT_PARAMS) -> torch.Tensor:
    """Beam's-eye-view apertures (B, Z, U) bool: the target ``projection`` (B, Z, U)
    grown by the aperture margin (Euclidean, in mm, ``pixel_mm`` = (dz, du)) within each
    beam."""
    sampling = (1e6, *pixel_mm)  # no growth across beams
    distance = ndimage.distance_transform_edt(~projection.numpy(), sampling=sampling)
    return torch.from_numpy(distance <= params.aperture_margin_mm)


def penumbra(fluence: torch.Tensor, pixel_mm: tuple[float, float],
             params: BeamModelParams = DEFAULT_PARAMS) -> torch.Tensor:
    """Gaussian penumbra on (B, Z, U) fluence maps (``pixel_mm`` = (dz, du))."""
    sigmas = (0.0, *(params.penumbra_sigma_mm / p for p in pixel_mm))
    arr = ndimage.gaussian_filter(fluence.numpy(), sigma=sigmas, mode="constant")
    return torch.from_numpy(arr)


def scatter(dose: np.ndarray, spacing_mm: Sequence[float],
            params: BeamModelParams = DEFAULT_PARAMS) -> np.ndarray:
    """Lateral scatter: (Z, Y, X) dose blurred by a Gaussian of ``scatter_sigma_mm``."""
    return ndimage.gaussian_filter(dose, [params.scatter_sigma_mm / s for s in spacing_mm],
                                   mode="constant")


def field_margin_mm(spacing_mm: Sequence[float],
                    params: BeamModelParams = DEFAULT_PARAMS) -> float:
    """Lateral extent (mm) a field needs beyond its target: aperture margin + penumbra."""
    return 3 * max(params.penumbra_sigma_mm, spacing_mm[1], spacing_mm[2]) + \
        params.aperture_margin_mm
