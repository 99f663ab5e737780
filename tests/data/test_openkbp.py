"""OpenKBP import: sparse CSV reading, canonical orientation, the real sample when present."""

from __future__ import annotations

import numpy as np
import pytest

from vmatdose.data.case import load_case
from vmatdose.data.ingest.openkbp import (
    OpenKBPFormatError,
    find_openkbp_patients,
    import_openkbp_dataset,
    import_openkbp_patient,
    read_sparse,
    to_canonical,
)

from conftest import OPENKBP_SAMPLE

needs_sample = pytest.mark.skipif(
    not OPENKBP_SAMPLE.is_dir(),
    reason=f"OpenKBP sample not found at {OPENKBP_SAMPLE} (see ../shared/data/openkbp-sample)")


def test_read_sparse_values_and_masks(tmp_path):
    values = tmp_path / "dose.csv"
    values.write_text(",data\n0,1.5\n7,2.0\n")
    mask = tmp_path / "Roi.csv"
    mask.write_text(",data\n3,\n4,\n")
    dose = read_sparse(values, shape=(2, 2, 2))
    assert dose[0, 0, 0] == 1.5 and dose[1, 1, 1] == 2.0 and dose.sum() == 3.5
    roi = read_sparse(mask, shape=(2, 2, 2), dtype=np.uint8)
    assert roi.ravel().tolist() == [0, 0, 0, 1, 1, 0, 0, 0]


def test_read_sparse_rejects_bad_files(tmp_path):
    outside = tmp_path / "ct.csv"
    outside.write_text(",data\n99,1\n")
    with pytest.raises(OpenKBPFormatError, match="ct.csv.*outside"):
        read_sparse(outside, shape=(2, 2, 2))
    nan = tmp_path / "dose.csv"
    nan.write_text(",data\n1,nan\n2,3.0\n")
    with pytest.raises(OpenKBPFormatError, match="dose.csv.*non-finite"):
        read_sparse(nan, shape=(2, 2, 2))


def test_canonical_orientation_moves_slices_to_superior_first():
    volume = np.zeros((2, 3, 4))  # (row=y, column=x, slice: superior -> inferior)
    volume[1, 2, 0] = 1.0  # posterior, left, most superior slice
    out = to_canonical(volume)
    assert out.shape == (4, 2, 3)
    assert out[3, 1, 2] == 1.0  # z index 3 is the most superior


def test_missing_files_name_the_folder(tmp_path):
    (tmp_path / "ct.csv").write_text(",data\n")
    with pytest.raises(OpenKBPFormatError, match="missing.*dose.csv"):
        import_openkbp_patient(tmp_path)


@needs_sample
def test_sample_patient_anatomy_is_in_canonical_orientation():
    case = import_openkbp_patient(OPENKBP_SAMPLE / "train-pats" / "pt_1")
    centre = {n: np.argwhere(case.mask(n)).mean(0) for n in
              ("Brainstem", "SpinalCord", "Mandible", "LeftParotid", "RightParotid")}
    assert centre["Brainstem"][0] > centre["SpinalCord"][0]  # z: superior
    assert centre["Mandible"][1] < centre["SpinalCord"][1]  # y: posterior
    assert centre["LeftParotid"][2] > centre["RightParotid"][2]  # x: patient left
    np.testing.assert_allclose(case.spacing_mm, [2.5, 3.906, 3.906])
    assert case.ct.min() == -1024
    soft_tissue = np.median(case.ct[case.body > 0])
    assert -150 < soft_tissue < 150
    assert abs(np.median(case.dose[case.mask("PTV70") > 0]) - 70.0) < 5.0
    assert case.dose[case.body == 0].max() == 0.0
    assert case.prescriptions_gy == {"PTV70": 70.0, "PTV63": 63.0, "PTV56": 56.0}


@needs_sample
def test_sample_imports_into_case_files_once(tmp_path):
    patients = find_openkbp_patients(OPENKBP_SAMPLE)
    assert len(patients) == 21
    paths = import_openkbp_dataset(tmp_path, OPENKBP_SAMPLE, num_workers=1, progress=False)
    assert len(paths) == 21
    stamp = paths[0].stat().st_mtime_ns
    import_openkbp_dataset(tmp_path, OPENKBP_SAMPLE, num_workers=1, progress=False)
    assert paths[0].stat().st_mtime_ns == stamp
    case = load_case(tmp_path / "openkbp_pt_61.npz")
    assert "PTV63" not in case.prescriptions_gy  # only the targets the patient has
