"""Batch preprocessing: summary, idempotence, interrupted runs resumed, the Hydra app."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from hydra import compose, initialize_config_dir

import vmatdose.data.ingest.batch as batch
from vmatdose.config import CONFIG_DIR
from vmatdose.data.case import list_case_files, load_case
from vmatdose.data.ingest.batch import SkipCase, convert_cases, format_summary
from vmatdose.preprocess import run_preprocess

from conftest import OPENKBP_SAMPLE, REPO_ROOT, make_box_case
from dicom_builders import PatientSpec, write_patient


def box_convert(source: object, case_id: str):
    """Toy converter: ``"skip"`` skips, ``"boom"`` fails, anything else gives a box case."""
    if source == "skip":
        raise SkipCase("not a SIB case")
    if source == "boom":
        raise RuntimeError("broken input")
    return make_box_case(case_id=case_id)


def _snapshot(folder: Path) -> dict[str, tuple[int, int]]:
    """File name -> (inode, mtime_ns) of every case file: changes if a file is rewritten."""
    return {p.name: (p.stat().st_ino, p.stat().st_mtime_ns) for p in list_case_files(folder)}


def test_summary_records_processed_skipped_failed_and_a_rerun_does_nothing(tmp_path):
    jobs = [("a", "ok"), ("b", "skip"), ("c", "boom"), ("d", "ok"), ("a", "ok"), ("../x", "ok")]
    summary = convert_cases(jobs, box_convert, tmp_path, num_workers=1, progress=False,
                            summary_path=tmp_path / "summary.json")
    assert [p["case_id"] for p in summary["processed"]] == ["a", "d"]
    assert summary["skipped"] == [{"case_id": "b", "reason": "not a SIB case", "source": "skip"}]
    failed = {f["case_id"]: f["error"] for f in summary["failed"]}
    assert failed["c"] == "RuntimeError: broken input"
    assert "duplicate" in failed["a"] and "invalid case id" in failed["../x"]
    assert json.loads((tmp_path / "summary.json").read_text())["counts"]["failed"] == 3
    assert "failed" in format_summary(summary) and "not a SIB case" in format_summary(summary)
    before = _snapshot(tmp_path)
    again = convert_cases(jobs[:4], box_convert, tmp_path, num_workers=1, progress=False)
    assert again["already_done"] == ["a", "d"] and _snapshot(tmp_path) == before


def test_interrupted_batch_resumes_and_writes_each_case_exactly_once(tmp_path, monkeypatch):
    writes: list[str] = []
    real_save = batch.save_case

    def counting_save(case, path):
        writes.append(case.case_id)
        return real_save(case, path)

    monkeypatch.setattr(batch, "save_case", counting_save)
    calls = []

    def interrupt_after_three(source, case_id):
        calls.append(case_id)
        if len(calls) == 4:
            raise KeyboardInterrupt  # Ctrl-C half-way through the batch
        return box_convert(source, case_id)

    jobs = [(f"case_{i}", "ok") for i in range(6)]
    with pytest.raises(KeyboardInterrupt):
        convert_cases(jobs, interrupt_after_three, tmp_path, num_workers=1, progress=False)
    first = _snapshot(tmp_path)
    assert sorted(first) == ["case_0.npz", "case_1.npz", "case_2.npz"]
    summary = convert_cases(jobs, box_convert, tmp_path, num_workers=1, progress=False)
    assert summary["already_done"] == ["case_0", "case_1", "case_2"]
    assert sorted(writes) == [f"case_{i}" for i in range(6)]  # each written exactly once
    after = _snapshot(tmp_path)
    assert {k: after[k] for k in first} == first and len(after) == 6
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]


def _compose(tmp_path: Path, overrides: list[str]):
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        return compose("preprocess", overrides=[f"paths.root_dir={tmp_path}", "progress=false",
                                                *overrides])


@pytest.fixture(scope="module")
def dicom_root(tmp_path_factory) -> Path:
    """Four patients: three SIB cases and one without PTV56."""
    root = tmp_path_factory.mktemp("patients")
    for i in range(3):
        write_patient(root / f"patient_{i}", PatientSpec(orientation=("HFS", "FFS")[i % 2]))
    write_patient(root / "patient_x", PatientSpec(structures=("Body", "PTV70", "Rectum"),
                                                  plan_prescriptions={"PTV70": 70.0}))
    return root


def test_dicom_source_in_two_spawned_workers(tmp_path, dicom_root):
    out = tmp_path / "cases"
    cfg = _compose(tmp_path, ["source=dicom", f"input_dir={dicom_root}", f"output_dir={out}",
                              "num_workers=2"])
    summary = run_preprocess(cfg)
    assert summary["counts"] == {"jobs": 4, "processed": 3, "already_done": 0, "skipped": 1,
                                 "failed": 0, "warnings": 0}
    assert "PTV56" in summary["skipped"][0]["reason"]
    assert "source" not in summary["skipped"][0]  # folder names may name patients
    for path in list_case_files(out):
        case = load_case(path)
        assert case.structures[:2] == ["PTV70", "PTV56"] and case.meta["source"] == "dicom"
    assert json.loads((out / "preprocess_summary.json").read_text())["counts"]["processed"] == 3


def test_preprocess_killed_half_way_then_restarted_writes_every_case_once(tmp_path,
                                                                          dicom_root):
    out = tmp_path / "cases"
    command = [sys.executable, "-m", "vmatdose.preprocess", "source=dicom",
               f"input_dir={dicom_root}", f"output_dir={out}", "num_workers=1",
               "progress=false"]
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT)}
    process = subprocess.Popen(command, cwd=tmp_path, env=env, start_new_session=True,
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 120
    while not list_case_files(out) and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.005)
    os.killpg(process.pid, signal.SIGKILL)
    process.wait()
    first = _snapshot(out)
    if len(first) == 3:
        pytest.skip("the run finished before it could be killed")
    assert 1 <= len(first) < 3
    for path in list_case_files(out):
        load_case(path)  # never a broken file
    done = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    summary = json.loads((out / "preprocess_summary.json").read_text())
    assert sorted(summary["already_done"]) == sorted(Path(n).stem for n in first)
    assert summary["counts"]["processed"] == 3 - len(first)
    after = _snapshot(out)
    assert len(after) == 3 and {k: after[k] for k in first} == first
    assert not list(out.glob(".*.tmp"))
    assert "processed" in done.stdout + done.stderr  # the printed table


def test_phantom_source_generates_then_keeps(tmp_path):
    overrides = ["source=phantom", f"output_dir={tmp_path / 'ph'}", "num_workers=0",
                 "data.generator.n_cases=2", "data.generator.shape=[16,16,16]",
                 "data.generator.spacing_mm=[6.0,12.0,12.0]"]
    summary = run_preprocess(_compose(tmp_path, overrides))
    assert summary["counts"]["processed"] == 2 and "processed" in format_summary(summary)
    summary = run_preprocess(_compose(tmp_path, overrides))
    assert summary["counts"]["already_done"] == 2 and summary["counts"]["processed"] == 0


@pytest.mark.skipif(not OPENKBP_SAMPLE.is_dir(), reason=f"no OpenKBP sample at {OPENKBP_SAMPLE}")
def test_openkbp_source_goes_through_the_batch_engine(tmp_path):
    patient = sorted(OPENKBP_SAMPLE.glob("**/ct.csv"))[0].parent
    shutil.copytree(patient, tmp_path / "src" / patient.name)
    cfg = _compose(tmp_path, ["source=openkbp", f"input_dir={tmp_path / 'src'}",
                              f"output_dir={tmp_path / 'cases'}", "num_workers=1"])
    summary = run_preprocess(cfg)
    assert summary["counts"]["processed"] == 1, summary["failed"]
    case = load_case(tmp_path / "cases" / f"openkbp_{patient.name}.npz")
    assert case.meta["source"] == "openkbp" and np.isfinite(case.dose).all()
