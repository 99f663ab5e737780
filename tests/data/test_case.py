import numpy as np
import pytest

from vmatdose.data.case import (
    CaseValidationError,
    list_case_files,
    load_case,
    save_case,
)

from conftest import make_box_case


def test_round_trip_keeps_every_array_and_field(tmp_path, box_case):
    path = save_case(box_case, tmp_path / "box.npz")
    loaded = load_case(path)
    np.testing.assert_array_equal(loaded.ct, box_case.ct)
    np.testing.assert_array_equal(loaded.masks, box_case.masks)
    np.testing.assert_array_equal(loaded.body, box_case.body)
    np.testing.assert_array_equal(loaded.dose, box_case.dose)
    np.testing.assert_array_equal(loaded.spacing_mm, box_case.spacing_mm)
    assert loaded.structures == ["PTV70", "PTV56", "Rectum"]
    assert loaded.prescriptions_gy == {"PTV70": 70.0, "PTV56": 56.0}
    assert loaded.meta["schema_version"] == 1 and loaded.fractions == 28
    assert loaded.ct.dtype == np.int16 and loaded.dose.dtype == np.float32
    assert loaded.voxel_volume_cc == pytest.approx(2.0 * 2.5 * 3.0 / 1000)
    assert loaded.mask("Rectum").sum() == box_case.masks[2].sum()


def test_case_without_dose_round_trips(tmp_path):
    case = make_box_case(with_dose=False)
    assert load_case(save_case(case, tmp_path / "c.npz")).dose is None


def _expect_error(tmp_path, case, fragment):
    path = tmp_path / "bad.npz"
    with pytest.raises(CaseValidationError) as info:
        save_case(case, path)
    assert fragment in str(info.value) and "bad.npz" in str(info.value)
    assert not path.exists() and not list(tmp_path.glob(".*tmp")), "nothing half-written"


def test_shape_mismatch_between_arrays(tmp_path, box_case):
    box_case.dose = box_case.dose[:-1]
    _expect_error(tmp_path, box_case, "dose shape")


def test_masks_shape_mismatch(tmp_path, box_case):
    box_case.masks = box_case.masks[:, :, :-1]
    _expect_error(tmp_path, box_case, "masks shape")


def test_non_finite_dose(tmp_path, box_case):
    box_case.dose[3, 4, 5] = np.nan
    _expect_error(tmp_path, box_case, "non-finite")


def test_negative_dose(tmp_path, box_case):
    box_case.dose[3, 4, 5] = -1.0
    _expect_error(tmp_path, box_case, "negative")


def test_masks_not_binary(tmp_path, box_case):
    box_case.masks[0, 8, 10, 12] = 2
    _expect_error(tmp_path, box_case, "binary")


def test_prescription_names_missing_target(tmp_path, box_case):
    box_case.prescriptions_gy["PTV63"] = 63.0
    _expect_error(tmp_path, box_case, "PTV63")


def test_non_positive_spacing(tmp_path, box_case):
    box_case.spacing_mm = np.array([2.0, 0.0, 3.0])
    _expect_error(tmp_path, box_case, "spacing_mm")


def test_unknown_schema_version_on_load(tmp_path, box_case):
    path = save_case(box_case, tmp_path / "c.npz")
    with np.load(path) as data:
        arrays = dict(data)
    arrays["meta"] = np.asarray('{"schema_version": 99, "case_id": "box"}')
    np.savez_compressed(path, **arrays)
    with pytest.raises(CaseValidationError, match=r"c\.npz.*schema version 99"):
        load_case(path)


def test_truncated_file_names_the_file(tmp_path, box_case):
    path = save_case(box_case, tmp_path / "c.npz")
    path.write_bytes(path.read_bytes()[:200])
    with pytest.raises(CaseValidationError, match=r"c\.npz.*not a readable case file"):
        load_case(path)


def test_missing_file():
    with pytest.raises(FileNotFoundError, match="nope.npz"):
        load_case("nope.npz")


def test_list_case_files_ignores_temporaries(tmp_path, box_case):
    save_case(box_case, tmp_path / "b.npz")
    (tmp_path / ".a.npz.tmp").write_bytes(b"x")
    (tmp_path / ".hidden.npz").write_bytes(b"x")
    assert [p.name for p in list_case_files(tmp_path)] == ["b.npz"]
