"""``report.html``: one self-contained page (figures linked relative to it) with the
summary tables and every figure of an evaluation."""

from __future__ import annotations

import html
from collections.abc import Sequence
from pathlib import Path

import pandas as pd

_STYLE = """
body { font-family: system-ui, sans-serif; margin: 2em auto; max-width: 1200px;
       color: #222; }
h1 { font-size: 1.5em; } h2 { font-size: 1.2em; margin-top: 2em; }
table { border-collapse: collapse; font-size: 0.85em; margin: 0.5em 0; }
th, td { border: 1px solid #ccc; padding: 3px 8px; text-align: right; }
th { background: #f3f3f3; } td:first-child, th:first-child { text-align: left; }
img { max-width: 100%; border: 1px solid #eee; margin: 0.5em 0; }
.fail { color: #D55E00; font-weight: bold; } .note { color: #555; font-size: 0.9em; }
"""

_HEADLINE = [("mae_body_gy", "MAE in body (Gy)"),
             ("baseline_mae_body_gy", "mean-dose baseline MAE (Gy)"),
             ("gamma_3pct_3mm_pass", "gamma 3%/3mm pass (%)"),
             ("gamma_2pct_2mm_pass", "gamma 2%/2mm pass (%)"),
             ("openkbp_dose_score_gy", "OpenKBP dose score (Gy)")]


def _metrics_table(summary: dict) -> str:
    rows = []
    metrics = summary["metrics"]
    ordered = [k for k, _ in _HEADLINE if k in metrics] + sorted(
        k for k in metrics if k not in dict(_HEADLINE))
    labels = dict(_HEADLINE)
    for key in ordered:
        m = metrics[key]
        rows.append({"metric": labels.get(key, key), "mean": m["mean"], "std": m["std"],
                     "median": m["median"], "n": m["n"]})
    return pd.DataFrame(rows).to_html(index=False, float_format=lambda v: f"{v:.2f}")


def _constraint_table(summary: dict) -> str:
    if not summary.get("constraints"):
        return "<p class='note'>No constraints configured.</p>"
    frame = pd.DataFrame.from_dict(summary["constraints"], orient="index")
    frame.index.name = "constraint"
    return frame.reset_index().to_html(index=False, float_format=lambda v: f"{v:.1f}")


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
    return "\n".join(blocks)


def write_report(output_dir: str | Path, summary: dict, table: pd.DataFrame,
                 constraint_table: pd.DataFrame, figure_paths: Sequence[Path]) -> Path:
    """Write ``output_dir/report.html`` and return its path."""
    output_dir = Path(output_dir)
    openkbp = summary.get("openkbp", {})
    per_case = table.set_index("case_id")[[c for c, _ in _HEADLINE if c in table]]
    page = f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>vmatdose evaluation</title>
<style>{_STYLE}</style></head><body>
<h1>Dose prediction evaluation: {summary['n_cases']} cases</h1>
<p class="note">Gamma: global, normalised to the reference maximum, 10 % cutoff, scored in
the body. OpenKBP scores: dose score {openkbp.get('dose_score_gy', float('nan')):.3f} Gy,
DVH score {openkbp.get('dvh_score_gy', float('nan')):.3f} Gy.</p>
<h2>Summary over cases</h2>
{_metrics_table(summary)}
<h2>Clinical constraints</h2>
{_constraint_table(summary)}
<h2>Per case</h2>
{per_case.to_html(float_format=lambda v: f"{v:.2f}")}
<h2>Figures</h2>
{_figure_block(output_dir, figure_paths)}
</body></html>
"""
    path = output_dir / "report.html"
    path.write_text(page, encoding="utf-8")
    return path
