"""Per-case writers of a prediction, chosen by predict's config.

Each writer takes ``(prediction, output_dir, options)`` and returns the paths it wrote.
``npz`` always runs (the prediction file evaluate reads); ``export_rtdose=true`` adds
``rtdose`` and ``export_openkbp=true`` adds ``openkbp``. A new export is one function and
one entry in :data:`WRITERS`.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from pathlib import Path

from vmatdose.data.export.rtdose import DOSE_GRID_MM
from vmatdose.errors import InputError
from vmatdose.inference.predictions import prediction_path, save_prediction
from vmatdose.inference.predictor import Prediction

Writer = Callable[[Prediction, Path, Mapping], list[Path]]


def write_npz_prediction(prediction: Prediction, output_dir: Path, options: Mapping
                         ) -> list[Path]:
    """``<case_id>.npz`` (see :mod:`vmatdose.inference.predictions`)."""
    case = prediction.case
    return [save_prediction(case, prediction.dose_gy, prediction.std_gy,
                            prediction_path(output_dir, case.case_id))]


def write_rtdose_file(prediction: Prediction, output_dir: Path, options: Mapping
                      ) -> list[Path]:
    """``<case_id>_rtdose.dcm``: a DICOM RTDOSE of the predicted dose, on the patient's
    own RTDOSE grid, else ``options["rtdose_grid_mm"]`` over the body. With
    ``options["source_dicom"]`` (the patients' DICOM folder) the export reads the patient
    identity and study/frame UIDs from there."""
    from vmatdose.data.export.rtdose import find_source_patient, write_rtdose
    from vmatdose.data.privacy import SaltError

    case = prediction.case
    path = output_dir / f"{case.case_id}_rtdose.dcm"
    source = None
    if options.get("source_dicom"):
        try:
            source = find_source_patient(case.case_id, options["source_dicom"],
                                         options.get("id_salt") or None,
                                         options.get("case_id_map"))
        except (LookupError, SaltError) as err:
            raise InputError(f"{case.case_id}: {err}") from err
    return [write_rtdose(prediction.dose_gy, case, path, source=source,
                         grid_mm=options.get("rtdose_grid_mm", DOSE_GRID_MM))]


def write_openkbp_file(prediction: Prediction, output_dir: Path, options: Mapping
                       ) -> list[Path]:
    """``pt_N.csv``: the OpenKBP challenge's sparse submission format, on the original
    (row, column, slice) layout (:mod:`vmatdose.data.export.openkbp`)."""
    from vmatdose.data.export.openkbp import write_submission

    try:
        return [write_submission(prediction.dose_gy, prediction.case, output_dir)]
    except ValueError as err:
        raise InputError(str(err)) from err


WRITERS: dict[str, Writer] = {"npz": write_npz_prediction, "rtdose": write_rtdose_file,
                              "openkbp": write_openkbp_file}


def chosen_writers(export_rtdose: bool = False, export_openkbp: bool = False) -> list[Writer]:
    """The writers predict runs for each case, in order."""
    names = ["npz"] + (["rtdose"] if export_rtdose else []) + (["openkbp"] if export_openkbp
                                                                else [])
    return [WRITERS[name] for name in names]
