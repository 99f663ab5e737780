"""A clinic's first try, timed: three clinical-grid DICOM patients, the README's commands.

    python benchmarks/bench_clinic_first_run.py [--work-dir DIR]

The clinic of issue 26: three head-and-neck patients on 512 x 512 CTs at 0.98, 1.17 and
1.37 mm with 2.0, 2.5 and 3.0 mm slices, RTSTRUCT, a 2.5 mm RTDOSE over the body and an
RTPLAN of nine static 6 MV fields, head-first supine (the project's DICOM builders,
tests/data/dicom_builders.py). Then, each as its own process under GNU time (wall
seconds, peak RSS of its largest process):

* ``python -m vmatdose.preprocess source=dicom protocol=head_neck`` (the training grid),
* ``python -m vmatdose.train data=clinic data.cases_dir=<cases> protocol=head_neck
  debug=limit`` (the issue's bound: under 10 minutes, under 6 GB),
* ``python -m vmatdose.predict dicom_dir=<patients>`` with that checkpoint, each RTDOSE
  checked to lie on the grid of the patient's own RTDOSE.

Prints a table and writes ``benchmarks/results/bench_clinic_first_run.json`` with the
machine's load average.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
from pathlib import Path

import numpy as np
import pydicom

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_clinic_scale import (  # noqa: E402
    RESULTS,
    clinic_patient_spec,
    machine_info,
    timed,
    write_patient,
)

#: (CT pixel mm, slice mm) of the three patients: the issue's clinic
GRIDS = ((0.98, 2.0), (1.17, 2.5), (1.37, 3.0))
FIELDS = [{"gantry_deg": [float(a)], "rotation": "NONE"} for a in range(0, 360, 40)]
BOUNDS = {"train_seconds": 600.0, "train_peak_rss_gb": 6.0}


def write_patients(dicom: Path) -> None:
    for i, (pixel, dz) in enumerate(GRIDS):
        write_patient(dicom / f"patient_{i}", clinic_patient_spec(
            dz, pixel, 1.25, (0.0, 0.0, 0.0), tuple(FIELDS), f"Clinic^Patient{i}",
            f"CLINIC-{i}"))


def dose_grid(path: Path) -> tuple:
    """(frames, rows, columns, row mm, column mm, first z mm) of an RTDOSE file."""
    ds = pydicom.dcmread(path, stop_before_pixels=True)
    return (int(ds.NumberOfFrames), int(ds.Rows), int(ds.Columns),
            *(round(float(v), 4) for v in ds.PixelSpacing),
            round(float(ds.ImagePositionPatient[2]), 3))


def same_grids(dicom: Path, predictions: Path) -> list[bool]:
    """For each patient: its predicted RTDOSE on the grid of its own RTDOSE."""
    own = sorted(dose_grid(p) for p in dicom.glob("*/RD*.dcm"))
    predicted = sorted(dose_grid(p) for p in predictions.glob("*_rtdose.dcm"))
    return [a == b for a, b in zip(own, predicted)] if len(own) == len(predicted) else [False]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--work-dir", default=None,
                        help="kept; default: a temporary folder, removed at the end")
    args = parser.parse_args()
    work = Path(args.work_dir or tempfile.mkdtemp(prefix="bench_clinic_first_run_"))
    env = {**os.environ, "VMATDOSE_ID_SALT": "bench-clinic", "PYTHONPATH": os.pathsep.join(
        [str(Path(__file__).resolve().parents[1]), os.environ.get("PYTHONPATH", "")])}
    dicom, cases = work / "dicom", work / "cases"
    write_patients(dicom)
    stages = {
        "preprocess": timed([sys.executable, "-m", "vmatdose.preprocess", "source=dicom",
                             "protocol=head_neck", f"input_dir={dicom}",
                             f"output_dir={cases}", "progress=false",
                             f"hydra.run.dir={work / 'hydra' / 'preprocess'}"],
                            work, env, work / "preprocess.log"),
        "train": timed([sys.executable, "-m", "vmatdose.train", "data=clinic",
                        f"data.cases_dir={cases}", "protocol=head_neck", "debug=limit",
                        f"hydra.run.dir={work / 'train'}"], work, env, work / "train.log"),
    }
    ckpt = sorted((work / "train" / "checkpoints").glob("*.ckpt"))[-1]
    stages["predict"] = timed([sys.executable, "-m", "vmatdose.predict", f"ckpt_path={ckpt}",
                               f"dicom_dir={dicom}", f"output_dir={work / 'predictions'}",
                               "export_rtdose=true", "accelerator=cpu",
                               f"hydra.run.dir={work / 'hydra' / 'predict'}"],
                              work, env, work / "predict.log")
    fingerprint = json.loads((cases / "dataset_fingerprint.json").read_text())
    result = {"patients": len(GRIDS), "grids_mm": GRIDS,
              "training_spacing_mm": fingerprint["target_spacing_mm"],
              "case_shape_max": fingerprint["shape"]["max"], "stages": stages,
              "rtdose_on_own_grid": same_grids(dicom, work / "predictions"),
              "bounds": BOUNDS, "machine": machine_info()}
    result["within_bounds"] = bool(stages["train"]["seconds"] < BOUNDS["train_seconds"] and
                                   stages["train"]["peak_rss_gb"] < BOUNDS["train_peak_rss_gb"])
    print_table(result)
    if not args.work_dir:  # a temporary folder of ~200 MB of DICOM: not left behind
        shutil.rmtree(work, ignore_errors=True)
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / "bench_clinic_first_run.json"
    path.write_text(json.dumps(result, indent=2))
    print(f"wrote {path}")


def print_table(r: dict) -> None:
    print(f"\nA clinic's first run: {r['patients']} patients, training grid "
          f"{r['training_spacing_mm']} mm, largest case {r['case_shape_max']} voxels, "
          f"load average at the end {np.round(r['machine']['load_average_at_end'], 1)}")
    print(f"{'stage':12s}{'wall s':>10s}{'CPU s':>10s}{'peak RSS GB':>14s}")
    for name, s in r["stages"].items():
        print(f"{name:12s}{s['seconds']:10.1f}{s['cpu_seconds']:10.1f}{s['peak_rss_gb']:14.2f}")
    print(f"train debug=limit within {r['bounds']['train_seconds']:.0f} s and "
          f"{r['bounds']['train_peak_rss_gb']:.0f} GB: {r['within_bounds']}; RTDOSE on each "
          f"patient's own dose grid: {r['rtdose_on_own_grid']}")


if __name__ == "__main__":
    main()
