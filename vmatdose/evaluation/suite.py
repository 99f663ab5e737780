"""The full clinical evaluation of predicted doses: one place that turns (case, prediction)
pairs into tables, figures and a report.

Per case: MAE (body, targets), DVH points of every structure, gamma pass rates for each
criterion (global, 10 % cutoff, inside the body) and by region, clinical constraints for
reference and prediction, the OpenKBP dose score and DVH errors, and the mean-dose
baseline's MAE. Outputs in ``output_dir``: ``per_case.csv``, ``dvh.csv``,
``constraints.csv``, ``summary.json``, ``figures/`` (PNG + PDF) and ``report.html``.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

import numpy as np
import pandas as pd
from tqdm import tqdm

from vmatdose.config_schema import EvaluationConfig
from vmatdose.data.atomic import atomic_path
from vmatdose.data.case import Case
from vmatdose.evaluation import figures
from vmatdose.evaluation.baseline import StructureMeanBaseline
from vmatdose.evaluation.case_metrics import basic_case_metrics
from vmatdose.evaluation.constraints import (
    Constraint,
    constraint_rows,
    constraint_summary,
    parse_constraints,
)
from vmatdose.evaluation.openkbp_scores import dose_score, dvh_errors, openkbp_scores
from vmatdose.evaluation.regions import region_pass_rates, scoring_regions
from vmatdose.evaluation.report import write_report
from vmatdose.evaluation.tables import summarise
from vmatdose.evaluation.uncertainty import uncertainty_metrics
from vmatdose.metrics.dvh import dvh_metrics
from vmatdose.metrics.gamma import gamma_index, pass_rate_from_gamma
from vmatdose.plot_style import save_figure


@dataclass
class EvaluationSettings:
    """What to compute (the ``evaluation`` config group).

    Attributes:
        gamma: criteria, each ``{dose_percent, distance_mm}``; the first one also gets
            region pass rates and the gamma map figure. Empty: no gamma.
        gamma_cutoff_percent: reference voxels below this % of the max are not scored.
        region_margin_mm: OAR neighbourhood margin for region gamma.
        figures: draw figures and the HTML report.
        figure_cases: how many cases get slice, DVH and gamma figures.
        dpi: PNG resolution.
        max_cases: only the first this many cases of the split are evaluated (the
            pipeline leaves the rest unread); ``None``: every case.
    """

    targets: Sequence[str]
    constraints: list[Constraint] = field(default_factory=list)
    # The defaults are the config schema's (written once, there).
    gamma: list[dict] = field(default_factory=lambda: [
        asdict(c) for c in EvaluationConfig().gamma])
    gamma_cutoff_percent: float = EvaluationConfig.gamma_cutoff_percent
    region_margin_mm: float = EvaluationConfig.region_margin_mm
    figures: bool = EvaluationConfig.figures
    figure_cases: int = EvaluationConfig.figure_cases
    dpi: int = EvaluationConfig.dpi
    max_cases: int | None = EvaluationConfig.max_cases

    @classmethod
    def from_config(cls, targets: Sequence[str], constraints: Sequence[Mapping] | None,
                    cfg: Mapping | None) -> EvaluationSettings:
        cfg = dict(cfg or {})
        unknown = set(cfg) - {f.name for f in fields(EvaluationConfig)}
        if unknown:
            raise ValueError(f"evaluation config: unknown keys {sorted(unknown)}")
        if "gamma" in cfg:
            cfg["gamma"] = [dict(c) for c in (cfg["gamma"] or [])]
        return cls(targets=list(targets), constraints=parse_constraints(constraints), **cfg)


def _gamma_label(criterion: Mapping) -> str:
    return f"gamma_{criterion['dose_percent']:g}pct_{criterion['distance_mm']:g}mm"


@dataclass
class CaseResult:
    row: dict
    dvh_rows: list[dict]
    constraint_rows: list[dict]
    dvh_errors: list[float]
    gamma_map: np.ndarray | None


def evaluate_case(case: Case, pred_gy: np.ndarray, settings: EvaluationSettings,
                  baseline: StructureMeanBaseline | None = None,
                  std_gy: np.ndarray | None = None) -> CaseResult:
    """Every metric of one predicted dose (Z, Y, X) in Gy against the case's reference;
    ``std_gy`` (Z, Y, X), a generative model's per-voxel ensemble std, adds the
    uncertainty calibration (:mod:`vmatdose.evaluation.uncertainty`)."""
    targets = [t for t in settings.targets if case.has_structure(t)]
    row: dict = {"case_id": case.case_id, **basic_case_metrics(case, pred_gy, targets)}
    row["openkbp_dose_score_gy"] = dose_score(case, pred_gy)
    if baseline is not None:
        row["baseline_mae_body_gy"] = basic_case_metrics(
            case, baseline.predict(case), targets)["mae_body_gy"]
    if std_gy is not None:
        row.update(uncertainty_metrics(case, pred_gy, std_gy, targets))
    dvh_rows = _dvh_rows(case, pred_gy, targets)
    for r in dvh_rows:
        if r["metric"] == "Dmean":
            row[f"dmean_{r['structure']}_error_gy"] = r["error_gy"]
    gamma_map = None
    for i, criterion in enumerate(settings.gamma):
        gamma = gamma_index(case.dose, pred_gy.astype(np.float32), case.spacing_mm,
                            lower_percent_dose_cutoff=settings.gamma_cutoff_percent,
                            mask=case.body > 0, **criterion)
        label = _gamma_label(criterion)
        row[f"{label}_pass"] = pass_rate_from_gamma(gamma)
        if i == 0:
            gamma_map = gamma
            regions = scoring_regions(case, targets, settings.region_margin_mm)
            for name, rate in region_pass_rates(gamma, regions).items():
                row[f"{label}_{name}_pass"] = rate
    constraints = constraint_rows(case, pred_gy, settings.constraints)
    errors = dvh_errors(case, pred_gy, targets)
    # the challenge pools every patient's points; per case, for paired statistics
    row["openkbp_dvh_score_gy"] = float(np.mean(errors)) if errors else float("nan")
    return CaseResult(row, dvh_rows, constraints, errors, gamma_map)


def _dvh_rows(case: Case, pred_gy: np.ndarray, targets: Sequence[str]) -> list[dict]:
    present = [s for s in case.structures if case.mask(s).any()]
    if not present:
        return []
    masks = np.stack([case.mask(s) for s in present])
    ref = dvh_metrics(case.dose, masks, present, case.spacing_mm, targets)
    pred = dvh_metrics(pred_gy.astype(np.float64), masks, present, case.spacing_mm, targets)
    return [{"case_id": case.case_id, "structure": s, "metric": m, "ref_gy": ref[s][m],
             "pred_gy": pred[s][m], "error_gy": pred[s][m] - ref[s][m]}
            for s in present for m in ref[s]]


def run_suite(pairs: Iterable[tuple], settings: EvaluationSettings,
              output_dir: str | Path, baseline: StructureMeanBaseline | None = None,
              total: int | None = None) -> tuple[pd.DataFrame, dict]:
    """Evaluate every ``(case, pred_gy)`` or ``(case, pred_gy, std_gy or None)``, write
    tables, figures and the report; return (table, summary)."""
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    results, figure_paths = [], []
    for case, pred_gy, *std in tqdm(pairs, total=total, desc="evaluate", unit="case"):
        std_gy = std[0] if std else None
        result = evaluate_case(case, pred_gy, settings, baseline, std_gy)
        results.append(result)
        if settings.figures and len(results) <= settings.figure_cases:
            figure_paths += _case_figures(case, pred_gy, result, settings, output_dir,
                                          std_gy)
    if not results:
        raise ValueError("nothing to evaluate: the split has no cases")
    table = pd.DataFrame([r.row for r in results])
    dvh_table = pd.DataFrame([d for r in results for d in r.dvh_rows])
    constraint_table = pd.DataFrame([c for r in results for c in r.constraint_rows])
    table.to_csv(output_dir / "per_case.csv", index=False)
    dvh_table.to_csv(output_dir / "dvh.csv", index=False)
    constraint_table.to_csv(output_dir / "constraints.csv", index=False)
    summary = {
        "n_cases": len(table),
        "metrics": summarise(table),
        "openkbp": openkbp_scores(list(table["openkbp_dose_score_gy"]),
                                  [r.dvh_errors for r in results]),
        "constraints": constraint_summary([c for r in results for c in r.constraint_rows]),
        "dvh": _dvh_summary(dvh_table),
    }
    with atomic_path(output_dir / "summary.json", ".json.tmp") as tmp:
        tmp.write_text(json.dumps(summary, indent=2, default=_json), encoding="utf-8")
    if settings.figures:
        stem = output_dir / "figures" / "structure_errors"
        figure_paths += save_figure(
            figures.error_boxplot_figure(table, _structure_order(dvh_table), settings.targets),
            stem, settings.dpi)
        write_report(output_dir, summary, table, constraint_table, figure_paths)
    return table, summary


def _case_figures(case: Case, pred_gy: np.ndarray, result: CaseResult,
                  settings: EvaluationSettings, output_dir: Path,
                  std_gy: np.ndarray | None = None) -> list[Path]:
    folder = output_dir / "figures"
    label = "gamma"
    if settings.gamma:
        first = settings.gamma[0]
        label = f"gamma {first['dose_percent']:g}%/{first['distance_mm']:g} mm"
    slices = figures.dose_slices_figure(case, pred_gy, settings.targets, result.gamma_map,
                                        gamma_label=label)
    dvh = figures.dvh_figure(case, pred_gy, targets=settings.targets)
    paths = (save_figure(slices, folder / f"{case.case_id}_slices", settings.dpi)
             + save_figure(dvh, folder / f"{case.case_id}_dvh", settings.dpi))
    if std_gy is not None:
        spread = figures.spread_error_figure(case, pred_gy, std_gy, settings.targets)
        paths += save_figure(spread, folder / f"{case.case_id}_spread", settings.dpi)
    return paths


def _structure_order(dvh_table: pd.DataFrame) -> list[str]:
    return list(dict.fromkeys(dvh_table["structure"])) if len(dvh_table) else []


def _dvh_summary(dvh_table: pd.DataFrame) -> dict[str, dict[str, float]]:
    """Mean absolute error (Gy) per structure and DVH metric over cases."""
    if dvh_table.empty:
        return {}
    grouped = dvh_table.assign(abs_error_gy=dvh_table["error_gy"].abs()).groupby(
        ["structure", "metric"], sort=False)["abs_error_gy"].mean()
    out: dict[str, dict[str, float]] = {}
    for (structure, metric), value in grouped.items():
        out.setdefault(structure, {})[metric] = float(value)
    return out


def _json(value):
    if isinstance(value, np.generic):
        return value.item()
    raise TypeError(f"not JSON serialisable: {type(value)}")
