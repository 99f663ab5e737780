"""The criteria stage: from the mimicking solution, the protocol's criteria enforced on
the case grid, with a fluence-smoothness term; and the same objective over segment MUs.

Dose is judged where the criteria are decided: on the case grid, ``d = P @ (D @ w)``
(:mod:`.dose_grid`: ``P`` the engine's linear interpolation restricted to the body and
structure voxels, ``D`` the dose influence matrix, ``w`` the bixel weights). Terms
(``N``: voxels of the term's structure, ``p``: its priority, doses in Gy):

* mimicking: ``p / N sum (d - prediction)^2`` in every target, organ at risk and the body
  (``target_weight``, ``oar_weight``, ``body_weight``, as the first stage);
* ``V<x>% >= L`` or ``V<x>Gy >= L`` (target coverage): ``p / N sum max(0, a - d)^2`` with
  the aim ``a`` the criterion's dose raised by ``criteria_margin``;
* ``Dmax < L``: ``p / N sum max(0, d - a)^2``, ``a = L (1 - criteria_margin)``;
* ``Dmean < L``: ``p max(0, mean(d) - a)^2``, ``a = L (1 - criteria_margin)``;
* smoothness: ``s sum (w_i - w_j)^2 / (n_pairs mean(w_start)^2)`` over neighbouring
  bixels of each beam's fluence map, ``s`` = ``smoothing_weight`` (isolated hot bixels
  are what turns into many small segments).

``p`` of the criteria terms is ``criteria_weight``. The first stage's weights are the
start; L-BFGS-B with ``w >= 0`` runs up to ``criteria_max_iter`` iterations. For the
segment stage the variables are segment weights ``s`` with ``w = A s`` (``A``: bixels x
segments, the apertures) and ``s >= min_segment_weight``.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, field, replace

import numpy as np
import scipy.optimize
import scipy.sparse as sp

from vmatdose.data.case import Case
from vmatdose.evaluation.constraints import Constraint
from vmatdose.metrics.dvh import parse_dvh_metric
from vmatdose.planning.arrangement import case_targets

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Term:
    """One objective term over selected voxels.

    Attributes:
        kind: ``mimic``, ``under``, ``over`` or ``mean_over``.
        voxels: (N,) indices into the selected case voxels.
        priority: its weight.
        aim: (N,) reference dose for ``mimic``; the threshold (Gy) otherwise.
        label: what it stands for.
    """

    kind: str
    voxels: np.ndarray
    priority: float
    aim: np.ndarray | float
    label: str

    def value_and_grad(self, dose: np.ndarray, grad: np.ndarray) -> float:
        """The term's value at ``dose`` (selected voxels); adds its gradient to ``grad``."""
        d = dose[self.voxels]
        n = max(len(d), 1)
        if self.kind == "mimic":
            diff = d - self.aim
        elif self.kind == "under":
            diff = np.minimum(d - self.aim, 0.0)
        elif self.kind == "over":
            diff = np.maximum(d - self.aim, 0.0)
        else:  # mean_over
            excess = max(float(d.mean()) - float(self.aim), 0.0)
            grad[self.voxels] += 2.0 * self.priority * excess / n
            return self.priority * excess ** 2
        grad[self.voxels] += 2.0 * self.priority / n * diff
        return float(self.priority / n * np.dot(diff, diff))


