"""predict: a trained checkpoint -> prediction .npz files and DICOM RTDOSE, which
evaluate reads back; cases that do not match the checkpoint are refused by name."""

from __future__ import annotations

import json

import numpy as np
import pydicom
import pytest
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from vmatdose.config import CONFIG_DIR
from vmatdose.data.case import list_case_files, load_case
from vmatdose.data.validation import CaseSetError
from vmatdose.evaluation.pipeline import run_evaluation
from vmatdose.inference.run import run_prediction
from vmatdose.inference.writers import WRITERS, chosen_writers

from case_variants import first_case, without_structure, write
from conftest import last_line, run_main


def _predict(ckpt, cases_dir, out, **extra):
    return run_prediction(OmegaConf.create({"ckpt_path": str(ckpt), "cases_dir": str(cases_dir),
                                            "output_dir": str(out), "accelerator": "cpu",
                                            **extra}))


def test_predictions_and_rtdose_for_every_case(trained_run, tmp_path):
    root, _, ckpt = trained_run
    cases_dir = root / "data" / "phantom_smoke"
    out = tmp_path / "pred"
    # rtdose_grid_mm=None: a case without an RTDOSE of its own exports on its own grid
    written = _predict(ckpt, cases_dir, out, export_rtdose=True, rtdose_grid_mm=None)
    cases = list_case_files(cases_dir)
    assert len(written) == 2 * len(cases) == 8
    case = load_case(cases[0])
    with np.load(out / f"{case.case_id}.npz") as data:
        dose = data["dose"]
        assert dose.shape == case.shape and np.all(np.isfinite(dose)) and dose.min() >= 0
        np.testing.assert_allclose(data["spacing_mm"], case.spacing_mm)
        grid = json.loads(str(data["grid"]))
        assert grid["on"] == "case" and grid["shape"] == list(case.shape)
    rtdose = pydicom.dcmread(out / f"{case.case_id}_rtdose.dcm")
    assert (rtdose.Modality, rtdose.DoseUnits, rtdose.DoseType) == ("RTDOSE", "GY", "PHYSICAL")
    assert rtdose.BitsAllocated == 32
    stored = rtdose.pixel_array * float(rtdose.DoseGridScaling)
    assert stored.shape == dose.shape
    assert abs(stored.max() - dose.max()) <= 1e-3 * dose.max()
    assert abs(stored.sum() - dose.sum()) <= 1e-3 * dose.sum()


def test_evaluate_reads_a_folder_of_predictions(trained_run, tmp_path):
    root, _, ckpt = trained_run
    cases_dir = root / "data" / "phantom_smoke"
    out = tmp_path / "pred"
    _predict(ckpt, cases_dir, out)
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        cfg = compose("eval", overrides=[f"paths.root_dir={root}", f"data.cases_dir={cases_dir}",
                                         f"predictions_dir={out}", "split=all",
                                         "evaluation=fast"])
    table, summary = run_evaluation(cfg, tmp_path / "eval", "config")
    assert len(table) == 4 and summary["n_cases"] == 4
    case = load_case(list_case_files(cases_dir)[0])
    with np.load(out / f"{case.case_id}.npz") as data:
        mae = np.abs(data["dose"] - case.dose)[case.body > 0].mean()
    row = table.set_index("case_id").loc[case.case_id]
    assert row["mae_body_gy"] == pytest.approx(mae, rel=1e-5)


def test_writers_follow_the_export_keys():
    assert chosen_writers() == [WRITERS["npz"]]
    assert chosen_writers(export_rtdose=True, export_openkbp=True) == [
        WRITERS["npz"], WRITERS["rtdose"], WRITERS["openkbp"]]


def test_source_dicom_without_rtdose_export_is_refused(trained_run, tmp_path):
    root, _, ckpt = trained_run
    with pytest.raises(ValueError, match="source_dicom is read by the RTDOSE export only"):
        _predict(ckpt, root / "data" / "phantom_smoke", tmp_path, source_dicom=str(tmp_path))


