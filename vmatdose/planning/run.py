"""``python -m vmatdose.plan`` as a library function: check every case, then plan each.

Writes into ``output_dir``:

* ``<case_id>.npz``: the deliverable (sequenced) plan's dose on the case grid (the
  prediction-file format, so ``python -m vmatdose.evaluate predictions_dir=<output_dir>``
  scores it too);
* ``<case_id>_rtplan.dcm``: the deliverable plan as a DICOM RT Plan (MLC segments, MU);
* ``<case_id>_rtdose.dcm``: its dose as DICOM RTDOSE (``export_rtdose=true``);
* ``<case_id>/``: ``fluence.npz`` and ``fluence.png`` (per-beam fluence maps of the
  fluence plan), ``fluence_dose.npz`` (its dose), ``segments.csv`` (segments and MU per
  beam), ``dvh.png`` (reference, prediction, fluence, deliverable), ``criteria.csv``,
  ``dvh_points.csv`` and ``summary.json`` (distances, time, memory);
* ``plan_summary.csv`` (one row per case), ``criteria.csv`` and ``dvh_points.csv`` (all
  cases).
"""

from __future__ import annotations

import dataclasses
import json
import logging
from collections.abc import Callable, Mapping
from pathlib import Path

import numpy as np
import pandas as pd
from tqdm import tqdm

from vmatdose.config_schema import PlanGammaConfig
from vmatdose.data.case import Case, list_case_files, load_case
from vmatdose.errors import InputError
from vmatdose.evaluation.constraints import Constraint, parse_constraints
from vmatdose.inference.predictions import load_prediction, save_prediction
from vmatdose.planning.arrangement import case_targets
from vmatdose.planning.comparison import (
    criteria_rows,
    distance_metrics,
    dvh_point_rows,
    plan_doses,
    plan_dvh_figure,
)
from vmatdose.planning.delivery import delivered_beams
from vmatdose.planning.engine import require_pyradplan
from vmatdose.planning.fluence import fluence_figure, save_fluence_arrays
from vmatdose.planning.optimise import PlannedCase, plan_case
from vmatdose.planning.preflight import PlanJob, check_cases
from vmatdose.planning.rtplan import DeliveredBeam, write_rtplan
from vmatdose.planning.settings import PlanSettings
from vmatdose.plot_style import save_figure
from vmatdose.protocol import Protocol

log = logging.getLogger(__name__)

DEFAULT_GAMMA = dataclasses.asdict(PlanGammaConfig())


def _folders(cfg: Mapping) -> tuple[Path, Path | None, Path]:
    if bool(cfg.get("ckpt_path")) == bool(cfg.get("predictions_dir")):
        raise InputError("give exactly one of predictions_dir=<folder of predicted doses> or "
                         "ckpt_path=<checkpoint> (to predict first)")
    if not cfg.get("cases_dir") or not cfg.get("output_dir"):
        raise InputError("plan needs cases_dir=<case files> and output_dir=<folder>")
    cases_dir, output_dir = Path(cfg["cases_dir"]), Path(cfg["output_dir"])
    predictions = Path(cfg["predictions_dir"]) if cfg.get("predictions_dir") else None
    for name, folder in (("cases_dir", cases_dir), ("predictions_dir", predictions)):
        if folder is not None and folder.resolve() == output_dir.resolve():
            raise InputError(f"output_dir={output_dir} is the {name}: plan writes its "
                             "deliverable doses elsewhere, give another output_dir")
    return cases_dir, predictions, output_dir


def _predict_first(cfg: Mapping, output_dir: Path) -> Path:
    """Predict every case with ``cfg.ckpt_path`` into ``output_dir/predictions``."""
    from vmatdose.inference.run import run_prediction

    folder = output_dir / "predictions"
    chosen = {key: cfg[key] for key in ("accelerator", "spacing_mismatch") if key in cfg}
    run_prediction({"ckpt_path": cfg["ckpt_path"], "cases_dir": cfg["cases_dir"],
                    "output_dir": str(folder), **chosen})  # else predict's defaults
    return folder


