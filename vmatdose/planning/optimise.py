"""One case planned with pyRadPlan: steering file, dose influence matrix, then

1. mimicking: the engine's fluence optimisation of the prediction (:mod:`.objectives`);
2. criteria: the protocol's criteria enforced on the case grid, fluence smoothed
   (:mod:`.refinement`), giving the *fluence plan*;
3. sequencing: each beam's fluence into MLC segments (:mod:`.delivery`), the segments'
   weights re-optimised with the same objective, giving the *deliverable plan*, whose
   dose the engine recomputes through the apertures (``D @ (apertures @ weights)``);
4. normalisation of each plan (primary target's D95 or median, ``planning.normalisation``).

The engine computes on a dose grid of ``settings.dose_grid_mm``; doses are interpolated
(linearly) onto the case grid, where stages 2-3 judge them. Fluences are bixel weights
(non-negative), in the engine's unit in which the dose influence matrix gives Gy.
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
import scipy.sparse as sp

from vmatdose.data.beams import BeamArrangement
from vmatdose.data.case import Case
from vmatdose.evaluation.constraints import Constraint
from vmatdose.planning.arrangement import case_targets
from vmatdose.planning.delivery import SequencedPlan, sequence_plan
from vmatdose.planning.dose_grid import (
    DoseGrid,
    interpolation_matrix,
    resample_to_case,
    voxel_centres_mm,
)
from vmatdose.planning.engine import require_pyradplan
from vmatdose.planning.fluence import BeamFluence, bixel_cells
from vmatdose.planning.memory import PeakRSS
from vmatdose.planning.objectives import assign_objectives
from vmatdose.planning.patient import build_ct, build_structure_set
from vmatdose.planning.refinement import (
    PlanObjective,
    neighbour_pairs,
    optimise_bixels,
    optimise_segments,
    plan_terms,
)
from vmatdose.planning.sequencing import SequencingLimits
from vmatdose.planning.settings import PlanSettings

log = logging.getLogger(__name__)


@dataclass
class PlannedCase:
    """A case's plan: fluences, segments, doses and what it cost.

    Attributes:
        case_id: the case.
        weights: (n_bixels,) the fluence plan's bixel weights (after the criteria stage
            and normalisation), in steering-file order.
        fluence_dose_gy: (Z, Y, X) the fluence plan's dose on the case grid, Gy.
        dose_gy: (Z, Y, X) the deliverable (sequenced) plan's dose on the case grid, Gy.
        beams: per-beam fluences of the fluence plan (:class:`BeamFluence`).
        sequenced: the deliverable plan's segments (:class:`SequencedPlan`).
        seconds: wall-clock seconds of ``stf``, ``dij``, ``optimise`` (mimicking),
            ``criteria``, ``sequence`` (with the segment stage) and ``total``;
            ``cpu_seconds``: the same stages in CPU seconds (user + system, every thread
            of the process), which a loaded machine does not inflate.
        peak_rss_gb: peak resident memory while planning (GB).
        n_bixels, dij_nonzeros: size of the dose influence matrix.
        dose_grid_shape: (Z, Y, X) of the engine's dose grid.
        iterations: iterations of the mimicking stage (``None`` if the solver does not
            say); ``stage_iterations``: of every stage, ``hit_cap``: the stages stopped
            by their iteration cap; ``late_decrease``: per stage of ours, the relative
            decrease of its objective over its last 10 iterations.
        normalisation: factor applied to the fluence and to the sequenced plan.
        penalties: labels of the constraint penalties used.
    """

    case_id: str
    weights: np.ndarray
    fluence_dose_gy: np.ndarray
    dose_gy: np.ndarray
    beams: list[BeamFluence]
    sequenced: SequencedPlan
    seconds: dict[str, float]
    peak_rss_gb: float
    n_bixels: int
    dij_nonzeros: int
    dose_grid_shape: tuple[int, int, int]
    iterations: int | None
    stage_iterations: dict[str, int] = field(default_factory=dict)
    hit_cap: list[str] = field(default_factory=list)
    normalisation: dict[str, float] = field(default_factory=dict)
    penalties: list[str] = field(default_factory=list)
    cpu_seconds: dict[str, float] = field(default_factory=dict)
    late_decrease: dict[str, float] = field(default_factory=dict)
    _engine: Any = field(default=None, repr=False)

    def dose_for(self, weights: np.ndarray) -> np.ndarray:
        """(Z, Y, X) dose (Gy) on the case grid of other bixel ``weights`` (n_bixels,),
        e.g. an open-field plan; needs the plan's dose influence matrix (kept until
        :meth:`release`)."""
        if self._engine is None:
            raise RuntimeError(f"{self.case_id}: the dose influence matrix was released")
        weights = np.asarray(weights, dtype=np.float64)
        if weights.shape != self.weights.shape:
            raise ValueError(f"{self.case_id}: expected {self.weights.shape} weights, "
                             f"got {weights.shape}")
        return self._engine.case_dose(weights)

    def release(self) -> None:
        """Drop the dose influence matrix (the largest object of a plan)."""
        self._engine = None


@dataclass
class EngineDose:
    """The dose influence matrix and the grids: bixel weights -> dose on the case grid."""

    matrix: Any
    grid: DoseGrid
    case: Case

    def case_dose(self, weights: np.ndarray) -> np.ndarray:
        """(Z, Y, X) Gy on the case grid, as the engine's ``compute_result_ct_grid``."""
        return resample_to_case(self.grid, self.matrix @ weights, self.case.shape,
                                self.case.origin_mm, self.case.spacing_mm)