def test_a_case_missing_a_required_target_is_refused_before_any_prediction(trained_run,
                                                                           tmp_path):
    root, _, ckpt = trained_run
    good = first_case(root / "data" / "phantom_smoke")
    write(good, tmp_path / "cases")
    missing = without_structure(good, "PTV56")
    missing.case_id = "no_ptv56"
    bad = write(missing, tmp_path / "cases")
    result = run_main("vmatdose.predict", f"ckpt_path={ckpt}", f"cases_dir={tmp_path / 'cases'}",
                     f"output_dir={tmp_path / 'pred'}", "accelerator=cpu", cwd=tmp_path)
    assert result.returncode == 1
    assert last_line(result.stdout) == (
        f"error: 1 case file not matching the checkpoint: {bad}: missing required target "
        "PTV56 (prostate_sib needs PTV70 and PTV56)")
    assert not list((tmp_path / "pred").glob("*.npz")), "nothing is predicted"


def test_refused_cases_are_all_named_in_one_error(trained_run, tmp_path):
    root, _, ckpt = trained_run
    good = first_case(root / "data" / "phantom_smoke")
    broken = tmp_path / "cases" / "broken.npz"
    broken.parent.mkdir()
    broken.write_bytes(b"not a zip")
    missing = without_structure(good, "PTV70")
    missing.case_id = "no_ptv70"
    write(missing, tmp_path / "cases")
    with pytest.raises(CaseSetError) as err:
        _predict(ckpt, tmp_path / "cases", tmp_path / "pred")
    message = str(err.value)
    assert message.startswith("2 case files not matching the checkpoint: ")
    assert f"{broken}: not a readable case file" in message
    assert f"{tmp_path / 'cases' / 'no_ptv70.npz'}: missing required target PTV70" in message


def test_predict_takes_the_organ_scale_and_refuses_pooling_grids_the_model_cannot_use(
        trained_run, tmp_path):
    root, _, ckpt = trained_run
    cases_dir = root / "data" / "phantom_smoke"
    files = {p.name: p.read_bytes() for p in cases_dir.iterdir()}
    _predict(ckpt, cases_dir, tmp_path / "plain")
    scaled = run_main("vmatdose.predict", f"ckpt_path={ckpt}", f"cases_dir={cases_dir}",
                      f"output_dir={tmp_path / 'scaled'}", "accelerator=cpu",
                      "oar_dose_scale={Rectum:0.9,Bladder:0.9,Femur_L:0.9,Femur_R:0.9,Bowel:0.9}",
                      cwd=tmp_path)  # one factor per organ, from the command line
    assert scaled.returncode == 0, scaled.stdout
    case = first_case(cases_dir)
    with np.load(tmp_path / "plain" / f"{case.case_id}.npz") as plain, \
            np.load(tmp_path / "scaled" / f"{case.case_id}.npz") as out:
        plain_dose, dose = plain["dose"], out["dose"]
    targets = np.logical_or.reduce([case.mask(t) > 0 for t in ("PTV70", "PTV56")])
    oars = ("Rectum", "Bladder", "Femur_L", "Femur_R", "Bowel")  # conf/protocol/prostate_sib
    organs = np.logical_or.reduce([case.mask(o) > 0 for o in oars if o in case.structures])
    organs &= ~targets
    assert organs.any() and plain_dose[organs].max() > 1.0
    np.testing.assert_array_equal(dose[organs], plain_dose[organs] * np.float32(0.9))
    np.testing.assert_array_equal(dose[~organs], plain_dose[~organs])
    # the phantom network works on the case grid: no pooling grids to average over
    refused = run_main("vmatdose.predict", f"ckpt_path={ckpt}", f"cases_dir={cases_dir}",
                       f"output_dir={tmp_path / 'grids'}", "accelerator=cpu",
                       "tta_pool_grids=2", cwd=tmp_path)
    assert refused.returncode == 1
    assert last_line(refused.stdout) == (
        f"error: tta_pool_grids=2 for {ckpt}: pooling grids need a network at a coarser grid "
        "(model.resolution_factor > 1)")
    assert not (tmp_path / "grids").exists()
    assert {p.name: p.read_bytes() for p in cases_dir.iterdir()} == files  # read, not written
