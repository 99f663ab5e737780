"""The look shared by every figure vmatdose draws: headless matplotlib, the colour-blind
safe Okabe-Ito palette, font sizes, and how a figure is saved (PNG + PDF).

Figure makers (``evaluation/figures.py``, ``tracking/``, ``analysis/``) take their style
from here (``from vmatdose.plot_style import plt``). Importing this module leaves the
matplotlib backend alone (a notebook keeps its own); the entry points, which only write
figures to files, call :func:`use_file_backend` first.
"""

from __future__ import annotations

from pathlib import Path

import matplotlib
import matplotlib.pyplot as plt

__all__ = ["FONT", "OKABE_ITO", "plt", "save_figure", "use_file_backend"]

OKABE_ITO = ["#0072B2", "#E69F00", "#009E73", "#CC79A7", "#56B4E9", "#D55E00", "#F0E442",
             "#000000"]
FONT = {"font.size": 11, "axes.titlesize": 12, "axes.labelsize": 11, "legend.fontsize": 10,
        "xtick.labelsize": 9, "ytick.labelsize": 9}


def use_file_backend() -> None:
    """Draw on matplotlib's Agg backend: figures are files, never windows (entry points
    call this; a library import never switches a user's backend)."""
    matplotlib.use("Agg")


def save_figure(fig: plt.Figure, stem: str | Path, dpi: int = 300) -> list[Path]:
    """Write ``<stem>.png`` (``dpi``) and ``<stem>.pdf``; close the figure."""
    stem = Path(stem)
    stem.parent.mkdir(parents=True, exist_ok=True)
    paths = [stem.with_suffix(".png"), stem.with_suffix(".pdf")]
    fig.savefig(paths[0], dpi=dpi)
    fig.savefig(paths[1])
    plt.close(fig)
    return paths
