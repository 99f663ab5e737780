"""One case planned with pyRadPlan: steering file, dose influence matrix, fluence
optimisation and the dose the optimised fluences deliver.

The engine computes on a dose grid of ``settings.dose_grid_mm`` (coarser than the case
grid if asked); the deliverable dose is interpolated (linearly) back onto the case grid.
Fluences are the optimised bixel weights (non-negative, one per bixel), in the engine's
monitor-unit-like unit in which the dose influence matrix gives Gy.
"""

from __future__ import annotations

import contextlib
import logging
import time
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from vmatdose.data.beams import BeamArrangement
from vmatdose.data.case import Case
from vmatdose.evaluation.constraints import Constraint
from vmatdose.planning.engine import require_pyradplan
from vmatdose.planning.memory import PeakRSS
from vmatdose.planning.objectives import assign_objectives
from vmatdose.planning.patient import build_ct, build_structure_set, image_array
from vmatdose.planning.settings import PlanSettings

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class BeamFluence:
    """The optimised weights of one beam's bixels.

    Attributes:
        gantry_deg, couch_deg: the beam's angles (IEC degrees).
        positions_mm: (N, 2) bixel centres in the isocentre plane, beam's-eye view
            (lateral, longitudinal) mm.
        weights: (N,) optimised bixel weights (>= 0).
    """

    gantry_deg: float
    couch_deg: float
    positions_mm: np.ndarray
    weights: np.ndarray


@dataclass
class PlannedCase:
    """A case's plan: fluences, deliverable dose and what it cost.

    Attributes:
        case_id: the case.
        weights: (n_bixels,) optimised bixel weights, in steering-file order.
        dose_gy: (Z, Y, X) deliverable dose on the case grid, Gy.
        beams: per-beam fluences (:class:`BeamFluence`).
        seconds: wall-clock seconds of ``stf``, ``dij``, ``optimise`` and ``total``.
        peak_rss_gb: peak resident memory while planning (GB).
        n_bixels, dij_nonzeros: size of the dose influence matrix.
        dose_grid_shape: (Z, Y, X) of the engine's dose grid.
        iterations: optimiser iterations (``None`` if the solver does not say).
        penalties: labels of the constraint penalties used.
    """

    case_id: str
    weights: np.ndarray
    dose_gy: np.ndarray
    beams: list[BeamFluence]
    seconds: dict[str, float]
    peak_rss_gb: float
    n_bixels: int
    dij_nonzeros: int
    dose_grid_shape: tuple[int, int, int]
    iterations: int | None
    penalties: list[str] = field(default_factory=list)
    _dij: Any = field(default=None, repr=False)

    def dose_for(self, weights: np.ndarray) -> np.ndarray:
        """(Z, Y, X) dose (Gy) on the case grid of other bixel ``weights`` (n_bixels,),
        e.g. an open-field plan; needs the plan's dose influence matrix (kept until
        :meth:`release`)."""
        if self._dij is None:
            raise RuntimeError(f"{self.case_id}: the dose influence matrix was released")
        weights = np.asarray(weights, dtype=np.float64)
        if weights.shape != self.weights.shape:
            raise ValueError(f"{self.case_id}: expected {self.weights.shape} weights, "
                             f"got {weights.shape}")
        return image_array(self._dij.compute_result_ct_grid(weights)["physical_dose"])

    def release(self) -> None:
        """Drop the dose influence matrix (the largest object of a plan)."""
        self._dij = None


@contextlib.contextmanager
def engine_progress(show: bool) -> Iterator[None]:
    """Switch pyRadPlan's own console progress bars (per beam, per ray) on or off."""
    from pyRadPlan.core import ProgressReporter

    before = ProgressReporter.console_progress
    ProgressReporter.console_progress = show
    try:
        yield
    finally:
        ProgressReporter.console_progress = before


