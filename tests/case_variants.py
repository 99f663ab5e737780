"""Case files that break a checkpoint's contract in one way each."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import numpy as np

from vmatdose.data.case import Case, list_case_files, load_case, save_case


def first_case(cases_dir: Path) -> Case:
    return load_case(list_case_files(cases_dir)[0])


def without_structure(case: Case, name: str) -> Case:
    """``case`` with structure ``name`` (and its prescription) removed."""
    keep = [i for i, s in enumerate(case.structures) if s != name]
    return replace(case, masks=case.masks[keep], structures=[case.structures[i] for i in keep],
                   prescriptions_gy={k: v for k, v in case.prescriptions_gy.items() if k != name})


def as_head_and_neck(case: Case) -> Case:
    """``case`` relabelled as a head-and-neck patient: PTV70, PTV63 and OARs of that site,
    ``meta["protocol"] = "head_neck"``, on the same grid."""
    names = {"PTV56": "PTV63", "Rectum": "SpinalCord", "Bladder": "Brainstem",
             "Femur_L": "LeftParotid", "Femur_R": "RightParotid", "Bowel": "Mandible"}
    structures = [names.get(s, s) for s in case.structures]
    return replace(case, case_id=f"{case.case_id}_hn", structures=structures,
                   prescriptions_gy={"PTV70": 70.0, "PTV63": 63.0},
                   meta={**case.meta, "protocol": "head_neck", "fractions": 35})


def upsampled(case: Case, factor: int = 2, case_id: str | None = None) -> Case:
    """``case`` on a grid ``factor`` times finer per axis (every voxel repeated), covering
    the same volume: spacing divided by ``factor``."""
    def up(a: np.ndarray) -> np.ndarray:
        for axis in range(-3, 0):
            a = np.repeat(a, factor, axis=axis)
        return a

    shift = np.asarray(case.spacing_mm) * (1 - 1 / factor) / 2
    return replace(case, case_id=case_id or f"{case.case_id}_fine", ct=up(case.ct),
                   masks=up(case.masks), body=up(case.body),
                   dose=None if case.dose is None else up(case.dose),
                   spacing_mm=np.asarray(case.spacing_mm) / factor,
                   origin_mm=np.asarray(case.origin_mm) - shift)


def with_spacing(case: Case, spacing_mm, case_id: str) -> Case:
    return replace(case, case_id=case_id, spacing_mm=np.asarray(spacing_mm, float))


def write(case: Case, folder: Path) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    return save_case(case, folder / f"{case.case_id}.npz")
