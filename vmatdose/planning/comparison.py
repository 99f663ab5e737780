"""Four doses of one case side by side: the reference plan, the prediction, the fluence
plan made from the prediction and the deliverable (sequenced) plan made from that.

* clinical criteria: each protocol constraint's value and met / not met for each;
* DVH points (OpenKBP's: D99, D95, D1 of targets; D0.1cc, Dmean of organs) of each;
* how far the deliverable is from the prediction: OpenKBP dose score and DVH score with
  the prediction as reference, and the gamma pass rate (deliverable evaluated against
  the prediction, global, within the body, low-dose cut-off of the prediction's max);
  the same for the fluence plan, and the deliverable against the fluence plan (what
  sequencing changed);
* a DVH figure with all four (reference solid, prediction dashed, fluence dash-dot,
  deliverable dotted).

A case without a reference dose gets NaN (and ``None`` for met) in the reference columns.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence

import matplotlib.pyplot as plt
import numpy as np
from matplotlib.lines import Line2D

from vmatdose.data.case import Case
from vmatdose.evaluation.constraints import Constraint
from vmatdose.evaluation.figures import structure_colours
from vmatdose.evaluation.openkbp_scores import dose_score, dvh_entries, dvh_errors
from vmatdose.metrics.dvh import cumulative_dvh
from vmatdose.metrics.gamma import gamma_index, pass_rate_from_gamma
from vmatdose.plot_style import FONT

DOSES = ("reference", "prediction", "fluence", "deliverable")
_STYLES = {"reference": "-", "prediction": "--", "fluence": "-.", "deliverable": ":"}


def plan_doses(case: Case, pred_gy: np.ndarray, fluence_gy: np.ndarray,
               deliverable_gy: np.ndarray) -> dict[str, np.ndarray | None]:
    """The four doses by name (:data:`DOSES`); the reference is ``None`` without one."""
    return {"reference": case.dose, "prediction": pred_gy, "fluence": fluence_gy,
            "deliverable": deliverable_gy}


def criteria_rows(case: Case, doses: Mapping[str, np.ndarray | None],
                  constraints: Sequence[Constraint]) -> list[dict]:
    """One row per constraint: ``<dose>_value`` and ``<dose>_met`` for each dose."""
    rows = []
    for c in constraints:
        row: dict = {"case_id": case.case_id, "criterion": c.label}
        for name, dose in doses.items():
            value = c.value(case, dose) if dose is not None else float("nan")
            row[f"{name}_value"] = value
            row[f"{name}_met"] = c.passes(value)
        rows.append(row)
    return rows


def dvh_point_rows(case: Case, doses: Mapping[str, np.ndarray | None],
                   targets: Sequence[str]) -> list[dict]:
    """One row per OpenKBP DVH point (``structure``, ``metric``) with its value in Gy for
    each dose."""
    values = {name: dvh_entries(case, dose, targets) for name, dose in doses.items()
              if dose is not None}
    keys = next(iter(values.values())).keys() if values else []
    rows = []
    for key in keys:
        structure, metric = key.split("/")
        rows.append({"case_id": case.case_id, "structure": structure, "metric": metric,
                     **{f"{name}_gy": values[name][key] if name in values else float("nan")
                        for name in doses}})
    return rows


def gamma_pass(reference_gy: np.ndarray, evaluated_gy: np.ndarray, case: Case,
               gamma: Mapping) -> float:
    """Gamma pass rate (%) of ``evaluated_gy`` against ``reference_gy`` (global, within
    the body, ``gamma``'s criteria and low-dose cut-off)."""
    gamma_map = gamma_index(reference_gy.astype(np.float32), evaluated_gy.astype(np.float32),
                            case.spacing_mm, dose_percent=float(gamma["dose_percent"]),
                            distance_mm=float(gamma["distance_mm"]),
                            lower_percent_dose_cutoff=float(gamma["cutoff_percent"]),
                            mask=case.body > 0)
    return pass_rate_from_gamma(gamma_map)


def distance_metrics(case: Case, pred_gy: np.ndarray, fluence_gy: np.ndarray,
                     deliverable_gy: np.ndarray, targets: Sequence[str], gamma: Mapping
                     ) -> dict[str, float]:
    """Deliverable vs prediction (dose score, DVH score, gamma pass rate %), fluence plan
    vs prediction (dose and DVH score), deliverable vs fluence plan (gamma: what
    sequencing changed), and each vs the reference plan's dose (dose scores) when the
    case has one."""
    as_reference = dataclasses.replace(case, dose=np.asarray(pred_gy, np.float32))
    label = f"gamma_{gamma['dose_percent']:g}pct_{gamma['distance_mm']:g}mm"
    out: dict[str, float] = {}
    for name, dose in (("deliverable", deliverable_gy), ("fluence", fluence_gy)):
        errors = dvh_errors(as_reference, dose, targets)
        out[f"{name}_vs_prediction_dose_score_gy"] = dose_score(as_reference, dose)
        out[f"{name}_vs_prediction_dvh_score_gy"] = float(np.mean(errors)) if errors \
            else float("nan")
    out[f"deliverable_vs_prediction_{label}_pass"] = gamma_pass(pred_gy, deliverable_gy,
                                                                case, gamma)
    out[f"deliverable_vs_fluence_{label}_pass"] = gamma_pass(fluence_gy, deliverable_gy,
                                                             case, gamma)
    has_ref = case.dose is not None
    for name, dose in (("prediction", pred_gy), ("fluence", fluence_gy),
                       ("deliverable", deliverable_gy)):
        out[f"{name}_vs_reference_dose_score_gy"] = dose_score(case, dose) if has_ref \
            else float("nan")
    return out


def plan_dvh_figure(case: Case, doses: Mapping[str, np.ndarray | None],
                     targets: Sequence[str]) -> plt.Figure:
    """Cumulative DVHs of every structure for each dose."""
    with plt.rc_context(FONT):
        names = [s for s in case.structures if case.mask(s).any()]
        names = [s for s in names if s in targets] + [s for s in names if s not in targets]
        colours = structure_colours(names, targets)
        present = {k: v for k, v in doses.items() if v is not None}
        top = max(float(np.max(v)) for v in present.values())
        bins = np.linspace(0.0, top * 1.02 + 1e-6, 256)
        fig, ax = plt.subplots(figsize=(9.5, 5.2), constrained_layout=True)
        masks = np.stack([case.mask(s) for s in names])
        for kind, dose in present.items():
            _, volume = cumulative_dvh(np.asarray(dose, np.float64), masks, bins=bins,
                                       unit="percent")
            for i, name in enumerate(names):
                ax.plot(bins, volume[i], color=colours[name], ls=_STYLES[kind],
                        lw=2.2 if name in targets else 1.4,
                        label=name if kind == next(iter(present)) else None)
        for name, gy in case.prescriptions_gy.items():
            ax.axvline(gy, color=colours.get(name, "black"), lw=0.8, alpha=0.5)
        handles, labels = ax.get_legend_handles_labels()
        handles += [Line2D([], [], color="black", ls=_STYLES[k]) for k in present]
        labels += [k for k in present]
        ax.set(xlabel="dose (Gy)", ylabel="volume (%)", ylim=(0, 102), xlim=(0, bins[-1]),
               title=f"{case.case_id}: reference, prediction, fluence and deliverable plan")
        ax.grid(alpha=0.3)
        ax.legend(handles, labels, loc="center left", bbox_to_anchor=(1.01, 0.5),
                  frameon=False)
    return fig
