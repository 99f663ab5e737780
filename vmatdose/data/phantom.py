"""Synthetic prostate SIB phantoms: the embedded default data set.

Each case is a pelvis with anatomy that varies per seed (body ellipse, prostate size and
position, seminal vesicles, rectum behind the prostate, bladder filling, femoral heads,
pelvic bone, bowel), a CT in realistic Hounsfield units with mild noise, and a dose that
looks like a 70/56 Gy simultaneous-integrated-boost VMAT plan in 28 fractions.

What the dose model captures (physics-inspired, not a treatment planning system):

* a coplanar arc sampled by ``n_beams`` parallel beams around the target;
* attenuation along the *radiological* depth through the CT (electron density from HU),
  with a build-up region under the skin;
* fluence shaped per beam to the beam's-eye-view projection of the targets, with a
  Gaussian penumbra: a boost segment on rays through PTV70 and an elective segment on
  rays through PTV56 only, its fluence reduced where rays cross the rectum or bladder
  (what plan optimisation does to spare them);
* lateral scatter as a Gaussian blur of the summed dose;
* fluence modulation by a few multiplicative updates per ray (the mean ratio of goal to
  delivered dose over the targets the ray crosses), a miniature inverse planning that
  makes both dose levels uniform; normalised to a PTV70 median of 70 Gy. Steep fall-off
  outside the targets and a low-dose bath where the arc enters follow.

What it ignores: beam divergence and inverse-square, heterogeneity effects on scatter,
multi-leaf-collimator mechanics, and real optimisation objectives.
"""

from __future__ import annotations

import json
import logging
import math
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from scipy import ndimage

from vmatdose.data.atomic import write_json_atomic
from vmatdose.data.case import Case
from vmatdose.data.geometry import dilate_mm
from vmatdose.data.ingest.batch import convert_cases

log = logging.getLogger(__name__)

DEFAULT_SHAPE = (48, 64, 96)
DEFAULT_SPACING_MM = (3.0, 4.0, 4.0)
STRUCTURES = ["PTV70", "PTV56", "Rectum", "Bladder", "Femur_L", "Femur_R", "Bowel"]
PRESCRIPTIONS_GY = {"PTV70": 70.0, "PTV56": 56.0}
FRACTIONS = 28
DATASET_FILE = "dataset.json"
GENERATOR_VERSION = 2  # bump when the anatomy or dose model changes: old folders are refused

_MU_PER_MM = 0.0045  # effective attenuation of a 6 MV beam in water (~4.5 %/cm)
_BUILDUP_MM = 6.0  # e-folding length of the build-up under the skin
_PENUMBRA_SIGMA_MM = 3.5
_APERTURE_MARGIN_MM = 6.0  # leaves open beyond the target projection, so its edge is covered
_SCATTER_SIGMA_MM = 4.0
_OAR_SPARING = 0.55  # fraction of fluence removed on rays fully blocked by rectum/bladder
_BOOST_FLUENCE = 0.25  # initial boost segment, relative to the elective one
_RELAXATION = 0.8  # exponent of the per-ray fluence correction
_ELECTIVE_GOAL = 0.9  # PTV56 goal in the modulation, relative to its prescription


@dataclass
class Anatomy:
    """Binary masks (Z, Y, X) of one phantom and its HU map."""

    masks: dict[str, np.ndarray]
    body: np.ndarray
    hu: np.ndarray
    isocentre_mm: np.ndarray  # (z, y, x) relative to the grid centre


def _grid_mm(shape: Sequence[int], spacing_mm: Sequence[float]) -> list[np.ndarray]:
    """Voxel-centre coordinates in mm relative to the grid centre, as broadcastable axes."""
    axes = [(np.arange(n) - (n - 1) / 2.0) * s for n, s in zip(shape, spacing_mm)]
    return list(np.meshgrid(*axes, indexing="ij", sparse=True))


def _ellipsoid(z, y, x, centre, radii) -> np.ndarray:
    return (((z - centre[0]) / radii[0]) ** 2 + ((y - centre[1]) / radii[1]) ** 2
            + ((x - centre[2]) / radii[2]) ** 2) <= 1.0


