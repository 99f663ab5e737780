"""Figures a physicist reads: dose slices with isodose lines, DVH overlays, gamma maps,
per-structure error box plots. Colour-blind-safe: viridis for dose, a purple-orange
diverging map for differences, the Okabe-Ito palette for curves.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # headless: figures are files, never windows
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402

from vmatdose.data.case import Case  # noqa: E402
from vmatdose.metrics.dvh import cumulative_dvh  # noqa: E402

OKABE_ITO = ["#0072B2", "#E69F00", "#009E73", "#CC79A7", "#56B4E9", "#D55E00", "#F0E442",
             "#000000"]
DOSE_CMAP = "viridis"
DIFF_CMAP = "PuOr_r"
GAMMA_CMAP = "cividis"
VIEWS = ("axial", "coronal", "sagittal")


def slice_centre(case: Case, targets: Sequence[str]) -> tuple[int, int, int]:
    """Voxel (z, y, x) at the centroid of the highest-prescription target (else dose max)."""
    ranked = sorted((t for t in targets if case.has_structure(t) and case.mask(t).any()),
                    key=lambda t: -case.prescriptions_gy.get(t, 0.0))
    if ranked:
        return tuple(int(round(v)) for v in np.argwhere(case.mask(ranked[0])).mean(0))
    dose = case.dose if case.dose is not None else case.ct
    return tuple(int(v) for v in np.unravel_index(np.argmax(dose), dose.shape))


def _view(volume: np.ndarray, view: str, centre: Sequence[int]) -> np.ndarray:
    """A 2-D slice of a (Z, Y, X) volume through ``centre``: axial (rows anterior ->
    posterior), coronal and sagittal (rows superior -> inferior)."""
    z, y, x = centre
    if view == "axial":
        return volume[z]  # rows y (anterior up), columns x
    if view == "coronal":
        return volume[::-1, y]  # rows z (superior up), columns x
    return volume[::-1, :, x]  # sagittal: rows z, columns y


def _extent(case: Case, view: str) -> list[float]:
    dz, dy, dx = case.spacing_mm
    nz, ny, nx = case.shape
    width = {"axial": nx * dx, "coronal": nx * dx, "sagittal": ny * dy}[view]
    height = {"axial": ny * dy, "coronal": nz * dz, "sagittal": nz * dz}[view]
    return [0.0, width, height, 0.0]


def dose_slices_figure(case: Case, pred_gy: np.ndarray, targets: Sequence[str],
                       gamma: np.ndarray | None = None) -> plt.Figure:
    """Axial, coronal and sagittal slices through the main target: reference and
    predicted dose with isodose lines, their difference, and the gamma map if given."""
    centre = slice_centre(case, targets)
    top = max(case.prescriptions_gy.values(), default=float(case.dose.max()))
    levels = sorted({0.2 * top, 0.5 * top, *(0.95 * g for g in case.prescriptions_gy.values())})
    columns = [("reference", case.dose), ("prediction", pred_gy),
               ("prediction - reference", pred_gy - case.dose)]
    if gamma is not None:
        columns.append(("gamma", gamma))
    fig, axes = plt.subplots(3, len(columns), figsize=(3.4 * len(columns), 8.4),
                             constrained_layout=True, squeeze=False)
    diff_limit = max(float(np.abs(columns[2][1]).max()), 1e-3)
    for row, view in enumerate(VIEWS):
        extent = _extent(case, view)
        for col, (title, volume) in enumerate(columns):
            ax = axes[row, col]
            ax.imshow(_view(case.ct, view, centre), cmap="gray", vmin=-400, vmax=600,
                      extent=extent)
            image = _draw_panel(ax, title, _view(volume, view, centre), extent, top,
                                diff_limit, levels)
            ax.set_xticks([]), ax.set_yticks([])
            if row == 0:
                ax.set_title(title, fontsize=10)
                fig.colorbar(image, ax=axes[:, col], shrink=0.6,
                             label={"gamma": "gamma"}.get(title, "Gy"))
        axes[row, 0].set_ylabel(view)
    fig.suptitle(f"{case.case_id}: isodose lines at {', '.join(f'{v:.0f}' for v in levels)} Gy",
                 fontsize=10)
    return fig


def _draw_panel(ax, title: str, image: np.ndarray, extent, top: float, diff_limit: float,
                levels: Sequence[float]):
    if title == "gamma":
        return ax.imshow(np.ma.masked_invalid(image), cmap=GAMMA_CMAP, vmin=0, vmax=2,
                         extent=extent)
    if title.startswith("prediction -"):
        return ax.imshow(image, cmap=DIFF_CMAP, vmin=-diff_limit, vmax=diff_limit,
                         extent=extent, alpha=0.9)
    shown = ax.imshow(np.ma.masked_less(image, 0.05 * top), cmap=DOSE_CMAP, vmin=0,
                      vmax=1.1 * top, extent=extent, alpha=0.75)
    if image.max() > min(levels):
        ax.contour(image, levels=levels, colors="white", linewidths=0.7, extent=extent,
                   origin="upper")
    return shown


def dvh_figure(case: Case, pred_gy: np.ndarray, structures: Sequence[str] | None = None
               ) -> plt.Figure:
    """Cumulative DVHs: reference solid, prediction dashed, one colour per structure."""
    names = [s for s in (structures or case.structures)
             if case.has_structure(s) and case.mask(s).any()]
    masks = np.stack([case.mask(s) for s in names]) if names else np.zeros((0, *case.shape))
    top = float(max(case.dose.max(), pred_gy.max()))
    bins = np.linspace(0.0, top * 1.02 + 1e-6, 256)
    fig, ax = plt.subplots(figsize=(7, 4.5), constrained_layout=True)
    if names:
        _, ref = cumulative_dvh(case.dose, masks, bins=bins, unit="percent")
        _, pred = cumulative_dvh(pred_gy.astype(np.float64), masks, bins=bins, unit="percent")
        for i, name in enumerate(names):
            colour = OKABE_ITO[i % len(OKABE_ITO)]
            ax.plot(bins, ref[i], color=colour, lw=1.6, label=name)
            ax.plot(bins, pred[i], color=colour, lw=1.6, ls="--")
    ax.plot([], [], color="grey", ls="-", label="reference")
    ax.plot([], [], color="grey", ls="--", label="prediction")
    ax.set(xlabel="dose (Gy)", ylabel="volume (%)", ylim=(0, 102), xlim=(0, bins[-1]),
           title=f"{case.case_id}: DVH")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, ncol=2, loc="lower left")
    return fig


def error_boxplot_figure(table: pd.DataFrame, structures: Sequence[str]) -> plt.Figure:
    """Per-structure box plots over cases of the mean-dose error (pred - ref, Gy)."""
    columns = [(s, f"dmean_{s}_error_gy") for s in structures
               if f"dmean_{s}_error_gy" in table]
    fig, ax = plt.subplots(figsize=(max(5.0, 0.9 * len(columns) + 2), 4.5),
                           constrained_layout=True)
    data = [table[c].dropna().to_numpy() for _, c in columns]
    if columns:
        box = ax.boxplot(data, patch_artist=True, tick_labels=[s for s, _ in columns])
        for patch, colour in zip(box["boxes"], OKABE_ITO * 4):
            patch.set_facecolor(colour)
            patch.set_alpha(0.6)
    ax.axhline(0.0, color="black", lw=0.8)
    ax.set(ylabel="Dmean error, prediction - reference (Gy)",
           title=f"per-structure error over {len(table)} cases")
    ax.tick_params(axis="x", rotation=30)
    ax.grid(axis="y", alpha=0.3)
    return fig


def save_figure(fig: plt.Figure, stem: str | Path, dpi: int = 300) -> list[Path]:
    """Write ``<stem>.png`` (``dpi``) and ``<stem>.pdf``; close the figure."""
    stem = Path(stem)
    stem.parent.mkdir(parents=True, exist_ok=True)
    paths = [stem.with_suffix(".png"), stem.with_suffix(".pdf")]
    fig.savefig(paths[0], dpi=dpi)
    fig.savefig(paths[1])
    plt.close(fig)
    return paths
