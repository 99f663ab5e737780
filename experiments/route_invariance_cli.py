"""Route invariance as a user runs it: OpenKBP validation patients written as a clinic's
DICOM-RT export at the CT resolution the challenge arrays were made from (512 x 512, pixel
= the arrays' in-plane spacing / 4, the arrays' slices; an External drawn from the CT at
-500 HU as a planning system draws it; RTDOSE on a 2.5 mm grid; RTPLAN with the nine
fields), then predicted by one checkpoint twice with the commands a user types:

    python -m vmatdose.predict ckpt_path=<ckpt> cases_dir=<OpenKBP folder> output_dir=A
    python -m vmatdose.predict ckpt_path=<ckpt> dicom_dir=<DICOM folders> output_dir=B

Prints one JSON line per patient: the mean absolute difference of the two predictions
inside the possible-dose mask (Gy, on the arrays' grid), the grid the DICOM route
predicted on, and whether the exported RTDOSE lies on the patient's own RTDOSE grid.

    PYTHONPATH=$PWD python experiments/route_invariance_cli.py <ckpt> <work dir> pt_201 ...
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pydicom

sys.path[:0] = [str(Path(__file__).resolve().parents[1] / "tests" / "data")]

from openkbp_as_dicom import write_case_as_dicom  # noqa: E402

from vmatdose.data.case import Case  # noqa: E402
from vmatdose.data.ingest.openkbp import SAMPLE, import_openkbp_patient  # noqa: E402
from vmatdose.data.resample import Grid, resample_volume  # noqa: E402

from dicom_builders import GridSpec  # noqa: E402


def clinic_ct_grid(case: Case) -> GridSpec:
    """512 x 512 over the arrays' field of view (pixel = their spacing / 4), their slices."""
    spacing = np.array([case.spacing_mm[0], case.spacing_mm[1] / 4, case.spacing_mm[2] / 4])
    low = np.asarray(case.origin_mm) - np.asarray(case.spacing_mm) / 2
    shape = (case.shape[0], 4 * case.shape[1], 4 * case.shape[2])
    return GridSpec(shape, tuple(spacing), tuple(low + spacing / 2))


def read_npz(path: Path) -> tuple[np.ndarray, Grid]:
    """A prediction file's dose (Gy) and the grid it says it is on."""
    with np.load(path) as data:
        grid = json.loads(str(data["grid"]))
        return data["dose"], Grid(tuple(grid["shape"]), tuple(grid["spacing_mm"]),
                                  tuple(grid["origin_mm"]))


def predict(*args: str) -> float:
    start = time.perf_counter()
    subprocess.run([sys.executable, "-m", "vmatdose.predict", *args, "accelerator=cpu"],
                   check=True, env={**os.environ, "VMATDOSE_ID_SALT": "route"})
    return round(time.perf_counter() - start, 1)


def main(ckpt: str, work: Path, patients: list[str]) -> None:
    arrays_in, dicom_in = work / "openkbp", work / "dicom"
    cases = {}
    for name in patients:
        folder = next(SAMPLE.glob(f"*/{name}"))
        cases[name] = import_openkbp_patient(folder)
        if not (arrays_in / name).is_dir():
            shutil.copytree(folder, arrays_in / name)
        if not (dicom_in / name).is_dir():
            write_case_as_dicom(cases[name], dicom_in / name, clinic_ct_grid(cases[name]),
                                body="external")
    id_map = work / "case_ids.csv"
    id_map.write_text("key,case_id\n" + "".join(f"{n},dicom_{n}\n" for n in patients))
    for out in ("by_arrays", "by_dicom"):
        shutil.rmtree(work / out, ignore_errors=True)
    seconds = {"arrays": predict(f"ckpt_path={ckpt}", f"cases_dir={arrays_in}",
                                 f"output_dir={work / 'by_arrays'}"),
               "dicom": predict(f"ckpt_path={ckpt}", f"dicom_dir={dicom_in}",
                                f"output_dir={work / 'by_dicom'}", f"case_id_map={id_map}")}
    print(json.dumps({"predict_seconds": seconds}))
    for name, case in cases.items():
        by_arrays, _ = read_npz(next((work / "by_arrays").glob(f"*{name}.npz")))
        by_dicom, dicom_grid = read_npz(work / "by_dicom" / f"dicom_{name}.npz")
        back = resample_volume(by_dicom, dicom_grid, Grid.of(case))
        inside = case.body > 0
        rtdose = pydicom.dcmread(work / "by_dicom" / f"dicom_{name}_rtdose.dcm")
        source = pydicom.dcmread(next((dicom_in / name).glob("RD*.dcm")))
        same_grid = (rtdose.Rows == source.Rows and rtdose.Columns == source.Columns
                     and rtdose.NumberOfFrames == source.NumberOfFrames
                     and np.allclose([float(v) for v in rtdose.ImagePositionPatient],
                                     [float(v) for v in source.ImagePositionPatient]))
        print(json.dumps({
            "patient": name, "arrays_spacing_mm": [round(float(v), 3) for v in case.spacing_mm],
            "dicom_grid_spacing_mm": [round(float(v), 3) for v in dicom_grid.spacing_mm],
            "dicom_grid_shape": list(dicom_grid.shape),
            "prediction_mean_gy": round(float(by_arrays[inside].mean()), 2),
            "mean_abs_difference_gy": round(float(np.abs(back - by_arrays)[inside].mean()), 3),
            "rtdose_on_own_grid": bool(same_grid)}), flush=True)


if __name__ == "__main__":
    main(sys.argv[1], Path(sys.argv[2]), sys.argv[3:])