def make_anatomy(rng: np.random.Generator, shape: Sequence[int],
                 spacing_mm: Sequence[float]) -> Anatomy:
    """Draw one pelvis: structures as boolean masks and a CT in HU (float)."""
    z, y, x = _grid_mm(shape, spacing_mm)
    u = rng.uniform
    body_a = (u(140, 175), u(95, 118))  # half-width (x), half-depth (y) in mm
    body = ((x / body_a[0]) ** 2 + (y / body_a[1]) ** 2 <= 1.0) & np.ones_like(z, bool)
    fat_depth = u(12, 25)
    inner = (x / (body_a[0] - fat_depth)) ** 2 + (y / (body_a[1] - fat_depth)) ** 2 <= 1.0

    c = np.array([u(-8, 8), u(0, 14), u(-5, 5)])  # prostate centre (z, y, x)
    r = np.array([u(15, 21), u(13, 18), u(18, 25)])
    prostate = _ellipsoid(z, y, x, c, r)
    sv = np.zeros(body.shape, bool)
    for side in (-1, 1):
        sv |= _ellipsoid(z, y, x, c + [r[0] * 0.9, r[1] * 0.6, side * u(10, 16)],
                         [u(7, 10), u(5, 7), u(10, 14)])
    ptv70 = dilate_mm(prostate, 7.0, spacing_mm) & body
    ptv56 = dilate_mm(prostate | sv, 16.0, spacing_mm) & body & ~ptv70

    rect_r = u(12, 17)
    rect_y = c[1] + r[1] + rect_r + u(1, 4)
    rect_x = c[2] + u(-4, 4) + 0.08 * (z - c[0])  # slight lateral curve
    rectum_solid = (((y - rect_y) ** 2 + (x - rect_x) ** 2 <= rect_r ** 2)
                    & (z > c[0] - u(35, 50)) & (z < c[0] + u(25, 40)))
    rect_gas = rectum_solid & ((y - rect_y) ** 2 + (x - rect_x) ** 2 <= (rect_r * u(0, 0.6)) ** 2)

    fill = u(0.6, 1.3)
    b_r = np.array([22.0, 26.0, 34.0]) * fill
    bladder = _ellipsoid(z, y, x, c + [r[0] + b_r[0] * 0.6, -r[1] - b_r[1] * 0.5, 0.0], b_r)
    bladder &= ~dilate_mm(prostate, 2.0, spacing_mm)

    femurs, bone = {}, np.zeros(body.shape, bool)
    for name, side in (("Femur_L", 1), ("Femur_R", -1)):
        fc = c + [u(-6, 6), u(-10, 0), side * u(85, 100)]
        fr = u(21, 26)
        head = _ellipsoid(z, y, x, fc, [fr] * 3)
        neck = ((((y - fc[1]) / 14.0) ** 2 + ((z - fc[0] + 0.6 * side * (x - fc[2])) / 14.0) ** 2
                 <= 1.0) & (side * (x - fc[2]) > 0) & (side * (x - fc[2]) < 45))
        femurs[name] = (head | neck) & body
        socket = _ellipsoid(z, y, x, fc, [fr + 8] * 3) & ~_ellipsoid(z, y, x, fc, [fr + 3] * 3)
        bone |= socket & (side * (x - fc[2]) < 0)
    pubis = _ellipsoid(z, y, x, c + [u(-12, -4), -r[1] - u(28, 36), 0.0], [14.0, 9.0, 30.0])
    sacrum = _ellipsoid(z, y, x, c + [30.0, u(60, 75), 0.0], [50.0, 12.0, 35.0])
    bone = (bone | pubis | sacrum) & body & ~prostate

    bowel_top = c[0] + r[0] + 2 * b_r[0] * 0.8
    bowel = (_ellipsoid(z, y, x, [bowel_top + 40, c[1] - 20, 0.0], [45.0, 55.0, 95.0])
             & body & ~bladder & ~bone & ~ptv56 & ~ptv70)
    bowel_gas = bowel & (ndimage.gaussian_filter(rng.standard_normal(body.shape), 1.5) > 0.45)

    hu = np.full(body.shape, -1000.0)
    hu[body] = -95.0  # subcutaneous fat
    hu[body & inner] = 35.0  # muscle and soft tissue
    hu[bowel] = 25.0
    hu[bowel_gas] = -650.0
    hu[bladder] = 8.0
    hu[prostate | sv] = 42.0
    hu[rectum_solid] = 38.0
    hu[rect_gas] = -700.0
    hu[bone] = 650.0
    for mask in femurs.values():
        hu[mask] = 450.0
        hu[mask & ~ndimage.binary_erosion(mask)] = 1100.0  # cortical shell
    hu += np.where(body, rng.normal(0.0, 12.0, body.shape), 0.0)

    masks = {"PTV70": ptv70, "PTV56": ptv56, "Rectum": rectum_solid & body,
             "Bladder": bladder & body, **femurs, "Bowel": bowel}
    return Anatomy(masks=masks, body=body, hu=hu, isocentre_mm=c)


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
    _, y, x = _grid_mm(mask.shape, spacing_mm)
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


