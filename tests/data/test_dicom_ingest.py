"""DICOM-RT ingestion against analytic truth: masks (Dice), dose (1 %), orientations, errors."""

from __future__ import annotations

import dataclasses
import functools
import json
import logging
import shutil
import zipfile

import numpy as np
import pytest

from vmatdose.data.case import load_case, save_case
from vmatdose.data.ingest.batch import SkipCase, convert_cases
from vmatdose.data.ingest.dicom import (
    DicomIngestError,
    DicomIngestSettings,
    MissingTargetsError,
    ingest_dicom_case,
)
from vmatdose.data.ingest.rasterize import rasterize_polygons
from vmatdose.data.ingest.structure_names import StructureNameMap
from vmatdose.data.privacy import (
    SaltError,
    anonymous_case_id,
    case_id_for_folder,
    load_case_id_map,
)
from vmatdose.protocol import Protocol

from dicom_builders import (
    PATIENT_BIRTH_DATE,
    PATIENT_ID,
    PATIENT_NAME,
    GridSpec,
    PatientSpec,
    dice,
    dicom_uids,
    write_patient,
)

CANONICAL = ["PTV70", "PTV56", "Rectum", "Bladder", "Femur_L", "Femur_R", "Bowel"]
SALT = "test-salt"
PROSTATE = Protocol.load("prostate_sib")
SETTINGS = DicomIngestSettings(protocol=PROSTATE, id_salt=SALT)


def ingest(folder, **settings):
    """Ingest with the prostate protocol and a test salt (``settings`` override)."""
    return ingest_dicom_case(folder, settings=dataclasses.replace(SETTINGS, **settings))


@pytest.fixture(scope="module")
def patients(tmp_path_factory):
    """HFS and FFS patients of the same anatomy, ingested once."""
    root = tmp_path_factory.mktemp("dicom")
    out = {}
    for orientation in ("HFS", "FFS"):
        truth = write_patient(root / orientation, PatientSpec(orientation=orientation))
        out[orientation] = (root / orientation, truth, ingest(root / orientation))
    return out


def _variant(tmp_path, **spec) -> tuple:
    folder = tmp_path / "pt"
    return folder, write_patient(folder, PatientSpec(**spec))


# ----------------------------------------------------------------- rasteriser, names


def test_rasterized_ring_with_hole_matches_the_analytic_annulus():
    t = np.linspace(0, 2 * np.pi, 200, endpoint=False)
    outer = np.column_stack([60 + 40 * np.cos(t), 50 + 40 * np.sin(t)])
    inner = np.column_stack([60 + 20 * np.cos(t), 50 + 20 * np.sin(t)])
    mask = rasterize_polygons([outer, inner], (100, 120))
    yy, xx = np.mgrid[0:100, 0:120]
    r = np.hypot(xx - 60, yy - 50)
    assert dice(mask, (r < 40) & (r >= 20)) > 0.98
    assert not mask[50, 60] and mask[50, 60 + 30]


def test_structure_names_are_case_and_separator_insensitive():
    names = StructureNameMap.from_protocol(PROSTATE)
    for roi in ("PTV70", "PTV_70", "PTV 70Gy", "ptv-70"):
        assert names.canonical_name(roi) == "PTV70"
    for roi in ("Femur_L", "FemoralHead_L", "Left Femur", "LEFT FEMUR"):
        assert names.canonical_name(roi) == "Femur_L"
    assert names.canonical_name("External") == "Body"
    assert names.canonical_name("Couch") is None
    with pytest.raises(ValueError, match="maps to both"):
        StructureNameMap.from_dict({"structures": {"A": ["x_1"], "B": ["X 1"]}})


# ----------------------------------------------------------------- analytic truth


@pytest.mark.parametrize("orientation", ["HFS", "FFS"])
def test_ingest_reproduces_analytic_ct_masks_and_dose(patients, orientation):
    _, truth, case = patients[orientation]
    assert np.array_equal(case.ct, truth.ct)  # exact through RescaleSlope/Intercept
    assert case.structures == CANONICAL
    for name in CANONICAL:
        assert dice(case.mask(name), truth.masks[name]) > 0.98, name
    assert dice(case.body, truth.masks["Body"]) > 0.98
    ring = case.mask("PTV56")
    assert not np.any(ring & case.mask("PTV70"))  # the hole is empty
    assert truth.masks["Bowel"].sum() > 100 and dice(case.mask("Bowel"), truth.masks["Bowel"]) > 0.98
    relative = np.abs(case.dose - truth.dose) / truth.dose
    assert relative.max() < 0.01  # coarser, offset dose grid resampled onto the CT
    np.testing.assert_allclose(case.origin_mm, [-20.0, -70.0, -80.0])
    np.testing.assert_allclose(case.spacing_mm, [2.5, 2.0, 1.75])


