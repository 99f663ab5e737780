"""Phantom anatomy: a pelvis whose organs vary per seed, as masks and a CT in HU.

Body ellipse with a fat layer, prostate (size and position drawn), seminal vesicles,
rectum behind the prostate (with gas), bladder filling, femoral heads and necks, pelvic
bone, bowel with gas. PTV70 is the prostate grown by 7 mm, PTV56 prostate and seminal
vesicles grown by 16 mm, outside PTV70. HU values are realistic tissue values plus mild
noise.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from scipy import ndimage

from vmatdose.data.geometry import dilate_mm

#: the structures the phantom draws (a protocol may order them, but not add others)
STRUCTURES = ["PTV70", "PTV56", "Rectum", "Bladder", "Femur_L", "Femur_R", "Bowel"]
#: its two targets: the boost (prostate) and the elective volume
BOOST, ELECTIVE = "PTV70", "PTV56"


@dataclass
class Anatomy:
    """Binary masks (Z, Y, X) of one phantom and its HU map."""

    masks: dict[str, np.ndarray]
    body: np.ndarray
    hu: np.ndarray
    isocentre_mm: np.ndarray  # (z, y, x) relative to the grid centre


def grid_mm(shape: Sequence[int], spacing_mm: Sequence[float]) -> list[np.ndarray]:
    """Voxel-centre coordinates in mm relative to the grid centre, as broadcastable axes."""
    axes = [(np.arange(n) - (n - 1) / 2.0) * s for n, s in zip(shape, spacing_mm)]
    return list(np.meshgrid(*axes, indexing="ij", sparse=True))


def _ellipsoid(z, y, x, centre, radii) -> np.ndarray:
    return (((z - centre[0]) / radii[0]) ** 2 + ((y - centre[1]) / radii[1]) ** 2
            + ((x - centre[2]) / radii[2]) ** 2) <= 1.0


def make_anatomy(rng: np.random.Generator, shape: Sequence[int],
                 spacing_mm: Sequence[float]) -> Anatomy:
    """Draw one pelvis: structures as boolean masks and a CT in HU (float)."""
    z, y, x = grid_mm(shape, spacing_mm)
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
