"""Figures a physicist reads at a glance: dose slices with isodose lines and structure
contours, DVH overlays, gamma pass/fail maps, per-structure error box plots.

Slices are drawn in patient millimetres (``origin_mm`` + index x ``spacing_mm``) in the
radiological convention of the case files' LPS orientation (:mod:`vmatdose.data.case`):
axial and coronal views have the patient's right on the image left, axial rows run
anterior -> posterior, coronal and sagittal rows superior -> inferior, and each panel's
edges carry the orientation letters. Isodose lines are at fixed percentages of the
highest prescription. Colours: viridis for dose, a purple-orange diverging map for
differences, blue/vermillion (colour-blind safe) for gamma pass/fail; targets in warm
hues with thick lines, organs at risk in cool hues (tab10/tab20).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pandas as pd
from matplotlib.colors import ListedColormap
from matplotlib.lines import Line2D

from vmatdose.data.case import Case
from vmatdose.evaluation.uncertainty import (
    interval_coverage,
    outside_interval,
    spread_error_correlation,
)
from vmatdose.metrics.dvh import cumulative_dvh
from vmatdose.metrics.gamma import pass_rate_from_gamma
from vmatdose.metrics.registry import INTERVAL_Z
from vmatdose.plot_style import FONT, OKABE_ITO, plt

DOSE_CMAP = "viridis"
DIFF_CMAP = "PuOr_r"
#: Gamma pass (<= 1) and fail (> 1) colours: Okabe-Ito sky blue and vermillion.
GAMMA_COLOURS = (OKABE_ITO[4], OKABE_ITO[5])
#: Isodose levels (% of the highest prescription) and their line colours.
ISODOSE_PERCENT = (95.0, 80.0, 50.0, 20.0)
ISODOSE_COLOURS = ("#FF2020", "#FF9A00", "#FFF200", "#00E5FF")
# Structure hues stay clear of the isodose red/orange/yellow/cyan.
TARGET_COLOURS = ("#E6007E", "#F781BF", "#A65628", "#BC80BD", "#7B2D26")
OAR_COLOURS = ("#1F77B4", "#2CA02C", "#9467BD", "#7F7F7F", "#BCBD22", "#393B79",
               "#637939", "#8C6D31", "#AEC7E8", "#98DF8A", "#C5B0D5", "#C7C7C7")
VIEWS = ("axial", "coronal", "sagittal")
# (row axis, column axis, fixed axis) as array axes (0 z, 1 y, 2 x) and edge letters
# (left, right, top, bottom) of each view.
_VIEW_AXES = {"axial": (1, 2, 0), "coronal": (0, 2, 1), "sagittal": (0, 1, 2)}
_VIEW_LETTERS = {"axial": ("R", "L", "A", "P"), "coronal": ("R", "L", "S", "I"),
                 "sagittal": ("A", "P", "S", "I")}
_AXIS_NAMES = ("z", "y", "x")


def structure_colours(names: Sequence[str], targets: Sequence[str]) -> dict[str, str]:
    """One colour per structure: targets from a warm list, the others from a cool one, so
    a PTV never shares a hue family with an organ at risk."""
    colours, n_target, n_oar = {}, 0, 0
    for name in names:
        if name in targets:
            colours[name] = TARGET_COLOURS[n_target % len(TARGET_COLOURS)]
            n_target += 1
        else:
            colours[name] = OAR_COLOURS[n_oar % len(OAR_COLOURS)]
            n_oar += 1
    return colours


def slice_centre(case: Case, targets: Sequence[str]) -> tuple[int, int, int]:
    """Voxel (z, y, x) at the centroid of the highest-prescription target (else dose max)."""
    ranked = sorted((t for t in targets if case.has_structure(t) and case.mask(t).any()),
                    key=lambda t: -case.prescriptions_gy.get(t, 0.0))
    if ranked:
        return tuple(int(round(v)) for v in np.argwhere(case.mask(ranked[0])).mean(0))
    dose = case.dose if case.dose is not None else case.ct
    return tuple(int(v) for v in np.unravel_index(np.argmax(dose), dose.shape))


def _view(volume: np.ndarray, view: str, centre: Sequence[int]) -> np.ndarray:
    """The 2-D slice of a (Z, Y, X) volume through ``centre`` as displayed: axial rows
    y (anterior at the top), coronal and sagittal rows z flipped (superior at the top)."""
    z, y, x = centre
    if view == "axial":
        return volume[z]
    if view == "coronal":
        return volume[::-1, y]
    return volume[::-1, :, x]


def _coordinates_mm(case: Case, axis: int) -> np.ndarray:
    """Patient coordinate (mm) of every voxel centre along array ``axis``."""
    return case.origin_mm[axis] + case.spacing_mm[axis] * np.arange(case.shape[axis])


def _extent(case: Case, view: str) -> list[float]:
    """imshow extent (left, right, bottom, top) in mm matching :func:`_view`'s layout."""
    rows, cols, _ = _VIEW_AXES[view]
    c, r = _coordinates_mm(case, cols), _coordinates_mm(case, rows)
    half_c, half_r = case.spacing_mm[cols] / 2, case.spacing_mm[rows] / 2
    left, right = c[0] - half_c, c[-1] + half_c
    if view == "axial":  # row 0 (smallest y, anterior) at the top: y grows downwards
        return [left, right, r[-1] + half_r, r[0] - half_r]
    return [left, right, r[0] - half_r, r[-1] + half_r]  # flipped z: superior at the top


