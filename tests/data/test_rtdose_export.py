"""RTDOSE export: attributes, the patient's own RTDOSE grid (else 2.5 mm over the body),
export -> ingest round trip, and identity read from the source DICOM at export time (never
from the case file)."""

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
from vmatdose.data.ingest.training_grid import GridSettings
from vmatdose.data.privacy import SaltError
from vmatdose.protocol import Protocol

from conftest import make_box_case
from dicom_builders import (
    PATIENT_BIRTH_DATE,
    PATIENT_ID,
    PATIENT_NAME,
    GridSpec,
    PatientSpec,
    dose_function,
    head_neck_spec,
    write_patient,
)

SALT = "export-salt"
SETTINGS = DicomIngestSettings(protocol=Protocol.load("prostate_sib"), id_salt=SALT)


@pytest.mark.parametrize("orientation", ["HFS", "FFS"])
def test_export_then_ingest_gives_the_same_dose(tmp_path, orientation):
    folder = tmp_path / "patients" / "pt"
    write_patient(folder, PatientSpec(orientation=orientation, beam_weights=(0.5, 0.5)))
    case = ingest_dicom_case(folder, settings=SETTINGS)
    predicted = (case.dose * 1.1).astype(np.float32)
    source = find_source_patient(case.case_id, tmp_path / "patients", id_salt=SALT)
    for old in folder.glob("RD_*.dcm"):
        old.unlink()
    write_rtdose(predicted, case, folder / "RD_predicted.dcm", source=source)
    again = ingest_dicom_case(folder, settings=SETTINGS)
    assert again.meta["dicom"]["dose_summation"] == "PLAN"
    # CT grid -> the patient's RTDOSE grid -> CT grid: linear interpolation twice
    inside = case.body > 0
    assert np.abs(again.dose - predicted)[inside].max() <= 0.01 * predicted.max()
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
    # on the grid of the patient's own RTDOSE (feet first: frames run inferior, columns
    # towards the patient's right), the dose matching it within interpolation
    own = pydicom.dcmread(truth.files["RTDOSE"][0])
    for keyword in ("ImagePositionPatient", "ImageOrientationPatient", "PixelSpacing",
                    "GridFrameOffsetVector"):
        assert list(map(float, ds[keyword].value)) == list(map(float, own[keyword].value))
    assert (ds.NumberOfFrames, ds.Rows, ds.Columns) == (own.NumberOfFrames, own.Rows,
                                                         own.Columns)
    dose = ds.pixel_array * float(ds.DoseGridScaling)
    reference = own.pixel_array * float(own.DoseGridScaling)
    inside = dose > 0  # the part of the dose grid the CT covers
    assert inside.mean() > 0.5
    error = np.abs(dose - reference)[inside]
    # interpolated twice (RTDOSE grid -> CT grid -> RTDOSE grid); at most 2 % where the
    # dose grid overhangs the CT and the edge voxels stand in
    assert error.mean() < 0.002 * reference.max() and error.max() < 0.02 * reference.max()


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
    with pytest.raises(ValueError, match="is not the CT grid of case 'box'.*wrong source "
                                         "patient"):
        write_rtdose(box.dose, box, tmp_path / "x.dcm", source=source)
    assert not (tmp_path / "x.dcm").exists()


def test_case_without_source_exports_the_case_id_and_says_so(tmp_path):
    case = make_box_case()
    first = write_rtdose(case.dose, case, tmp_path / "a.dcm", grid_mm=None)  # case grid
    second = write_rtdose(case.dose, case, tmp_path / "b.dcm", grid_mm=None)
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


def test_case_without_an_rtdose_gets_a_2_5_mm_grid_over_its_body(tmp_path):
    case = make_box_case((16, 20, 24), (2.0, 2.5, 3.0))  # body: [1:15, 2:18, 2:22]
    path = write_rtdose(case.dose, case, tmp_path / "a.dcm")
    ds = pydicom.dcmread(path)
    # body voxel centres span z 2..28, y 5..42.5, x 6..63 mm
    assert list(map(float, ds.ImagePositionPatient)) == [6.0, 5.0, 2.0]
    assert list(map(float, ds.PixelSpacing)) == [2.5, 2.5]
    assert (ds.NumberOfFrames, ds.Rows, ds.Columns) == (12, 16, 24)  # 27.5, 37.5, 57.5 mm
    dose = ds.pixel_array * float(ds.DoseGridScaling)
    # 10 Gy body, 56 / 70 Gy cubes: values between them only at their edges
    assert dose.max() == pytest.approx(70.0, rel=1e-6)
    assert np.isclose(dose, 10.0, atol=1e-4).mean() > 0.5


