"""Planning input checks that need no planning engine: the missing-extra message, and the
errors every case gets before any optimisation (no prediction, no targets, too large)."""

from __future__ import annotations

import sys

import numpy as np
import pytest

from vmatdose.data.beams import BeamArrangement
from vmatdose.data.case import save_case
from vmatdose.errors import InputError
from vmatdose.inference.predictions import save_prediction
from vmatdose.planning.engine import INSTALL_COMMAND, PlanningEngineMissing, require_pyradplan
from vmatdose.planning.preflight import (
    DIVERGENCE,
    check_cases,
    estimate_bixels,
    estimate_entries,
)
from vmatdose.planning.run import run_planning
from vmatdose.planning.settings import PlanSettings
from vmatdose.protocol import Protocol

from conftest import last_line, make_box_case, run_main


@pytest.fixture(scope="module")
def prostate() -> dict:
    return Protocol.load("prostate_sib").to_dict()


def _write(tmp_path, cases, predict=True):
    cases_dir, pred_dir = tmp_path / "cases", tmp_path / "pred"
    for case in cases:
        save_case(case, cases_dir / f"{case.case_id}.npz")
        if predict:
            save_prediction(case, case.dose, None, pred_dir / f"{case.case_id}.npz")
    pred_dir.mkdir(exist_ok=True)
    return cases_dir, pred_dir


def _cfg(protocol, cases_dir, pred_dir, out, **planning):
    return {"cases_dir": str(cases_dir), "predictions_dir": str(pred_dir),
            "output_dir": str(out), "protocol": protocol,
            "planning": {"progress": False, **planning}}


def test_missing_engine_names_the_install_command(monkeypatch):
    monkeypatch.setitem(sys.modules, "pyRadPlan", None)  # import now raises ImportError
    with pytest.raises(PlanningEngineMissing) as err:
        require_pyradplan()
    assert INSTALL_COMMAND in str(err.value)
    assert 'pip install -e ".[plan]"' in str(err.value)
    assert isinstance(err.value, InputError)  # the entry point prints it as one line


def test_case_without_prediction_is_refused_before_planning(tmp_path, prostate):
    good, missing = make_box_case(case_id="good"), make_box_case(case_id="lonely")
    cases_dir, pred_dir = _write(tmp_path, [good])
    save_case(missing, cases_dir / "lonely.npz")
    out = tmp_path / "out"
    with pytest.raises(InputError, match=r"case 'lonely' .*no prediction .*lonely\.npz"):
        run_planning(_cfg(prostate, cases_dir, pred_dir, out))
    assert not out.exists()  # nothing written, the good case not planned either


def test_case_without_targets_is_refused(tmp_path, prostate):
    case = make_box_case(case_id="empty")
    case.masks[:2] = 0  # PTV70 and PTV56 without voxels
    cases_dir, pred_dir = _write(tmp_path, [case])
    with pytest.raises(InputError, match=r"case 'empty' .*has no targets"):
        run_planning(_cfg(prostate, cases_dir, pred_dir, tmp_path / "out"))
    assert not (tmp_path / "out").exists()


def test_grid_too_large_for_the_memory_limit(tmp_path, prostate):
    cases_dir, pred_dir = _write(tmp_path, [make_box_case(case_id="big")])
    [job] = check_cases([cases_dir / "big.npz"], pred_dir, Protocol.from_dict(prostate),
                        PlanSettings())
    assert 1.0 < job.estimated_gb < 2.0  # the defaults fit
    with pytest.raises(InputError, match=r"case 'big' .*GB .*memory_limit_gb=16"):
        run_planning(_cfg(prostate, cases_dir, pred_dir, tmp_path / "out",
                          dose_grid_mm=1.0, bixel_width_mm=1.0, leaf_width_mm=1.0))
    assert not (tmp_path / "out").exists()


def test_protocol_mismatch_and_output_over_inputs(tmp_path, prostate):
    case = make_box_case(case_id="hn")
    case.meta["protocol"] = "head_neck"
    cases_dir, pred_dir = _write(tmp_path, [case])
    with pytest.raises(InputError, match="run with protocol=head_neck"):
        run_planning(_cfg(prostate, cases_dir, pred_dir, tmp_path / "out"))
    with pytest.raises(InputError, match="output_dir=.* is the predictions_dir"):
        run_planning(_cfg(prostate, cases_dir, pred_dir, pred_dir))
    with pytest.raises(InputError, match="exactly one of predictions_dir"):
        run_planning({**_cfg(prostate, cases_dir, pred_dir, tmp_path / "o"), "ckpt_path": "x"})


def test_bad_settings_name_the_key():
    with pytest.raises(InputError, match="planning.sparsity_cutoff"):
        PlanSettings(sparsity_cutoff=1.5)
    with pytest.raises(InputError, match=r"unknown keys \['bixel'\]"):
        PlanSettings.from_config({"bixel": 5})


