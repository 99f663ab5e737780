"""Batch preprocessing: summary, idempotence, interrupted runs resumed, the Hydra app, exit
codes, workers that die with their parent, and nothing identifying in any output."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import numpy as np
import pytest
from hydra import compose, initialize_config_dir

import vmatdose.data.ingest.batch as batch
from vmatdose.config import CONFIG_DIR
from vmatdose.data.case import list_case_files, load_case
from vmatdose.data.ingest.batch import SkipCase, convert_cases, format_summary
from vmatdose.data.ingest.sources import run_preprocess

from conftest import OPENKBP_SAMPLE, REPO_ROOT, make_box_case, run_main
from dicom_builders import (
    PATIENT_BIRTH_DATE,
    PATIENT_ID,
    PATIENT_NAME,
    PatientSpec,
    dicom_uids,
    head_neck_spec,
    write_patient,
)

SALT = "preprocess-test-salt"


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
        salt = [f"source.id_salt={SALT}"] if "source=dicom" in overrides else []
        return compose("preprocess", overrides=[f"paths.root_dir={tmp_path}", "progress=false",
                                                *salt, *overrides])


def _preprocess(tmp_path: Path, *overrides: str, salt: str | None = SALT
                ) -> subprocess.CompletedProcess:
    """``python -m vmatdose.preprocess <overrides>`` in ``tmp_path`` (Hydra folder there),
    as its ``main()`` in this process (:func:`conftest.run_main`); ``salt=None``: no
    ``VMATDOSE_ID_SALT``."""
    return run_main("vmatdose.preprocess", *overrides, "progress=false", cwd=tmp_path,
                    env={"VMATDOSE_ID_SALT": salt})


def _last_line(done: subprocess.CompletedProcess) -> str:
    return (done.stdout + done.stderr).strip().splitlines()[-1]


@pytest.fixture(scope="module")
def dicom_root(tmp_path_factory) -> Path:
    """Four prostate patients: three SIB cases and one without PTV56 (fails)."""
    root = tmp_path_factory.mktemp("patients")
    for i in range(3):
        write_patient(root / f"patient_{i}", PatientSpec(orientation=("HFS", "FFS")[i % 2]))
    write_patient(root / "patient_x", PatientSpec(structures=("Body", "PTV70", "Rectum"),
                                                  plan_prescriptions={"PTV70": 70.0}))
    return root


@pytest.mark.slow
def test_dicom_source_in_two_spawned_workers(tmp_path, dicom_root):
    out = tmp_path / "cases"
    cfg = _compose(tmp_path, ["source=dicom", f"input_dir={dicom_root}", f"output_dir={out}",
                              "num_workers=2"])
    summary = run_preprocess(cfg)
    assert summary["counts"] == {"jobs": 4, "processed": 3, "already_done": 0, "skipped": 0,
                                 "failed": 1, "warnings": 0}
    assert summary["failed"][0]["error"].startswith(
        "MissingTargetsError: patient_x: missing required target(s) PTV56 (protocol "
        "prostate_sib needs PTV70 and PTV56")
    assert "source" not in summary["failed"][0]  # folder paths only with record_sources
    for path in list_case_files(out):
        case = load_case(path)
        assert case.structures[:2] == ["PTV70", "PTV56"] and case.meta["source"] == "dicom"
        assert case.meta["protocol"] == "prostate_sib"
    assert json.loads((out / "preprocess_summary.json").read_text())["counts"]["processed"] == 3


@pytest.mark.cli
def test_preprocess_killed_half_way_then_restarted_writes_every_case_once(tmp_path,
                                                                          dicom_root):
    out = tmp_path / "cases"
    command = [sys.executable, "-m", "vmatdose.preprocess", "source=dicom",
               f"input_dir={dicom_root}", f"output_dir={out}", "num_workers=1",
               "progress=false", "allow_failures=true"]
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT), "VMATDOSE_ID_SALT": SALT}
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


# ----------------------------------------------------------------- head and neck, exit codes

HEAD_NECK = ["PTV70", "PTV63", "PTV56", "Brainstem", "SpinalCord", "RightParotid",
             "LeftParotid", "Esophagus", "Larynx", "Mandible"]


@pytest.fixture(scope="module")
def head_neck_root(tmp_path_factory) -> tuple[Path, dict]:
    """Two head-and-neck patients: all three targets (HFS), and one lacking PTV63 (FFS)."""
    root = tmp_path_factory.mktemp("hn")
    truths = {"hn_full": write_patient(root / "hn_full", head_neck_spec()),
              "hn_no63": write_patient(root / "hn_no63", head_neck_spec(
                  ("PTV70", "PTV56"), orientation="FFS"))}
    return root, truths


def _decompressed_outputs(tmp_path: Path, done: subprocess.CompletedProcess) -> list[bytes]:
    """Every npz member (arrays and meta), every other file written, and the console."""
    blobs = [done.stdout.encode(), done.stderr.encode()]
    for path in tmp_path.rglob("*"):
        if not path.is_file():
            continue
        if path.suffix == ".npz":
            with zipfile.ZipFile(path) as archive:
                blobs += [archive.read(name) for name in archive.namelist()]
        else:
            blobs.append(path.read_bytes())
    return blobs


@pytest.mark.slow
def test_head_and_neck_dicom_with_nothing_else_given(tmp_path, head_neck_root):
    root, truths = head_neck_root
    out = tmp_path / "cases"
    # native CT grids, to compare with the builders' truth there (the training grid:
    # test_training_grid.py, test_fingerprint.py)
    done = _preprocess(tmp_path, "source=dicom", "protocol=head_neck", f"input_dir={root}",
                       f"output_dir={out}", "source.grid.resample=false")
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    by_targets = {tuple(c.prescriptions_gy): c for c in map(load_case, list_case_files(out))}
    assert len(by_targets) == 2
    full, no63 = by_targets[("PTV70", "PTV63", "PTV56")], by_targets[("PTV70", "PTV56")]
    assert full.structures == HEAD_NECK
    assert no63.structures == [s for s in HEAD_NECK if s != "PTV63"]
    assert full.prescriptions_gy == {"PTV70": 70.0, "PTV63": 63.0, "PTV56": 56.0}
    assert no63.prescriptions_gy == {"PTV70": 70.0, "PTV56": 56.0}
    for case, truth in ((full, truths["hn_full"]), (no63, truths["hn_no63"])):
        assert case.meta["protocol"] == "head_neck" and case.fractions == 35
        assert np.abs(case.dose - truth.dose).max() <= 0.005 * truth.dose.max()
        for name in case.structures:
            overlap = np.count_nonzero(case.mask(name) & truth.masks[name])
            assert 2 * overlap / (case.mask(name).sum() + truth.masks[name].sum()) > 0.97, name
    # nothing identifying anywhere: case files (decompressed), summary, logs, Hydra folder
    planted = [PATIENT_NAME, PATIENT_ID, PATIENT_BIRTH_DATE, "Doe", "Welby", "ACC-99812",
               *dicom_uids(root)]
    assert len(planted) > 40
    blobs = _decompressed_outputs(tmp_path, done)
    assert any(b"preprocess_summary" in b or b"processed" in b for b in blobs)
    assert (tmp_path / "hydra" / ".hydra" / "config.yaml").is_file()
    leaks = [secret for secret in planted if any(secret.encode() in b for b in blobs)]
    assert not leaks


def test_missing_target_fails_naming_the_folder_and_exits_non_zero(tmp_path):
    root = tmp_path / "in"
    write_patient(root / "hn_ok", head_neck_spec(("PTV56",)))
    write_patient(root / "hn_none", head_neck_spec((), with_plan=False))
    out = tmp_path / "cases"
    args = ["source=dicom", "protocol=head_neck", f"input_dir={root}", f"output_dir={out}",
            "num_workers=1"]
    done = _preprocess(tmp_path, *args)
    assert done.returncode == 1
    summary_path = out / "preprocess_summary.json"
    assert _last_line(done).endswith(
        f"preprocess: 1 of 2 case(s) failed; see {summary_path} (allow_failures=true exits 0)")
    error = json.loads(summary_path.read_text())["failed"][0]["error"]
    assert error.startswith("MissingTargetsError: hn_none: missing required target(s) PTV70, "
                            "PTV63, PTV56 (protocol head_neck needs at least one of PTV70, "
                            "PTV63, PTV56; found targets: none")
    assert [load_case(p).structures[0] for p in list_case_files(out)] == ["PTV56"]
    assert _preprocess(tmp_path, *args, "allow_failures=true").returncode == 0


def test_all_cases_failed_exits_non_zero(tmp_path):
    for name in ("a", "b"):  # prostate patients without targets
        write_patient(tmp_path / "in" / name, PatientSpec(structures=("Body", "Rectum"),
                                                          with_plan=False))
    out = tmp_path / "cases"
    done = _preprocess(tmp_path, "source=dicom", f"input_dir={tmp_path / 'in'}",
                       f"output_dir={out}", "num_workers=1")
    assert done.returncode == 1
    assert _last_line(done).endswith(f"preprocess: 2 of 2 case(s) failed; see {out}/"
                                     "preprocess_summary.json (allow_failures=true exits 0)")
    assert not list_case_files(out)


@pytest.mark.slow
def test_empty_salt_is_refused_before_any_work(tmp_path, dicom_root):
    out = tmp_path / "cases"
    for salt in (None, ""):
        done = _preprocess(tmp_path, "source=dicom", f"input_dir={dicom_root}",
                           f"output_dir={out}", salt=salt)
        assert done.returncode == 2
        assert "preprocess: DICOM ingest refuses an empty id salt" in _last_line(done)
        assert "export VMATDOSE_ID_SALT=" in _last_line(done)
        assert not out.exists() or not list_case_files(out)
    mapping = tmp_path / "ids.csv"
    mapping.write_text("key,case_id\n" + "".join(f"{f.name},case_{f.name}\n"
                                                 for f in sorted(dicom_root.iterdir())))
    done = _preprocess(tmp_path, "source=dicom", f"input_dir={dicom_root}",
                       f"output_dir={out}", f"source.case_id_map={mapping}",
                       "allow_failures=true", salt="")
    assert done.returncode == 0, done.stderr[-2000:]
    assert sorted(p.stem for p in list_case_files(out)) == [f"case_patient_{i}" for i in range(3)]


def _children(pid: int) -> list[int]:
    path = Path(f"/proc/{pid}/task/{pid}/children")
    return [int(c) for c in path.read_text().split()] if path.exists() else []


def _alive(pid: int) -> bool:
    """Running (a zombie waiting to be reaped by init counts as gone)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, ProcessLookupError, IndexError):
        return False
    return state != "Z"


