"""The metric registry: readable labels, units and directions for the metric columns."""

import pytest

from vmatdose.metrics.registry import heading, higher_is_better, label, summary_line


@pytest.mark.parametrize("name, expected", [
    ("mae_body_gy", "MAE in body (Gy)"),
    ("gamma_3pct_3mm_ptv_region_pass", "gamma 3%/3 mm pass rate in targets + 5 mm (%)"),
    ("gamma_2pct_2mm_high_dose_pass", "gamma 2%/2 mm pass rate above 50 % of Rx (%)"),
    ("gamma_3pct_3mm_low_dose_pass", "gamma 3%/3 mm pass rate at 10-50 % of Rx (%)"),
    ("gamma_3pct_3mm_oar_Rectum_pass", "gamma 3%/3 mm pass rate near Rectum (%)"),
])
def test_every_region_gamma_has_a_readable_heading(name, expected):
    assert heading(name) == expected
    assert higher_is_better(name) == name.startswith("gamma")


def test_unknown_names_stay_as_they_are_and_the_summary_line_keeps_its_form():
    assert label("no_such_metric") == "no_such_metric"
    line = summary_line("demo", {"mae_body_gy": 1.034, "baseline_mae_body_gy": 8.0,
                                 "d95_PTV70_abs_error_gy": 3.126}, "PTV70", 112.6)
    assert line == ("demo: test MAE 1.03 Gy (mean-dose baseline 8.00 Gy), PTV70 D95 error "
                    "3.13 Gy, 113 s")
