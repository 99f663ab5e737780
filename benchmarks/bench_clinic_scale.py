"""How a clinic's DICOM scales: N synthetic clinical-grid patients, preprocess, train, predict.

    python benchmarks/bench_clinic_scale.py [--patients 4] [--workers 2] [--steps 8]

Writes N head-and-neck patients with the project's own DICOM builders
(tests/data/dicom_builders.py: phantom anatomy on 512 x 512 CTs at 0.98-1.17 mm with
2.0 / 2.5 / 3.0 mm slices, 240 mm long, RTSTRUCT, a 2.5 mm RTDOSE over the body, an RTPLAN
of two VMAT arcs with a control point every 2 degrees), in chunks of ``--chunk`` patients:
each chunk is written, preprocessed (``python -m vmatdose.preprocess source=dicom
protocol=head_neck``, the training grid chosen from the first chunk's fingerprint and kept
for the rest) and its DICOM deleted, except the first ``--predict-patients`` patients, kept
to predict. So N = 200 never holds more than one chunk of DICOM on disk and one patient in
memory. Then

* trains ``data=clinic`` for ``--steps`` steps (``python -m vmatdose.train data=clinic
  data.cases_dir=<cases> protocol=head_neck``, one epoch, one validation case), and
* predicts the kept patients from their DICOM (``python -m vmatdose.predict
  dicom_dir=<patients>``: on-the-fly ingest at the training spacing, RTDOSE on each
  patient's own dose grid).

Each command runs as its own process under GNU time: wall seconds and peak RSS (of the
largest process in its tree). Prints a table and writes
``benchmarks/results/bench_clinic_scale_n<N>.json`` with the machine's load average.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests" / "data"))

from dicom_builders import HEAD_NECK_SCENE, GridSpec, head_neck_spec, write_patient  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results"
#: (slice mm, pixel mm) cycled over the patients: the issue's clinic.
GRIDS = ((2.0, 0.98), (2.5, 1.17), (3.0, 1.04))
LENGTH_MM = 240.0
SCALE = 1.25  # the phantom's head and neck: about 180 x 150 mm across
DOSE_MM = 2.5


def patient_spec(index: int):
    """Patient ``index``: a 512 x 512 CT, its 2.5 mm RTDOSE over the body + 10 mm, two
    arcs (181 -> 179 clockwise, back counter-clockwise, 2 degree control points)."""
    dz, pixel = GRIDS[index % len(GRIDS)]
    slices = int(round(LENGTH_MM / dz))
    half = 256 * pixel
    ct = GridSpec((slices, 512, 512), (dz, pixel, pixel),
                  (-LENGTH_MM / 2, -half + pixel / 2, -half + pixel / 2))
    cx, cy = ct.centre_xy()
    (bx, by, ax, ay), = HEAD_NECK_SCENE["Body"][1]
    half_x, half_y = ax * SCALE + 10.0, ay * SCALE + 10.0
    z0 = ct.origin[0] - 1.0
    dose = GridSpec((int(np.ceil((slices - 1) * dz / DOSE_MM)) + 2,
                     int(2 * half_y / DOSE_MM) + 1, int(2 * half_x / DOSE_MM) + 1),
                    (DOSE_MM,) * 3, (z0, cy + by * SCALE - half_y, cx + bx * SCALE - half_x))
    (px, py, _, _), = HEAD_NECK_SCENE["PTV70"][1]
    isocentre = (cx + px * SCALE, cy + py * SCALE, 0.0)
    clockwise = [float(a % 360) for a in np.arange(181, 181 + 358 + 1, 2)]
    arcs = ({"gantry_deg": clockwise, "rotation": "CW", "isocentre_xyz": isocentre},
            {"gantry_deg": clockwise[::-1], "rotation": "CC", "isocentre_xyz": isocentre})
    return head_neck_spec(ct=ct, dose_grid=dose, scale=SCALE, vertices=160, beams=arcs,
                          beam_weights=(1.0,))


def timed(command: list[str], cwd: Path, env: dict, log: Path) -> dict:
    """Run ``command`` under GNU time: ``{"seconds", "peak_rss_gb", "returncode"}``."""
    stats = log.with_suffix(".time")
    with open(log, "w") as out:
        done = subprocess.run(["/usr/bin/time", "-f", "%e %M", "-o", str(stats), *command],
                              cwd=cwd, env=env, stdout=out, stderr=subprocess.STDOUT)
    seconds, kb = stats.read_text().split()[-2:]
    if done.returncode != 0:
        tail = "\n".join(log.read_text().splitlines()[-15:])
        raise RuntimeError(f"{' '.join(command[:4])} ... failed ({done.returncode}):\n{tail}")
    return {"seconds": float(seconds), "peak_rss_gb": round(int(kb) / 1e6, 3)}


def folder_mb(folder: Path) -> float:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file()) / 1e6


def preprocess_chunks(args, work: Path, env: dict) -> dict:
    """Write, preprocess and (but for the kept ones) delete the patients chunk by chunk."""
    cases, keep = work / "cases", work / "keep"
    runs, write_s, dicom_mb = [], 0.0, []
    for start in range(0, args.patients, args.chunk):
        chunk = work / "dicom" / f"chunk_{start // args.chunk}"
        began = time.perf_counter()
        for i in range(start, min(args.patients, start + args.chunk)):
            write_patient(chunk / f"patient_{i:04d}", patient_spec(i))
            dicom_mb.append(folder_mb(chunk / f"patient_{i:04d}"))
        write_s += time.perf_counter() - began
        command = [sys.executable, "-m", "vmatdose.preprocess", "source=dicom",
                   "protocol=head_neck", f"input_dir={chunk}", f"output_dir={cases}",
                   f"num_workers={args.workers}", "progress=false",
                   f"hydra.run.dir={work / 'hydra' / chunk.name}"]
        run = timed(command, work, env, work / f"preprocess_{chunk.name}.log")
        run["patients"] = len(list(chunk.iterdir()))
        runs.append(run)
        for patient in sorted(chunk.iterdir()):
            if len(list(keep.glob("*"))) < args.predict_patients:
                keep.mkdir(exist_ok=True)
                shutil.move(str(patient), keep / patient.name)
        shutil.rmtree(chunk)
    files = sorted(cases.glob("*.npz"))
    fingerprint = json.loads((cases / "dataset_fingerprint.json").read_text())
    seconds = sum(r["seconds"] for r in runs)
    return {"cases": len(files), "write_seconds": round(write_s, 1),
            "dicom_mb_per_patient": round(float(np.mean(dicom_mb)), 1),
            "seconds": round(seconds, 1), "seconds_per_case": round(seconds / len(files), 2),
            "peak_rss_gb": max(r["peak_rss_gb"] for r in runs),
            "case_mb": round(float(np.mean([p.stat().st_size for p in files])) / 1e6, 2),
            "target_spacing_mm": fingerprint["target_spacing_mm"],
            "case_shape_max": fingerprint["shape"]["max"], "chunks": runs}


def train(args, work: Path, env: dict) -> dict:
    run_dir = work / "train"
    command = [sys.executable, "-m", "vmatdose.train", "data=clinic",
               f"data.cases_dir={work / 'cases'}", "protocol=head_neck", "trainer.max_epochs=1",
               f"++trainer.limit_train_batches={args.steps}", "++trainer.limit_val_batches=1",
               "evaluate_after_training=false", "logger=csv", f"hydra.run.dir={run_dir}"]
    run = timed(command, work, env, work / "train.log")
    throughput = json.loads((run_dir / "throughput.json").read_text())
    return {**run, "steps": throughput["steps"],
            "steps_per_s": round(throughput["steps"] / run["seconds"], 4),
            "fit_steps_per_s": round(float(throughput["steps_per_s"]), 4),
            "checkpoint": str(sorted((run_dir / "checkpoints").glob("*.ckpt"))[-1])}


def predict(args, work: Path, env: dict, ckpt: str) -> dict:
    kept = len(list((work / "keep").iterdir()))
    command = [sys.executable, "-m", "vmatdose.predict", f"ckpt_path={ckpt}",
               f"dicom_dir={work / 'keep'}", f"output_dir={work / 'predictions'}",
               "accelerator=cpu", f"hydra.run.dir={work / 'hydra' / 'predict'}"]
    run = timed(command, work, env, work / "predict.log")
    rtdose_mb = np.mean([p.stat().st_size for p in (work / "predictions").glob("*.dcm")]) / 1e6
    return {**run, "patients": kept, "seconds_per_patient": round(run["seconds"] / kept, 1),
            "rtdose_mb": round(float(rtdose_mb), 2)}


def machine_info() -> dict:
    import torch

    return {"platform": platform.platform(), "cpu_count": os.cpu_count(),
            "load_average_at_end": list(os.getloadavg()), "python": platform.python_version(),
            "torch": torch.__version__,
            "memory_gb": round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 1e9,
                               1)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--patients", type=int, default=4, help="N (default 4)")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--chunk", type=int, default=10,
                        help="patients written as DICOM at a time")
    parser.add_argument("--steps", type=int, default=8, help="training steps")
    parser.add_argument("--predict-patients", type=int, default=2)
    parser.add_argument("--work-dir", default=None, help="default: a temporary folder")
    args = parser.parse_args()
    if args.patients < 3:
        parser.error("--patients: at least 3 (a training, a validation and a test case)")
    work = Path(tempfile.mkdtemp(prefix="bench_clinic_", dir=args.work_dir))
    env = {**os.environ, "PYTHONPATH": str(ROOT), "VMATDOSE_ID_SALT": "bench-clinic",
           "VMATDOSE_ROOT": str(work)}
    load_start = list(os.getloadavg())
    try:
        prep = preprocess_chunks(args, work, env)
        fit = train(args, work, env)
        pred = predict(args, work, env, fit.pop("checkpoint"))
    finally:
        shutil.rmtree(work, ignore_errors=True)
    result = {"patients": args.patients, "workers": args.workers, "chunk": args.chunk,
              "ct": "512 x 512, 0.98-1.17 mm, 2.0/2.5/3.0 mm slices, 240 mm",
              "preprocess": prep, "train": fit, "predict": pred,
              "machine": {**machine_info(), "load_average_at_start": load_start}}
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / f"bench_clinic_scale_n{args.patients}.json"
    path.write_text(json.dumps(result, indent=2))
    print(f"clinic scale, N = {args.patients} head-and-neck patients (512 x 512 CT, 2.5 mm "
          f"RTDOSE, two arcs); training grid {prep['target_spacing_mm']} mm, largest case "
          f"{prep['case_shape_max']}")
    print(f"{'stage':<34}{'value':>12}")
    rows = [("DICOM per patient (MB)", prep["dicom_mb_per_patient"]),
            ("preprocess s per case (wall)", prep["seconds_per_case"]),
            ("preprocess peak RSS (GB)", prep["peak_rss_gb"]),
            ("case file (MB)", prep["case_mb"]),
            (f"train steps/s ({fit['steps']} steps, wall)", fit["steps_per_s"]),
            ("train steps/s (fit loop)", fit["fit_steps_per_s"]),
            ("train peak RSS (GB)", fit["peak_rss_gb"]),
            (f"predict s per patient ({pred['patients']})", pred["seconds_per_patient"]),
            ("predict peak RSS (GB)", pred["peak_rss_gb"]),
            ("RTDOSE file (MB)", pred["rtdose_mb"])]
    for name, value in rows:
        print(f"{name:<34}{value:>12}")
    print(f"load average {load_start} -> {result['machine']['load_average_at_end']} "
          f"({os.cpu_count()} cores); results -> {path}")


if __name__ == "__main__":
    main()
