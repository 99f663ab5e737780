"""The entry points as a user runs them (``python -m vmatdose.<app> ...``): exit code, the
message, and what is (and is not) written, for the defects of issue 18. Each command runs
as its module's ``main()`` in this process (:func:`conftest.run_main`: the same argv,
messages and exit status, without a process's start-up); ``tests/test_readme.py`` starts
every entry point as a command.

Folders a command only reads are made read-only (``chmod -R a-w``) and their listing is
compared before and after.
"""

from __future__ import annotations

import json
import shutil
import stat
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import last_line, openkbp_patients, run_main

pytestmark = pytest.mark.slow  # each runs an entry point end to end (seconds)


def cli(module: str, *args: str, cwd: Path, tmpdir: Path | None = None,
        env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    """``python -m vmatdose.<module> <args>`` in ``cwd`` (Hydra's folder there); with
    ``tmpdir`` its temporary files go there (to see what it leaves)."""
    return run_main(f"vmatdose.{module}", *args, cwd=cwd, tmpdir=tmpdir, env=env)


def listing(folder: Path) -> dict[str, tuple[int, int]]:
    """Every file below ``folder`` -> (size, mtime ns)."""
    return {str(p.relative_to(folder)): (p.stat().st_size, p.stat().st_mtime_ns)
            for p in sorted(folder.rglob("*"))}


def read_only(folder: Path) -> Path:
    for path in [folder, *folder.rglob("*")]:
        mode = path.stat().st_mode
        path.chmod(mode & ~(stat.S_IWUSR | stat.S_IWGRP | stat.S_IWOTH))
    return folder


@pytest.fixture
def writable_cleanup(tmp_path):
    """Give write permission back so pytest can remove the read-only folders."""
    yield
    for path in [tmp_path, *tmp_path.rglob("*")]:
        if not path.is_symlink():
            path.chmod(path.stat().st_mode | stat.S_IWUSR)


def smoke_cases(trained_run, dest: Path) -> Path:
    """A copy of the smoke run's four phantom case files."""
    root, _, _ = trained_run
    shutil.copytree(root / "data" / "phantom_smoke", dest,
                    ignore=shutil.ignore_patterns("*.json", ".*"))
    return dest


def with_nan_dose(path: Path) -> None:
    """Rewrite a case file with one NaN dose voxel (bypassing save_case's check)."""
    with np.load(path, allow_pickle=False) as data:
        arrays = {k: data[k] for k in data.files}
    arrays["dose"] = arrays["dose"].astype(np.float32)
    arrays["dose"][0, 0, 0] = np.nan
    np.savez_compressed(path, **arrays)


# predict ---------------------------------------------------------------------------------


def test_predict_an_openkbp_folder_writes_one_csv_per_patient_and_only_reads_it(
        openkbp_run, tmp_path, writable_cleanup):
    _, source, ckpt = openkbp_run
    folder = read_only(openkbp_patients(tmp_path / "okbp", {"validation-pats": ("pt_201",),
                                                            "train-pats": ("pt_1",)}))
    before = listing(folder)
    out = tmp_path / "out"
    done = cli("predict", f"ckpt_path={ckpt}", f"cases_dir={folder}", f"output_dir={out}",
               "export_openkbp=true", "accelerator=cpu", cwd=tmp_path, tmpdir=tmp_path / "tmp")
    assert done.returncode == 0, done.stdout[-3000:]
    assert "GlobalHydra" not in done.stdout
    assert sorted(p.name for p in out.iterdir() if not p.name.startswith(".")) == [
        "openkbp_pt_1.npz", "openkbp_pt_201.npz", "pt_1.csv", "pt_201.csv"]
    assert listing(folder) == before
    assert not list((tmp_path / "tmp").iterdir())  # the temporary import is gone
    # evaluate scores exactly the (imported, read-only) cases of the folder it is given
    root, _, _ = openkbp_run
    cases = tmp_path / "mycases"
    shutil.copytree(root / "data" / "openkbp" / source.name, cases)
    read_only(cases)
    before = listing(cases)
    (tmp_path / "ev").mkdir()
    done = cli("evaluate", "data=openkbp", f"predictions_dir={out}", f"data.cases_dir={cases}",
               "split=all", "evaluation=fast", cwd=tmp_path / "ev")
    assert done.returncode == 0, done.stdout[-3000:]
    summary = json.loads((tmp_path / "ev" / "hydra" / "summary.json").read_text())
    assert summary["n_cases"] == 2
    assert listing(cases) == before


def test_an_openkbp_patient_without_targets_is_refused_at_import_and_leaves_nothing(
        openkbp_run, tmp_path):
    _, _, ckpt = openkbp_run
    folder = openkbp_patients(tmp_path / "okbp", {"validation-pats": ("pt_201",)})
    for ptv in (folder / "validation-pats" / "pt_201").glob("PTV*.csv"):
        ptv.unlink()
    out = tmp_path / "out"
    done = cli("predict", f"ckpt_path={ckpt}", f"cases_dir={folder}", f"output_dir={out}",
               "export_openkbp=true", "accelerator=cpu", cwd=tmp_path, tmpdir=tmp_path / "tmp")
    assert done.returncode == 1
    assert last_line(done.stdout) == (
        f"error: {folder}: 1 of 1 patients failed to import, first openkbp_pt_201: "
        "OpenKBPFormatError: pt_201: missing required target PTV70, PTV63, PTV56 (head_neck "
        "needs at least one of PTV70, PTV63, PTV56)")
    assert not out.exists()
    assert not list((tmp_path / "tmp").iterdir())  # no openkbp_* folder, no .convert.lock


def test_predict_and_evaluate_read_a_read_only_folder_and_score_exactly_its_cases(
        trained_run, tmp_path, writable_cleanup):
    _, _, ckpt = trained_run
    cases = read_only(smoke_cases(trained_run, tmp_path / "cases"))
    before = listing(cases)
    pred = tmp_path / "pred"
    done = cli("predict", f"ckpt_path={ckpt}", f"cases_dir={cases}", f"output_dir={pred}",
               "accelerator=cpu", cwd=tmp_path)
    assert done.returncode == 0, done.stdout[-3000:]
    (tmp_path / "eval").mkdir()
    done = cli("evaluate", f"predictions_dir={pred}", f"data.cases_dir={cases}", "split=all",
               "evaluation=fast", cwd=tmp_path / "eval")
    assert done.returncode == 0, done.stdout[-3000:]
    summary = json.loads((tmp_path / "eval" / "hydra" / "summary.json").read_text())
    assert summary["n_cases"] == 4
    assert listing(cases) == before


@pytest.mark.parametrize(("app", "state"), [("evaluate", "missing"), ("evaluate", "empty"),
                                           ("predict", "empty"), ("train", "empty")])
def test_a_missing_or_empty_cases_folder_is_one_error_and_nothing_is_generated(
        trained_run, tmp_path, app, state):
    _, _, ckpt = trained_run
    folder = tmp_path / "cases"
    if state == "empty":
        folder.mkdir()
    args = {"evaluate": [f"ckpt_path={ckpt}", "accelerator=cpu", f"data.cases_dir={folder}",
                         "split=all"],
            "predict": [f"ckpt_path={ckpt}", "accelerator=cpu", f"cases_dir={folder}",
                        f"output_dir={tmp_path / 'out'}"],
            # the phantom is generated only into its own folder, never into this one
            "train": ["debug=smoke", f"data.cases_dir={folder}", f"paths.root_dir={tmp_path}"]}
    done = cli(app, *args[app], cwd=tmp_path)
    assert done.returncode == 1
    line = last_line(done.stdout)
    assert line.startswith("error: ") and str(folder) in line
    assert ("no such folder" if state == "missing" else "no case files (*.npz)") in line
    assert (not folder.exists()) if state == "missing" else not list(folder.iterdir())
    assert not (tmp_path / "out").exists() and not (tmp_path / "data").exists()
    assert not (tmp_path / "hydra" / "run_record.json").exists()


def test_a_nan_dose_is_refused_before_any_prediction_figure_or_epoch(trained_run, tmp_path):
    _, _, ckpt = trained_run
    cases = smoke_cases(trained_run, tmp_path / "cases")
    bad = sorted(cases.glob("*.npz"))[-1]
    with_nan_dose(bad)
    expected = f"{bad}: dose has 1 non-finite voxels (NaN/inf)"
    out = tmp_path / "out"
    done = cli("predict", f"ckpt_path={ckpt}", f"cases_dir={cases}", f"output_dir={out}",
               "accelerator=cpu", cwd=tmp_path)
    assert done.returncode == 1 and expected in last_line(done.stdout)
    assert not out.exists()
    (tmp_path / "ev").mkdir()
    done = cli("evaluate", f"ckpt_path={ckpt}", f"data.cases_dir={cases}", "split=all",
               "accelerator=cpu", cwd=tmp_path / "ev")
    assert done.returncode == 1 and expected in last_line(done.stdout)
    assert not (tmp_path / "ev" / "hydra" / "figures").exists()
    assert not (tmp_path / "ev" / "hydra" / "per_case.csv").exists()
    (tmp_path / "tr").mkdir()
    done = cli("train", "debug=smoke", f"data.cases_dir={cases}", f"paths.root_dir={tmp_path}",
               cwd=tmp_path / "tr")
    assert done.returncode == 1 and expected in last_line(done.stdout)
    assert "Traceback" not in done.stdout
    assert not (tmp_path / "tr" / "hydra" / "checkpoints").exists()
    assert not (tmp_path / "tr" / "hydra" / "run_record.json").exists()


def test_predict_refuses_another_checkpoints_folder_and_overwrite_leaves_no_mix(
        trained_run, tmp_path):
    _, _, ckpt = trained_run
    other = tmp_path / "other.ckpt"
    raw = torch.load(ckpt, map_location="cpu", weights_only=True)
    first = next(k for k, v in raw["state_dict"].items() if v.is_floating_point())
    raw["state_dict"][first] = raw["state_dict"][first] + 1.0
    torch.save(raw, other)
    cases = smoke_cases(trained_run, tmp_path / "cases")
    out = tmp_path / "out"
    done = cli("predict", f"ckpt_path={ckpt}", f"cases_dir={cases}", f"output_dir={out}",
               "export_rtdose=true", "accelerator=cpu", cwd=tmp_path)
    assert done.returncode == 0, done.stdout[-3000:]
    assert len(list(out.glob("*_rtdose.dcm"))) == 4
    before = listing(out)
    args = [f"ckpt_path={other}", f"cases_dir={cases}", f"output_dir={out}", "accelerator=cpu"]
    done = cli("predict", *args, cwd=tmp_path)
    assert done.returncode == 1
    assert last_line(done.stdout).startswith(f"error: output_dir={out}: holds 8 files of "
                                             "another checkpoint or run")
    assert "overwrite=true" in last_line(done.stdout)
    assert listing(out) == before
    done = cli("predict", *args, "overwrite=true", cwd=tmp_path)
    assert done.returncode == 0, done.stdout[-3000:]
    assert not list(out.glob("*_rtdose.dcm"))  # the first checkpoint's doses are gone
    assert len(list(out.glob("*.npz"))) == 4
    assert cli("predict", *args, cwd=tmp_path).returncode == 0  # its own folder: fine


# train --resume ---------------------------------------------------------------------------


def _crafted(tmp_path: Path, ckpt: Path, kind: str) -> tuple[Path, str]:
    path = tmp_path / f"{kind}.ckpt"
    if kind == "truncated":
        path.write_bytes(ckpt.read_bytes()[: ckpt.stat().st_size // 2])
        return path, "not a vmatdose checkpoint (a truncated or corrupt checkpoint)"
    if kind == "crafted":
        torch.save({"state_dict": {}, "note": "no contract"}, path)
        return path, "not a vmatdose checkpoint (no 'vmatdose' contract"
    shutil.copy(ckpt, path)  # other protocol: the head-and-neck run's
    return path, "trained with protocol 'head_neck'; this run's is 'prostate_sib'"


@pytest.mark.parametrize("kind", ["truncated", "crafted", "other_protocol"])
def test_train_refuses_a_bad_resume_checkpoint_in_one_line(trained_run, openkbp_run,
                                                           tmp_path, kind):
    source = openkbp_run[2] if kind == "other_protocol" else trained_run[2]
    path, message = _crafted(tmp_path, source, kind)
    done = cli("train", "debug=smoke", f"ckpt_path={path}", f"paths.root_dir={tmp_path}",
               cwd=tmp_path)
    assert done.returncode == 1
    assert last_line(done.stdout).startswith(f"error: {path}: {message}")
    assert "Traceback" not in done.stdout
    run = tmp_path / "hydra"
    assert not (run / "run_record.json").exists() and not (run / "checkpoints").exists()
    assert not (tmp_path / "data").exists()  # nothing generated either
    if kind == "truncated":  # predict says the same
        cases = smoke_cases(trained_run, tmp_path / "cases")
        done = cli("predict", f"ckpt_path={path}", f"cases_dir={cases}",
                   f"output_dir={tmp_path / 'o'}", cwd=tmp_path)
        assert f"{path}: not a vmatdose checkpoint (a truncated or corrupt checkpoint)" in \
            last_line(done.stdout)


def test_train_on_read_only_case_files(trained_run, tmp_path, writable_cleanup):
    cases = read_only(smoke_cases(trained_run, tmp_path / "cases"))
    before = listing(cases)
    done = cli("train", "debug=smoke", f"data.cases_dir={cases}", "evaluation=fast",
               f"paths.root_dir={tmp_path}", cwd=tmp_path)
    assert done.returncode == 0, done.stdout[-3000:]
    assert (tmp_path / "hydra" / "checkpoints" / "last.ckpt").is_file()
    assert listing(cases) == before


# preprocess ------------------------------------------------------------------------------


def test_preprocess_names_a_failed_source_folder_on_the_console_only(tmp_path):
    from dicom_builders import PatientSpec, write_patient

    write_patient(tmp_path / "in" / "Doe_Jane", PatientSpec(structures=("Body", "Rectum"),
                                                           with_plan=False))
    out = tmp_path / "cases"
    done = cli("preprocess", "source=dicom", f"input_dir={tmp_path / 'in'}",
               f"output_dir={out}", "num_workers=1", cwd=tmp_path,
               env={"VMATDOSE_ID_SALT": "s" * 32})
    assert done.returncode == 1
    case_id = json.loads((out / "preprocess_summary.json").read_text())["failed"][0]["case_id"]
    assert f"failed {case_id}: source {tmp_path / 'in' / 'Doe_Jane'}" in done.stdout
    log_text = (tmp_path / "hydra" / "preprocess.log").read_text()
    assert case_id in log_text
    assert str(tmp_path / "in" / "Doe_Jane") not in log_text
    assert str(tmp_path / "in" / "Doe_Jane") not in (out / "preprocess_summary.json").read_text()


@pytest.mark.parametrize("words", [["output_dir=/tmp/my", "cases"], ["output_dir=/tmp/données"]])
def test_an_unquoted_path_gets_a_hint_to_quote_it(tmp_path, words):
    done = cli("preprocess", "source=phantom", *words, cwd=tmp_path)
    assert done.returncode != 0
    value = " ".join(words).split("=", 1)[1]
    assert last_line(done.stdout) == (
        "hint: quote a value with spaces or non-ASCII characters for the shell and for Hydra: "
        f"'output_dir=\"{value}\"'")


def test_a_sweep_goes_on_past_a_failed_job_and_ends_listing_it(trained_run, tmp_path):
    cases = smoke_cases(trained_run, tmp_path / "cases")
    sweep = tmp_path / "sweep"
    done = cli("train", "-m", "debug=smoke", f"data.cases_dir={tmp_path / 'empty'},{cases}",
               "evaluation=fast", f"paths.root_dir={tmp_path}", f"hydra.sweep.dir={sweep}",
               cwd=tmp_path)
    assert done.returncode == 1
    failure = json.loads((sweep / "0" / "failed.json").read_text())
    assert failure["error"] == "InputError" and "no case files (*.npz)" in failure["message"]
    assert (sweep / "1" / "checkpoints" / "last.ckpt").is_file()  # the next job still ran
    assert last_line(done.stdout).startswith(
        f"error: 1 of 2 sweep jobs failed: {sweep / '0'}: {tmp_path / 'empty'}: no case files")
