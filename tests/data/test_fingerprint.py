"""The dataset fingerprint and the target spacing rule: patients of three CT spacings
preprocessed onto one grid, the fingerprint JSON beside the case files (no identifiers),
and the rule's numbers."""

from __future__ import annotations

import json

import numpy as np
import pytest
from hydra import compose, initialize_config_dir

from vmatdose.config import CONFIG_DIR
from vmatdose.data.case import list_case_files, load_case
from vmatdose.data.ingest.fingerprint import FINGERPRINT_FILE, choose_spacing, source_geometry
from vmatdose.data.ingest.sources import run_preprocess
from vmatdose.protocol import Protocol

from dicom_builders import (
    PATIENT_BIRTH_DATE,
    PATIENT_ID,
    PATIENT_NAME,
    GridSpec,
    dicom_uids,
    head_neck_spec,
    write_patient,
)

SALT = "fingerprint-test-salt"
#: (CT slices, dz, pixel mm): the issue's clinic at a small size (2-3 mm slices, 1-1.4 mm)
CLINIC = ((30, 2.0, 0.98), (24, 2.5, 1.17), (20, 3.0, 1.37))


def _ct(slices: int, dz: float, pixel: float) -> GridSpec:
    n = int(round(180 / pixel))
    return GridSpec((slices, n, n), (dz, pixel, pixel), (-30.0, -90.0, -90.0))


def _dose(ct: GridSpec) -> GridSpec:
    """2.5 mm over the CT (the RTDOSE a planning system writes)."""
    extent = [(n - 1) * s for n, s in zip(ct.shape, ct.spacing)]
    return GridSpec(tuple(int(e // 2.5) + 1 for e in extent), (2.5, 2.5, 2.5), ct.origin)


@pytest.fixture(scope="module")
def clinic_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("clinic")
    for i, (slices, dz, pixel) in enumerate(CLINIC):
        ct = _ct(slices, dz, pixel)
        write_patient(root / f"patient_{i}", head_neck_spec(ct=ct, dose_grid=_dose(ct)))
    return root


def test_rule_median_spacing_no_finer_than_the_dose_and_at_most_max_voxels():
    geometries = [{"spacing_mm": [dz, p, p], "dose_spacing_mm": [2.5, 2.5, 2.5],
                   "body_extent_mm": [300.0, 200.0, 180.0]} for _, dz, p in CLINIC]
    assert choose_spacing(geometries) == [2.5, 2.5, 2.5]  # the dose grid bounds all axes
    no_dose = [{**g, "dose_spacing_mm": None} for g in geometries]
    assert choose_spacing(no_dose) == [2.5, 1.17, 1.17]  # nnU-Net's medians
    # a 900 mm long body: 920 mm / 253 voxels = 3.64 mm along z
    tall = [*no_dose[:2], {**no_dose[2], "body_extent_mm": [900.0, 200.0, 180.0]}]
    assert choose_spacing(tall) == [3.64, 1.17, 1.17]
    assert int(np.ceil(920 / 3.64)) + 1 <= 256


def test_source_geometry_reads_headers_only(clinic_root):
    geometry = source_geometry(clinic_root / "patient_1", Protocol.load("head_neck"))
    assert geometry["spacing_mm"] == [2.5, 1.17, 1.17]
    assert geometry["shape"] == [24, 154, 154]
    assert geometry["dose_spacing_mm"] == [2.5, 2.5, 2.5]
    # the external contour (ellipse 2 x 72 by 2 x 60 mm, 96 vertices) over the CT's slices
    assert np.allclose(geometry["body_extent_mm"], [23 * 2.5, 120.0, 144.0], atol=0.1)


def test_preprocess_puts_three_spacings_on_one_grid_with_a_fingerprint(tmp_path, clinic_root):
    out = tmp_path / "cases"
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        cfg = compose("preprocess", overrides=[
            f"paths.root_dir={tmp_path}", "progress=false", f"source.id_salt={SALT}",
            "source=dicom", "protocol=head_neck", f"input_dir={clinic_root}",
            f"output_dir={out}", "num_workers=1"])
    summary = run_preprocess(cfg)
    assert summary["counts"]["processed"] == 3
    cases = [load_case(p) for p in list_case_files(out)]
    for case in cases:
        assert np.allclose(case.spacing_mm, (2.5, 2.5, 2.5)) and max(case.shape) <= 256
        assert case.meta["grid"] == "training"
    assert sorted(c.meta["source_grids"]["ct"]["spacing_mm"][2] for c in cases) == [2.0, 2.5, 3.0]
    text = (out / FINGERPRINT_FILE).read_text()
    fingerprint = json.loads(text)
    assert fingerprint["target_spacing_mm"] == [2.5, 2.5, 2.5] and fingerprint["cases"] == 3
    assert fingerprint["source_spacing_mm"]["median"] == [2.5, 1.17, 1.17]
    assert fingerprint["source_spacing_mm"]["max"] == [3.0, 1.37, 1.37]
    one = fingerprint["per_case"][cases[0].case_id]
    assert set(one) >= {"source_spacing_mm", "source_shape", "dose_spacing_mm", "body_extent_mm",
                        "hu_percentiles", "structure_volumes_cc"}
    ptv = one["structure_volumes_cc"]["PTV56"]
    assert ptv == pytest.approx(cases[0].mask("PTV56").sum() * 2.5 ** 3 / 1000, abs=1e-3)
    for secret in (PATIENT_NAME, PATIENT_ID, PATIENT_BIRTH_DATE, *dicom_uids(clinic_root)):
        assert secret not in text
    # a second run (one more patient) reuses the fingerprint's spacing, whatever it sees
    ct = GridSpec((12, 100, 100), (1.0, 0.5, 0.5), (-6.0, -25.0, -25.0))
    write_patient(tmp_path / "more" / "patient_3", head_neck_spec(ct=ct, dose_grid=_dose(ct),
                                                                  scale=0.3))
    cfg.input_dir = str(tmp_path / "more")
    assert run_preprocess(cfg)["counts"]["processed"] == 1
    assert json.loads((out / FINGERPRINT_FILE).read_text())["cases"] == 4
    assert all(np.allclose(load_case(p).spacing_mm, 2.5) for p in list_case_files(out))
