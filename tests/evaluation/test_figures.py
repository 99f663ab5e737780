"""Slice and DVH figures: patient millimetres, orientation, isodose levels, gamma rate."""

from __future__ import annotations

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd

from vmatdose.evaluation import figures

from conftest import make_box_case


def _case():
    case = make_box_case()
    case.origin_mm = np.array([10.0, 20.0, 30.0])
    return case


def test_extent_and_slice_position_are_patient_millimetres():
    case = _case()  # shape (16, 20, 24), spacing (2, 2.5, 3)
    left, right, bottom, top = figures._extent(case, "axial")
    assert (left, right) == (30 - 1.5, 30 + 3 * 23 + 1.5)
    assert (top, bottom) == (20 - 1.25, 20 + 2.5 * 19 + 1.25), "anterior (small y) on top"
    _, _, bottom, top = figures._extent(case, "coronal")
    assert (bottom, top) == (10 - 1, 10 + 2 * 15 + 1), "superior (large z) on top"
    assert figures.slice_position_mm(case, "axial", (8, 0, 0)) == ("z", 26.0)
    assert figures.slice_position_mm(case, "sagittal", (0, 0, 5)) == ("x", 45.0)


def test_coronal_view_puts_superior_slices_at_the_top():
    volume = np.zeros((4, 2, 3))
    volume[-1] = 1.0  # the most superior slice
    assert figures._view(volume, "coronal", (0, 0, 0))[0].tolist() == [1, 1, 1]
    assert figures._view(volume, "sagittal", (0, 0, 0))[-1].tolist() == [0, 0]


def test_isodose_levels_are_percent_of_the_highest_prescription():
    levels = figures.isodose_levels(_case())
    assert [(p, round(gy, 2)) for p, gy, _ in levels] == [
        (95.0, 66.5), (80.0, 56.0), (50.0, 35.0), (20.0, 14.0)]
    assert len({c for _, _, c in levels}) == 4


def test_targets_and_organs_get_distinct_colour_families():
    colours = figures.structure_colours(["PTV70", "Rectum", "PTV56", "Bladder"],
                                        ["PTV70", "PTV56"])
    assert len(set(colours.values())) == 4
    assert {colours["PTV70"], colours["PTV56"]} <= set(figures.TARGET_COLOURS)
    assert {colours["Rectum"], colours["Bladder"]} <= set(figures.OAR_COLOURS)


def test_slice_figure_titles_gamma_with_its_pass_rate_and_labels_positions():
    case = _case()
    gamma = np.full(case.shape, np.nan)
    gamma[case.body > 0] = 0.5
    body = np.argwhere(case.body > 0)
    n_fail = len(body) // 4
    gamma[tuple(body[:n_fail].T)] = 1.5
    rate = 100.0 * (len(body) - n_fail) / len(body)
    fig = figures.dose_slices_figure(case, case.dose * 0.9, ["PTV70", "PTV56"], gamma,
                                     gamma_label="gamma 3%/3mm")
    titles = [ax.get_title() for ax in fig.axes]
    assert f"gamma 3%/3mm: {rate:.1f} % pass" in titles
    ylabels = [ax.get_ylabel() for ax in fig.axes if ax.get_ylabel().startswith("axial")]
    assert ylabels == ["axial, z = 26.0 mm\ny (mm)"]  # PTV70 centre at z index 8
    legend_texts = {t.get_text() for legend in fig.legends for t in legend.get_texts()}
    assert {"95 % (66.5 Gy)", "20 % (14.0 Gy)", "PTV70", "Rectum"} <= legend_texts
    plt.close(fig)


def test_dvh_legend_sits_outside_the_curves_with_prescription_markers():
    case = _case()
    fig = figures.dvh_figure(case, case.dose * 0.95)
    ax = fig.axes[0]
    fig.canvas.draw()
    legend_box = ax.get_legend().get_window_extent()
    assert legend_box.x0 >= ax.get_window_extent().x1
    markers = sorted(line.get_xdata()[0] for line in ax.lines if line.get_linestyle() == ":")
    assert markers == [56.0, 70.0]
    plt.close(fig)


def test_box_plot_title_counts_cases_in_the_singular():
    table = pd.DataFrame({"dmean_PTV70_error_gy": [1.0]})
    fig = figures.error_boxplot_figure(table, ["PTV70"], ["PTV70"])
    assert fig.axes[0].get_title() == "per-structure error over 1 case"
    plt.close(fig)
