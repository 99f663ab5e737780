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


def test_region_labels_come_from_the_region_constants():
    from vmatdose.metrics import registry

    assert f"+ {registry.PTV_MARGIN_MM:g} mm" in label("gamma_3pct_3mm_ptv_region_pass")
    assert f"above {100 * registry.HIGH_DOSE_FRACTION:g} %" in label(
        "gamma_3pct_3mm_high_dose_pass")
    assert f"at {100 * registry.LOW_DOSE_FRACTION:g}-" in label("gamma_3pct_3mm_low_dose_pass")


def test_validation_mae_is_labelled_in_body():
    assert heading("val/mae_gy") == "validation MAE in body (Gy)"
    assert label("mae_gy_best") == "best MAE in body"


def test_one_filter_of_overrides_that_are_no_experimental_choice():
    from vmatdose.metrics.registry import is_experimental, study_metrics

    for key in ("paths.log_dir=x", "+hydra.job.name=a", "hydra/launcher=slurm", "logger=csv",
                "tags=[a]", "ckpt_path=a.ckpt", "trainer.default_root_dir"):
        assert not is_experimental(key), key
    for key in ("experiment=baseline", "model.optimizer.lr=1e-3", "~callbacks.early_stopping",
                "seed=1", "data.patch_size"):
        assert is_experimental(key), key
    assert "d95_PTV60_abs_error_gy" in study_metrics("PTV60")
    assert not any(m.startswith("d95_") for m in study_metrics(None))