def run_planning(cfg: Mapping, report: Callable[[str], None] = log.info) -> pd.DataFrame:
    """Plan every case of ``cfg.cases_dir`` from its prediction; return the summary table
    (``report`` gets one line per planned case; the entry point prints them).

    Keys: ``cases_dir``, ``output_dir``, ``predictions_dir`` or ``ckpt_path``, ``protocol``
    (a protocol config), ``planning`` (:class:`PlanSettings`), ``gamma``
    (``dose_percent``, ``distance_mm``, ``cutoff_percent``), ``export_rtdose``.
    """
    settings = PlanSettings.from_config(cfg.get("planning"))
    protocol = Protocol.from_dict(cfg["protocol"])
    gamma = {**DEFAULT_GAMMA, **dict(cfg.get("gamma") or {})}
    cases_dir, predictions_dir, output_dir = _folders(cfg)
    paths = list_case_files(cases_dir)
    if not paths:
        raise InputError(f"{cases_dir}: no case files (*.npz) to plan")
    if predictions_dir is None:
        require_pyradplan()  # before spending time on predictions
        predictions_dir = _predict_first(cfg, output_dir)
    jobs = check_cases(paths, predictions_dir, protocol, settings)
    sources = rtdose_sources(jobs, cfg)
    require_pyradplan()
    constraints = parse_constraints(protocol.constraints)
    rows, criteria, points = [], [], []
    for job in tqdm(jobs, desc="plan", unit="case", disable=not settings.progress):
        row, case_criteria, case_points = plan_one(job, constraints, settings, gamma,
                                                   output_dir, bool(cfg.get("export_rtdose")),
                                                   sources.get(job.case_id))
        rows.append(row)
        criteria += case_criteria
        points += case_points
        report(_case_line(row))
    table = pd.DataFrame(rows)
    output_dir.mkdir(parents=True, exist_ok=True)
    table.to_csv(output_dir / "plan_summary.csv", index=False)
    pd.DataFrame(criteria).to_csv(output_dir / "criteria.csv", index=False)
    pd.DataFrame(points).to_csv(output_dir / "dvh_points.csv", index=False)
    return table


def rtdose_sources(jobs: list[PlanJob], cfg: Mapping) -> dict[str, object]:
    """case id -> its source patient (:func:`~vmatdose.data.export.rtdose.find_source_patient`)
    when ``source_dicom`` is given, so each RTPLAN and RTDOSE carries the patient's identity
    and UIDs as ``predict`` writes them; found for every case before any optimisation."""
    if not cfg.get("source_dicom"):
        return {}
    from vmatdose.data.export.rtdose import find_source_patient
    from vmatdose.data.privacy import SaltError

    sources = {}
    for job in jobs:
        try:
            sources[job.case_id] = find_source_patient(
                job.case_id, cfg["source_dicom"], cfg.get("id_salt") or None,
                cfg.get("case_id_map"))
        except (LookupError, SaltError) as err:
            raise InputError(f"{job.case_id}: {err}") from err
    return sources


def plan_one(job: PlanJob, constraints: list[Constraint], settings: PlanSettings,
             gamma: Mapping, output_dir: Path, export_rtdose: bool, source: object = None
             ) -> tuple[dict, list[dict], list[dict]]:
    """Plan one checked case and write its outputs (``source``: its source patient for
    the RTDOSE); its summary row, criteria and DVH point rows."""
    case = load_case(job.case_path)
    pred, _ = load_prediction(job.prediction_path, case)
    planned = plan_case(case, pred, job.arrangement, constraints, settings)
    planned.release()
    return write_case_outputs(case, pred, planned, job, constraints, settings, gamma,
                              output_dir, export_rtdose, source)


def write_case_outputs(case: Case, pred: np.ndarray, planned: PlannedCase, job: PlanJob,
                       constraints: list[Constraint], settings: PlanSettings,
                       gamma: Mapping, output_dir: Path, export_rtdose: bool,
                       source: object = None) -> tuple[dict, list[dict], list[dict]]:
    """Every per-case file of :mod:`.run`; returns the rows for the run's tables."""
    folder = output_dir / case.case_id
    folder.mkdir(parents=True, exist_ok=True)
    dose = np.maximum(planned.dose_gy, 0.0)
    fluence_dose = np.maximum(planned.fluence_dose_gy, 0.0)
    save_prediction(case, dose, None, output_dir / f"{case.case_id}.npz")
    save_prediction(case, fluence_dose, None, folder / "fluence_dose.npz")
    fractions = int(case.meta.get("fractions") or 1)
    beams = delivered_beams(planned.sequenced, planned.beams, settings.mu_per_weight,
                            fractions)
    write_rtplan(case, beams, job.arrangement.isocentre_mm, case.prescriptions_gy, fractions,
                 output_dir / f"{case.case_id}_rtplan.dcm", source=source)
    if export_rtdose:
        from vmatdose.data.export.rtdose import write_rtdose

        write_rtdose(dose, case, output_dir / f"{case.case_id}_rtdose.dcm", source=source)
    save_fluence_arrays(planned.beams, settings.bixel_width_mm, folder / "fluence.npz")
    save_figure(fluence_figure(planned.beams, settings.bixel_width_mm,
                               f"{case.case_id}: optimised fluence per beam"),
                folder / "fluence", dpi=120)
    segment_table(beams).to_csv(folder / "segments.csv", index=False)
    targets = case_targets(case)
    doses = plan_doses(case, pred, fluence_dose, dose)
    save_figure(plan_dvh_figure(case, doses, targets), folder / "dvh", dpi=120)
    criteria = criteria_rows(case, doses, constraints)
    points = dvh_point_rows(case, doses, targets)
    pd.DataFrame(criteria).to_csv(folder / "criteria.csv", index=False)
    pd.DataFrame(points).to_csv(folder / "dvh_points.csv", index=False)
    row = summary_row(case, pred, fluence_dose, dose, planned, job, criteria, targets, gamma,
                      beams)
    (folder / "summary.json").write_text(json.dumps(row, indent=2, default=float) + "\n")
    return row, criteria, points


