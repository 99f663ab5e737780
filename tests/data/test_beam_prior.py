"""The beam model and the beam prior: entry side, attenuation, field width, mirror
symmetry, the protocol's default arrangement, the gantry sectors."""

from __future__ import annotations

import logging

import numpy as np
import pytest
import torch

from vmatdose.data.beam_model import BeamModelParams
from vmatdose.data.beam_prior import (
    beam_prior_channels,
    beam_prior_dose,
    gantry_sectors,
    traced_gantry_deg,
)
from vmatdose.data.beams import BeamArrangement
from vmatdose.data.input_spec import InputSpec
from vmatdose.data.prior import (
    PriorDosed,
    cap_organs,
    check_prior_config,
    floor_targets,
    scale_organs,
    stretch_targets,
)

SPACING = (2.0, 2.0, 2.0)
SHAPE = (12, 64, 64)
ORIGIN = (-11.0, -63.0, -63.0)  # grid centre at 0 mm
# no build-up or scatter: the depth dose is the pure exponential
BARE = BeamModelParams(attenuation_per_mm=0.006, buildup_mm=1e-3, scatter_sigma_mm=1e-3)


def water_cube(target_half_mm: float = 10.0):
    """(ct HU, body, target) of a water cube (y, x in [-48, 48] mm) with a cubic target
    of half width ``target_half_mm`` at the centre."""
    z, y, x = np.meshgrid(*[o + s * np.arange(n) for o, s, n in zip(ORIGIN, SPACING, SHAPE)],
                          indexing="ij")
    body = (np.abs(y) <= 48) & (np.abs(x) <= 48)
    target = (np.abs(y) <= target_half_mm) & (np.abs(x) <= target_half_mm) & (np.abs(z) <= 6)
    ct = np.where(body, 0.0, -1000.0).astype(np.float32)
    return ct, body, target


def single_beam(gantry_deg: float, params=BARE, target_half_mm: float = 10.0) -> np.ndarray:
    ct, body, target = water_cube(target_half_mm)
    arrangement = BeamArrangement((gantry_deg,), (0.0,), (0.0, 0.0, 0.0))
    return beam_prior_dose(ct, body, target[None], [1.0], SPACING, ORIGIN, arrangement, params)


def test_gantry_0_enters_from_anterior_and_falls_off_at_the_configured_attenuation():
    prior = single_beam(0.0)
    axis = prior[6, :, 32]  # central column: y from anterior (index 0) to posterior
    entry, deep = 32 - 15, 32 + 15  # 60 mm apart along the beam, both inside the water
    assert axis[entry] > axis[deep] > 0
    expected = np.exp(-BARE.attenuation_per_mm * 60.0)
    assert axis[deep] / axis[entry] == pytest.approx(expected, rel=0.02)
    assert prior[6, 5, 32] == 0.0  # outside the body


def test_gantry_90_enters_from_the_patients_left_the_high_x_side():
    prior = single_beam(90.0)
    row = prior[6, 32, :]
    assert row[32 + 15] > row[32 - 15] > 0  # x grows towards the patient's left (LPS)
    assert row[32 - 15] / row[32 + 15] == pytest.approx(np.exp(-BARE.attenuation_per_mm * 60),
                                                         rel=0.02)


def test_the_field_is_as_wide_as_the_target_projection_plus_the_margin():
    prior = single_beam(0.0, target_half_mm=10.0)
    profile = prior[6, 32, :]  # across the beam at the isocentre's depth
    x = ORIGIN[2] + SPACING[2] * np.arange(SHAPE[2])
    inside = x[profile >= 0.5 * profile[32]]
    width = inside.max() - inside.min() + SPACING[2]
    # target 20 mm wide (10 voxels) + 2 x 6 mm margin, to a voxel
    assert width == pytest.approx(20.0 + 2 * BARE.aperture_margin_mm, abs=SPACING[2])