def compute_vmat_dose(anatomy: Anatomy, spacing_mm: Sequence[float], n_beams: int = 36,
                      iterations: int = 5) -> np.ndarray:
    """Dose (Z, Y, X) in Gy of a 70/56 Gy SIB arc plan on the phantom ``anatomy``."""
    shape = anatomy.body.shape
    m = anatomy.masks
    iso = anatomy.isocentre_mm
    targets = m["PTV70"] | m["PTV56"]
    margin = 3 * max(_PENUMBRA_SIGMA_MM, spacing_mm[1], spacing_mm[2]) + _APERTURE_MARGIN_MM
    geo = BeamGeometry(shape, spacing_mm, iso, n_beams,
                       depth_radius_mm=_in_plane_radius_mm(anatomy.body, spacing_mm, iso),
                       lateral_radius_mm=_in_plane_radius_mm(targets, spacing_mm, iso) + margin)
    density = relative_electron_density(anatomy.hu) * anatomy.body
    oar = (m["Rectum"] | m["Bladder"]) & ~dilate_mm(targets, 3.0, spacing_mm)
    stack = np.stack([density, targets, m["PTV70"], oar]).astype(np.float32)
    frames = geo.into_beams(torch.from_numpy(stack).reshape(-1, *shape[1:]))
    frames = frames.reshape(n_beams, 4, shape[0], geo.n_v, geo.n_u)  # (B, 4, Z, V, U)
    rho = frames[:, 0]
    depth = (torch.cumsum(rho, dim=2) - 0.5 * rho) * geo.pixel_mm
    ddose = _depth_dose(depth, (rho > 0.05).float())  # (B, Z, V, U)

    fluence = _initial_fluence(frames, spacing_mm, geo.pixel_mm)
    # Rays through PTV70 cross the PTV56 shell around it too, so the shell ends up hotter
    # than its goal: asking for less there puts its median near the prescription.
    goal = np.where(m["PTV70"], PRESCRIPTIONS_GY["PTV70"],
                    np.where(m["PTV56"], _ELECTIVE_GOAL * PRESCRIPTIONS_GY["PTV56"], 0.0))
    on_ray = frames[:, 1].sum(dim=2)  # (B, Z, U): target path per ray (pixels)
    for _ in range(iterations):
        dose = _deliver(geo, ddose, fluence, spacing_mm, anatomy.body, m["PTV70"])
        ratio = np.where(targets, goal / np.maximum(dose, 1e-3), 0.0).clip(0.0, 2.0)
        ray_ratio = geo.into_beams(torch.from_numpy(ratio.astype(np.float32))).sum(dim=2)
        correction = torch.where(on_ray > 0.5, ray_ratio / on_ray.clamp(min=0.5), 1.0)
        fluence = fluence * correction.clamp(0.5, 2.0) ** _RELAXATION
    return _deliver(geo, ddose, fluence, spacing_mm, anatomy.body, m["PTV70"])


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
             spacing_mm: Sequence[float], body: np.ndarray, ptv70: np.ndarray) -> np.ndarray:
    """Dose (Z, Y, X) Gy of ``fluence`` (B, Z, U): beams summed in the patient, lateral
    scatter, zero outside the body, normalised to a PTV70 median of 70 Gy."""
    beams = depth_dose * fluence[:, :, None, :]  # (B, Z, V, U)
    dose = geo.into_patient(beams).numpy()
    dose = ndimage.gaussian_filter(dose, [_SCATTER_SIGMA_MM / s for s in spacing_mm],
                                   mode="constant") * body
    median = float(np.median(dose[ptv70])) if ptv70.any() else float(dose.max())
    return (dose * (PRESCRIPTIONS_GY["PTV70"] / max(median, 1e-6))).astype(np.float32)


