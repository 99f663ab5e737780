"""Every case checked before any optimisation starts: its prediction, its targets, its
protocol, its beams, and whether planning it fits in the memory limit.

The memory estimate needs no planning engine: the bixel count is the number of
``bixel_width``-sized cells the targets cover in each beam's view (divergence ignored),
the dose influence matrix keeps per bixel about the dose-grid voxels of a cylinder of
:data:`CORE_RADIUS_MM` along the body's equivalent diameter, at :data:`BYTES_PER_ENTRY`,
and the engine's assembly holds up to :data:`ASSEMBLY_FACTOR` copies of it at its peak.
(Measured at 5 mm grid and bixels: OpenKBP pt_201 2.7 GB peak, estimate 4.5 GB; the
36-beam phantom 4.0 GB, estimate 3.8 GB.)
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from vmatdose.data.beams import BeamArrangement
from vmatdose.data.case import Case, load_case
from vmatdose.errors import InputError
from vmatdose.inference.predictions import load_prediction, prediction_path
from vmatdose.planning.arrangement import case_arrangement, case_targets
from vmatdose.planning.settings import PlanSettings
from vmatdose.protocol import Protocol

#: Radius (mm) of the cylinder whose dose-grid voxels stand for one bixel's entries,
#: fitted to the engine's matrices at 5 mm: an OpenKBP patient (8600 entries per bixel)
#: and the pelvic phantom (14400); it errs on the safe side for the first.
CORE_RADIUS_MM = 45.0
#: float64 value + int32 row index of a sparse (CSC) entry.
BYTES_PER_ENTRY = 12
#: Peak copies of the matrix while the engine assembles it (measured about 1.5; kept
#: on the safe side).
ASSEMBLY_FACTOR = 2.0
#: Python, the engine and one case's arrays (GB), measured on the phantom.
BASE_GB = 1.0


@dataclass(frozen=True)
class PlanJob:
    """A case that passed the checks: its file, prediction file, beams and estimates."""

    case_path: Path
    prediction_path: Path
    case_id: str
    arrangement: BeamArrangement
    estimated_bixels: int
    estimated_gb: float


def estimate_bixels(case: Case, arrangement: BeamArrangement, bixel_width_mm: float) -> int:
    """Bixels covering the targets, summed over beams (each beam's view of the targets
    cut into ``bixel_width_mm`` squares in the isocentre plane, plus a one-bixel margin;
    divergence ignored)."""
    union = np.stack([case.mask(t) for t in case_targets(case)]).any(0)
    idx = np.argwhere(union)
    zyx = case.origin_mm + idx * case.spacing_mm - np.asarray(arrangement.isocentre_mm)
    z, y, x = zyx.T
    total = 0
    for gantry, couch in zip(arrangement.gantry_deg, arrangement.couch_deg):
        c, g = np.deg2rad(couch), np.deg2rad(gantry)
        xr, zr = x * np.cos(c) - z * np.sin(c), x * np.sin(c) + z * np.cos(c)
        lateral = xr * np.cos(g) + y * np.sin(g)
        cells = np.unique(np.round(np.stack([lateral, zr], 1) / bixel_width_mm)
                          .astype(np.int64), axis=0)
        # the engine adds a margin of about one bixel around the targets' outline
        ring = np.concatenate([cells + (i, j) for i in (-1, 0, 1) for j in (-1, 0, 1)])
        total += len(np.unique(ring, axis=0))
    return int(total)


def estimate_peak_gb(case: Case, n_bixels: int, settings: PlanSettings) -> float:
    """Estimated peak resident memory (GB) of planning ``case`` with ``n_bixels``."""
    voxel_mm3 = float(settings.dose_grid_mm) ** 3 if settings.dose_grid_mm else \
        float(np.prod(case.spacing_mm))
    axial_mm2 = case.body.sum(axis=(1, 2)).max() * case.spacing_mm[1] * case.spacing_mm[2]
    diameter_mm = 2.0 * np.sqrt(axial_mm2 / np.pi)
    body_voxels = case.body.sum() * float(np.prod(case.spacing_mm)) / voxel_mm3
    per_bixel = min(np.pi * CORE_RADIUS_MM ** 2 * diameter_mm / voxel_mm3, body_voxels)
    matrix_gb = n_bixels * per_bixel * BYTES_PER_ENTRY / 1e9
    return float(BASE_GB + ASSEMBLY_FACTOR * matrix_gb)


def check_case(case_path: Path, predictions_dir: Path, protocol: Protocol,
               settings: PlanSettings) -> PlanJob:
    """One case's checks; ``InputError`` naming the case and the problem."""
    case = load_case(case_path)
    label = f"case {case.case_id!r} ({case_path})"
    recorded = case.meta.get("protocol")
    if recorded is not None and recorded != protocol.name:
        raise InputError(f"{label} was made for protocol {recorded!r}, not {protocol.name!r}: "
                         f"run with protocol={recorded}")
    if not case_targets(case):
        raise InputError(f"{label} has no targets (no prescribed structure with voxels): "
                         "nothing to plan")
    pred_path = prediction_path(predictions_dir, case.case_id)
    if not pred_path.is_file():
        raise InputError(f"{label}: no prediction {pred_path}")
    try:
        load_prediction(pred_path, case)
    except (FileNotFoundError, OSError) as err:
        raise InputError(f"{label}: {err}") from err
    arrangement = case_arrangement(case, protocol)
    n_bixels = estimate_bixels(case, arrangement, settings.bixel_width_mm)
    peak = estimate_peak_gb(case, n_bixels, settings)
    if peak > settings.memory_limit_gb:
        grid = f"{settings.dose_grid_mm} mm" if settings.dose_grid_mm else "the case grid"
        raise InputError(
            f"{label}: planning needs about {peak:.1f} GB ({n_bixels} bixels of "
            f"{settings.bixel_width_mm} mm, dose grid {grid}), over "
            f"planning.memory_limit_gb={settings.memory_limit_gb:g}; use a coarser "
            "planning.dose_grid_mm, a wider planning.bixel_width_mm or raise the limit")
    return PlanJob(case_path, pred_path, case.case_id, arrangement, n_bixels, peak)


def check_cases(case_paths: Sequence[Path], predictions_dir: str | Path, protocol: Protocol,
                settings: PlanSettings) -> list[PlanJob]:
    """:func:`check_case` for every case, all before any planning."""
    if not case_paths:
        raise InputError("no case files to plan")
    return [check_case(Path(p), Path(predictions_dir), protocol, settings) for p in case_paths]