def test_the_target_gets_its_prescription_and_nothing_lies_outside_the_body():
    ct, body, target = water_cube()
    arrangement = BeamArrangement(tuple(np.arange(9) * 40.0), (0.0,) * 9, (0.0, 0.0, 0.0))
    prior = beam_prior_dose(ct, body, target[None], [56.0], SPACING, ORIGIN, arrangement)
    assert np.median(prior[target]) == pytest.approx(56.0, rel=1e-4)
    assert prior[~body].max() == 0.0
    assert prior[body & ~target].max() < prior[target].max()


def _sample(ct, body, masks, beams=None) -> dict:
    return {"ct": torch.from_numpy(ct[None]), "masks": torch.from_numpy(masks.astype(np.float32)),
            "body": torch.from_numpy(body[None].astype(np.float32)),
            "spacing_mm": np.asarray(SPACING, np.float32), "origin_mm": np.asarray(ORIGIN),
            "beams": beams, "case_id": "cube"}


NINE = {"n_beams": 9, "start_deg": 0.0, "energy_mv": 6.0, "delivery": "static"}


def test_a_left_right_mirrored_case_gets_the_mirrored_prior():
    ct, body, _ = water_cube()
    z, y, x = np.meshgrid(*[o + s * np.arange(n) for o, s, n in zip(ORIGIN, SPACING, SHAPE)],
                          indexing="ij")
    boost = (np.hypot(y - 4, x - 14) <= 8) & (np.abs(z) <= 6)  # off-centre, to the left
    elective = (np.hypot(y - 4, x - 8) <= 18) & (np.abs(z) <= 8)
    masks = np.stack([boost, elective])
    prior = PriorDosed(["PTV70", "PTV56"], {"PTV70": 70.0, "PTV56": 56.0}, 70.0,
                       {"kind": "beams"}, NINE)
    out = prior(_sample(ct, body, masks))["prior"].numpy()
    mirrored = prior(_sample(ct[..., ::-1].copy(), body[..., ::-1].copy(),
                             masks[..., ::-1].copy()))["prior"].numpy()
    assert out.max() > 0.9
    np.testing.assert_allclose(mirrored, out[..., ::-1], atol=2e-3)


def test_a_case_without_beams_takes_the_protocol_arrangement_and_says_so_once(caplog):
    ct, body, target = water_cube()
    prior = PriorDosed(["PTV70"], {"PTV70": 70.0}, 70.0, {"kind": "beams"}, NINE)
    own = BeamArrangement((0.0,), (0.0,), (0.0, 0.0, 0.0), source="rtplan").to_meta()
    with caplog.at_level(logging.INFO, logger="vmatdose.data.prior"):
        first = prior(_sample(ct, body, target[None]))["prior"]
        second = prior(_sample(ct, body, target[None]))["prior"]
        single = prior(_sample(ct, body, target[None], beams=own))["prior"]
    said = [r for r in caplog.records if "protocol's default" in r.getMessage()]
    assert len(said) == 1 and "cube" in said[0].getMessage()
    torch.testing.assert_close(first, second)
    # the case's own single anterior field: more dose in front of the target than behind
    axis = single[0, 6, :, 32]
    assert axis[32 - 14] > 1.15 * axis[32 + 14]
    assert abs(float(first[0, 6, 32 - 14, 32] - first[0, 6, 32 + 14, 32])) < 0.05


def test_the_blend_is_the_weighted_sum_of_the_two_priors():
    ct, body, target = water_cube()
    profile = {"distance_mm": [0.0, 20.0, 60.0], "relative_dose": [1.0, 0.5, 0.1]}
    make = lambda kind, w: PriorDosed(["PTV70"], {"PTV70": 70.0}, 70.0,  # noqa: E731
                                      {"kind": kind, "distance_weight": w, **profile}, NINE)
    sample = _sample(ct, body, target[None])
    distance = make("distance", 1.0)(dict(sample))["prior"]
    beams = make("beams", 0.0)(dict(sample))["prior"]
    blend = make("beams", 0.25)(dict(sample))["prior"]
    torch.testing.assert_close(blend, 0.75 * beams + 0.25 * distance)


