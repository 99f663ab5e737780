"""The look shared by every figure vmatdose draws: headless matplotlib, the colour-blind
safe Okabe-Ito palette, font sizes, and how a figure is saved (PNG + PDF).

Figure makers (``evaluation/figures.py``, ``tracking/``, ``analysis/``) take their style
from here; ``from vmatdose.plot_style import plt`` gives pyplot on the Agg backend.
"""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # headless: figures are files, never windows
import matplotlib.pyplot as plt  # noqa: E402

__all__ = ["FONT", "OKABE_ITO", "plt", "save_figure"]

OKABE_ITO = ["#0072B2", "#E69F00", "#009E73", "#CC79A7", "#56B4E9", "#D55E00", "#F0E442",
             "#000000"]
FONT = {"font.size": 11, "axes.titlesize": 12, "axes.labelsize": 11, "legend.fontsize": 10,
        "xtick.labelsize": 9, "ytick.labelsize": 9}


def save_figure(fig: plt.Figure, stem: str | Path, dpi: int = 300) -> list[Path]:
    """Write ``<stem>.png`` (``dpi``) and ``<stem>.pdf``; close the figure."""
    stem = Path(stem)
    stem.parent.mkdir(parents=True, exist_ok=True)
    paths = [stem.with_suffix(".png"), stem.with_suffix(".pdf")]
    fig.savefig(paths[0], dpi=dpi)
    fig.savefig(paths[1])
    plt.close(fig)
    return paths
