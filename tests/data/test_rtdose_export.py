"""RTDOSE export: attributes, geometry, export -> ingest round trip (0.1 %), and identity
read from the source DICOM at export time (never from the case file)."""

from __future__ import annotations

import numpy as np
import pydicom
import pytest
import SimpleITK as sitk

from vmatdose.data.export.rtdose import (
    NO_SOURCE_DESCRIPTION,
    find_source_patient,
    write_rtdose,
)
from vmatdose.data.ingest.dicom import DicomIngestSettings, ingest_dicom_case
from vmatdose.data.privacy import SaltError
from vmatdose.protocol import Protocol

from conftest import make_box_case
from dicom_builders import (
    PATIENT_BIRTH_DATE,
    PATIENT_ID,
    PATIENT_NAME,
    PatientSpec,
    write_patient,
)

SALT = "export-salt"
SETTINGS = DicomIngestSettings(protocol=Protocol.load("prostate_sib"), id_salt=SALT)


@pytest.mark.parametrize("orientation", ["HFS", "FFS"])
def test_export_then_ingest_gives_the_same_dose(tmp_path, orientation):
    folder = tmp_path / "patients" / "pt"
    write_patient(folder, PatientSpec(orientation=orientation, beam_weights=(0.5, 0.5)))
    case = ingest_dicom_case(folder, settings=SETTINGS)
    rng = np.random.default_rng(0)
    predicted = (case.dose * rng.uniform(0.8, 1.2, case.shape)).astype(np.float32)
    source = find_source_patient(case.case_id, tmp_path / "patients", id_salt=SALT)
    for old in folder.glob("RD_*.dcm"):
        old.unlink()
    write_rtdose(predicted, case, folder / "RD_predicted.dcm", source=source)
    again = ingest_dicom_case(folder, settings=SETTINGS)
    assert again.meta["dicom"]["dose_summation"] == "PLAN"
    assert np.abs(again.dose - predicted).max() <= 1e-3 * predicted.max()
    assert np.array_equal(again.masks, case.masks) and again.case_id == case.case_id


@pytest.fixture
def exported(tmp_path):
    """Two FFS patients; the second one's case exported with its source found by case id."""
    root = tmp_path / "patients"
    write_patient(root / "other", PatientSpec(orientation="FFS"))
    truth = write_patient(root / "pt", PatientSpec(orientation="FFS"))
    case = ingest_dicom_case(root / "pt", settings=SETTINGS)
    source = find_source_patient(case.case_id, root, id_salt=SALT)
    path = write_rtdose(case.dose, case, tmp_path / "out" / "rd.dcm", source=source)
    return case, truth, source, pydicom.dcmread(path)


def test_exported_file_carries_the_rtdose_attributes_and_references(exported):
    case, truth, source, ds = exported
    assert source.folder.name == "pt" and "Doe" not in repr(source)
    assert ds.SOPClassUID == "1.2.840.10008.5.1.4.1.1.481.2" and ds.Modality == "RTDOSE"
    assert (ds.DoseUnits, ds.DoseType, ds.DoseSummationType) == ("GY", "PHYSICAL", "PLAN")
    assert (ds.BitsAllocated, ds.BitsStored, ds.PixelRepresentation) == (32, 32, 0)
    assert ds.pixel_array.dtype == np.uint32
    assert ds.NumberOfFrames == case.shape[0] and (ds.Rows, ds.Columns) == case.shape[1:]
    np.testing.assert_allclose([float(v) for v in ds.GridFrameOffsetVector],
                               np.arange(case.shape[0]) * case.spacing_mm[0])
    assert list(map(float, ds.ImageOrientationPatient)) == [-1, 0, 0, 0, 1, 0]
    dose = ds.pixel_array * float(ds.DoseGridScaling)
    # feet first: frames run inferior, columns towards the patient's right
    np.testing.assert_allclose(dose, case.dose[::-1, :, ::-1], atol=1e-6 * case.dose.max())


