"""Clinical dose-volume constraints (from the data config) checked on a dose.

A constraint is ``{structure, metric, op, limit}``, e.g. ``{structure: Rectum, metric:
V70Gy, op: "<", limit: 15}``: metric strings as in :mod:`vmatdose.metrics.dvh` (D in Gy,
V in % of the structure; ``V95%`` means 95 % of the structure's prescription). A
structure the case lacks makes the constraint *not evaluable* (recorded, not a crash).
"""

from __future__ import annotations

import operator
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from vmatdose.data.case import Case
from vmatdose.metrics.dvh import evaluate_dvh_metric, parse_dvh_metric

_OPS = {"<": operator.lt, "<=": operator.le, ">": operator.gt, ">=": operator.ge}


@dataclass(frozen=True)
class Constraint:
    """One clinical goal, e.g. ``Rectum V70Gy < 15`` (limit in % for V, Gy for D)."""

    structure: str
    metric: str
    op: str
    limit: float

    @classmethod
    def from_config(cls, item: Mapping) -> Constraint:
        missing = {"structure", "metric", "op", "limit"} - set(item)
        if missing:
            raise ValueError(f"constraint {dict(item)} lacks {sorted(missing)}")
        if item["op"] not in _OPS:
            raise ValueError(f"constraint {dict(item)}: op must be one of {list(_OPS)}")
        parse_dvh_metric(item["metric"])  # fail early on a typo
        return cls(str(item["structure"]), str(item["metric"]), str(item["op"]),
                   float(item["limit"]))

    @property
    def label(self) -> str:
        unit = "%" if self.metric.upper().startswith("V") else " Gy"
        return f"{self.structure} {self.metric} {self.op} {self.limit:g}{unit}"

    def value(self, case: Case, dose_gy: np.ndarray) -> float:
        """The metric of ``dose_gy`` (Z, Y, X) Gy in the case's structure; NaN if absent."""
        if not case.has_structure(self.structure) or not case.mask(self.structure).any():
            return float("nan")
        prescription = case.prescriptions_gy.get(self.structure)
        spec = parse_dvh_metric(self.metric)
        if spec.needs_prescription and prescription is None:
            return float("nan")
        return float(evaluate_dvh_metric(dose_gy, case.mask(self.structure)[None], spec,
                                         spacing_mm=case.spacing_mm,
                                         prescription_gy=prescription)[0])

    def passes(self, value: float) -> bool | None:
        """Whether ``value`` meets the goal; ``None`` when not evaluable (NaN)."""
        return None if np.isnan(value) else bool(_OPS[self.op](value, self.limit))


def parse_constraints(items: Sequence[Mapping] | None) -> list[Constraint]:
    """The data config's ``constraints`` list -> :class:`Constraint` objects."""
    return [Constraint.from_config(item) for item in items or ()]


def constraint_rows(case: Case, pred_gy: np.ndarray,
                    constraints: Sequence[Constraint]) -> list[dict]:
    """One row per constraint: value and pass/fail for the reference and the prediction,
    and whether both agree (``None`` where not evaluable)."""
    rows = []
    for c in constraints:
        ref_value, pred_value = c.value(case, case.dose), c.value(case, pred_gy)
        ref_pass, pred_pass = c.passes(ref_value), c.passes(pred_value)
        rows.append({
            "case_id": case.case_id, "constraint": c.label, "structure": c.structure,
            "metric": c.metric, "op": c.op, "limit": c.limit,
            "ref_value": ref_value, "pred_value": pred_value,
            "ref_pass": ref_pass, "pred_pass": pred_pass,
            "evaluable": ref_pass is not None and pred_pass is not None,
            "agree": None if ref_pass is None or pred_pass is None else ref_pass == pred_pass,
        })
    return rows


def constraint_summary(rows: Sequence[dict]) -> dict[str, dict]:
    """Per constraint: pass rates (%) of reference and prediction, agreement (%), and how
    many cases could not be evaluated."""
    summary: dict[str, dict] = {}
    for label in dict.fromkeys(r["constraint"] for r in rows):
        group = [r for r in rows if r["constraint"] == label]
        done = [r for r in group if r["evaluable"]]
        summary[label] = {"ref_pass_percent": _percent_true(done, "ref_pass"),
                          "pred_pass_percent": _percent_true(done, "pred_pass"),
                          "agreement_percent": _percent_true(done, "agree"),
                          "n_evaluated": len(done), "n_not_evaluable": len(group) - len(done)}
    return summary


def _percent_true(rows: Sequence[dict], key: str) -> float:
    return 100.0 * float(np.mean([bool(r[key]) for r in rows])) if rows else float("nan")