@dataclass
class PlanObjective:
    """The criteria-stage objective of one case.

    The products with the dose influence matrix run in the matrix's own precision (the
    engine's is float32: a float64 vector would make scipy cast all its entries to
    float64 at every product); the transposes both products of the gradient need are made
    once, at construction.

    Attributes:
        matrix: (dose-grid voxels, bixels) dose influence matrix, Gy per weight unit
            (CSR is fastest for both products).
        interpolation: (selected case voxels, dose-grid voxels), :mod:`.dose_grid`.
        terms: the dose terms.
        smooth_pairs: (n_pairs, 2) indices of neighbouring bixels.
        smoothing_weight: ``s``; ``weight_scale`` the mean start weight it is relative to.
        evaluations: objective and gradient evaluations so far.
    """

    matrix: sp.spmatrix | sp.sparray
    interpolation: sp.csr_matrix
    terms: list[Term]
    smooth_pairs: np.ndarray = field(default_factory=lambda: np.zeros((0, 2), np.int64))
    smoothing_weight: float = 0.0
    weight_scale: float = 1.0
    evaluations: int = 0

    def __post_init__(self) -> None:
        self._matrix_t = self.matrix.T
        self._interpolation_t = sp.csr_matrix(self.interpolation.T)

    def grid_dose(self, weights: np.ndarray) -> np.ndarray:
        """(dose-grid voxels,) dose in Gy of bixel ``weights``, in the matrix's precision."""
        return np.asarray(self.matrix @ np.asarray(weights, self.matrix.dtype)).ravel()

    def dose(self, weights: np.ndarray) -> np.ndarray:
        """(selected case voxels,) dose in Gy of bixel ``weights`` (float64)."""
        return np.asarray(self.interpolation @ self.grid_dose(weights), np.float64).ravel()

    def value_and_grad(self, weights: np.ndarray) -> tuple[float, np.ndarray]:
        self.evaluations += 1
        dose = self.dose(weights)
        grad_dose = np.zeros_like(dose)
        value = sum(term.value_and_grad(dose, grad_dose) for term in self.terms)
        grad_grid = np.asarray(self._interpolation_t @ grad_dose, self.matrix.dtype)
        grad = np.asarray(self._matrix_t @ grad_grid, np.float64).ravel()
        if self.smoothing_weight > 0 and len(self.smooth_pairs):
            i, j = self.smooth_pairs.T
            diff = weights[i] - weights[j]
            scale = self.smoothing_weight / (len(diff) * self.weight_scale ** 2)
            value += scale * float(np.dot(diff, diff))
            np.add.at(grad, i, 2.0 * scale * diff)
            np.add.at(grad, j, -2.0 * scale * diff)
        return float(value), grad

    def term_values(self, weights: np.ndarray) -> dict[str, float]:
        dose = self.dose(weights)
        scratch = np.zeros_like(dose)
        return {t.label: t.value_and_grad(dose, scratch) for t in self.terms}


@dataclass(frozen=True)
class StageResult:
    """Variables found, iterations, whether the cap stopped it, the final value and the
    objective after each iteration (``values``)."""

    x: np.ndarray
    iterations: int
    hit_cap: bool
    value: float
    values: tuple[float, ...] = ()

    def late_decrease(self, last: int = 10) -> float:
        """Relative decrease of the objective over the last ``last`` iterations (0: it
        had stopped improving; a stage stopped by its cap with a large value here would
        still gain from more iterations)."""
        if len(self.values) < 2:
            return 0.0
        before = self.values[max(len(self.values) - 1 - last, 0)]
        return float((before - self.values[-1]) / abs(before)) if before else 0.0


def minimise(objective_and_grad, start: np.ndarray, lower: float, max_iter: int
             ) -> StageResult:
    """L-BFGS-B from ``start`` with every variable ``>= lower``."""
    values: list[float] = []

    def record(intermediate_result: scipy.optimize.OptimizeResult) -> None:
        values.append(float(intermediate_result.fun))  # scipy passes it by this name

    result = scipy.optimize.minimize(
        objective_and_grad, np.maximum(np.asarray(start, float), lower), jac=True,
        method="L-BFGS-B", bounds=[(lower, None)] * len(start),
        options={"maxiter": int(max_iter), "maxfun": int(max_iter) * 2},
        callback=record)
    return StageResult(np.asarray(result.x), int(result.nit), int(result.nit) >= max_iter,
                       float(result.fun), tuple(values))


def optimise_bixels(objective: PlanObjective, start: np.ndarray, max_iter: int
                    ) -> StageResult:
    """The criteria stage over bixel weights ``>= 0``."""
    return minimise(objective.value_and_grad, start, 0.0, max_iter)