def _aspect(case: Case, view: str) -> float:
    """Height / width of a view in mm."""
    left, right, bottom, top = _extent(case, view)
    return abs(top - bottom) / abs(right - left)


def slice_position_mm(case: Case, view: str, centre: Sequence[int]) -> tuple[str, float]:
    """The fixed axis of a view and its position in mm, e.g. ``("z", 12.0)`` for axial."""
    axis = _VIEW_AXES[view][2]
    return _AXIS_NAMES[axis], float(_coordinates_mm(case, axis)[centre[axis]])


def isodose_levels(case: Case) -> list[tuple[float, float, str]]:
    """(percent, Gy, colour) of each isodose line, from the highest prescription (the
    reference maximum when the case has no prescription)."""
    top = max(case.prescriptions_gy.values(), default=float(np.max(case.dose)))
    return [(p, p / 100.0 * top, c) for p, c in zip(ISODOSE_PERCENT, ISODOSE_COLOURS)]


def _label_edges(ax: plt.Axes, view: str) -> None:
    left, right, top, bottom = _VIEW_LETTERS[view]
    style = dict(transform=ax.transAxes, color="white", fontsize=11, fontweight="bold")
    ax.text(0.02, 0.5, left, ha="left", va="center", **style)
    ax.text(0.98, 0.5, right, ha="right", va="center", **style)
    ax.text(0.5, 0.97, top, ha="center", va="top", **style)
    ax.text(0.5, 0.03, bottom, ha="center", va="bottom", **style)


def _contours(ax: plt.Axes, case: Case, view: str, centre: Sequence[int], extent,
              colours: dict[str, str], lw: float, ls: str = "-") -> None:
    for name, colour in colours.items():
        mask = _view(case.mask(name), view, centre)
        if mask.any() and mask.min() == 0:
            ax.contour(mask, levels=[0.5], colors=[colour], linewidths=lw, linestyles=ls,
                       extent=extent, origin="upper")


def dose_slices_figure(case: Case, pred_gy: np.ndarray, targets: Sequence[str],
                       gamma: np.ndarray | None = None, gamma_label: str = "gamma"
                       ) -> plt.Figure:
    """Axial, coronal and sagittal slices through the main target (rows, each titled with
    its position in mm): CT with structure contours, reference and predicted dose with
    isodose lines and contours, their difference, and the gamma pass/fail map if given
    (``gamma`` (Z, Y, X), NaN where not scored; ``gamma_label`` e.g. ``"gamma 3%/3mm"``).
    """
    with plt.rc_context(FONT):
        return _dose_slices(case, pred_gy, targets, gamma, gamma_label)