@pytest.mark.cli
@pytest.mark.skipif(not Path("/proc/self/task").is_dir(), reason="needs Linux /proc")
def test_workers_exit_when_the_parent_is_killed(tmp_path, dicom_root):
    command = [sys.executable, "-m", "vmatdose.preprocess", "source=dicom",
               f"input_dir={dicom_root}", f"output_dir={tmp_path / 'cases'}", "num_workers=2",
               "progress=false", f"hydra.run.dir={tmp_path / 'hydra'}"]
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT), "VMATDOSE_ID_SALT": SALT}
    parent = subprocess.Popen(command, cwd=tmp_path, env=env, stdout=subprocess.DEVNULL,
                              stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 120
        workers: list[int] = []
        while len(workers) < 2 and time.monotonic() < deadline and parent.poll() is None:
            workers = [c for c in _children(parent.pid)
                       if b"spawn_main" in Path(f"/proc/{c}/cmdline").read_bytes()]
            time.sleep(0.02)
        assert len(workers) == 2, "the pool never started two workers"
        parent.send_signal(signal.SIGKILL)  # the parent only, not its process group
        parent.wait()
        # a worker still importing (a loaded machine: tens of seconds) notices later
        deadline = time.monotonic() + 120
        while any(_alive(w) for w in workers) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not [w for w in workers if _alive(w)]
    finally:
        for pid in ([parent.pid] + workers if parent.poll() is None else workers):
            if _alive(pid):
                os.kill(pid, signal.SIGKILL)


@pytest.mark.cli
def test_a_worker_whose_parent_is_already_gone_exits_at_once():
    # exit_with_parent(pid) in a process whose parent is not pid: the re-parented branch
    code = ("from vmatdose.data.ingest.batch import exit_with_parent\n"
            "exit_with_parent(1)\nprint('still alive')")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          env={**os.environ, "PYTHONPATH": str(REPO_ROOT)}, timeout=60)
    assert done.returncode == 1 and "still alive" not in done.stdout