def test_the_target_floor_lifts_the_cold_target_voxels_to_the_prescription_and_nothing_else():
    ct, body, target = water_cube(target_half_mm=20.0)
    make = lambda floor: PriorDosed(["PTV70"], {"PTV70": 70.0}, 70.0,  # noqa: E731
                                    {"kind": "beams", "target_floor": floor}, NINE)
    sample = _sample(ct, body, target[None])
    plain = make(False)(dict(sample))["prior"][0].numpy()
    floored = make(True)(dict(sample))["prior"][0].numpy()
    inside = target & body
    assert plain[inside].min() < 0.97  # the open fields' edges are cold inside the target
    assert floored[inside].min() == pytest.approx(1.0)  # 70 Gy / dose scale 70 Gy
    hot = inside & (plain > 1.0)
    assert hot.any() and np.array_equal(floored[hot], plain[hot])
    np.testing.assert_array_equal(floored[~inside], plain[~inside])


def test_the_floor_of_nested_targets_is_each_voxels_highest_prescription():
    prior = np.full((1, 4, 4), 0.5, np.float32)
    prior[0, 0, 0] = 1.2  # already above every prescription: kept
    ptv56 = np.zeros((1, 4, 4), bool)
    ptv56[0, :3, :3] = True
    ptv70 = np.zeros((1, 4, 4), bool)
    ptv70[0, :2, :2] = True
    floored = floor_targets(prior, np.stack([ptv70, ptv56]), [1.0, 0.8])
    expected = np.full((4, 4), 0.5, np.float32)
    expected[:3, :3] = 0.8
    expected[:2, :2] = 1.0
    expected[0, 0] = 1.2
    np.testing.assert_array_equal(floored[0], expected)
    assert prior[0, 1, 1] == 0.5  # the input is not changed in place


@pytest.mark.parametrize("config, message", [
    ({"kind": "beam"}, "kind must be one of"),
    ({"kind": "beams", "distance_wieght": 0.5}, "unknown key(s) ['distance_wieght']"),
    ({"kind": "beams", "distance_weight": 0.5}, "needs matching distance_mm"),
    ({"kind": "beams", "distance_weight": 1.5}, "distance_weight must be in [0, 1]"),
    ({"kind": "distance"}, "needs matching distance_mm"),
    ({"kind": "beams", "target_floor": "yes"}, "target_floor must be true or false"),
    ({"kind": "distance", "distance_mm": [0.0, 9.0], "relative_dose": [1.0, 0.5],
      "beam_sectors": 9}, "beam_sectors needs kind=beams"),
    ({"kind": "beams", "beam_sectors": -1}, "beam_sectors must be a whole number from 0 to 36"),
    ({"kind": "beams", "beam_sectors": 2.5}, "beam_sectors must be a whole number"),
    ({"kind": "beams", "beam_sectors": True}, "beam_sectors must be a whole number"),
    ({"kind": "beams", "beam_sectors": 37}, "beam_sectors must be a whole number from 0 to 36"),
])
def test_a_bad_prior_config_is_refused_naming_the_key(config, message):
    with pytest.raises(ValueError) as err:
        check_prior_config(config)
    assert message in str(err.value)


def test_an_arc_is_thinned_to_max_beams_equally_spaced_control_points():
    arc = BeamArrangement(tuple(np.arange(0, 360, 2.0)), (0.0,) * 180, (0.0, 0.0, 0.0),
                          delivery="arc")
    angles = traced_gantry_deg(arc, 36)
    assert len(angles) == 36 and angles[0] == 0.0 and angles[-1] == 358.0
    assert traced_gantry_deg(BeamArrangement((0.0, 40.0), (0.0, 0.0), (0, 0, 0)), 36) == [0.0, 40.0]