def _dose_slices(case, pred_gy, targets, gamma, gamma_label) -> plt.Figure:
    centre = slice_centre(case, targets)
    present = [s for s in case.structures if case.has_structure(s) and case.mask(s).any()]
    colours = structure_colours(present, [t for t in targets if t in present]
                                or list(case.prescriptions_gy))
    levels = isodose_levels(case)
    top = levels[0][1] / 0.95
    diff = pred_gy - case.dose
    diff_limit = max(float(np.abs(diff).max()), 1e-3)
    columns = ["CT and structures", "reference dose", "predicted dose",
               "prediction - reference"]
    if gamma is not None:
        columns.append(f"{gamma_label}: {pass_rate_from_gamma(gamma):.1f} % pass")
    ratios = [_aspect(case, view) for view in VIEWS]
    panel_in = 3.1
    fig, axes = plt.subplots(3, len(columns), squeeze=False, constrained_layout=True,
                             figsize=(panel_in * len(columns) + 2.0,
                                      panel_in * sum(ratios) + 3.2),
                             gridspec_kw={"height_ratios": ratios})
    images = {}
    for row, view in enumerate(VIEWS):
        extent = _extent(case, view)
        ct = _view(case.ct, view, centre)
        for col, title in enumerate(columns):
            ax = axes[row, col]
            ax.imshow(ct, cmap="gray", vmin=-400, vmax=600, extent=extent)
            if col == 0:
                _contours(ax, case, view, centre, extent, colours, lw=1.4)
            elif col in (1, 2):
                dose = _view(case.dose if col == 1 else pred_gy, view, centre)
                images["dose"] = ax.imshow(np.ma.masked_less(dose, 0.05 * top),
                                           cmap=DOSE_CMAP, vmin=0, vmax=1.1 * top,
                                           extent=extent, alpha=0.55)
                _contours(ax, case, view, centre, extent, colours, lw=0.7, ls=":")
                for _, gy, colour in levels:
                    if dose.max() > gy:
                        ax.contour(dose, levels=[gy], colors=[colour], linewidths=1.3,
                                   extent=extent, origin="upper")
            elif col == 3:
                images["diff"] = ax.imshow(_view(diff, view, centre), cmap=DIFF_CMAP,
                                           vmin=-diff_limit, vmax=diff_limit, extent=extent,
                                           alpha=0.9)
            else:
                failed = (_view(gamma, view, centre) > 1.0).astype(float)
                failed[np.isnan(_view(gamma, view, centre))] = np.nan
                images["gamma"] = ax.imshow(np.ma.masked_invalid(failed),
                                            cmap=ListedColormap(GAMMA_COLOURS), vmin=0,
                                            vmax=1, extent=extent, interpolation="nearest")
            _label_edges(ax, view)
            if row == 0:
                ax.set_title(title)
        axis, position = slice_position_mm(case, view, centre)
        rows_axis, cols_axis, _ = _VIEW_AXES[view]
        axes[row, 0].set_ylabel(f"{view}, {axis} = {position:.1f} mm\n"
                                f"{_AXIS_NAMES[rows_axis]} (mm)")
        for ax in axes[row]:
            ax.set_xlabel(f"{_AXIS_NAMES[cols_axis]} (mm)")
    _colour_bars(fig, axes, images)
    _slice_legends(fig, colours, levels, targets)
    fig.suptitle(f"{case.case_id}: slices through the centre of the highest-dose target",
                 fontsize=13)
    return fig


def _colour_bars(fig: plt.Figure, axes: np.ndarray, images: dict) -> None:
    if "dose" in images:
        fig.colorbar(images["dose"], ax=axes[:, 2], shrink=0.5, label="dose (Gy)")
    if "diff" in images:
        fig.colorbar(images["diff"], ax=axes[:, 3], shrink=0.5, label="difference (Gy)")
    if "gamma" in images:
        bar = fig.colorbar(images["gamma"], ax=axes[:, 4], shrink=0.3, ticks=[0.25, 0.75])
        bar.ax.set_yticklabels(["pass\n(γ ≤ 1)", "fail\n(γ > 1)"])


def _slice_legends(fig: plt.Figure, colours: dict[str, str], levels, targets) -> None:
    isodose = [Line2D([], [], color=c, lw=2, label=f"{p:g} % ({gy:.1f} Gy)")
               for p, gy, c in levels]
    structures = [Line2D([], [], color=c, lw=2 if n in targets else 1.4, label=n)
                  for n, c in colours.items()]
    fig.legend(handles=isodose, title="isodose (% of highest prescription)",
               loc="outside lower left", ncol=len(isodose), frameon=False)
    if structures:
        fig.legend(handles=structures, title="structures (dotted on dose)",
                   loc="outside lower right", ncol=min(len(structures), 6), frameon=False)