def segment_table(beams: list[DeliveredBeam]) -> pd.DataFrame:
    """One row per beam: gantry and couch angles, segments, MU per fraction."""
    return pd.DataFrame([{"beam": i + 1, "gantry_deg": b.gantry_deg, "couch_deg": b.couch_deg,
                          "segments": len(b.shapes), "mu": round(b.mu, 2)}
                         for i, b in enumerate(beams)])


def summary_row(case: Case, pred: np.ndarray, fluence_dose: np.ndarray, dose: np.ndarray,
                planned: PlannedCase, job: PlanJob, criteria: list[dict],
                targets: list[str], gamma: Mapping, beams: list[DeliveredBeam]) -> dict:
    """One row of ``plan_summary.csv`` ("deliverable": the sequenced plan, "fluence": the
    plan before sequencing)."""
    primary = targets[0]
    mask = case.mask(primary) > 0
    segments = [len(b.shapes) for b in beams]
    row: dict = {"case_id": case.case_id, "n_beams": len(planned.beams),
                 "n_bixels": planned.n_bixels, "estimated_bixels": job.estimated_bixels,
                 "dij_nonzeros": planned.dij_nonzeros,
                 "dose_grid": "x".join(str(n) for n in planned.dose_grid_shape),
                 "iterations": planned.iterations,
                 **{f"iterations_{k}": v for k, v in planned.stage_iterations.items()},
                 "iteration_cap_hit": ";".join(planned.hit_cap),
                 **{f"late_decrease_{k}": float(f"{v:.3g}")
                    for k, v in planned.late_decrease.items()},
                 **{f"seconds_{k}": round(v, 2) for k, v in planned.seconds.items()},
                 **{f"cpu_seconds_{k}": round(v, 2) for k, v in planned.cpu_seconds.items()},
                 "peak_rss_gb": round(planned.peak_rss_gb, 3),
                 "estimated_peak_gb": round(job.estimated_gb, 3),
                 "primary_target": primary,
                 "deliverable_median_primary_gy": float(np.median(dose[mask])),
                 "fluence_median_primary_gy": float(np.median(fluence_dose[mask])),
                 "prescription_primary_gy": case.prescriptions_gy[primary],
                 "normalisation": planned.normalisation.get("deliverable", 1.0),
                 "fluence_normalisation": planned.normalisation.get("fluence", 1.0),
                 "segments": int(sum(segments)),
                 "segments_per_beam": " ".join(str(n) for n in segments),
                 "mu_per_fraction": round(sum(b.mu for b in beams), 1),
                 "mu_per_beam": " ".join(f"{b.mu:.0f}" for b in beams),
                 "dropped_fluence_fraction": dropped_fraction(planned)}
    for kind in ("reference", "prediction", "fluence", "deliverable"):
        met = [r[f"{kind}_met"] for r in criteria if r[f"{kind}_met"] is not None]
        row[f"{kind}_criteria_met"] = int(sum(met))
        row[f"{kind}_criteria_evaluable"] = len(met)
    row.update(distance_metrics(case, pred, fluence_dose, dose, targets, gamma))
    row["penalties"] = "; ".join(planned.penalties)
    return row


def dropped_fraction(planned: PlannedCase) -> float:
    """Share of the fluence the sequencer dropped (segments too small or too many)."""
    dropped = sum(b.dropped_weight for b in planned.sequenced.beams)
    total = dropped + sum(b.total_weight for b in planned.sequenced.beams)
    return round(dropped / total, 4) if total > 0 else 0.0


def _case_line(row: Mapping) -> str:
    gamma = next(v for k, v in row.items()
                 if k.startswith("deliverable_vs_prediction_gamma") and k.endswith("_pass"))
    vs_fluence = next(v for k, v in row.items() if k.startswith("deliverable_vs_fluence_"))
    return (f"{row['case_id']}: criteria met reference {row['reference_criteria_met']}/"
            f"{row['reference_criteria_evaluable']}, fluence {row['fluence_criteria_met']}, "
            f"deliverable {row['deliverable_criteria_met']}/"
            f"{row['deliverable_criteria_evaluable']}; {row['segments']} segments, "
            f"{row['mu_per_fraction']:.0f} MU; deliverable vs fluence gamma "
            f"{vs_fluence:.1f} %, vs prediction: dose score "
            f"{row['deliverable_vs_prediction_dose_score_gy']:.2f} Gy, gamma {gamma:.1f} %; "
            f"{row['seconds_total']:.0f} s, peak {row['peak_rss_gb']:.2f} GB")