def test_head_first_and_feet_first_give_the_same_canonical_arrays(patients):
    hfs, ffs = patients["HFS"][2], patients["FFS"][2]
    assert np.array_equal(hfs.ct, ffs.ct)
    assert np.array_equal(hfs.masks, ffs.masks) and np.array_equal(hfs.body, ffs.body)
    np.testing.assert_allclose(hfs.dose, ffs.dose, atol=1e-3)
    np.testing.assert_allclose(hfs.origin_mm, ffs.origin_mm)
    assert ffs.meta["dicom"]["image_orientation_patient"] == [-1, 0, 0, 0, 1, 0]


def test_prescriptions_fractions_protocol_and_names_come_from_the_dicom(patients):
    folder, truth, case = patients["HFS"]
    assert case.prescriptions_gy == {"PTV70": 70.0, "PTV56": 56.0}
    assert case.meta["prescription_source"] == "rtplan" and case.fractions == 28
    assert case.meta["protocol"] == "prostate_sib"
    assert case.meta["roi_names"]["Femur_L"] == "Left Femur"
    assert set(case.meta["unmapped_rois"]) == {"CTV70", "Couch"}


def test_case_keeps_no_source_uid_unless_record_sources(patients):
    folder, truth, case = patients["HFS"]
    planted = dicom_uids(folder)
    assert len(planted) > case.shape[0]  # every CT slice, RTSTRUCT, RTDOSE, RTPLAN, ...
    text = json.dumps(case.meta)
    assert not [uid for uid in planted if uid in text]
    recorded = ingest(folder, record_sources=True).meta["dicom"]
    assert recorded["frame_of_reference_uid"] == truth.uids["frame"]
    assert recorded["ct_series_instance_uid"] == truth.uids["ct_series"]
    assert recorded["rtplan_sop_instance_uid"] == truth.uids["plan"]
    assert len(recorded["ct_sop_instance_uids"]) == case.shape[0]


def test_per_beam_doses_are_summed_and_absolute_frame_offsets_read(tmp_path):
    folder, truth = _variant(tmp_path, orientation="FFS", beam_weights=(0.3, 0.7),
                             gfov="absolute")
    case = ingest(folder)
    assert case.meta["dicom"]["dose_summation"] == "BEAM"
    assert case.meta["dicom"]["rtdose_files"] == 2
    assert (np.abs(case.dose - truth.dose) / truth.dose).max() < 0.01


def test_fast_dose_coverage_agrees_with_itk_on_a_partial_dose_grid(tmp_path):
    from vmatdose.data.ingest import dicom_dose
    from vmatdose.data.ingest.dicom_ct import plan_ct_series
    from vmatdose.data.ingest.dicom_files import scan_folder

    partial = GridSpec((5, 30, 35), (3.0, 3.0, 3.3), (-10.0, -30.0, -20.0))
    for orientation in ("HFS", "FFS"):
        folder, _ = _variant(tmp_path / orientation, orientation=orientation, dose_grid=partial)
        files = scan_folder(folder)
        grid = plan_ct_series(files, files.of("CT")).grid
        image, _ = dicom_dose.read_dose_image(files, files.of("RTDOSE")[0][0])
        dose, covered = dicom_dose.resample_to_grid(image, grid)
        assert 0 < covered.sum() < covered.size
        assert np.array_equal(covered, dicom_dose._covered_by_itk(image, grid))
        full = dicom_dose._resample(image, grid.shape, grid.spacing_mm, grid.origin_mm)
        np.testing.assert_allclose(dose, full, atol=1e-4)


def test_prescriptions_from_the_plan_win_and_the_protocol_fills_the_rest(tmp_path):
    folder, _ = _variant(tmp_path, plan_prescriptions={"PTV70": 72.0})
    case = ingest(folder)
    assert case.prescriptions_gy == {"PTV70": 72.0, "PTV56": 56.0}
    assert case.meta["prescription_source"] == "rtplan+protocol"
    assert any("differ from protocol prostate_sib: PTV70 72 Gy" in w
               for w in case.meta["warnings"])
    (folder / "RP_plan.dcm").unlink()
    protocol = dataclasses.replace(PROSTATE, prescriptions_gy={"PTV70": 74.0, "PTV56": 60.0},
                                   fractions=20)
    case = ingest(folder, protocol=protocol)
    assert case.prescriptions_gy == {"PTV70": 74.0, "PTV56": 60.0} and case.fractions == 20
    assert case.meta["prescription_source"] == "protocol"