def dvh_figure(case: Case, pred_gy: np.ndarray, structures: Sequence[str] | None = None,
               targets: Sequence[str] | None = None) -> plt.Figure:
    """Cumulative DVHs: reference solid, prediction dashed; targets (default: the case's
    prescribed structures) in warm colours and thick lines, organs at risk in cool ones;
    a dotted vertical marker at each prescription; the legend outside the curves."""
    with plt.rc_context(FONT):
        return _dvh(case, pred_gy, structures, targets)


def _dvh(case, pred_gy, structures, targets) -> plt.Figure:
    targets = list(targets if targets is not None else case.prescriptions_gy)
    names = [s for s in (structures or case.structures)
             if case.has_structure(s) and case.mask(s).any()]
    names = [s for s in names if s in targets] + [s for s in names if s not in targets]
    colours = structure_colours(names, targets)
    top = float(max(case.dose.max(), pred_gy.max()))
    bins = np.linspace(0.0, top * 1.02 + 1e-6, 256)
    fig, ax = plt.subplots(figsize=(9, 5), constrained_layout=True)
    if names:
        masks = np.stack([case.mask(s) for s in names])
        _, ref = cumulative_dvh(case.dose, masks, bins=bins, unit="percent")
        _, pred = cumulative_dvh(pred_gy.astype(np.float64), masks, bins=bins, unit="percent")
        for i, name in enumerate(names):
            lw = 2.4 if name in targets else 1.5
            ax.plot(bins, ref[i], color=colours[name], lw=lw, label=name)
            ax.plot(bins, pred[i], color=colours[name], lw=lw, ls="--")
    for name, gy in sorted(case.prescriptions_gy.items(), key=lambda kv: -kv[1]):
        ax.axvline(gy, color=colours.get(name, "black"), ls=":", lw=1.2)
        ax.text(gy, 103, f"{name}\n{gy:g} Gy", ha="center", va="bottom", fontsize=9,
                color=colours.get(name, "black"))
    handles, labels = ax.get_legend_handles_labels()
    handles += [Line2D([], [], color="grey", ls="-"), Line2D([], [], color="grey", ls="--"),
                Line2D([], [], color="black", ls=":")]
    labels += ["reference", "prediction", "prescription"]
    ax.set(xlabel="dose (Gy)", ylabel="volume (%)", ylim=(0, 102), xlim=(0, bins[-1]))
    ax.set_title(f"{case.case_id}: DVH", pad=30)
    ax.grid(alpha=0.3)
    ax.legend(handles, labels, loc="center left", bbox_to_anchor=(1.01, 0.5), frameon=False)
    return fig


def error_boxplot_figure(table: pd.DataFrame, structures: Sequence[str],
                         targets: Sequence[str] = ()) -> plt.Figure:
    """Per-structure box plots over cases of the mean-dose error (pred - ref, Gy)."""
    with plt.rc_context(FONT):
        columns = [(s, f"dmean_{s}_error_gy") for s in structures
                   if f"dmean_{s}_error_gy" in table]
        fig, ax = plt.subplots(figsize=(max(6.0, 0.9 * len(columns) + 2), 4.8),
                               constrained_layout=True)
        data = [table[c].dropna().to_numpy() for _, c in columns]
        if columns:
            box = ax.boxplot(data, patch_artist=True, tick_labels=[s for s, _ in columns])
            colours = structure_colours([s for s, _ in columns], targets)
            for patch, (name, _) in zip(box["boxes"], columns):
                patch.set_facecolor(colours[name])
                patch.set_alpha(0.6)
        ax.axhline(0.0, color="black", lw=0.8)
        n = len(table)
        ax.set(ylabel="Dmean error, prediction - reference (Gy)",
               title=f"per-structure error over {n} case{'' if n == 1 else 's'}")
        ax.tick_params(axis="x", rotation=30)
        ax.grid(axis="y", alpha=0.3)
    return fig



#: Colour map of spread and error magnitudes (Gy; perceptually uniform, dark = small).
SPREAD_CMAP = "magma"


