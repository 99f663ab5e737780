"""Anatomy vs error: which anatomy a model fails on.

Per test case, features from its case file:

* ``volume_<structure>_cc``: every structure's volume;
* ``ptv_z_extent_mm``: the cranio-caudal extent of the union of the targets;
* ``min_distance_<oar>_mm``: the smallest distance from the targets to each OAR, from the
  targets' signed distance field (0 when they touch or overlap);
* ``overlap_<oar>_cc``: the OAR volume inside the targets (signed distance <= 0).

and their Spearman rank correlation (``scipy.stats.spearmanr``) with the per-case errors
of an evaluation (``per_case.csv``; a study's runs are averaged per case).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd
from scipy import stats

from vmatdose.data.case import Case, load_case
from vmatdose.data.geometry import signed_distance_mm
from vmatdose.metrics.registry import ANATOMY_ERRORS
from vmatdose.plot_style import plt, save_figure


def anatomy_features(case: Case, targets: Sequence[str]) -> dict[str, float]:
    """The features of one case (see the module docstring); ``targets`` names which
    structures are targets (the others are OARs)."""
    cc = case.voxel_volume_cc
    row: dict[str, float] = {"case_id": case.case_id}
    union = np.zeros(case.shape, bool)
    for name in case.structures:
        mask = case.mask(name) > 0
        row[f"volume_{name}_cc"] = float(mask.sum() * cc)
        if name in targets:
            union |= mask
    slices = np.flatnonzero(union.any(axis=(1, 2)))
    row["ptv_z_extent_mm"] = (float((slices[-1] - slices[0] + 1) * case.spacing_mm[0])
                              if slices.size else float("nan"))
    sdf = signed_distance_mm(union, case.spacing_mm) if union.any() else None
    for name in case.structures:
        mask = case.mask(name) > 0
        if name in targets or sdf is None or not mask.any():
            continue
        row[f"min_distance_{name}_mm"] = float(max(sdf[mask].min(), 0.0))
        row[f"overlap_{name}_cc"] = float((sdf[mask] <= 0).sum() * cc)
    return row


def find_evaluations(location: Path) -> list[Path]:
    """``per_case.csv`` files at or below ``location`` (an eval dir, a run or a study)."""
    if (location / "per_case.csv").is_file():
        return [location / "per_case.csv"]
    found = sorted(location.glob("**/per_case.csv"))
    if not found:
        raise FileNotFoundError(f"{location}: no per_case.csv at or below it (give an "
                                "evaluation folder, a run folder or a study folder)")
    return found


def _run_config(per_case: Path) -> dict:
    for folder in (per_case.parent, per_case.parent.parent):
        record = folder / "run_record.json"
        if record.is_file():
            return json.loads(record.read_text()).get("config", {})
    return {}


def case_errors(per_case_files: Sequence[Path]) -> pd.DataFrame:
    """Per-case errors averaged over the evaluations (case_id index)."""
    tables = [pd.read_csv(p) for p in per_case_files]
    merged = pd.concat(tables).groupby("case_id").mean(numeric_only=True)
    return merged


def correlations(features: pd.DataFrame, errors: pd.DataFrame,
                 error_columns: Sequence[str]) -> pd.DataFrame:
    """Spearman rho and p of every feature with every error, over the shared cases."""
    joined = features.join(errors[list(error_columns)], how="inner")
    rows = []
    for feature in features.columns:
        for error in error_columns:
            pair = joined[[feature, error]].dropna()
            if len(pair) < 3 or pair[feature].nunique() < 2 or pair[error].nunique() < 2:
                rho, p = float("nan"), float("nan")
            else:
                result = stats.spearmanr(pair[feature], pair[error])
                rho, p = float(result.statistic), float(result.pvalue)
            rows.append({"feature": feature, "error": error, "n_cases": len(pair),
                         "spearman_rho": rho, "p_value": p})
    return pd.DataFrame(rows)


def correlation_figure(table: pd.DataFrame) -> plt.Figure:
    """Heat map of Spearman rho, features x errors."""
    grid = table.pivot(index="feature", columns="error", values="spearman_rho")
    fig, ax = plt.subplots(figsize=(2.0 + 1.4 * grid.shape[1], 1.0 + 0.28 * grid.shape[0]),
                           constrained_layout=True)
    image = ax.imshow(grid.to_numpy(dtype=float), cmap="PuOr_r", vmin=-1, vmax=1,
                      aspect="auto")
    ax.set_xticks(range(grid.shape[1]), grid.columns, rotation=30, ha="right", fontsize=7)
    ax.set_yticks(range(grid.shape[0]), grid.index, fontsize=7)
    fig.colorbar(image, ax=ax, label="Spearman rho")
    return fig


def write_anatomy_analysis(location: str | Path, output_dir: str | Path | None = None,
                           cases_dir: str | Path | None = None,
                           errors: Sequence[str] | None = None) -> list[Path]:
    """Features, correlations (CSV + markdown) and the heat map for the evaluation(s) at
    ``location``; the case files come from the runs' ``data.cases_dir`` unless
    ``cases_dir`` is given. Returns the written paths."""
    location = Path(location)
    files = find_evaluations(location)
    config = _run_config(files[0])
    folder = Path(cases_dir or config.get("data", {}).get("cases_dir", ""))
    if not cases_dir and not config:
        raise ValueError(f"{files[0]}: no run_record.json next to it names the case files; "
                         "give --cases-dir")
    targets = list(config.get("data", {}).get("targets", []) or [])
    error_table = case_errors(files)
    rows = []
    for case_id in error_table.index:
        path = folder / f"{case_id}.npz"
        if not path.is_file():
            raise FileNotFoundError(f"{path}: case file of evaluated case {case_id!r} missing")
        case = load_case(path, load_dose=False)
        rows.append(anatomy_features(case, targets or _guess_targets(case)))
    features = pd.DataFrame(rows).set_index("case_id")
    columns = [c for c in error_table.columns
               if c in ANATOMY_ERRORS or (c.startswith("d95_") and c.endswith("_abs_error_gy"))]
    columns = list(errors) if errors else columns
    table = correlations(features, error_table, columns)
    out = Path(output_dir) if output_dir else (location / "anatomy")
    out.mkdir(parents=True, exist_ok=True)
    features.to_csv(out / "anatomy_features.csv")
    table.to_csv(out / "anatomy_correlations.csv", index=False)
    (out / "anatomy_correlations.md").write_text(_markdown(table, len(features), len(files)))
    return [out / "anatomy_features.csv", out / "anatomy_correlations.csv",
            out / "anatomy_correlations.md",
            *save_figure(correlation_figure(table), out / "anatomy_correlations", dpi=150)]


def _guess_targets(case: Case) -> list[str]:
    return list(case.prescriptions_gy)


def _markdown(table: pd.DataFrame, n_cases: int, n_evaluations: int) -> str:
    lines = [f"Spearman correlation of anatomy features with per-case errors: {n_cases} cases, "
             f"errors averaged over {n_evaluations} evaluation(s). Sorted by |rho|.", "",
             "| feature | error | rho | p | cases |", "|---|---|---|---|---|"]
    ordered = table.assign(order=table["spearman_rho"].abs()).sort_values(
        "order", ascending=False, na_position="last")
    for _, r in ordered.iterrows():
        lines.append(f"| {r.feature} | {r.error} | {r.spearman_rho:.2f} | {r.p_value:.3g} | "
                     f"{r.n_cases} |")
    return "\n".join(lines) + "\n"