def test_missing_slice_is_interpolated_and_reported(tmp_path):
    folder, truth = _variant(tmp_path, skip_slices=(7,))
    case = ingest(folder)
    assert case.shape == truth.ct.shape and case.meta["missing_slices"] == 1
    assert any("missing CT slice" in w for w in case.meta["warnings"])
    expected = (truth.ct[6].astype(float) + truth.ct[8]) / 2
    np.testing.assert_allclose(case.ct[7], np.rint(expected), atol=1)
    assert dice(case.mask("PTV70"), truth.masks["PTV70"]) > 0.98


# ----------------------------------------------------------------- privacy


def test_no_patient_name_id_or_birth_date_in_case_file_summary_or_logs(tmp_path, caplog):
    folder, truth = _variant(tmp_path / "in", structures=("Body", "PTV70"))  # skipped
    good, _ = _variant(tmp_path / "in2")
    caplog.set_level(logging.DEBUG)
    jobs = [(case_id_for_folder(f, "s3cret"), f) for f in (folder, good)]
    convert = functools.partial(ingest_dicom_case, settings=SETTINGS)
    summary = convert_cases(jobs, convert, tmp_path / "out", num_workers=1,
                            progress=False, summary_path=tmp_path / "out" / "summary.json",
                            record_sources=False)
    assert summary["counts"]["processed"] == 1 and summary["counts"]["failed"] == 1
    assert "pt: missing required target(s) PTV56" in summary["failed"][0]["error"]
    case_file = tmp_path / "out" / f"{jobs[1][0]}.npz"
    with zipfile.ZipFile(case_file) as archive:
        blob = b"".join(archive.read(name) for name in archive.namelist())
    texts = [blob, (tmp_path / "out" / "summary.json").read_bytes(), caplog.text.encode()]
    uids = dicom_uids(good) | dicom_uids(folder)
    for secret in (PATIENT_NAME, PATIENT_ID, PATIENT_BIRTH_DATE, "Doe", *uids):
        assert not any(secret.encode() in text for text in texts), secret
    case = load_case(case_file)
    assert case.case_id == jobs[1][0] == anonymous_case_id(PATIENT_ID, truth_study(good), "s3cret")


def truth_study(folder) -> str:
    import pydicom

    return str(pydicom.dcmread(next(folder.glob("CT_*.dcm")), stop_before_pixels=True)
               .StudyInstanceUID)


def test_case_id_mapping_file(tmp_path):
    folder, _ = _variant(tmp_path)
    mapping = tmp_path / "ids.csv"
    mapping.write_text(f"key,case_id\n{PATIENT_ID},prostate_001\n")
    assert case_id_for_folder(folder, id_map=load_case_id_map(mapping)) == "prostate_001"
    mapping.write_text(json.dumps({"pt": "by_folder"}))
    mapping = mapping.rename(tmp_path / "ids.json")
    assert case_id_for_folder(folder, id_map=load_case_id_map(mapping)) == "by_folder"


# ----------------------------------------------------------------- errors and skips