def test_bixel_estimate_counts_the_target_view_plus_margin():
    case = make_box_case(shape=(20, 20, 20), spacing=(1.0, 1.0, 1.0))
    case.masks[1] = 0
    case.masks[0] = 0
    case.masks[0][5:15, 5:15, 5:15] = 1  # a 10 mm cube around the origin + 9.5 mm
    iso = tuple(float(v) for v in np.full(3, 9.5))
    one_beam = BeamArrangement((0.0,), (0.0,), iso)
    # 10 mm across in 5 mm bixels: cells -1..1 on both axes (3 x 3), plus a ring: 5 x 5
    assert estimate_bixels(case, one_beam, 5.0) == 25
    two_beams = BeamArrangement((0.0, 90.0), (0.0, 0.0), iso)
    assert estimate_bixels(case, two_beams, 5.0) == 50
    # a cut-off wider than the body: every bixel keeps the whole body (20^3 voxels of
    # 1 mm^3 = 8000 mm^3 = 64 dose-grid voxels of 5 mm)
    body_voxels = case.body.sum() / 125.0
    wide = PlanSettings(dose_grid_mm=5.0, lateral_cutoff_mm=500.0)
    assert estimate_entries(case, one_beam, wide) == pytest.approx(
        DIVERGENCE * 25 * body_voxels)
    # a narrow one keeps less: only the body near each bixel's ray
    narrow = PlanSettings(dose_grid_mm=5.0, lateral_cutoff_mm=5.0)
    assert estimate_entries(case, one_beam, narrow) < 0.5 * estimate_entries(case, one_beam,
                                                                             wide)


def test_cli_names_the_case_and_exits_1(tmp_path):
    cases_dir, pred_dir = _write(tmp_path, [make_box_case(case_id="nopred")], predict=False)
    out = tmp_path / "out"
    result = run_main("vmatdose.plan", f"cases_dir={cases_dir}", f"predictions_dir={pred_dir}",
                     f"output_dir={out}", cwd=tmp_path)
    assert result.returncode == 1, result.stdout
    assert last_line(result.stdout).startswith("error: case 'nopred' ")
    assert "no prediction" in last_line(result.stdout)
    assert not out.exists()


def test_ckpt_path_predicts_every_case_first_then_plans_from_those_predictions(
        trained_run, tmp_path, prostate, monkeypatch):
    """The ``ckpt_path=`` route up to the engine: one prediction per case written into
    ``output_dir/predictions`` (as ``predict`` writes them), each job planned from it."""
    import vmatdose.planning.run as plan_run
    from vmatdose.data.case import load_case
    from vmatdose.inference.predictions import load_prediction

    root, _, ckpt = trained_run
    cases_dir = root / "data" / "phantom_smoke"
    planned = []
    monkeypatch.setattr(plan_run, "require_pyradplan", lambda: None)  # engine not needed
    monkeypatch.setattr(plan_run, "plan_one",
                        lambda job, *args: (planned.append(job) or ({"case_id": job.case_id},
                                                                    [], [])))
    monkeypatch.setattr(plan_run, "_case_line", lambda row: row["case_id"])
    out = tmp_path / "out"
    cfg = {"cases_dir": str(cases_dir), "ckpt_path": str(ckpt), "output_dir": str(out),
           "accelerator": "cpu", "protocol": prostate, "planning": {"progress": False}}
    table = run_planning(cfg)
    case_files = sorted(cases_dir.glob("*.npz"))
    assert sorted(table["case_id"]) == [p.stem for p in case_files]
    assert [j.prediction_path for j in planned] == [out / "predictions" / p.name
                                                    for p in case_files]
    case = load_case(case_files[0])
    dose, _ = load_prediction(planned[0].prediction_path, case)
    assert dose.shape == case.shape and dose.max() > 0


def test_rtdose_identity_comes_from_source_dicom_and_a_miss_stops_before_planning(
        tmp_path, prostate, monkeypatch):
    import vmatdose.planning.run as plan_run
    from vmatdose.data.ingest.dicom import DicomIngestSettings, ingest_dicom_case
    from vmatdose.planning.run import rtdose_sources

    from dicom_builders import PATIENT_ID, PatientSpec, write_patient

    root = tmp_path / "dicom"
    write_patient(root / "p_hfs", PatientSpec())
    settings = DicomIngestSettings(protocol=Protocol.load("prostate_sib"), id_salt="s3cret")
    case = ingest_dicom_case(root / "p_hfs", settings=settings)
    cases_dir, pred_dir = _write(tmp_path, [case])
    cfg = {**_cfg(prostate, cases_dir, pred_dir, tmp_path / "out"), "export_rtdose": True,
           "source_dicom": str(root), "id_salt": "s3cret"}
    jobs = check_cases(sorted(cases_dir.glob("*.npz")), pred_dir, Protocol.from_dict(prostate),
                       PlanSettings.from_config(cfg["planning"]))
    assert rtdose_sources(jobs, cfg)[case.case_id].patient["PatientID"] == PATIENT_ID
    # the RT Plan carries the identity too, with or without an RTDOSE
    assert rtdose_sources(jobs, {**cfg, "export_rtdose": False})[case.case_id].patient[
        "PatientID"] == PATIENT_ID
    assert rtdose_sources(jobs, {**cfg, "source_dicom": None}) == {}
    planned = []
    monkeypatch.setattr(plan_run, "require_pyradplan", lambda: None)
    monkeypatch.setattr(plan_run, "plan_one", lambda *args: planned.append(args))
    with pytest.raises(InputError, match=rf"^{case.case_id}: .*VMATDOSE_ID_SALT"):
        run_planning({**cfg, "id_salt": "wrong"})
    assert not planned and not (tmp_path / "out").exists()
