"""RTDOSE export: required attributes, geometry, and export -> ingest round trip (0.1 %)."""

from __future__ import annotations

import numpy as np
import pydicom
import pytest
import SimpleITK as sitk

from vmatdose.data.export.rtdose import write_rtdose
from vmatdose.data.ingest.dicom import ingest_dicom_case

from conftest import make_box_case
from dicom_builders import PatientSpec, write_patient


@pytest.mark.parametrize("orientation", ["HFS", "FFS"])
def test_export_then_ingest_gives_the_same_dose(tmp_path, orientation):
    folder = tmp_path / "pt"
    write_patient(folder, PatientSpec(orientation=orientation, beam_weights=(0.5, 0.5)))
    case = ingest_dicom_case(folder)
    rng = np.random.default_rng(0)
    predicted = (case.dose * rng.uniform(0.8, 1.2, case.shape)).astype(np.float32)
    for old in folder.glob("RD_*.dcm"):
        old.unlink()
    write_rtdose(predicted, case, folder / "RD_predicted.dcm")
    again = ingest_dicom_case(folder)
    assert again.meta["dicom"]["dose_summation"] == "PLAN"
    assert np.abs(again.dose - predicted).max() <= 1e-3 * predicted.max()
    assert np.array_equal(again.masks, case.masks) and again.case_id == case.case_id


def test_exported_file_carries_the_rtdose_attributes_and_references(tmp_path):
    folder = tmp_path / "pt"
    truth = write_patient(folder, PatientSpec(orientation="FFS"))
    case = ingest_dicom_case(folder)
    path = write_rtdose(case.dose, case, tmp_path / "out" / "rd.dcm")
    ds = pydicom.dcmread(path)
    assert ds.SOPClassUID == "1.2.840.10008.5.1.4.1.1.481.2" and ds.Modality == "RTDOSE"
    assert (ds.DoseUnits, ds.DoseType, ds.DoseSummationType) == ("GY", "PHYSICAL", "PLAN")
    assert (ds.BitsAllocated, ds.BitsStored, ds.PixelRepresentation) == (32, 32, 0)
    assert ds.pixel_array.dtype == np.uint32
    assert ds.NumberOfFrames == case.shape[0] and (ds.Rows, ds.Columns) == case.shape[1:]
    np.testing.assert_allclose([float(v) for v in ds.GridFrameOffsetVector],
                               np.arange(case.shape[0]) * case.spacing_mm[0])
    assert ds.FrameOfReferenceUID == truth.uids["frame"]
    assert ds.StudyInstanceUID == truth.uids["study"]
    assert ds.ReferencedRTPlanSequence[0].ReferencedSOPInstanceUID == truth.uids["plan"]
    series = ds.ReferencedSeriesSequence[0]
    assert series.SeriesInstanceUID == truth.uids["ct_series"]
    assert len(series.ReferencedInstanceSequence) == case.shape[0]
    assert list(map(float, ds.ImageOrientationPatient)) == [-1, 0, 0, 0, 1, 0]
    assert ds.PatientID == case.case_id and ds.PatientName == case.case_id
    dose = ds.pixel_array * float(ds.DoseGridScaling)
    # feet first: frames run inferior, columns towards the patient's right
    np.testing.assert_allclose(dose, case.dose[::-1, :, ::-1], atol=1e-6 * case.dose.max())


def test_case_without_dicom_source_exports_a_readable_head_first_dose(tmp_path):
    case = make_box_case()
    first = write_rtdose(case.dose, case, tmp_path / "a.dcm")
    second = write_rtdose(case.dose, case, tmp_path / "b.dcm")
    a, b = pydicom.dcmread(first), pydicom.dcmread(second)
    assert a.FrameOfReferenceUID == b.FrameOfReferenceUID  # stable per case id
    assert "ReferencedRTPlanSequence" not in a
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