def test_non_coplanar_beams_are_traced_coplanar_and_said_once(caplog):
    ct, body, target = water_cube()
    prior = PriorDosed(["PTV70"], {"PTV70": 70.0}, 70.0, {"kind": "beams"}, NINE)
    tilted = BeamArrangement((0.0, 180.0), (10.0, 0.0), (0.0, 0.0, 0.0)).to_meta()
    flat = BeamArrangement((0.0, 180.0), (0.0, 0.0), (0.0, 0.0, 0.0)).to_meta()
    with caplog.at_level(logging.WARNING, logger="vmatdose.data.prior"):
        first = prior(_sample(ct, body, target[None], beams=tilted))["prior"]
        prior(_sample(ct, body, target[None], beams=tilted))
    assert sum("couch" in r.getMessage() for r in caplog.records) == 1
    torch.testing.assert_close(first, prior(_sample(ct, body, target[None], beams=flat))["prior"])


def test_each_gantry_angle_falls_in_the_sector_whose_centre_is_nearest():
    assert gantry_sectors([0.0, 10.0, 185.0, 359.0, 260.0, -40.0], 4) == [0, 0, 2, 0, 3, 0]
    assert gantry_sectors(np.arange(9) * 40.0, 9) == list(range(9))


def test_the_sectors_of_one_target_add_up_to_the_prior_which_they_leave_unchanged():
    ct, body, target = water_cube()
    arrangement = BeamArrangement(tuple(np.arange(9) * 40.0), (0.0,) * 9, (0.0, 0.0, 0.0))
    prior = beam_prior_dose(ct, body, target[None], [56.0], SPACING, ORIGIN, arrangement)
    channels = beam_prior_channels(ct, body, target[None], [56.0], SPACING, ORIGIN,
                                   arrangement, sectors=9)
    assert channels.shape == (10, *SHAPE)
    np.testing.assert_array_equal(channels[0], prior)
    # one target: every beam's field is scaled alike and the scatter is linear
    np.testing.assert_allclose(channels[1:].sum(0), prior, rtol=1e-5, atol=1e-4)
    anterior = channels[1][6, :, 32]  # gantry 0 enters from anterior (low y index)
    assert anterior[32 - 14] > 1.2 * anterior[32 + 14] > 0
    assert channels[1:, ~body].max() == 0.0


def test_a_sector_without_beams_is_zero_and_the_beams_of_one_sector_add_up():
    ct, body, target = water_cube()
    arrangement = BeamArrangement((0.0, 10.0, 180.0), (0.0,) * 3, (0.0, 0.0, 0.0))
    channels = beam_prior_channels(ct, body, target[None], [1.0], SPACING, ORIGIN,
                                   arrangement, sectors=4)  # centres 0, 90, 180, 270
    assert channels[2].max() == 0.0 and channels[4].max() == 0.0
    assert channels[1].max() > 1.5 * channels[3].max() > 0  # two beams against one
    np.testing.assert_allclose(channels[1:].sum(0), channels[0], rtol=1e-5, atol=1e-6)


def test_a_mirrored_case_gets_its_sectors_mirrored_into_the_swapped_channels():
    ct, body, _ = water_cube()
    z, y, x = np.meshgrid(*[o + s * np.arange(n) for o, s, n in zip(ORIGIN, SPACING, SHAPE)],
                          indexing="ij")
    target = (np.hypot(y - 4, x - 14) <= 8) & (np.abs(z) <= 6)  # off-centre, to the left
    prior = PriorDosed(["PTV70"], {"PTV70": 70.0}, 70.0, {"kind": "beams", "beam_sectors": 9},
                       NINE)
    out = prior(_sample(ct, body, target[None]))["prior"].numpy()
    mirrored = prior(_sample(ct[..., ::-1].copy(), body[..., ::-1].copy(),
                             target[None, ..., ::-1].copy()))["prior"].numpy()
    swap = InputSpec.build((), prior=True, prior_sectors=9).block_lr_permutation("prior")
    assert swap == [0, 1, 9, 8, 7, 6, 5, 4, 3, 2]  # gantry g becomes -g
    assert out.shape == (10, *SHAPE)
    np.testing.assert_allclose(mirrored[swap], out[..., ::-1], atol=2e-3)
    unswapped = np.abs(mirrored[2] - out[2][..., ::-1]).max()
    assert unswapped > 10 * 2e-3  # the 40-degree sector is not its own mirror image