def generate_phantom_case(seed: int, shape: Sequence[int] = DEFAULT_SHAPE,
                          spacing_mm: Sequence[float] = DEFAULT_SPACING_MM,
                          case_id: str | None = None, n_beams: int = 36) -> Case:
    """One phantom case, fully determined by ``seed`` and the grid.

    Args:
        seed: random seed (anatomy and CT noise).
        shape: grid ``(Z, Y, X)`` in voxels.
        spacing_mm: voxel size ``(dz, dy, dx)`` in mm.
        case_id: identifier written into the case (default ``phantom_<seed>``).
        n_beams: beam angles sampling the arc.
    """
    rng = np.random.default_rng(seed)
    spacing = tuple(float(s) for s in spacing_mm)
    with _single_threaded_torch():
        anatomy = make_anatomy(rng, shape, spacing)
        dose = compute_vmat_dose(anatomy, spacing, n_beams)
    ct = np.clip(np.round(anatomy.hu), -1024, 3071).astype(np.int16)
    origin = -(np.asarray(shape) - 1) / 2.0 * np.asarray(spacing)
    return Case(
        case_id=case_id or f"phantom_{seed}",
        ct=ct,
        masks=np.stack([anatomy.masks[s] for s in STRUCTURES]).astype(np.uint8),
        structures=list(STRUCTURES),
        body=anatomy.body.astype(np.uint8),
        spacing_mm=np.asarray(spacing, float),
        origin_mm=origin,
        prescriptions_gy=dict(PRESCRIPTIONS_GY),
        dose=dose,
        meta={"source": "phantom", "seed": int(seed), "fractions": FRACTIONS,
              "n_beams": n_beams},
    )


class _single_threaded_torch:
    """Run torch ops on one thread (workers run in parallel; results stay identical)."""

    def __enter__(self):
        self.threads = torch.get_num_threads()
        torch.set_num_threads(1)

    def __exit__(self, *exc):
        torch.set_num_threads(self.threads)


def _case_seed(seed: int, index: int) -> int:
    return int(np.random.SeedSequence([seed, index]).generate_state(1)[0])


def _phantom_from_job(source: tuple, case_id: str) -> Case:
    """The batch engine's convert function: ``source`` is ``(seed, shape, spacing_mm)``."""
    seed, shape, spacing = source
    return generate_phantom_case(seed, shape, spacing, case_id)


def _check_dataset_file(folder: Path, params: dict) -> None:
    record = folder / DATASET_FILE
    if record.exists():
        previous = json.loads(record.read_text())
        same = {k: previous.get(k) for k in params if k != "n_cases"}
        if same != {k: v for k, v in params.items() if k != "n_cases"}:
            raise ValueError(
                f"{record}: this folder holds phantoms generated with {previous}, not "
                f"{params}. Use another cases_dir or delete the folder.")


def generate_phantom_dataset(output_dir: str | os.PathLike, n_cases: int = 32,
                             shape: Sequence[int] = DEFAULT_SHAPE,
                             spacing_mm: Sequence[float] = DEFAULT_SPACING_MM,
                             seed: int = 0, num_workers: int = 2,
                             progress: bool = True) -> list[Path]:
    """Write ``n_cases`` phantom case files ``phantom_000.npz ...`` into ``output_dir``.

    Idempotent and resumable: cases already on disk (valid files) are kept, so a killed
    run continues where it stopped; each file is written atomically. ``dataset.json``
    records the parameters, and a folder generated with other parameters is refused.

    Returns:
        Paths of all ``n_cases`` files.
    """
    folder = Path(output_dir)
    folder.mkdir(parents=True, exist_ok=True)
    shape, spacing = [int(s) for s in shape], [float(s) for s in spacing_mm]
    params = {"generator": "vmatdose.data.phantom", "version": GENERATOR_VERSION,
              "n_cases": int(n_cases), "shape": shape,
              "spacing_mm": spacing, "seed": int(seed)}
    _check_dataset_file(folder, params)
    jobs = [(f"phantom_{i:03d}", (_case_seed(seed, i), shape, spacing)) for i in range(n_cases)]
    summary = convert_cases(jobs, _phantom_from_job, folder, num_workers=num_workers,
                            progress=progress and "generating phantom cases")
    if summary["failed"]:
        raise RuntimeError(f"{folder}: phantom generation failed: {summary['failed']}")
    write_json_atomic(params, folder / DATASET_FILE)
    return [folder / f"{case_id}.npz" for case_id, _ in jobs]
