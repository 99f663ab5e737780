"""The training grid: a clinical-style DICOM patient (fine CT, 2.5 mm RTDOSE) ingested onto
one target spacing, cropped to the body: CT, masks and dose checked against the builders'
analytic truth at the target voxels, and the source grids kept in meta."""

from __future__ import annotations

import numpy as np
import pytest

from vmatdose.data.ingest.dicom import DicomIngestSettings, ingest_dicom_case
from vmatdose.data.ingest.dicom_ct import CanonicalGrid
from vmatdose.data.ingest.training_grid import (
    GridSettings,
    body_box,
    crop_grid,
    full_target_grid,
    resample_to_geometry,
)
from vmatdose.protocol import Protocol

from dicom_builders import GridSpec, dice, dose_function, head_neck_spec, write_patient

SALT = "grid-test-salt"
CT = GridSpec((33, 160, 160), (2.0, 1.0, 1.0), (-32.0, -80.0, -80.0))
DOSE = GridSpec((30, 64, 72), (2.5, 2.5, 2.5), (-34.0, -78.0, -88.0))


@pytest.fixture(scope="module")
def patient(tmp_path_factory):
    folder = tmp_path_factory.mktemp("grid") / "pt"
    spec = head_neck_spec(ct=CT, dose_grid=DOSE)
    return folder, spec, write_patient(folder, spec)


def _ingest(folder, spacing, margin=10.0):
    settings = DicomIngestSettings(protocol=Protocol.load("head_neck"), id_salt=SALT,
                                   grid=GridSettings(spacing, margin))
    return ingest_dicom_case(folder, "grid_case", settings)


def _axes(case) -> list[np.ndarray]:
    return [o + s * np.arange(n) for o, s, n in zip(case.origin_mm, case.spacing_mm,
                                                    case.shape)]


def _analytic_mask(spec, name: str, z, y, x) -> np.ndarray:
    """Truth at target voxel centres: the ellipses in-plane (even-odd), the contoured CT
    slices along z (each target slice shows its nearest CT slice)."""
    cx0, cy0 = spec.ct.centre_xy()
    yy, xx = np.meshgrid(y, x, indexing="ij")
    plane = np.zeros(yy.shape, bool)
    for cx, cy, a, b in spec.scene[name][1]:
        plane ^= ((xx - cx0 - cx) / a) ** 2 + ((yy - cy0 - cy) / b) ** 2 < 1
    lo, hi = spec.scene[name][2]
    n = spec.ct.shape[0]
    k = np.rint((z - spec.ct.origin[0]) / spec.ct.spacing[0])
    inside_z = (k >= round(lo * (n - 1))) & (k <= round(hi * (n - 1)))
    return inside_z[:, None, None] & plane[None]


def test_full_grid_keeps_the_field_of_view_and_the_crop_adds_the_margin():
    ct = CanonicalGrid((40, 512, 512), (2.5, 0.98, 0.98), (-50.0, -250.0, -250.0))
    grid = full_target_grid(ct, (2.5, 2.5, 2.5))
    assert grid.shape == (40, 201, 201)  # 501.76 mm / 2.5 mm
    # outer corners agree: origin - spacing / 2
    assert np.allclose(np.asarray(grid.origin_mm) - 1.25,
                       np.asarray(ct.origin_mm) - np.asarray(ct.spacing_mm) / 2)
    body = np.zeros(grid.shape, bool)
    body[10:20, 50:100, 60:150] = True
    box = body_box(body, grid, margin_mm=10.0)
    assert box == (slice(6, 24), slice(46, 104), slice(56, 154))  # 4 voxels = 10 mm each side
    cropped = crop_grid(grid, box)
    assert cropped.shape == (18, 58, 98)
    assert np.allclose(cropped.origin_mm, np.asarray(grid.origin_mm) + np.array([6, 46, 56]) * 2.5)


def test_case_on_the_training_grid_matches_the_analytic_patient(patient):
    folder, spec, truth = patient
    case = _ingest(folder, (2.5, 1.5, 1.5))
    assert np.allclose(case.spacing_mm, (2.5, 1.5, 1.5)) and case.meta["grid"] == "training"
    z, y, x = _axes(case)
    body_truth = _analytic_mask(spec, "Body", z, y, x)
    assert dice(case.body, body_truth) > 0.98
    # cropped to the body + 10 mm (clipped by the CT's field of view)
    for axis, step in enumerate(case.spacing_mm):
        present = np.flatnonzero(case.body.any(axis=tuple(a for a in range(3) if a != axis)))
        assert present[0] <= int(np.ceil(10 / step)) and present[-1] >= case.shape[axis] - 1 - int(np.ceil(10 / step))
    for name in ("PTV70", "PTV56", "Mandible", "LeftParotid", "Brainstem"):
        assert dice(case.mask(name), _analytic_mask(spec, name, z, y, x)) > 0.95, name
    zz, yy, xx = np.meshgrid(z, y, x, indexing="ij")
    reference = dose_function(xx, yy, zz, spec.ct.centre_xy())
    inside = case.body > 0
    # linear interpolation of a smooth dose from the 2.5 mm grid: a fraction of a Gy
    assert np.abs(case.dose - reference)[inside].max() < 0.2
    # CT: linear resampling of an integer ramp pattern inside the body (2 HU per x or y
    # voxel of 1 mm, 10 HU per 2 mm slice): exact away from the body's edge
    core = _analytic_mask(spec, "Body", z, y, x) & (case.body > 0)
    eroded = core.copy()
    for axis in range(3):
        eroded &= np.roll(core, 1, axis) & np.roll(core, -1, axis)
    i = (xx - spec.ct.origin[2]) / spec.ct.spacing[2]
    j = (yy - spec.ct.origin[1]) / spec.ct.spacing[1]
    k = (zz - spec.ct.origin[0]) / spec.ct.spacing[0]
    expected = 2 * (i - j) + 10 * k
    assert np.abs(case.ct[eroded] - expected[eroded]).max() <= 1.0


def test_case_keeps_its_source_ct_and_rtdose_grids(patient):
    folder, spec, _ = patient
    case = _ingest(folder, (2.5, 2.5, 2.5))
    grids = case.meta["source_grids"]
    assert grids["ct"] == {"origin_mm": [-80.0, -80.0, -32.0], "spacing_mm": [1.0, 1.0, 2.0],
                           "size": [160, 160, 33], "direction": list(np.eye(3).ravel())}
    assert grids["rtdose"]["origin_mm"] == [-88.0, -78.0, -34.0]
    assert grids["rtdose"]["spacing_mm"] == [2.5, 2.5, 2.5]
    assert grids["rtdose"]["size"] == [72, 64, 30]
    # the dose put back on the RTDOSE grid is the analytic dose there (interpolation only)
    back = resample_to_geometry(case.dose, CanonicalGrid(case.shape, tuple(case.spacing_mm),
                                                         tuple(case.origin_mm)), grids["rtdose"])
    assert back.shape == (30, 64, 72)
    z, y, x = DOSE.axes()
    zz, yy, xx = np.meshgrid(z, y, x, indexing="ij")
    reference = dose_function(xx, yy, zz, spec.ct.centre_xy())
    body = _analytic_mask(spec, "Body", z, y, x)
    near = body & (back > 0)
    assert near.sum() > 0.9 * body.sum()
    assert np.abs(back - reference)[near].mean() < 0.1


def test_native_grid_is_kept_without_a_spacing(patient):
    folder, _, truth = patient
    case = _ingest(folder, None)
    assert case.shape == CT.shape and case.meta["grid"] == "ct"
    assert np.array_equal(case.ct, truth.ct)
