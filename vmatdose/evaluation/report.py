"""``report.html``: one self-contained page (figures linked relative to it) a reviewer can
trust: where the numbers come from (checkpoint, model, data, protocol, commit, date),
warnings where the numbers contradict each other, the summary and constraint tables in
readable words (:mod:`vmatdose.metrics.registry`), and every figure of the evaluation.

Sections carry ids (``provenance``, ``warnings``, ``summary``, ``constraints``,
``per-case``, ``figures``) so a browser test can find them.
"""

from __future__ import annotations

import html
import math
from collections.abc import Mapping, Sequence
from pathlib import Path

import pandas as pd

from vmatdose.metrics import registry
from vmatdose.records.provenance import find_provenance

_STYLE = """
body { font-family: system-ui, sans-serif; margin: 2em auto; max-width: 1200px;
       color: #222; }
h1 { font-size: 1.5em; } h2 { font-size: 1.2em; margin-top: 2em; }
table { border-collapse: collapse; font-size: 0.9em; margin: 0.5em 0; }
th, td { border: 1px solid #ccc; padding: 3px 8px; text-align: right; }
th { background: #f3f3f3; } td:first-child, th:first-child { text-align: left; }
img { max-width: 100%; border: 1px solid #eee; margin: 0.5em 0; }
.warning { background: #fff3e0; border-left: 4px solid #D55E00; padding: 0.5em 1em; }
.note { color: #555; font-size: 0.9em; }
#provenance td { text-align: left; font-family: ui-monospace, monospace; }
"""

#: A target's D95 error beyond this fraction of its prescription is clinically relevant.
D95_TOLERANCE = 0.05
#: Gamma pass rate (%) in the targets above which a reader would call the targets fine.
GAMMA_TRUSTED_PERCENT = 90.0
_PROVENANCE_LABELS = (("checkpoint", "checkpoint"), ("model", "model"),
                      ("data_dir", "data folder"), ("protocol", "protocol"),
                      ("split", "split"), ("git_commit", "git commit"),
                      ("run_date", "training run"), ("report_date", "report written"))


def _finite(value) -> bool:
    return isinstance(value, int | float) and math.isfinite(value)


def report_warnings(summary: Mapping, table: pd.DataFrame,
                    prescriptions_gy: Mapping[str, float] | None) -> list[str]:
    """Plain-text warnings: a model worse than the mean-dose baseline on MAE, and cases
    whose gamma pass rate in the targets is >= 90 % while a target's D95 is off by more
    than 5 % of its prescription (gamma, normalised to the global maximum, misses it)."""
    warnings = []
    metrics = summary.get("metrics", {})
    mae = metrics.get("mae_body_gy", {}).get("mean")
    baseline = metrics.get("baseline_mae_body_gy", {}).get("mean")
    if _finite(mae) and _finite(baseline) and mae > baseline:
        warnings.append(f"The model is worse than the mean-dose baseline: MAE in body "
                        f"{mae:.2f} Gy against {baseline:.2f} Gy for predicting each "
                        f"structure's mean training dose.")
    gamma_columns = [c for c in table.columns if c.startswith("gamma_")
                     and c.endswith("_targets_pass")]
    if not gamma_columns:
        return warnings
    if not prescriptions_gy:
        warnings.append("Prescriptions unknown: the gamma-versus-D95 check was skipped.")
        return warnings
    column = gamma_columns[0]
    for _, row in table.iterrows():
        if not (_finite(row[column]) and row[column] >= GAMMA_TRUSTED_PERCENT):
            continue
        for target, gy in prescriptions_gy.items():
            error = row.get(f"d95_{target}_error_gy")
            if _finite(error) and abs(error) > D95_TOLERANCE * gy:
                warnings.append(
                    f"{row['case_id']}: {registry.label(column)} {row[column]:.1f} % but "
                    f"{target} D95 error {error:+.1f} Gy ({100 * abs(error) / gy:.0f} % of "
                    f"{gy:g} Gy): gamma does not show this target underdose/overdose.")
    return warnings


def metrics_table(summary: Mapping) -> pd.DataFrame:
    """Readable summary rows (headline metrics first); metrics without values left out."""
    metrics = summary.get("metrics", {})
    names = [k for k in registry.HEADLINE if k in metrics] + [
        k for k in metrics if k not in registry.HEADLINE]
    rows = [{"metric": registry.heading(k), "mean": metrics[k]["mean"],
             "std": metrics[k]["std"], "median": metrics[k]["median"], "cases": metrics[k]["n"]}
            for k in names if metrics[k].get("n") and _finite(metrics[k].get("mean"))]
    return pd.DataFrame(rows, columns=["metric", "mean", "std", "median", "cases"])


