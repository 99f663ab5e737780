"""``predict dicom_dir=<patients>``: ingest on the fly, one RTDOSE per patient, identity
from the patient's own DICOM."""

import json

import numpy as np
import pydicom
import pytest
import SimpleITK as sitk

from conftest import last_line, run_main
from dicom_builders import PATIENT_ID, PATIENT_NAME, PatientSpec, write_patient


@pytest.fixture(scope="module")
def patients(tmp_path_factory):
    root = tmp_path_factory.mktemp("dicom_patients")
    truths = {name: write_patient(root / name, PatientSpec(orientation=orientation))
              for name, orientation in (("p_hfs", "HFS"), ("p_ffs", "FFS"))}
    return root, truths


def test_predict_from_dicom_writes_one_rtdose_per_patient_on_its_rtdose_grid(
        trained_run, patients, tmp_path):
    _, _, ckpt = trained_run
    root, truths = patients
    out = tmp_path / "out"
    result = run_main("vmatdose.predict", f"ckpt_path={ckpt}", f"dicom_dir={root}",
                     f"output_dir={out}", "accelerator=cpu", cwd=tmp_path)
    assert result.returncode == 0, result.stdout
    rtdoses = sorted(out.glob("*_rtdose.dcm"))
    assert len(rtdoses) == 2 and len(list(out.glob("*.npz"))) == 2
    assert not list(out.rglob("cases")), "no case files are left behind by default"
    seen_frames = set()
    for path in rtdoses:
        ds = pydicom.dcmread(path)
        assert (str(ds.PatientName), ds.PatientID) == (PATIENT_NAME, PATIENT_ID)
        truth = next(t for t in truths.values() if t.uids["frame"] == ds.FrameOfReferenceUID)
        seen_frames.add(ds.FrameOfReferenceUID)
        assert ds.StudyInstanceUID == truth.uids["study"]
        own = sitk.ReadImage(str(truth.files["RTDOSE"][0]))  # the patient's own RTDOSE
        dose = sitk.ReadImage(str(path))
        assert dose.GetSize() == own.GetSize()
        np.testing.assert_allclose(dose.GetSpacing(), own.GetSpacing(), atol=1e-4)
        np.testing.assert_allclose(dose.GetDirection(), own.GetDirection(), atol=1e-6)
        # the same corner voxels in patient space: the dose lies on the RTDOSE grid
        for corner in ([0, 0, 0], [s - 1 for s in own.GetSize()]):
            np.testing.assert_allclose(dose.TransformIndexToPhysicalPoint(corner),
                                       own.TransformIndexToPhysicalPoint(corner), atol=1e-3)
        case_id = path.name.removesuffix("_rtdose.dcm")
        with np.load(out / f"{case_id}.npz") as prediction:
            grid = json.loads(str(prediction["grid"]))
        assert grid["on"] == "case" and grid["case_grid"] == "training"
        assert grid["source_grids"]["rtdose"]["size"] == list(own.GetSize())
        values = sitk.GetArrayFromImage(dose) * float(ds.DoseGridScaling)
        assert 10.0 < values.max() < 110.0  # a real prediction in Gy, not zeros
    assert len(seen_frames) == 2


def test_predict_needs_cases_or_dicom_but_not_both(trained_run, patients, tmp_path):
    _, _, ckpt = trained_run
    root, _ = patients
    both = run_main("vmatdose.predict", f"ckpt_path={ckpt}", f"dicom_dir={root}",
                   f"cases_dir={root}", f"output_dir={tmp_path / 'o'}", cwd=tmp_path)
    assert both.returncode == 1
    assert last_line(both.stdout) == ("error: give cases_dir (case files) or dicom_dir "
                                      "(DICOM-RT patient folders), not both")


def test_case_files_export_rtdose_with_identity_from_source_dicom(trained_run, patients,
                                                                   tmp_path):
    from omegaconf import OmegaConf

    from vmatdose.data.case import save_case
    from vmatdose.data.ingest.dicom import DicomIngestSettings, ingest_dicom_case
    from vmatdose.inference.run import run_prediction
    from vmatdose.protocol import Protocol

    _, _, ckpt = trained_run
    root, truths = patients
    settings = DicomIngestSettings(protocol=Protocol.load("prostate_sib"), id_salt="s3cret")
    case = ingest_dicom_case(root / "p_hfs", settings=settings)
    save_case(case, tmp_path / "cases" / f"{case.case_id}.npz")
    cfg = {"ckpt_path": str(ckpt), "cases_dir": str(tmp_path / "cases"), "accelerator": "cpu",
           "output_dir": str(tmp_path / "out"), "export_rtdose": True,
           "source_dicom": str(root), "id_salt": "s3cret"}
    run_prediction(OmegaConf.create(cfg))
    ds = pydicom.dcmread(tmp_path / "out" / f"{case.case_id}_rtdose.dcm")
    assert ds.PatientID == PATIENT_ID
    assert ds.FrameOfReferenceUID == truths["p_hfs"].uids["frame"]
    with pytest.raises(ValueError, match="VMATDOSE_ID_SALT"):
        run_prediction(OmegaConf.create({**cfg, "id_salt": "wrong",
                                         "output_dir": str(tmp_path / "o2")}))