def photon_plan(arrangement: BeamArrangement, settings: PlanSettings, ct: Any) -> Any:
    """pyRadPlan ``PhotonPlan`` for ``arrangement`` (the engine's generic 6 MV machine)."""
    from pyRadPlan import PhotonPlan

    n = len(arrangement.gantry_deg)
    iso_xyz = [float(v) for v in arrangement.isocentre_mm[::-1]]
    pln = PhotonPlan(machine="Generic")
    pln.prop_stf = {"gantry_angles": [float(g) for g in arrangement.gantry_deg],
                    "couch_angles": [float(c) for c in arrangement.couch_deg],
                    "bixel_width": float(settings.bixel_width_mm),
                    "iso_center": [iso_xyz] * n}
    grid = ct.grid if settings.dose_grid_mm is None else \
        {"resolution": {k: float(settings.dose_grid_mm) for k in ("x", "y", "z")}}
    pln.prop_dose_calc = {
        "dose_grid": grid,
        "geometric_lateral_cutoff": float(settings.lateral_cutoff_mm),
        "dij_sampling": {"rel_dose_threshold": float(settings.sparsity_cutoff),
                         "lat_cut_off": 20.0, "type": "radius", "delta_rad_depth": 5.0},
    }
    pln.prop_opt = {"solver": "scipy", "max_iter": int(settings.max_iter)}
    return pln


def beam_fluences(stf: Any, weights: np.ndarray) -> list[BeamFluence]:
    """Split the bixel ``weights`` (steering-file order: beam by beam, ray by ray) into
    per-beam fluences with their bixel positions."""
    beams, start = [], 0
    for beam in stf.beams:
        positions = np.array([[ray.ray_pos_bev[0], ray.ray_pos_bev[2]] for ray in beam.rays],
                             dtype=np.float64).reshape(-1, 2)
        n = beam.total_number_of_bixels
        if n != len(positions):
            raise RuntimeError(f"beam at gantry {beam.gantry_angle}: {n} bixels but "
                               f"{len(positions)} rays (one bixel per photon ray expected)")
        beams.append(BeamFluence(float(beam.gantry_angle), float(beam.couch_angle), positions,
                                 np.asarray(weights[start:start + n], dtype=np.float64)))
        start += n
    return beams


def plan_case(case: Case, pred_gy: np.ndarray, arrangement: BeamArrangement,
              constraints: Sequence[Constraint], settings: PlanSettings) -> PlannedCase:
    """Plan ``case`` to mimic ``pred_gy`` (Z, Y, X) Gy with ``arrangement``'s beams."""
    require_pyradplan()
    from pyRadPlan import calc_dose_influence, fluence_optimization, generate_stf

    logging.getLogger("pyRadPlan").setLevel(logging.WARNING)  # it logs every iteration
    seconds: dict[str, float] = {}
    with PeakRSS() as rss, engine_progress(settings.progress), warnings.catch_warnings():
        # the engine's ray tracer divides by zero for rays parallel to a grid axis and
        # handles the infinities; its RuntimeWarnings say nothing to a user
        warnings.simplefilter("ignore", RuntimeWarning)
        start = time.perf_counter()
        ct = build_ct(case)
        cst = build_structure_set(case, ct)
        pln = photon_plan(arrangement, settings, ct)
        stf = generate_stf(ct, cst, pln)
        seconds["stf"] = time.perf_counter() - start
        tick = time.perf_counter()
        dij = calc_dose_influence(ct, cst, stf, pln)
        seconds["dij"] = time.perf_counter() - tick
        penalties = assign_objectives(cst, case, pred_gy, constraints, settings)
        tick = time.perf_counter()
        info: dict = {}
        weights = np.asarray(fluence_optimization(ct, cst, stf, dij, pln, opt_info=info),
                             dtype=np.float64)
        seconds["optimise"] = time.perf_counter() - tick
        dose = image_array(dij.compute_result_ct_grid(weights)["physical_dose"])
        seconds["total"] = time.perf_counter() - start
    matrix = dij.physical_dose.flat[0]
    grid = dij.dose_grid.dimensions
    log.info("%s: %d bixels, %d dij entries, %.1f s, peak %.2f GB", case.case_id,
             weights.size, matrix.nnz, seconds["total"], rss.peak_gb)
    return PlannedCase(case.case_id, weights, dose, beam_fluences(stf, weights), seconds,
                       rss.peak_gb, int(weights.size), int(matrix.nnz),
                       (int(grid[2]), int(grid[1]), int(grid[0])), info.get("num_iter"),
                       penalties, dij)
