"""Per-case metric rows -> ``per_case.csv`` and ``summary.json`` (mean/std/median)."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd


def summarise(table: pd.DataFrame) -> dict[str, dict[str, float]]:
    """metric -> {mean, std, median, n} over cases (NaNs ignored)."""
    summary = {}
    for column in table.select_dtypes(include=[np.number]).columns:
        values = table[column].dropna()
        summary[column] = {"mean": float(values.mean()) if len(values) else float("nan"),
                           "std": float(values.std(ddof=0)) if len(values) else float("nan"),
                           "median": float(values.median()) if len(values) else float("nan"),
                           "n": int(len(values))}
    return summary


def write_tables(rows: Sequence[dict], output_dir: str | Path,
                 extra: dict | None = None) -> tuple[pd.DataFrame, dict]:
    """Write ``per_case.csv`` and ``summary.json`` into ``output_dir``; return both."""
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    table = pd.DataFrame(list(rows))
    table.to_csv(output_dir / "per_case.csv", index=False)
    summary = {"n_cases": len(table), "metrics": summarise(table), **(extra or {})}
    (output_dir / "summary.json").write_text(json.dumps(summary, indent=2))
    return table, summary