def test_identity_and_uids_come_from_the_source_dicom_not_the_case(exported):
    case, truth, _, ds = exported
    assert "frame_of_reference_uid" not in case.meta["dicom"]  # the case file has none
    assert (str(ds.PatientName), ds.PatientID, ds.PatientBirthDate) == (
        PATIENT_NAME, PATIENT_ID, PATIENT_BIRTH_DATE)
    assert ds.FrameOfReferenceUID == truth.uids["frame"]
    assert ds.StudyInstanceUID == truth.uids["study"]
    assert ds.ReferencedRTPlanSequence[0].ReferencedSOPInstanceUID == truth.uids["plan"]
    rtstruct = pydicom.dcmread(truth.files["RTSTRUCT"][0])
    assert (ds.ReferencedStructureSetSequence[0].ReferencedSOPInstanceUID
            == rtstruct.SOPInstanceUID)
    series = ds.ReferencedSeriesSequence[0]
    assert series.SeriesInstanceUID == truth.uids["ct_series"]
    assert len(series.ReferencedInstanceSequence) == case.shape[0]
    assert ds.SeriesDescription == "vmatdose predicted dose"


def test_source_lookup_needs_the_ingest_salt_and_the_right_grid(exported, tmp_path):
    case, _, source, _ = exported
    root = tmp_path / "patients"
    with pytest.raises(LookupError, match=r"none of its 2 patient folders has case id "
                                          rf"'{case.case_id}'; give the VMATDOSE_ID_SALT"):
        find_source_patient(case.case_id, root, id_salt="another-salt")
    with pytest.raises(SaltError, match="VMATDOSE_ID_SALT"):
        find_source_patient(case.case_id, root, id_salt="")
    by_map = find_source_patient("mapped_7", root, id_salt="", case_id_map={"pt": "mapped_7"})
    assert by_map.folder.name == "pt"
    box = make_box_case()
    with pytest.raises(ValueError, match="is not the grid of case 'box'.*wrong source patient"):
        write_rtdose(box.dose, box, tmp_path / "x.dcm", source=source)
    assert not (tmp_path / "x.dcm").exists()


def test_case_without_source_exports_the_case_id_and_says_so(tmp_path):
    case = make_box_case()
    first = write_rtdose(case.dose, case, tmp_path / "a.dcm")
    second = write_rtdose(case.dose, case, tmp_path / "b.dcm")
    a, b = pydicom.dcmread(first), pydicom.dcmread(second)
    assert a.PatientID == a.PatientName == "box" and a.PatientBirthDate == ""
    assert a.SeriesDescription == NO_SOURCE_DESCRIPTION and len(NO_SOURCE_DESCRIPTION) <= 64
    assert a.FrameOfReferenceUID == b.FrameOfReferenceUID  # stable per case id
    assert "ReferencedRTPlanSequence" not in a and "ReferencedSeriesSequence" not in a
    image = sitk.ReadImage(str(first))
    np.testing.assert_allclose(image.GetOrigin(), case.origin_mm[::-1])
    np.testing.assert_allclose(image.GetSpacing(), case.spacing_mm[::-1])
    read = sitk.GetArrayFromImage(image) * float(a.DoseGridScaling)
    np.testing.assert_allclose(read, case.dose, atol=1e-6 * case.dose.max())


def test_export_refuses_a_dose_off_the_case_grid_or_not_finite(tmp_path):
    case = make_box_case()
    with pytest.raises(ValueError, match="not the case grid"):
        write_rtdose(case.dose[1:], case, tmp_path / "x.dcm")
    bad = case.dose.copy()
    bad[0, 0, 0] = np.nan
    with pytest.raises(ValueError, match="non-finite"):
        write_rtdose(bad, case, tmp_path / "x.dcm")
    assert not list(tmp_path.iterdir())
