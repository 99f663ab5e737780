"""predict: a trained checkpoint -> prediction .npz files and DICOM RTDOSE, which
evaluate reads back."""

from __future__ import annotations

import numpy as np
import pydicom
import pytest
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from vmatdose.config import CONFIG_DIR
from vmatdose.data.case import list_case_files, load_case
from vmatdose.evaluate import run_evaluation
from vmatdose.predict import run_prediction
from vmatdose.train import run

from conftest import smoke_config


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    root = tmp_path_factory.mktemp("predict")
    run_dir = root / "run"
    run(smoke_config(root, run_dir, "evaluate_after_training=false"))
    return root, run_dir / "checkpoints" / "last.ckpt"


def test_predictions_and_rtdose_for_every_case(trained, tmp_path):
    root, ckpt = trained
    cases_dir = root / "data" / "phantom_smoke"
    out = tmp_path / "pred"
    written = run_prediction(OmegaConf.create({"ckpt_path": str(ckpt),
                                               "cases_dir": str(cases_dir),
                                               "output_dir": str(out), "export_rtdose": True,
                                               "accelerator": "cpu"}))
    cases = list_case_files(cases_dir)
    assert len(written) == 2 * len(cases) == 8
    case = load_case(cases[0])
    with np.load(out / f"{case.case_id}.npz") as data:
        dose = data["dose"]
        assert dose.shape == case.shape and np.all(np.isfinite(dose)) and dose.min() >= 0
        np.testing.assert_allclose(data["spacing_mm"], case.spacing_mm)
    rtdose = pydicom.dcmread(out / f"{case.case_id}_rtdose.dcm")
    assert (rtdose.Modality, rtdose.DoseUnits, rtdose.DoseType) == ("RTDOSE", "GY", "PHYSICAL")
    assert rtdose.BitsAllocated == 32
    stored = rtdose.pixel_array * float(rtdose.DoseGridScaling)
    assert stored.shape == dose.shape
    assert abs(stored.max() - dose.max()) <= 1e-3 * dose.max()
    assert abs(stored.sum() - dose.sum()) <= 1e-3 * dose.sum()


def test_evaluate_reads_a_folder_of_predictions(trained, tmp_path):
    root, ckpt = trained
    cases_dir = root / "data" / "phantom_smoke"
    out = tmp_path / "pred"
    run_prediction(OmegaConf.create({"ckpt_path": str(ckpt), "cases_dir": str(cases_dir),
                                     "output_dir": str(out), "accelerator": "cpu"}))
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        cfg = compose("eval", overrides=[f"paths.root_dir={root}", f"data.cases_dir={cases_dir}",
                                         f"predictions_dir={out}", "split=all",
                                         "evaluation=fast"])
    table, summary = run_evaluation(cfg, tmp_path / "eval")
    assert len(table) == 4 and summary["n_cases"] == 4
    case = load_case(list_case_files(cases_dir)[0])
    with np.load(out / f"{case.case_id}.npz") as data:
        mae = np.abs(data["dose"] - case.dose)[case.body > 0].mean()
    row = table.set_index("case_id").loc[case.case_id]
    assert row["mae_body_gy"] == pytest.approx(mae, rel=1e-5)
