"""The grid rule of a data set: OpenKBP's 128 voxels across the CT's field of view, found
from the case files' source, recorded in the checkpoint, applied to a DICOM CT."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest

from vmatdose.data.body_region import EXTERNAL, POSSIBLE_DOSE_MASK
from vmatdose.data.case import save_case
from vmatdose.data.grid_rule import (
    OPENKBP,
    GridRule,
    grid_rule_of,
    training_grid_rule,
)
from vmatdose.data.ingest.dicom_ct import CanonicalGrid
from vmatdose.data.ingest.training_grid import (
    GridSettings,
    canonical_geometry,
    full_target_grid,
    source_ct_grid,
)
from vmatdose.inference.checkpoint import CheckpointContract

from conftest import make_box_case


def test_openkbp_rule_is_the_field_of_view_over_128_and_the_cts_slices():
    # a 512 x 512 CT at 0.9766 mm (500 mm across), 2.5 mm slices: OpenKBP's 3.906 mm
    assert OPENKBP.spacing_for((90, 512, 512), (2.5, 0.9765625, 0.9765625)) == \
        pytest.approx((2.5, 3.90625, 3.90625))
    # rows and columns of another count and pixel: each axis its own field of view
    assert OPENKBP.spacing_for((40, 400, 512), (3.0, 1.2, 1.37)) == \
        pytest.approx((3.0, 3.75, 512 * 1.37 / 128))
    assert GridRule().spacing_for((40, 400, 512), (3.0, 1.2, 1.37)) is None


def test_the_rule_round_trips_and_comes_from_the_source():
    assert GridRule.from_dict(OPENKBP.to_dict()) == OPENKBP
    assert GridRule.from_dict({}) == GridRule() and GridRule.from_dict(None) == GridRule()
    assert grid_rule_of({"source": "openkbp"}) == OPENKBP
    assert grid_rule_of({"source": "dicom"}) == GridRule()
    assert grid_rule_of({}) == GridRule()


def test_training_cases_share_a_rule_or_have_none(tmp_path):
    def case_file(name: str, source: str):
        case = make_box_case(case_id=name)
        return save_case(replace(case, meta={**case.meta, "source": source}),
                         tmp_path / f"{name}.npz")

    a, b = case_file("a", "openkbp"), case_file("b", "openkbp")
    c = case_file("c", "dicom")
    assert training_grid_rule([a, b]) == OPENKBP
    assert training_grid_rule([a, b, c]) == GridRule()  # mixed: only one spacing is common
    assert training_grid_rule([c]) == GridRule()


def test_the_recorded_source_ct_gives_the_rules_spacing():
    ct = CanonicalGrid((60, 512, 512), (2.0, 1.17, 1.17), (0.0, -300.0, -300.0))
    recorded = source_ct_grid(canonical_geometry(ct))  # meta["source_grids"]["ct"] and back
    assert recorded == ct
    assert OPENKBP.spacing_for(recorded.shape, recorded.spacing_mm) == \
        pytest.approx((2.0, 4.68, 4.68))


def test_ingest_by_the_rule_puts_128_voxels_across_the_field_of_view():
    ct = CanonicalGrid((60, 512, 400), (2.0, 1.37, 1.2), (0.0, -350.0, -240.0))
    settings = GridSettings(spacing_mm=(2.5, 3.9, 3.9), field_of_view_voxels=128)
    assert settings.resamples and not settings.crops  # the whole field of view, as OpenKBP
    assert GridSettings(spacing_mm=(2.5, 3.9, 3.9)).crops
    target = full_target_grid(ct, settings.spacing_for(ct))
    assert target.shape == (60, 128, 128)  # the CT's slices kept, 128 across
    np.testing.assert_allclose(target.spacing_mm, (2.0, 512 * 1.37 / 128, 400 * 1.2 / 128))
    # the same outer corner as the CT: a voxel covers 4 x 4 of its pixels when it is 512
    np.testing.assert_allclose(np.asarray(target.origin_mm)[1] - target.spacing_mm[1] / 2,
                               -350.0 - 1.37 / 2)
    assert GridSettings(spacing_mm=(2.5, 3.9, 3.9)).spacing_for(ct) == (2.5, 3.9, 3.9)


def test_a_checkpoint_without_a_recorded_rule_takes_it_from_its_body():
    base = dict(config={}, protocol={}, structures=[], inputs={}, spacing={}, cases_dir="",
                split={}, version=1)
    assert CheckpointContract(**base, body=[POSSIBLE_DOSE_MASK]).grid_rule_obj == OPENKBP
    assert CheckpointContract(**base, body=[EXTERNAL]).grid_rule_obj == GridRule()
    recorded = CheckpointContract(**base, body=[POSSIBLE_DOSE_MASK], grid_rule={})
    assert recorded.grid_rule_obj == GridRule()
    stored = CheckpointContract.from_dict({**base, "body": [EXTERNAL],
                                           "grid_rule": OPENKBP.to_dict()})
    assert stored.grid_rule_obj == OPENKBP