def constraint_counts(constraint_table: pd.DataFrame) -> pd.DataFrame:
    """Per constraint: cases where reference and prediction both pass, only the
    reference passes, only the prediction passes, both fail, and not evaluable."""
    columns = ["constraint", "both pass", "reference passes, prediction fails",
               "reference fails, prediction passes", "both fail", "not evaluable"]
    if constraint_table is None or constraint_table.empty:
        return pd.DataFrame(columns=columns)
    rows = []
    for label, group in constraint_table.groupby("constraint", sort=False):
        done = group[group["evaluable"].astype(bool)]
        ref, pred = done["ref_pass"].astype(bool), done["pred_pass"].astype(bool)
        rows.append(dict(zip(columns, [label, int((ref & pred).sum()), int((ref & ~pred).sum()),
                                       int((~ref & pred).sum()), int((~ref & ~pred).sum()),
                                       len(group) - len(done)])))
    return pd.DataFrame(rows, columns=columns)


def _provenance_block(provenance: Mapping) -> str:
    items = "".join(f"<tr><th>{html.escape(label)}</th><td>"
                    f"{html.escape(str(provenance.get(key) or 'unknown'))}</td></tr>"
                    for key, label in _PROVENANCE_LABELS)
    return f"<table>{items}</table>"


def _warnings_block(warnings: Sequence[str]) -> str:
    if not warnings:
        return "<p class='note'>No contradictions found.</p>"
    return "".join(f"<p class='warning'>{html.escape(w)}</p>" for w in warnings)


def _per_case_table(table: pd.DataFrame) -> str:
    columns = [c for c in (*registry.HEADLINE, *registry.UNCERTAINTY) if c in table]
    shown = table.set_index("case_id")[columns]
    shown = shown.loc[:, shown.notna().any()]
    shown.index.name = "case"
    return shown.rename(columns=registry.heading).to_html(
        float_format=lambda v: f"{v:.2f}", na_rep="")


def _figure_block(output_dir: Path, paths: Sequence[Path]) -> str:
    blocks = []
    for path in paths:
        if path.suffix != ".png":
            continue
        rel = path.relative_to(output_dir).as_posix()
        pdf = Path(rel).with_suffix(".pdf").as_posix()
        blocks.append(f"<figure><img src='{html.escape(rel)}' alt='{html.escape(path.stem)}'>"
                      f"<figcaption class='note'>{html.escape(path.stem)} "
                      f"(<a href='{html.escape(pdf)}'>PDF</a>)</figcaption></figure>")
    return "\n".join(blocks) or "<p class='note'>No figures drawn.</p>"


def _openkbp_note(summary: Mapping) -> str:
    scores = [(registry.heading(f"openkbp_{k}"), v) for k, v in summary.get("openkbp", {}).items()
              if _finite(v)]
    text = ", ".join(f"{name} {value:.3f}" for name, value in scores)
    return f" {html.escape(text)}." if text else ""


def write_report(output_dir: str | Path, summary: dict, table: pd.DataFrame,
                 constraint_table: pd.DataFrame, figure_paths: Sequence[Path],
                 provenance: Mapping | None = None) -> Path:
    """Write ``output_dir/report.html`` and return its path. ``provenance`` (see
    :func:`vmatdose.records.provenance.find_provenance`, read from ``output_dir``
    when not given) heads the page and supplies the prescriptions for the warnings."""
    output_dir = Path(output_dir)
    provenance = dict(provenance or find_provenance(output_dir))
    warnings = report_warnings(summary, table, provenance.get("prescriptions_gy"))
    n = summary["n_cases"]
    page = f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>vmatdose evaluation</title>
<style>{_STYLE}</style></head><body>
<h1>Dose prediction evaluation: {n} case{'' if n == 1 else 's'}</h1>
<section id="provenance"><h2>Provenance</h2>
{_provenance_block(provenance)}</section>
<section id="warnings"><h2>Warnings</h2>
{_warnings_block(warnings)}</section>
<section id="summary"><h2>Summary over cases</h2>
<p class="note">Gamma: global, normalised to the reference maximum, 10 % cutoff, scored in
the body.{_openkbp_note(summary)}</p>
{metrics_table(summary).to_html(index=False, float_format=lambda v: f"{v:.2f}")}</section>
<section id="constraints"><h2>Clinical constraints (cases)</h2>
{constraint_counts(constraint_table).to_html(index=False)}</section>
<section id="per-case"><h2>Per case</h2>
{_per_case_table(table)}</section>
<section id="figures"><h2>Figures</h2>
{_figure_block(output_dir, figure_paths)}</section>
</body></html>
"""
    path = output_dir / "report.html"
    path.write_text(page, encoding="utf-8")
    return path
