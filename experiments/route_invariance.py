"""Route invariance, measured: one checkpoint, OpenKBP patients predicted from their case
files and from the same patients written as a clinic's DICOM (1.2 mm in-plane, 2.5 mm
slices, RTDOSE on a 2.5 mm grid, RTPLAN with the nine fields at the targets' centroid)
and ingested back. Prints one JSON line per patient (experiments/route_invariance.md).

    PYTHONPATH=$PWD python experiments/route_invariance.py <ckpt> <work dir> pt_201 pt_211

Mean absolute differences (Gy) inside the possible-dose mask, on the OpenKBP grid:
``before``: the predictor as it was (input channels built on the 1.2 mm grid, then
resized by index: masks nearest = floor, shifting them up to half a coarse voxel);
``after``: the case resampled to the training spacing in patient mm first;
``training_grid``: ``spacing_mismatch=training_grid`` (both routes on the median grid).
"""

from __future__ import annotations

import json
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch
from monai.transforms import Resize

sys.path[:0] = [str(Path(__file__).resolve().parents[1] / "tests" / "data")]

from openkbp_as_dicom import clinical_grid, write_case_as_dicom  # noqa: E402

from vmatdose.data.beams import BeamArrangement  # noqa: E402
from vmatdose.data.case import Case, load_case, save_case  # noqa: E402
from vmatdose.data.ingest.dicom import DicomIngestSettings, ingest_dicom_case  # noqa: E402
from vmatdose.data.ingest.openkbp import SAMPLE, import_openkbp_patient  # noqa: E402
from vmatdose.data.resample import Grid, resample_volume  # noqa: E402
from vmatdose.inference import Predictor  # noqa: E402
from vmatdose.inference.predictor import predict_image  # noqa: E402


def predict_before(predictor: Predictor, case: Case) -> np.ndarray:
    """The predictor before the fix: inputs on the case's grid, resized by index."""
    sample = predictor.transform({"path": "", "case": case})
    image, body = sample["image"], sample["body"]
    target = predictor.spacing.median_mm
    shape = tuple(int(v) for v in np.maximum(1, np.round(
        np.asarray(case.shape) * case.spacing_mm / np.asarray(target))))
    resize = {"linear": Resize(shape, mode="trilinear"), "nearest": Resize(shape, mode="nearest")}
    resize["constant"] = resize["nearest"]
    parts, start = [], 0
    for mode in predictor.contract.input_spec.interpolations:
        parts.append(torch.as_tensor(resize[mode](image[start:start + 1])))
        start += 1
    image, body = torch.cat(parts), torch.as_tensor(resize["nearest"](body))
    mean, _ = predict_image(predictor.module, image[None], body[None], zero=False)
    mean = torch.as_tensor(Resize(case.shape, mode="trilinear")(mean[0]))[0]
    return (np.asarray(mean) * (case.body > 0) * predictor.contract.dose_scale_gy
            ).astype(np.float32)


def predict_after(predictor: Predictor, case: Case) -> np.ndarray:
    work = predictor.on_training_grid(case)
    sample = predictor.transform({"path": "", "case": work})
    mean, _ = predict_image(predictor.module, sample["image"][None], sample["body"][None],
                            zero=False)
    dose = np.asarray(mean[0, 0]) * predictor.contract.dose_scale_gy
    return resample_volume(dose, Grid.of(work), Grid.of(case)) * (case.body > 0)


def prior_gy(predictor: Predictor, case: Case) -> tuple[np.ndarray, Grid]:
    """The prior channel (Gy) the model sees and the grid it is on (the training grid)."""
    work = predictor.on_training_grid(case)
    image = predictor.transform({"path": "", "case": work})["image"]
    return np.asarray(image[-1]) * predictor.contract.dose_scale_gy, Grid.of(work)


def dicom_case(case: Case, folder: Path, body: str) -> Case:
    path = folder / f"{body}.npz"
    if path.is_file():
        return load_case(path)
    write_case_as_dicom(case, folder / body, clinical_grid(case, 1.2), body=body)
    settings = DicomIngestSettings(protocol=predictor_protocol)
    ingested = ingest_dicom_case(folder / body, body, settings)
    save_case(ingested, path)
    return ingested


def shifted_isocentre(case: Case, mm: float) -> Case:
    beams = BeamArrangement.from_meta(case.meta["beams"])
    iso = np.asarray(beams.isocentre_mm) + np.array([0.0, 0.0, mm])
    return replace(case, meta={**case.meta, "beams": replace(
        beams, isocentre_mm=tuple(float(v) for v in iso)).to_meta()})


def measure(predictor: Predictor, patient: str, work: Path) -> dict:
    folder = next(SAMPLE.glob(f"*/{patient}"))
    a = import_openkbp_patient(folder)
    pdm = a.body > 0
    ga = Grid.of(a)
    on_a = lambda v, c: resample_volume(v, Grid.of(c), ga)  # noqa: E731
    mean = lambda x: round(float(np.abs(x)[pdm].mean()), 3)  # noqa: E731
    row: dict = {"patient": patient}
    dose_a = predict_after(predictor, a)
    row["pred_mean_gy"] = mean(dose_a)
    one_grid = Predictor(predictor.module, predictor.contract, "training_grid")
    dose_a_one_grid = predict_after(one_grid, a)
    for body in ("external", "possible_dose"):
        b = dicom_case(a, work / patient, body)
        gb = Grid.of(b)
        if body == "external":
            row["reference_dose_floor"] = mean(on_a(b.dose, b) - a.dose)
            row["prediction_floor"] = mean(on_a(resample_volume(dose_a, ga, gb), b) - dose_a)
            row["ct_hu"] = mean(on_a(b.ct.astype(np.float32), b) - a.ct)
            bb = on_a(b.body.astype(np.float32), b) >= 0.5
            row["body_voxels_external_not_mask"] = int((bb & ~pdm).sum())
            row["body_voxels_mask_not_external"] = int((pdm & ~bb).sum())
            padded = replace(b, ct=np.where(b.body > 0, b.ct, -3024).astype(np.int16))
            row["ct_padding_-3024_after"] = mean(on_a(predict_after(predictor, padded)
                                                      - predict_after(predictor, b), b))
            row["isocentre_10mm_after"] = mean(on_a(predict_after(
                predictor, shifted_isocentre(b, 10.0)) - predict_after(predictor, b), b))
        prior_b, grid_b = prior_gy(predictor, b)
        prior_a, grid_a = prior_gy(predictor, a)
        row[f"prior_gy_{body}"] = mean(resample_volume(prior_b, grid_b, ga)
                                       - resample_volume(prior_a, grid_a, ga))
        row[f"before_{body}"] = mean(on_a(predict_before(predictor, b), b) - dose_a)
        row[f"after_{body}"] = mean(on_a(predict_after(predictor, b), b) - dose_a)
        row[f"training_grid_{body}"] = mean(on_a(predict_after(one_grid, b), b)
                                            - dose_a_one_grid)
    return row


if __name__ == "__main__":
    ckpt, work_dir, *patients = sys.argv[1:]
    torch.set_num_threads(1)
    model = Predictor.from_checkpoint(ckpt, "cpu", "resample")  # before / after: as measured
    predictor_protocol = model.protocol
    for name in patients:
        print(json.dumps(measure(model, name, Path(work_dir))), flush=True)