class StageClock:
    """Wall-clock and CPU seconds (user + system of the whole process) per named stage,
    and of everything from its creation to :meth:`finish` (``total``)."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}
        self.cpu_seconds: dict[str, float] = {}
        self._start = (time.perf_counter(), time.process_time())

    @contextlib.contextmanager
    def stage(self, name: str) -> Iterator[None]:
        wall, cpu = time.perf_counter(), time.process_time()
        try:
            yield
        finally:
            self.seconds[name] = time.perf_counter() - wall
            self.cpu_seconds[name] = time.process_time() - cpu

    def finish(self) -> None:
        self.seconds["total"] = time.perf_counter() - self._start[0]
        self.cpu_seconds["total"] = time.process_time() - self._start[1]


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


def product_matrix(matrix: Any) -> sp.csr_array:
    """The engine's dose influence matrix (CSC, float32) as CSR float32, the layout in
    which both products every optimiser iteration needs (``D @ w`` and ``D.T @ g``) read
    it in order and gather from / scatter into the small bixel vector; the CSC copy is
    freed when the caller drops it."""
    return sp.csr_array(matrix, dtype=np.float32)


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
    """Plan ``case`` to mimic ``pred_gy`` (Z, Y, X) Gy with ``arrangement``'s beams, then
    enforce the criteria, sequence the fluences into segments and normalise both plans."""
    require_pyradplan()
    from pyRadPlan import calc_dose_influence, fluence_optimization, generate_stf

    logging.getLogger("pyRadPlan").setLevel(logging.WARNING)  # it logs every iteration
    clock = StageClock()
    with PeakRSS() as rss, engine_progress(settings.progress), warnings.catch_warnings():
        # the engine's ray tracer divides by zero for rays parallel to a grid axis and
        # handles the infinities; its RuntimeWarnings say nothing to a user
        warnings.simplefilter("ignore", RuntimeWarning)
        with clock.stage("stf"):
            ct = build_ct(case)
            cst = build_structure_set(case, ct)
            pln = photon_plan(arrangement, settings, ct)
            stf = generate_stf(ct, cst, pln)
        with clock.stage("dij"):
            dij = calc_dose_influence(ct, cst, stf, pln)
            dij.physical_dose.flat[0] = product_matrix(dij.physical_dose.flat[0])
        penalties = assign_objectives(cst, case, pred_gy, constraints, settings)
        info: dict = {}
        with clock.stage("optimise"):
            mimicked = np.asarray(fluence_optimization(ct, cst, stf, dij, pln, opt_info=info),
                                  dtype=np.float64)
        del ct, cst
        engine = EngineDose(dij.physical_dose.flat[0], DoseGrid.from_engine(dij.dose_grid),
                            case)
        del dij
        stages = {"mimicking": int(info.get("num_iter") or 0)}
        capped = ["mimicking"] if stages["mimicking"] >= settings.max_iter else []
        late: dict[str, float] = {}
        with clock.stage("criteria"):
            objective = criteria_objective(case, pred_gy, constraints, settings, engine,
                                           beam_fluences(stf, mimicked))
            weights = mimicked
            if settings.criteria_weight > 0:
                result = optimise_bixels(objective, mimicked, settings.criteria_max_iter)
                weights, stages["criteria"] = result.x, result.iterations
                capped += ["criteria"] if result.hit_cap else []
                late["criteria"] = result.late_decrease()
        with clock.stage("sequence"):
            fractions = int(case.meta.get("fractions") or 1)
            limits = sequencing_limits(settings, fractions)
            fluences = beam_fluences(stf, weights)
            sequenced = sequence_plan(fluences, settings.bixel_width_mm,
                                      settings.leaf_width_mm, limits)
            if settings.criteria_weight > 0 and sequenced.apertures.shape[1]:
                result = optimise_segments(objective, sequenced.apertures,
                                           sequenced.segment_weights,
                                           limits.min_segment_weight,
                                           settings.segment_max_iter)
                sequenced = sequenced.with_segment_weights(result.x)
                stages["segments"] = result.iterations
                capped += ["segments"] if result.hit_cap else []
                late["segments"] = result.late_decrease()
        fluence_dose = engine.case_dose(weights)
        dose = engine.case_dose(sequenced.bixel_weights)
        factors = {"fluence": normalisation_factor(case, fluence_dose, settings),
                   "deliverable": normalisation_factor(case, dose, settings)}
        weights = weights * factors["fluence"]
        fluence_dose *= factors["fluence"]
        sequenced = sequenced.with_segment_weights(sequenced.segment_weights
                                                   * factors["deliverable"])
        dose *= factors["deliverable"]
        clock.finish()
    grid = engine.grid.shape
    log.info("%s: %d bixels, %d dij entries, %.1f s (%.1f CPU s), peak %.2f GB",
             case.case_id, weights.size, engine.matrix.nnz, clock.seconds["total"],
             clock.cpu_seconds["total"], rss.peak_gb)
    return PlannedCase(case.case_id, weights, fluence_dose, dose, beam_fluences(stf, weights),
                       sequenced, clock.seconds, rss.peak_gb, int(weights.size),
                       int(engine.matrix.nnz), grid, info.get("num_iter"), stages, capped,
                       factors, penalties, clock.cpu_seconds, late, engine)


def sequencing_limits(settings: PlanSettings, fractions: int) -> SequencingLimits:
    """The sequencer's limits in fluence units (``min_segment_mu`` is per fraction)."""
    return SequencingLimits(
        levels=settings.intensity_levels, max_segments=settings.max_segments_per_beam,
        min_segment_weight=settings.min_segment_mu * fractions / settings.mu_per_weight,
        min_segment_bixels=settings.min_segment_bixels)


