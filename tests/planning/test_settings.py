"""Planning settings: the new stage, sequencing and normalisation keys are checked."""

from __future__ import annotations

import pytest

from vmatdose.errors import InputError
from vmatdose.planning.settings import PlanSettings


@pytest.mark.parametrize(("key", "value", "message"), [
    ("normalisation", "max", "planning.normalisation must be one of"),
    ("criteria_margin", 0.6, "planning.criteria_margin"),
    ("leaf_width_mm", 2.0, "whole multiple of planning.leaf_width_mm=2"),
    ("max_segments_per_beam", 0, "planning.max_segments_per_beam must be > 0"),
    ("smoothing_weight", -1.0, "planning.smoothing_weight must be >= 0"),
])
def test_bad_values_name_the_key(key, value, message):
    with pytest.raises(InputError, match=message):
        PlanSettings.from_config({key: value})


def test_leaf_width_divides_the_bixel_width():
    settings = PlanSettings.from_config({"bixel_width_mm": 10.0, "leaf_width_mm": 5.0})
    assert settings.leaf_width_mm == 5.0 and settings.normalisation == "d95"