def test_cap_organs_lowers_only_hot_organ_voxels_outside_the_kept_ones():
    dose = np.array([[[10.0, 50.0, 60.0, 70.0]]], np.float32)  # (1, 1, 4) Gy
    cord = np.array([[[1, 1, 1, 1]]], bool)
    target = np.array([[[0, 0, 0, 1]]], bool)
    capped = cap_organs(dose, cord[None], [45.0], keep=target)
    np.testing.assert_array_equal(capped, [[[10.0, 45.0, 45.0, 70.0]]])
    np.testing.assert_array_equal(cap_organs(dose, cord[None], [45.0]), [[[10, 45, 45, 45]]])
    assert dose[0, 0, 2] == 60.0  # the input is left as it was


def test_scale_organs_scales_only_organ_voxels_outside_the_kept_ones():
    dose = np.array([[[10.0, 40.0, 60.0, 70.0, 20.0]]], np.float32)  # (1, 1, 5) Gy
    parotid = np.array([[[0, 1, 1, 0, 0]]], bool)
    larynx = np.array([[[0, 0, 1, 1, 0]]], bool)  # overlapping the parotid at voxel 2
    target = np.array([[[0, 0, 0, 1, 0]]], bool)
    scaled = scale_organs(dose, np.stack([parotid, larynx]), 0.5, keep=target)
    np.testing.assert_array_equal(scaled, [[[10.0, 20.0, 30.0, 70.0, 20.0]]])  # once each
    np.testing.assert_array_equal(scale_organs(dose, larynx[None], 0.9), [[[10, 40, 54, 63, 20]]])
    assert dose[0, 0, 2] == 60.0  # the input is left as it was
    # one factor per organ: the overlap takes the smaller
    each = scale_organs(dose, np.stack([parotid, larynx]), [0.5, 0.9], keep=target)
    np.testing.assert_array_equal(each, [[[10.0, 20.0, 30.0, 70.0, 20.0]]])
    each = scale_organs(dose, np.stack([parotid, larynx]), [1.1, 0.9])
    np.testing.assert_allclose(each, [[[10.0, 44.0, 54.0, 63.0, 20.0]]], rtol=1e-6)


def test_stretch_targets_moves_only_the_dose_above_the_highest_prescription_away_from_it():
    dose = np.array([[[50.0, 60.0, 66.0, 72.0, 69.0, 80.0]]], np.float32)  # (1, 1, 6) Gy
    ptv56 = np.array([[[1, 1, 1, 1, 1, 0]]], bool)
    ptv70 = np.array([[[0, 0, 0, 1, 1, 0]]], bool)  # inside the PTV56 at voxels 3, 4
    stretched = stretch_targets(dose, np.stack([ptv56, ptv70]), [56.0, 70.0], 1.5)
    # below 56 kept; 56 + 1.5 x (60 - 56); 56 + 1.5 x 10; 70 + 1.5 x 2; below 70 kept; outside
    np.testing.assert_array_equal(stretched, [[[50.0, 62.0, 71.0, 73.0, 69.0, 80.0]]])
    np.testing.assert_array_equal(stretch_targets(dose, ptv56[None], [56.0], 1.0), dose)
    assert dose[0, 0, 1] == 60.0  # the input is left as it was