def optimise_segments(objective: PlanObjective, apertures: sp.csc_matrix, start: np.ndarray,
                      min_weight: float, max_iter: int) -> StageResult:
    """The same dose terms over segment weights (``w = apertures @ s``, ``s >=
    min_weight``); the smoothness term does not apply (segments are smooth)."""
    terms_only = replace(objective, smoothing_weight=0.0, evaluations=0)

    def value_and_grad(s: np.ndarray) -> tuple[float, np.ndarray]:
        value, grad = terms_only.value_and_grad(apertures @ s)
        return value, np.asarray(apertures.T @ grad).ravel()

    return minimise(value_and_grad, start, float(min_weight), max_iter)


def criterion_term(constraint: Constraint, case: Case, voxels: np.ndarray, priority: float,
                   margin: float) -> Term | None:
    """The term standing for ``constraint`` over ``voxels`` (indices into the selection),
    or ``None`` when it has no such form (left to the mimicking)."""
    spec = parse_dvh_metric(constraint.metric)
    at_least = constraint.op in (">", ">=")
    if spec.quantity == "V" and at_least:
        rx = case.prescriptions_gy.get(constraint.structure)
        if spec.unit == "%" and rx is None:
            return None
        dose = spec.value / 100.0 * rx if spec.unit == "%" else spec.value
        return Term("under", voxels, priority, dose * (1.0 + margin), constraint.label)
    if spec.quantity == "Dmax" and not at_least:
        return Term("over", voxels, priority, constraint.limit * (1.0 - margin),
                    constraint.label)
    if spec.quantity == "Dmean" and not at_least:
        return Term("mean_over", voxels, priority, constraint.limit * (1.0 - margin),
                    constraint.label)
    log.info("criterion %s has no criteria-stage form: left to the mimicking",
             constraint.label)
    return None


def plan_terms(case: Case, pred_gy: np.ndarray, selection: np.ndarray,
               constraints: Sequence[Constraint], weights: dict[str, float],
               criteria_weight: float, margin: float) -> list[Term]:
    """Terms of ``case`` over the selected case voxels ``selection`` (Z, Y, X) bool:
    mimicking of ``pred_gy`` per structure (``weights``: ``target``, ``oar``, ``body``)
    and one term per applicable criterion."""
    flat = np.flatnonzero(selection)
    position = np.full(selection.size, -1, np.int64)
    position[flat] = np.arange(flat.size)
    pred = np.asarray(pred_gy, np.float64).ravel()[flat]

    def voxels(mask: np.ndarray) -> np.ndarray:
        found = position[np.flatnonzero(mask.ravel() & selection.ravel())]
        return found

    targets = set(case_targets(case))
    terms = []
    groups = [(name, "target" if name in targets else "oar", case.mask(name) > 0)
              for name in case.structures if case.mask(name).any()]
    groups.append(("body", "body", case.body > 0))
    for name, kind, mask in groups:
        if weights[kind] > 0:
            idx = voxels(mask)
            terms.append(Term("mimic", idx, weights[kind], pred[idx], f"mimic {name}"))
    if criteria_weight > 0:
        for constraint in constraints:
            if not case.has_structure(constraint.structure) \
                    or not case.mask(constraint.structure).any():
                continue
            term = criterion_term(constraint, case, voxels(case.mask(constraint.structure) > 0),
                                  criteria_weight, margin)
            if term is not None:
                terms.append(term)
    return terms


def neighbour_pairs(cells: Sequence[np.ndarray]) -> np.ndarray:
    """(n_pairs, 2) indices of bixels that are neighbours (sharing an edge) in the same
    beam; ``cells[b]`` is beam ``b``'s (N_b, 2) integer bixel cells, bixels numbered
    beam after beam."""
    pairs, start = [], 0
    for beam_cells in cells:
        beam_cells = np.asarray(beam_cells, np.int64)
        lookup = {tuple(c): start + i for i, c in enumerate(beam_cells)}
        for i, (a, b) in enumerate(beam_cells):
            for da, db in ((1, 0), (0, 1)):
                j = lookup.get((a + da, b + db))
                if j is not None:
                    pairs.append((start + i, j))
        start += len(beam_cells)
    return np.asarray(pairs, np.int64).reshape(-1, 2)