@pytest.mark.parametrize("orientation", ["HFS", "FFS"])
def test_training_grid_case_exports_on_the_patients_own_rtdose_grid(tmp_path, orientation):
    ct = GridSpec((40, 150, 150), (2.0, 1.0, 1.0), (-40.0, -75.0, -75.0))
    dose_grid = GridSpec((33, 61, 61), (2.5, 2.5, 2.5), (-41.0, -76.0, -76.0))
    folder = tmp_path / "patients" / "pt"
    write_patient(folder, head_neck_spec(ct=ct, dose_grid=dose_grid, orientation=orientation))
    settings = DicomIngestSettings(protocol=Protocol.load("head_neck"), id_salt=SALT,
                                   grid=GridSettings((2.5, 2.5, 2.5)))
    case = ingest_dicom_case(folder, settings=settings)
    assert case.shape != (33, 61, 61)  # cropped to the body on its own 2.5 mm grid
    # a smooth "prediction" on the case grid: the analytic dose
    z, y, x = (o + s * np.arange(n) for o, s, n in zip(case.origin_mm, case.spacing_mm,
                                                        case.shape))
    zz, yy, xx = np.meshgrid(z, y, x, indexing="ij")
    predicted = dose_function(xx, yy, zz, ct.centre_xy()).astype(np.float32)
    source = find_source_patient(case.case_id, tmp_path / "patients", id_salt=SALT)
    ds = pydicom.dcmread(write_rtdose(predicted, case, tmp_path / "rd.dcm", source=source))
    own = pydicom.dcmread(next(folder.glob("RD_*.dcm")))
    for keyword in ("ImagePositionPatient", "ImageOrientationPatient", "PixelSpacing",
                    "GridFrameOffsetVector"):
        assert list(map(float, ds[keyword].value)) == list(map(float, own[keyword].value))
    assert (ds.NumberOfFrames, ds.Rows, ds.Columns) == (33, 61, 61)
    assert (own.Rows, own.Columns) == (61, 61)
    image = sitk.ReadImage(str(tmp_path / "rd.dcm"))
    exported = sitk.GetArrayFromImage(image) * float(ds.DoseGridScaling)  # (z, y, x) ITK
    zd, yd, xd = dose_grid.axes()
    zz, yy, xx = np.meshgrid(zd, yd, xd, indexing="ij")
    reference = dose_function(xx, yy, zz, ct.centre_xy())
    if orientation == "FFS":  # stored frames inferior first, columns to the right
        reference = reference[::-1, :, ::-1]
    low, high = case.origin_mm, case.origin_mm + (np.asarray(case.shape) - 1) * case.spacing_mm
    within = np.ones(zz.shape, bool)  # RTDOSE voxels inside the case grid
    for axis, values in enumerate((zz, yy, xx)):
        within &= (values >= low[axis] - 1e-6) & (values <= high[axis] + 1e-6)
    if orientation == "FFS":
        within = within[::-1, :, ::-1]
    assert within.mean() > 0.3 and np.all(exported[within] > 0)
    # linear interpolation of a smooth dose between 2.5 mm grids
    assert np.abs(exported - reference)[within].max() < 0.2
    # beyond the case's crop (body + 10 mm): the edge voxels for one voxel, then 0
    near = np.ones(zz.shape, bool)
    for axis, values in enumerate((zz, yy, xx)):
        step = case.spacing_mm[axis]
        near &= (values > low[axis] - 2 * step) & (values < high[axis] + 2 * step)
    if orientation == "FFS":
        near = near[::-1, :, ::-1]
    assert (~near).sum() > 1000 and np.all(exported[~near] == 0)