def criteria_objective(case: Case, pred_gy: np.ndarray, constraints: Sequence[Constraint],
                       settings: PlanSettings, engine: EngineDose,
                       fluences: Sequence[BeamFluence]) -> PlanObjective:
    """The criteria stage's objective on the case grid: body and structure voxels."""
    selection = case.body > 0
    for name in case.structures:
        selection |= case.mask(name) > 0
    centres = voxel_centres_mm(np.argwhere(selection), case.origin_mm, case.spacing_mm)
    interpolation = interpolation_matrix(engine.grid, centres)
    terms = plan_terms(case, pred_gy, selection, constraints,
                       {"target": settings.target_weight, "oar": settings.oar_weight,
                        "body": settings.body_weight},
                       settings.criteria_weight, settings.criteria_margin)
    pairs = neighbour_pairs([bixel_cells(f, settings.bixel_width_mm)[0] for f in fluences])
    start = np.concatenate([f.weights for f in fluences])
    scale = float(start.mean()) if start.size and start.mean() > 0 else 1.0
    return PlanObjective(engine.matrix, interpolation, terms, pairs,
                         settings.smoothing_weight, scale)


def normalisation_factor(case: Case, dose_gy: np.ndarray, settings: PlanSettings) -> float:
    """The factor that puts the primary target's D95 (or median) at
    ``normalisation_percent`` % of its prescription; 1 for ``normalisation: none``."""
    if settings.normalisation == "none":
        return 1.0
    primary = case_targets(case)[0]
    values = dose_gy[case.mask(primary) > 0]
    level = np.percentile(values, 5.0) if settings.normalisation == "d95" \
        else np.median(values)
    goal = settings.normalisation_percent / 100.0 * case.prescriptions_gy[primary]
    return float(goal / level) if level > 0 else 1.0
