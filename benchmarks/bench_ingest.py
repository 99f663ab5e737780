"""Seconds per case of DICOM-RT ingestion: 150-slice 512 x 512 CT, 10 structures, RTDOSE.

    python benchmarks/bench_ingest.py [--cases 2] [--workers 2] [--slices 150]

Builds synthetic patients (tests/data/dicom_builders.py: CT series, RTSTRUCT with 10 ROIs
incl. a ring with a hole and a two-polygon ROI, a coarser offset RTDOSE, RTPLAN) in a
temporary folder, then times

* one case in this process, phase by phase (scan headers, CT, masks, dose, save_case);
* the batch engine (``convert_cases``) over all cases with ``--workers`` spawned workers,
  wall clock / case (worker start-up included).

Prints a table and writes ``benchmarks/results/bench_ingest.json`` with machine info.
Goal (issue 4): under 10 s per case on 2 cores (the founding script: 120-180 s).
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import os
import platform
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pydicom
import SimpleITK as sitk

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests" / "data"))

from vmatdose.data.case import save_case  # noqa: E402
from vmatdose.data.ingest import dicom as dicom_ingest  # noqa: E402
from vmatdose.data.ingest.batch import convert_cases  # noqa: E402
from vmatdose.data.ingest.dicom import DicomIngestSettings, ingest_dicom_case  # noqa: E402
from vmatdose.protocol import Protocol  # noqa: E402

from dicom_builders import SCENE, GridSpec, PatientSpec, write_patient  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results" / "bench_ingest.json"
TEN_STRUCTURES = {"CTV70": ("CTV70",), "Couch": ("Couch",)}  # + the 7 prostate ones + Body


def bench_spec(slices: int) -> PatientSpec:
    """A clinical-size patient: 512 x 512 x ``slices`` CT at 0.98 x 0.98 x 2 mm; the dose
    grid (2.5 mm, two beams) spans the body's bounding box + 10 mm, as a TPS sets it."""
    ct = GridSpec((slices, 512, 512), (2.0, 0.9766, 0.9766), (-150.0, -250.0, -250.0))
    scale = 2.5
    cx, cy = ct.centre_xy()
    bx, by, ax, ay = SCENE["Body"][1][0]
    half_x, half_y = ax * scale + 10.0, ay * scale + 10.0
    z0 = ct.origin[0] - 1.0
    dose = GridSpec((int(np.ceil((slices - 1) * 2.0 / 2.5)) + 2,
                     int(2 * half_y / 2.5) + 1, int(2 * half_x / 2.5) + 1), (2.5, 2.5, 2.5),
                    (z0, cy + by * scale - half_y, cx + bx * scale - half_x))
    return PatientSpec(ct=ct, dose_grid=dose, scale=scale, vertices=160,
                       beam_weights=(0.4, 0.6))


def bench_protocol() -> Protocol:
    """The prostate protocol plus CTV70 and Couch, so all 10 ROIs are rasterised."""
    prostate = Protocol.load("prostate_sib")
    return dataclasses.replace(prostate, oars=(*prostate.oars, *TEN_STRUCTURES),
                               synonyms={**prostate.synonyms, **TEN_STRUCTURES})


def timed_phases(folder: Path, settings: DicomIngestSettings, out: Path) -> dict[str, float]:
    """Ingest one case with the phases timed by wrapping the module's steps."""
    phases: dict[str, float] = {}
    names = {"scan_folder": "scan headers", "read_ct_volume": "CT pixels",
             "_rasterize": "rasterise masks", "dose_on_grid": "RTDOSE resample"}
    originals = {name: getattr(dicom_ingest, name) for name in names}

    def wrap(name, fn):
        @functools.wraps(fn)
        def inner(*args, **kwargs):
            start = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                phases[names[name]] = phases.get(names[name], 0.0) + time.perf_counter() - start
        return inner

    for name, fn in originals.items():
        setattr(dicom_ingest, name, wrap(name, fn))
    try:
        start = time.perf_counter()
        case = ingest_dicom_case(folder, "bench_serial", settings)
        phases["ingest total"] = time.perf_counter() - start
    finally:
        for name, fn in originals.items():
            setattr(dicom_ingest, name, fn)
    start = time.perf_counter()
    save_case(case, out / "bench_serial.npz")
    phases["save_case (npz)"] = time.perf_counter() - start
    phases["case total"] = phases["ingest total"] + phases["save_case (npz)"]
    assert len(case.structures) == 9 and case.dose is not None  # 9 masks + body = 10 ROIs
    return phases


def machine_info() -> dict:
    return {"platform": platform.platform(), "processor": platform.processor(),
            "cpu_count": os.cpu_count(), "load_average": list(os.getloadavg()),
            "python": platform.python_version(), "numpy": np.__version__,
            "pydicom": pydicom.__version__, "SimpleITK": sitk.Version_VersionString()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--cases", type=int, default=2)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--slices", type=int, default=150)
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="bench_ingest_"))
    try:
        start = time.perf_counter()
        folders = [work / "in" / f"patient_{i}" for i in range(args.cases)]
        for folder in folders:
            write_patient(folder, bench_spec(args.slices))
        build_s = time.perf_counter() - start
        settings = DicomIngestSettings(protocol=bench_protocol(), id_salt="bench")
        phases = timed_phases(folders[0], settings, work / "serial")
        jobs = [(f"bench_{i}", f) for i, f in enumerate(folders)]
        start = time.perf_counter()
        summary = convert_cases(jobs, functools.partial(ingest_dicom_case, settings=settings),
                                work / "batch", num_workers=args.workers, progress=False)
        batch_s = time.perf_counter() - start
        assert summary["counts"]["processed"] == args.cases, summary["failed"]
        case_mb = np.mean([p.stat().st_size for p in (work / "batch").glob("*.npz")]) / 1e6
    finally:
        shutil.rmtree(work, ignore_errors=True)
    result = {"ct_shape": [args.slices, 512, 512], "structures": 10, "cases": args.cases,
              "workers": args.workers, "build_seconds": round(build_s, 2),
              "serial_phases_seconds": {k: round(v, 3) for k, v in phases.items()},
              "batch_wall_seconds": round(batch_s, 2),
              "batch_seconds_per_case": round(batch_s / args.cases, 2),
              "worker_seconds_per_case": [p["seconds"] for p in summary["processed"]],
              "case_file_mb": round(float(case_mb), 1), "goal_seconds_per_case": 10.0,
              "machine": machine_info()}
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(result, indent=2))
    print(f"DICOM-RT ingest, CT {args.slices}x512x512, 10 structures, RTDOSE (2 beams)")
    print(f"{'phase (1 case, 1 process)':<34}{'s':>8}")
    for key, value in phases.items():
        print(f"{key:<34}{value:>8.2f}")
    print(f"{f'batch: {args.cases} cases, {args.workers} workers':<34}{batch_s:>8.2f}")
    print(f"{'batch s per case (wall)':<34}{batch_s / args.cases:>8.2f}   (goal < 10)")
    print(f"case file {case_mb:.1f} MB; results -> {RESULTS}")


if __name__ == "__main__":
    main()