def spread_error_figure(case: Case, pred_gy: np.ndarray, std_gy: np.ndarray,
                        targets: Sequence[str]) -> plt.Figure:
    """Is the spread where the error is? Axial, coronal and sagittal slices through the
    main target (rows): the ensemble's 95 % interval half-width (1.96 x std), the
    absolute error |prediction - reference| on the same colour scale (Gy), and the
    voxels whose reference lies outside the interval; structure contours on each.
    ``pred_gy``, ``std_gy``: (Z, Y, X) ensemble mean and std in Gy."""
    with plt.rc_context(FONT):
        return _spread_error(case, pred_gy, std_gy, targets)


def _spread_error(case, pred_gy, std_gy, targets) -> plt.Figure:
    centre = slice_centre(case, targets)
    present = [s for s in case.structures if case.has_structure(s) and case.mask(s).any()]
    colours = structure_colours(present, [t for t in targets if t in present]
                                or list(case.prescriptions_gy))
    body = case.body > 0
    half_width = INTERVAL_Z * std_gy
    error = np.abs(pred_gy - case.dose)
    outside = np.where(body, outside_interval(case.dose, pred_gy, std_gy).astype(float),
                       np.nan)
    limit = max(float(np.percentile(np.maximum(error, half_width)[body], 99.5))
                if body.any() else 0.0, 1e-3)
    correlation = spread_error_correlation(std_gy[body], error[body])
    coverage = interval_coverage(case.dose[body], pred_gy[body], std_gy[body])
    columns = ["95 % interval half-width (1.96 std)", "|prediction - reference|",
               f"reference outside the interval ({100 - coverage:.1f} % of body)"]
    ratios = [_aspect(case, view) for view in VIEWS]
    panel_in = 3.1
    fig, axes = plt.subplots(3, 3, squeeze=False, constrained_layout=True,
                             figsize=(panel_in * 3 + 1.5, panel_in * sum(ratios) + 2.6),
                             gridspec_kw={"height_ratios": ratios})
    images = {}
    for row, view in enumerate(VIEWS):
        extent = _extent(case, view)
        for col, volume in enumerate((half_width, error, outside)):
            ax = axes[row, col]
            ax.imshow(_view(case.ct, view, centre), cmap="gray", vmin=-400, vmax=600,
                      extent=extent)
            shown = np.ma.masked_invalid(np.where(body, volume, np.nan))
            if col < 2:
                images["gy"] = ax.imshow(_view(shown, view, centre), cmap=SPREAD_CMAP,
                                         vmin=0, vmax=limit, extent=extent, alpha=0.9)
            else:
                images["outside"] = ax.imshow(
                    _view(shown, view, centre), cmap=ListedColormap(GAMMA_COLOURS), vmin=0,
                    vmax=1, extent=extent, interpolation="nearest", alpha=0.9)
            _contours(ax, case, view, centre, extent, colours, lw=1.0)
            _label_edges(ax, view)
            if row == 0:
                ax.set_title(columns[col])
        axis, position = slice_position_mm(case, view, centre)
        rows_axis, cols_axis, _ = _VIEW_AXES[view]
        axes[row, 0].set_ylabel(f"{view}, {axis} = {position:.1f} mm\n"
                                f"{_AXIS_NAMES[rows_axis]} (mm)")
        for ax in axes[row]:
            ax.set_xlabel(f"{_AXIS_NAMES[cols_axis]} (mm)")
    fig.colorbar(images["gy"], ax=axes[:, :2], shrink=0.5, label="Gy (same scale)")
    bar = fig.colorbar(images["outside"], ax=axes[:, 2], shrink=0.3, ticks=[0.25, 0.75])
    bar.ax.set_yticklabels(["inside", "outside"])
    fig.legend(handles=[Line2D([], [], color=c, lw=2 if n in targets else 1.2, label=n)
                        for n, c in colours.items()], title="structures",
               loc="outside lower center", ncol=min(len(colours), 6), frameon=False)
    fig.suptitle(f"{case.case_id}: ensemble spread against error (body: correlation "
                 f"{correlation:.2f}, 95 % interval coverage {coverage:.1f} %)", fontsize=13)
    return fig
