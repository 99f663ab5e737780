"""PTV-region and dose-level gamma regions: the masks, in mm and % of the prescription."""

import numpy as np
import pytest

from vmatdose.data.geometry import dilate_mm
from vmatdose.evaluation.regions import gamma_regions, region_pass_rates, scoring_regions

from conftest import make_box_case


def test_ptv_region_is_the_target_union_grown_by_5_mm_inside_the_body():
    case = make_box_case()
    regions = scoring_regions(case, ["PTV70", "PTV56"])
    union = (case.mask("PTV70") | case.mask("PTV56")) > 0
    # spacing (2, 2.5, 3) mm: 5 mm reaches 2 voxels along z and y, 1 along x
    z, y, x = np.nonzero(regions["ptv_region"])
    uz, uy, ux = np.nonzero(union)
    assert (z.min(), z.max()) == (uz.min() - 2, uz.max() + 2)
    assert (y.min(), y.max()) == (uy.min() - 2, uy.max() + 2)
    assert (x.min(), x.max()) == (ux.min() - 1, ux.max() + 1)
    np.testing.assert_array_equal(regions["ptv_region"],
                                  dilate_mm(union, 5.0, case.spacing_mm) & (case.body > 0))
    assert set(gamma_regions(case, ["PTV70", "PTV56"])) < set(regions)  # partition kept


def test_dose_regions_cut_at_50_and_10_percent_of_the_highest_prescription():
    case = make_box_case()  # 70 / 56 Gy in the targets, 10 Gy elsewhere in the body
    case.dose[case.mask("Rectum") > 0] = 5.0  # below 10 % of 70 Gy
    regions = scoring_regions(case, ["PTV70", "PTV56"])
    targets = (case.mask("PTV70") | case.mask("PTV56")) > 0
    np.testing.assert_array_equal(regions["high_dose"], targets & (case.body > 0))
    low = (case.body > 0) & ~targets & (case.mask("Rectum") == 0)
    np.testing.assert_array_equal(regions["low_dose"], low)
    gamma = np.where(regions["high_dose"], 0.5, 2.0)  # pass in the targets only
    rates = region_pass_rates(gamma, regions)
    assert rates["high_dose"] == 100.0 and rates["low_dose"] == 0.0
    assert 0 < rates["ptv_region"] < 100.0


def test_a_case_without_dose_has_no_dose_regions():
    case = make_box_case(with_dose=False)
    regions = scoring_regions(case, ["PTV70", "PTV56"])
    assert "high_dose" not in regions and regions["ptv_region"].any()
    with pytest.raises(KeyError):
        regions["low_dose"]
