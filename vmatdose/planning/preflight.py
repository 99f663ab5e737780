"""Every case checked before any optimisation starts: its prediction, its targets, its
protocol, its beams, and whether planning it fits in the memory limit.

The memory estimate needs no planning engine. Bixels: the ``bixel_width``-sized cells
the targets cover in each beam's view plus a one-bixel margin (:func:`estimate_bixels`;
the engine's divergent rays make about :data:`DIVERGENCE` times more). Matrix entries:
each bixel keeps the dose-grid voxels of the body within the pencil beam's lateral
cut-off (``planning.lateral_cutoff_mm``) of its ray, counted by projecting the body into
the beam's view (:func:`estimate_entries`: 0.92-1.01 of the engine's count on ten
OpenKBP patients, 1.00 on the 36-beam phantom). Peak: :data:`BASE_GB` plus
:data:`ASSEMBLY_FACTOR` times the matrix at :data:`BYTES_PER_ENTRY`
(:func:`estimate_peak_gb`), fitted to peaks measured one case per process
(experiments/planning.md).
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

#: Engine bixels per estimated bixel (its rays diverge from the source; measured 1.10-1.18).
DIVERGENCE = 1.14
#: Bytes an entry of the dose influence matrix is counted in (the unit
#: :data:`ASSEMBLY_FACTOR` was fitted in).
BYTES_PER_ENTRY = 12
#: Peak copies of the matrix while the engine assembles it and it is turned into the
#: optimisers' CSR copy (fitted to pt_201 and pt_204, issue 27's timing run).
ASSEMBLY_FACTOR = 2.07
#: Python, the engine and one case's arrays (GB).
BASE_GB = 0.97


@dataclass(frozen=True)
class PlanJob:
    """A case that passed the checks: its file, prediction file, beams and estimates."""

    case_path: Path
    prediction_path: Path
    case_id: str
    arrangement: BeamArrangement
    estimated_bixels: int
    estimated_gb: float


def beam_views(case: Case, arrangement: BeamArrangement, mask: np.ndarray
               ) -> list[np.ndarray]:
    """Per beam, (N, 2) (lateral, longitudinal) mm of ``mask``'s voxels projected into
    the beam's view at the isocentre (divergence ignored)."""
    idx = np.argwhere(mask)
    zyx = case.origin_mm + idx * case.spacing_mm - np.asarray(arrangement.isocentre_mm)
    z, y, x = zyx.T
    views = []
    for gantry, couch in zip(arrangement.gantry_deg, arrangement.couch_deg):
        c, g = np.deg2rad(couch), np.deg2rad(gantry)
        xr, zr = x * np.cos(c) - z * np.sin(c), x * np.sin(c) + z * np.cos(c)
        views.append(np.stack([xr * np.cos(g) + y * np.sin(g), zr], 1))
    return views


def _bixel_cells(view: np.ndarray, bixel_width_mm: float) -> np.ndarray:
    """The cells a target view covers plus a one-cell margin (as the engine does)."""
    cells = np.unique(np.round(view / bixel_width_mm).astype(np.int64), axis=0)
    ring = np.concatenate([cells + (i, j) for i in (-1, 0, 1) for j in (-1, 0, 1)])
    return np.unique(ring, axis=0)


def _targets(case: Case) -> np.ndarray:
    return np.stack([case.mask(t) for t in case_targets(case)]).any(0)


def estimate_bixels(case: Case, arrangement: BeamArrangement, bixel_width_mm: float) -> int:
    """Bixels covering the targets, summed over beams (each beam's view of the targets
    cut into ``bixel_width_mm`` squares in the isocentre plane, plus a one-bixel margin;
    divergence ignored)."""
    return int(sum(len(_bixel_cells(view, bixel_width_mm))
                   for view in beam_views(case, arrangement, _targets(case))))


def estimate_entries(case: Case, arrangement: BeamArrangement, settings: PlanSettings
                     ) -> float:
    """Dose influence matrix entries: for each bixel, the dose-grid voxels of the body
    within ``settings.lateral_cutoff_mm`` of its ray (the body projected into each beam's
    view, summed over a disc around each bixel), times :data:`DIVERGENCE`."""
    from scipy.signal import fftconvolve

    width = float(settings.bixel_width_mm)
    voxel_mm3 = float(settings.dose_grid_mm) ** 3 if settings.dose_grid_mm else \
        float(np.prod(case.spacing_mm))
    per_voxel = float(np.prod(case.spacing_mm)) / voxel_mm3
    radius = float(settings.lateral_cutoff_mm) / width
    k = int(np.ceil(radius))
    yy, xx = np.mgrid[-k:k + 1, -k:k + 1]
    disc = (yy ** 2 + xx ** 2 <= radius ** 2).astype(np.float64)
    total = 0.0
    for body, target in zip(beam_views(case, arrangement, case.body > 0),
                            beam_views(case, arrangement, _targets(case))):
        cells = np.round(body / width).astype(np.int64)
        bixels = _bixel_cells(target, width)
        low = np.minimum(cells.min(0), bixels.min(0)) - k
        shape = np.maximum(cells.max(0), bixels.max(0)) - low + k + 1
        depth = np.zeros(shape)
        np.add.at(depth, tuple((cells - low).T), per_voxel)
        # the disc spans lateral_cutoff_mm / bixel (up to ~100 cells): FFT, not direct sums
        near = fftconvolve(depth, disc, mode="same")
        total += float(near[tuple((bixels - low).T)].sum())
    return DIVERGENCE * total


def estimate_peak_gb(case: Case, arrangement: BeamArrangement, settings: PlanSettings
                     ) -> float:
    """Estimated peak resident memory (GB) of planning ``case``."""
    matrix_gb = estimate_entries(case, arrangement, settings) * BYTES_PER_ENTRY / 1e9
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
    peak = estimate_peak_gb(case, arrangement, settings)
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
