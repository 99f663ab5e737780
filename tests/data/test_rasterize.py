"""Rasterisation: the closed even-odd rule, analytic voxel counts, and rt-utils round trips.

rt-utils (OpenCV ``findContours``) writes contours through the centres of a mask's edge
voxels; ingesting such an RTSTRUCT must give the mask back exactly (Dice 1.0).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from matplotlib.path import Path as MplPath

from vmatdose.data.ingest.dicom import DicomIngestSettings, ingest_dicom_case
from vmatdose.data.ingest.rasterize import BOUNDARY_TOLERANCE, rasterize_polygons
from vmatdose.protocol import Protocol

from conftest import OPENKBP_SAMPLE
from dicom_builders import GridSpec, PatientSpec, dice, write_patient, write_rt_utils_rtstruct


def _square(lo: float, hi: float) -> np.ndarray:
    return np.array([[lo, lo], [hi, lo], [hi, hi], [lo, hi]], float)


# ----------------------------------------------------------------- analytic counts


@pytest.mark.parametrize(("lo", "hi", "count"), [
    (2.0, 5.0, 16),   # vertices on centres: the boundary rows/columns 2 and 5 are in
    (1.5, 5.5, 16),   # on half-voxels: centres 2..5, none on the boundary
    (2.3, 5.7, 9),    # off grid: centres 3..5
    (2.0, 2.0, 1),    # a point contour on a centre
])
def test_square_voxel_counts(lo, hi, count):
    assert rasterize_polygons([_square(lo, hi)], (10, 10)).sum() == count


def test_vertices_on_centres_keep_the_plus_x_and_plus_y_edges():
    mask = rasterize_polygons([_square(2, 5)], (8, 8))
    assert mask[2:6, 2:6].all() and mask.sum() == 16
    assert mask[5, 2:6].all() and mask[2:6, 5].all()  # the edges a half-open rule drops


def test_triangle_and_diagonal_edges_on_centres():
    triangle = np.array([[0, 0], [4, 0], [0, 4]], float)
    mask = rasterize_polygons([triangle], (6, 6))
    rows, cols = np.nonzero(mask)
    assert mask.sum() == 15 and np.all(rows + cols <= 4)  # 5 + 4 + 3 + 2 + 1
    line = np.array([[1, 1], [4, 4]], float)  # a degenerate (two-vertex) contour
    assert np.array_equal(np.argwhere(rasterize_polygons([line], (6, 6))),
                          [[1, 1], [2, 2], [3, 3], [4, 4]])


def test_hole_is_empty_but_its_boundary_ring_is_kept():
    mask = rasterize_polygons([_square(1, 8), _square(3, 6)], (10, 10))
    assert mask.sum() == 64 - 4  # 8 x 8 outer, hole interior 4..5 x 4..5
    assert not mask[4:6, 4:6].any() and mask[3, 3:7].all() and mask[6, 3:7].all()
    half = rasterize_polygons([_square(0.5, 8.5), _square(2.5, 6.5)], (10, 10))
    assert half.sum() == 64 - 16  # hole on half-voxels removes 3..6 x 3..6


def test_points_within_the_tolerance_count_as_on_the_boundary():
    eps = BOUNDARY_TOLERANCE / 10
    assert rasterize_polygons([_square(2 + eps, 5 - eps)], (8, 8)).sum() == 16
    off = 0.01  # far beyond the tolerance: the edge centres are outside
    assert rasterize_polygons([_square(2 + off, 5 - off)], (8, 8)).sum() == 4


def _reference(polygons: list[np.ndarray], shape: tuple[int, int], tol: float) -> np.ndarray:
    """Brute force: even-odd inside (matplotlib) OR within ``tol`` (Euclidean) of an edge."""
    rows, cols = np.mgrid[0:shape[0], 0:shape[1]]
    centres = np.column_stack([cols.ravel(), rows.ravel()]).astype(float)
    inside = np.zeros(len(centres), bool)
    boundary = np.zeros(len(centres), bool)
    for polygon in polygons:
        inside ^= MplPath(polygon).contains_points(centres)
        for a, b in zip(polygon, np.roll(polygon, -1, axis=0)):
            d = b - a
            t = np.clip(((centres - a) @ d) / max(float(d @ d), 1e-300), 0, 1)
            boundary |= np.linalg.norm(centres - (a + t[:, None] * d), axis=1) <= tol
    return (inside | boundary).reshape(shape)


def test_random_polygons_match_a_brute_force_reference():
    rng = np.random.default_rng(1)
    for trial in range(150):
        if trial % 2:  # vertices on voxel centres: many centres on edges
            polygons = [rng.integers(-3, 33, (rng.integers(3, 9), 2)).astype(float)
                        for _ in range(rng.integers(1, 4))]
        else:
            polygons = [rng.uniform(-3, 33, (rng.integers(3, 9), 2))
                        for _ in range(rng.integers(1, 4))]
        got = rasterize_polygons(polygons, (28, 30))
        # the tolerance is a box (|dx|, |dy| <= tol): between the two Euclidean discs
        assert not np.any(_reference(polygons, (28, 30), BOUNDARY_TOLERANCE) & ~got), trial
        assert not np.any(got & ~_reference(polygons, (28, 30), 1.5 * BOUNDARY_TOLERANCE)), trial


# ----------------------------------------------------------------- rt-utils round trips


def _shapes_protocol(names: list[str]) -> Protocol:
    """A protocol whose 'target' is the first test shape, the others OARs."""
    return Protocol(name="shapes", fractions=1, prescriptions_gy={names[0]: 60.0},
                    oars=tuple(names[1:]), required_targets=(names[0],))


def _round_trip(folder: Path, grid: GridSpec, orientation: str,
                masks: dict[str, np.ndarray]):
    """CT series -> rt-utils RTSTRUCT of ``masks`` -> ingest; the ingested case."""
    write_patient(folder, PatientSpec(orientation=orientation, ct=grid, structures=(),
                                      with_struct=False, with_dose=False, with_plan=False))
    write_rt_utils_rtstruct(folder, masks, orientation)
    settings = DicomIngestSettings(protocol=_shapes_protocol(list(masks)), require_dose=False)
    return ingest_dicom_case(folder, "shapes", settings)


def _ball(grid: GridSpec, centre_zyx, radius_mm) -> np.ndarray:
    z, y, x = np.meshgrid(*grid.axes(), indexing="ij")
    c = np.asarray(centre_zyx)
    return (z - c[0]) ** 2 + (y - c[1]) ** 2 + (x - c[2]) ** 2 <= radius_mm ** 2


def _test_shapes(grid: GridSpec) -> dict[str, np.ndarray]:
    """Sphere, a 1-voxel and a 2-voxel wide tube (curved, like a spinal cord), a concave
    C shape, a torus with its hole, on the canonical grid."""
    shape = grid.shape
    z0, y0, x0 = (o + s * (n - 1) / 2 for o, s, n in zip(grid.origin, grid.spacing, shape))
    sphere = _ball(grid, (z0, y0, x0), 0.3 * min(s * n for s, n in zip(grid.spacing, shape)))
    thin = np.zeros(shape, bool)
    wide = np.zeros(shape, bool)
    for k in range(1, shape[0] - 1):  # a cord drifting one voxel every few slices
        j, i = shape[1] - 6, 4 + k // 3
        thin[k, j, i] = True
        wide[k, j - 3:j - 1, i + 6:i + 8] = True
    c_shape = np.zeros(shape, bool)
    c_shape[2:-2, 4:16, 4:7] = True
    c_shape[2:-2, 4:7, 4:14] = True
    c_shape[2:-2, 13:16, 4:14] = True
    yy, xx = np.mgrid[0:shape[1], 0:shape[2]]
    r = np.hypot(yy - shape[1] / 2, xx - (shape[2] - 12))
    torus = np.zeros(shape, bool)
    torus[3:-3] = (r <= 8) & (r > 3.2)
    return {"Sphere": sphere, "Cord": thin, "Cord2": wide, "Concave": c_shape,
            "Torus": torus}


@pytest.mark.parametrize(("orientation", "grid"), [
    ("HFS", GridSpec((14, 40, 44), (3.0, 1.2, 1.2), (-20.0, -25.0, -30.0))),
    ("FFS", GridSpec((14, 40, 44), (3.0, 1.2, 1.2), (-20.0, -25.0, -30.0))),
    ("HFS", GridSpec((18, 36, 48), (1.0, 2.5, 2.5), (5.0, -40.0, -60.0))),
])
def test_rt_utils_rtstruct_ingests_with_dice_one(tmp_path, orientation, grid):
    masks = _test_shapes(grid)
    case = _round_trip(tmp_path / "pt", grid, orientation, masks)
    assert case.structures == list(masks)
    assert masks["Cord"].sum() == grid.shape[0] - 2 and masks["Torus"][7].sum() > 100
    for name, truth in masks.items():
        got = case.mask(name).astype(bool)
        assert dice(got, truth) == 1.0, (name, int(got.sum()), int(truth.sum()))


# ----------------------------------------------------------------- real-sized anatomy


def _openkbp_masks(folder: Path) -> tuple[dict[str, np.ndarray], np.ndarray]:
    """The structures of one OpenKBP sample patient, (Z, Y, X), and its voxel size."""
    import pandas as pd

    masks = {}
    for name in ("PTV70", "PTV63", "PTV56", "Brainstem", "SpinalCord", "RightParotid",
                 "LeftParotid", "Esophagus", "Larynx", "Mandible"):
        path = folder / f"{name}.csv"
        if path.is_file():
            flat = np.zeros(128 ** 3, bool)
            flat[pd.read_csv(path, index_col=0).index.to_numpy()] = True
            masks[name] = np.ascontiguousarray(
                np.transpose(flat.reshape(128, 128, 128), (2, 0, 1))[::-1])
    spacing_xyz = np.loadtxt(folder / "voxel_dimensions.csv")
    return masks, np.array([spacing_xyz[2], spacing_xyz[0], spacing_xyz[1]])


@pytest.mark.skipif(not OPENKBP_SAMPLE.is_dir(), reason=f"no OpenKBP sample at {OPENKBP_SAMPLE}")
def test_head_and_neck_anatomy_through_rt_utils_keeps_every_structure(tmp_path):
    patient = OPENKBP_SAMPLE / "train-pats" / "pt_1"
    masks, spacing = _openkbp_masks(patient)
    assert {"PTV70", "SpinalCord", "Mandible"} <= set(masks)
    z = np.flatnonzero(np.any(np.stack(list(masks.values())), axis=(0, 2, 3)))
    masks = {n: m[max(z[0] - 1, 0):z[-1] + 2] for n, m in masks.items()}  # contoured slices
    grid = GridSpec(masks["PTV70"].shape, tuple(float(s) for s in spacing),
                    (-100.0, -250.0, -250.0))
    case = _round_trip(tmp_path / "hn", grid, "HFS", masks)
    scores = {n: dice(case.mask(n), m) for n, m in masks.items()}
    assert min(scores.values()) >= 0.99, scores
    assert scores["SpinalCord"] == 1.0 and scores["Mandible"] == 1.0, scores