def test_truncated_file_is_a_clear_error_naming_it(tmp_path):
    folder, truth = _variant(tmp_path)
    victim = truth.files["CT"][3]
    data = victim.read_bytes()
    victim.write_bytes(data[: len(data) // 2])
    with pytest.raises(DicomIngestError, match=victim.name) as err:
        ingest(folder)
    assert err.value.path == victim.name


def test_missing_rtstruct_is_a_clear_error(tmp_path):
    folder, _ = _variant(tmp_path, with_struct=False)
    with pytest.raises(DicomIngestError, match="no RTSTRUCT"):
        ingest(folder)


def test_structure_set_on_another_frame_of_reference_is_refused(tmp_path):
    folder, _ = _variant(tmp_path, struct_frame_uid="1.2.3.4.5.6.7")
    with pytest.raises(DicomIngestError, match="frame of reference") as err:
        ingest(folder)
    assert err.value.path == "RS_structures.dcm"


def test_dose_grid_not_covering_the_targets_is_refused(tmp_path):
    shifted = GridSpec((8, 40, 15), (4.0, 3.0, 3.0), (-20.0, -70.0, -80.0))  # x < -38 mm only
    folder, _ = _variant(tmp_path, dose_grid=shifted)
    with pytest.raises(DicomIngestError, match="does not cover the CT region of PTV70: 100.0 %"):
        ingest(folder)


def test_case_without_the_required_targets_fails_naming_the_folder(tmp_path):
    folder, _ = _variant(tmp_path, structures=("Body", "PTV70", "Rectum"),
                         plan_prescriptions={"PTV70": 70.0})
    with pytest.raises(MissingTargetsError,
                       match=r"^pt: missing required target\(s\) PTV56 \(protocol "
                             r"prostate_sib needs PTV70 and PTV56; found targets: PTV70") as err:
        ingest(folder)
    assert err.value.path == "pt"


def test_empty_salt_is_refused_with_how_to_set_it(tmp_path):
    folder, _ = _variant(tmp_path)
    for salt in ("", "  "):
        with pytest.raises(SaltError, match="export VMATDOSE_ID_SALT="):
            ingest(folder, id_salt=salt)
        with pytest.raises(SaltError, match="pt: not in the case-id map"):
            case_id_for_folder(folder, salt)
    assert ingest_dicom_case(folder, "given_id", dataclasses.replace(SETTINGS, id_salt="")
                             ).case_id == "given_id"  # a mapped id needs no salt
    assert case_id_for_folder(folder, "", id_map={"pt": "mapped"}) == "mapped"


def test_missing_dose_is_a_skip_unless_allowed(tmp_path):
    folder, _ = _variant(tmp_path, with_dose=False)
    with pytest.raises(SkipCase, match="no RTDOSE"):
        ingest(folder)
    case = ingest(folder, require_dose=False)
    assert case.dose is None
    save_case(case, tmp_path / "c.npz")


def test_oblique_orientation_and_uneven_slices_are_clear_errors(tmp_path):
    import pydicom

    folder, truth = _variant(tmp_path)
    path = truth.files["CT"][5]
    ds = pydicom.dcmread(path)
    ds.ImagePositionPatient = [ds.ImagePositionPatient[0], ds.ImagePositionPatient[1],
                               float(ds.ImagePositionPatient[2]) + 0.9]
    ds.save_as(path)
    with pytest.raises(DicomIngestError, match="uneven CT slice spacing"):
        ingest(folder)
    shutil.rmtree(folder)
    folder, truth = _variant(tmp_path)
    for path in truth.files["CT"]:
        ds = pydicom.dcmread(path)
        ds.ImageOrientationPatient = [1, 0, 0, 0, 0.8, -0.6]
        ds.save_as(path)
    with pytest.raises(DicomIngestError, match="unsupported ImageOrientationPatient"):
        ingest(folder)


# ------------------------------------------------------------------ beam arrangement


def test_rtplan_static_fields_and_an_arc_are_read_back_as_the_case_beams(tmp_path):
    iso_xyz = (12.5, -4.0, 7.5)
    static = [{"gantry_deg": [a], "isocentre_xyz": iso_xyz, "energy_mv": 10.0}
              for a in (0.0, 72.0, 144.0, 216.0, 288.0)]
    static.append({"gantry_deg": [90.0], "isocentre_xyz": iso_xyz, "delivery": "SETUP"})
    _, _ = _variant(tmp_path / "static", beams=tuple(static))
    case = ingest(tmp_path / "static" / "pt")
    beams = case.meta["beams"]
    assert beams["gantry_deg"] == [0.0, 72.0, 144.0, 216.0, 288.0]  # the setup field left out
    assert beams["isocentre_mm"] == [7.5, -4.0, 12.5]  # DICOM (x, y, z) -> case (z, y, x)
    assert (beams["delivery"], beams["source"], beams["energy_mv"]) == ("static", "rtplan", 10.0)

    arc = [{"gantry_deg": [181.0, 270.0, 0.0, 90.0, 179.0], "rotation": "CW",
            "isocentre_xyz": iso_xyz, "couch_deg": 0.0},
           {"gantry_deg": [179.0, 90.0, 0.0], "rotation": "CC", "isocentre_xyz": iso_xyz}]
    _variant(tmp_path / "arc", beams=tuple(arc))
    beams = load_case(save_case(ingest(tmp_path / "arc" / "pt"), tmp_path / "arc.npz")).meta[
        "beams"]
    assert beams["gantry_deg"] == [181.0, 270.0, 0.0, 90.0, 179.0, 179.0, 90.0, 0.0]
    assert beams["couch_deg"] == [0.0] * 8
    assert beams["delivery"] == "arc"


@pytest.mark.parametrize("position, expected", [("FFS", [270.0, 0.0]), ("HFS", [90.0, 0.0])])
def test_rtplan_angles_are_stored_as_the_head_first_supine_direction(tmp_path, position,
                                                                      expected):
    # gantry 90 enters from the patient's left head first, from the right feet first
    beams = tuple({"gantry_deg": [a], "isocentre_xyz": (0.0, 0.0, 0.0)} for a in (90.0, 0.0))
    _variant(tmp_path, orientation=position, beams=beams)
    assert ingest(tmp_path / "pt").meta["beams"]["gantry_deg"] == expected


def test_a_plan_without_beams_leaves_the_case_without_an_arrangement(patients):
    _, _, case = patients["HFS"]
    assert "beams" not in case.meta
