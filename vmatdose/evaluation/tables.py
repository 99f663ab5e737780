"""Per-case metric table -> summary statistics (mean/std/median/n) per metric."""

from __future__ import annotations

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
