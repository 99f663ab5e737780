"""DVH metrics: analytic doses, exact definitions, OpenKBP conventions, parser, validation."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from vmatdose.metrics.dvh import (
    DVHMetric,
    cumulative_dvh,
    dose_at_cc,
    dose_at_volume,
    dvh_metrics,
    evaluate_dvh_metric,
    max_dose,
    mean_dose,
    min_dose,
    parse_dvh_metric,
    volume_at_dose,
    volume_at_relative_dose,
)

SPACING = (2.0, 2.0, 2.5)  # 0.01 cc voxels


def one_to_hundred() -> tuple[np.ndarray, np.ndarray]:
    """Doses 1..100 Gy in a (4, 5, 5) volume (shuffled), a full mask and an empty one."""
    dose = np.random.default_rng(0).permutation(np.arange(1.0, 101.0)).reshape(4, 5, 5)
    masks = np.stack([np.ones(dose.shape, bool), np.zeros(dose.shape, bool)])
    return dose, masks


def ramp_box() -> tuple[np.ndarray, np.ndarray]:
    """Linear ramp 0, 1, ..., 99 Gy along x in a (2, 3, 100) box: 6 voxels per dose."""
    dose = np.broadcast_to(np.arange(100.0), (2, 3, 100)).copy()
    return dose, np.ones((1, *dose.shape), bool)


# --------------------------------------------------------------------------- analytic


def test_uniform_dose_every_metric_equals_the_dose():
    dose = np.full((6, 7, 8), 42.5)
    masks = np.zeros((2, 6, 7, 8), np.uint8)
    masks[0, 1:5, 2:6, 1:7] = 1  # 96 voxels of 0.008 cc
    masks[1, :2] = 1
    np.testing.assert_allclose(dose_at_volume(dose, masks, [100, 99, 98, 95, 50, 2, 1, 0]),
                               42.5)
    np.testing.assert_allclose(dose_at_cc(dose, masks, [0.03, 0.1, 0.5], 0.008), 42.5)
    np.testing.assert_allclose(mean_dose(dose, masks), 42.5)
    np.testing.assert_allclose(max_dose(dose, masks), 42.5)
    np.testing.assert_allclose(min_dose(dose, masks), 42.5)
    np.testing.assert_allclose(volume_at_dose(dose, masks, [42.5, 42.6]), [[100, 0], [100, 0]])


def test_uniform_prescription_dose_gives_full_coverage():
    dose = np.full((5, 6, 7), 70.0)
    mask = np.ones((1, 5, 6, 7), bool)
    assert volume_at_relative_dose(dose, mask, 95.0, 70.0)[0] == 100.0
    assert volume_at_relative_dose(dose, mask, 100.0, 70.0)[0] == 100.0  # >= counts
    np.testing.assert_array_equal(volume_at_relative_dose(dose, mask, [95, 101], 70.0),
                                  [[100.0, 0.0]])
    v95 = evaluate_dvh_metric(dose, mask, "V95%", prescription_gy=70.0)
    assert v95[0] == 100.0
    assert evaluate_dvh_metric(dose, mask, "D95%")[0] == 70.0


@pytest.mark.parametrize(("x", "expected"),
                         [(95, 5.0), (98, 2.0), (2, 98.0), (50, 50.0), (100, 0.0),
                          (0, 99.0), (0.1, 99.0), (37.3, 62.0), (99.9, 0.0)])
def test_linear_ramp_dose_at_volume_is_exact(x, expected):
    # the hottest x % of the box are the doses above 100 - x, so D_x% = floor(100 - x) Gy
    # (the coldest dose of the ceil(6 x)-th hottest voxel), with no interpolation
    dose, mask = ramp_box()
    assert dose_at_volume(dose, mask, x)[0] == expected
    assert expected == math.floor(100 - x) or x == 0


def test_linear_ramp_volume_at_dose_and_dvh():
    dose, mask = ramp_box()
    np.testing.assert_allclose(volume_at_dose(dose, mask, [0.0, 50.0, 50.5, 99.0, 99.5])[0],
                               [100.0, 50.0, 49.0, 1.0, 0.0])
    bins, volume = cumulative_dvh(dose, mask, bin_width_gy=10.0, unit="percent")
    np.testing.assert_array_equal(bins, np.arange(0.0, 110.0, 10.0))
    np.testing.assert_allclose(volume[0], [100, 90, 80, 70, 60, 50, 40, 30, 20, 10, 0])


def test_exact_definition_on_random_doses():
    # D_x% is a voxel dose, covers at least x % and no higher dose does; D_x >= L exactly
    # when V_L >= x (the equivalence DVH constraints rely on)
    rng = np.random.default_rng(1)
    dose = rng.gamma(4.0, 10.0, size=(7, 9, 11))
    mask = (rng.random(dose.shape) < 0.6)[None]
    values = dose[mask[0]]
    xs = np.array([0.5, 1, 2, 5, 33.3, 50, 90, 95, 98, 99])
    d_x = dose_at_volume(dose, mask, xs)[0]
    assert np.isin(d_x, values).all()
    above = np.nextafter(d_x, np.inf)
    np.testing.assert_array_less(volume_at_dose(dose, mask, above)[0], xs)
    assert np.all(volume_at_dose(dose, mask, d_x)[0] >= xs)
    levels = np.linspace(values.min(), values.max(), 37)
    v = volume_at_dose(dose, mask, levels)[0]
    for x, d in zip(xs, d_x):
        np.testing.assert_array_equal(d >= levels, v >= x)


def test_known_histogram_points():
    dose, masks = one_to_hundred()
    # 100 voxels: D_x% is the x-th highest dose, 101 - x
    np.testing.assert_array_equal(dose_at_volume(dose, masks, [95, 2, 99, 1, 50])[0],
                                  [6.0, 99.0, 2.0, 100.0, 51.0])
    assert volume_at_dose(dose, masks, 50.0)[0] == pytest.approx(51.0)
    assert volume_at_dose(dose, masks, 50.5)[0] == pytest.approx(50.0)
    assert volume_at_dose(dose, masks, 50.0, unit="cc", voxel_volume_cc=0.008)[0] == \
        pytest.approx(51 * 0.008)
    assert volume_at_dose(dose, masks, 50.0, unit="cc", spacing_mm=SPACING)[0] == \
        pytest.approx(0.51)
    assert volume_at_dose(dose, masks, 50.0, unit="fraction")[0] == pytest.approx(0.51)
    assert mean_dose(dose, masks)[0] == pytest.approx(50.5)
    assert max_dose(dose, masks)[0] == 100.0 and min_dose(dose, masks)[0] == 1.0


def test_openkbp_method_interpolates_like_numpy_percentile():
    dose, masks = one_to_hundred()
    result = dose_at_volume(dose, masks, [95, 2, 99, 1], method="openkbp")[0]
    np.testing.assert_allclose(result, [5.95, 98.02, 1.99, 99.01])
    ramp = np.broadcast_to(np.arange(0.0, 64.0, 0.5), (2, 3, 128)).copy()
    qs = [99, 98, 95, 50, 2, 1, 37.3]
    np.testing.assert_allclose(
        dose_at_volume(ramp, np.ones((1, *ramp.shape)), qs, method="openkbp")[0],
        np.percentile(ramp, [100 - q for q in qs]), rtol=0, atol=1e-12)


def test_dose_to_hottest_cc():
    dose, masks = one_to_hundred()
    voxel_cc = 0.01
    assert dose_at_cc(dose, masks, 0.1, voxel_cc)[0] == 91.0  # 10 hottest voxels
    assert dose_at_cc(dose, masks, 0.03, spacing_mm=SPACING)[0] == 98.0  # 3 voxels
    assert dose_at_cc(dose, masks, 0.105, voxel_cc)[0] == 90.0  # 10.5 voxels -> 11
    assert dose_at_cc(dose, masks, 0.004, voxel_cc)[0] == 100.0  # at least one voxel
    assert dose_at_cc(dose, masks, 1.0, voxel_cc)[0] == 1.0  # the whole structure
    assert math.isnan(dose_at_cc(dose, masks, 2.0, voxel_cc)[0])  # larger than it
    # 0.1 / 0.001 = 100.00000000000001 in floating point: still 100 voxels, not 101
    assert dose_at_cc(dose, masks, 0.1, 0.001)[0] == 1.0
    # OpenKBP's code: percentile(roi, 100 - N / n * 100) = P90 = 1 + 0.9 * 99
    openkbp = dose_at_cc(dose, masks, [0.1, 2.0], voxel_cc, method="openkbp")[0]
    np.testing.assert_allclose(openkbp, [90.1, 1.0])


def test_cumulative_dvh_counts_doses_at_least_each_level():
    dose, masks = one_to_hundred()
    bins, fraction = cumulative_dvh(dose, masks, bin_width_gy=1.0)
    np.testing.assert_array_equal(bins, np.arange(0.0, 102.0))
    expected = np.clip((101 - bins) / 100, 0, 1)
    np.testing.assert_allclose(fraction[0], expected)
    assert np.isnan(fraction[1]).all()
    bins, fraction = cumulative_dvh(dose, masks, bins=[0.5, 50.0, 99.5, 200.0])
    np.testing.assert_allclose(fraction[0], [1.0, 0.51, 0.01, 0.0])
    _, cc = cumulative_dvh(dose, masks, bins=[0.5, 50.0], unit="cc", spacing_mm=SPACING)
    np.testing.assert_allclose(cc[0], [1.0, 0.51])
    default_bins, _ = cumulative_dvh(dose, masks)
    assert default_bins[1] == pytest.approx(0.01) and default_bins[-1] > 100.0


def test_empty_structure_gives_nan_not_a_crash():
    dose, masks = one_to_hundred()
    for value in (dose_at_volume(dose, masks, 95)[1], dose_at_cc(dose, masks, 0.1, 0.01)[1],
                  volume_at_dose(dose, masks, 10.0)[1],
                  volume_at_dose(dose, masks, 10.0, unit="cc", voxel_volume_cc=0.01)[1],
                  mean_dose(dose, masks)[1], max_dose(dose, masks)[1],
                  min_dose(dose, masks)[1]):
        assert math.isnan(value)
    metrics = dvh_metrics(dose, masks, ["PTV", "Empty"], SPACING, extra=["V20Gy"])
    assert all(math.isnan(v) for v in metrics["Empty"].values())


# --------------------------------------------------------------------------- metric strings


@pytest.mark.parametrize(("name", "quantity", "value", "unit"), [
    ("D95%", "D", 95.0, "%"),
    ("d_2%", "D", 2.0, "%"),
    ("D0.03cc", "D", 0.03, "cc"),
    ("D2cc", "D", 2.0, "cc"),
    ("V70Gy", "V", 70.0, "Gy"),
    ("V 20 gy", "V", 20.0, "Gy"),
    ("V95%", "V", 95.0, "%"),
    ("V.5Gy", "V", 0.5, "Gy"),
    ("Dmax", "Dmax", None, None),
    ("dmean", "Dmean", None, None),
    ("Dmin", "Dmin", None, None),
])
def test_parse_dvh_metric(name, quantity, value, unit):
    spec = parse_dvh_metric(name)
    assert (spec.quantity, spec.value, spec.unit, spec.name) == (quantity, value, unit, name)
    assert spec.result_unit == ("%" if quantity == "V" else "Gy")
    assert spec.needs_prescription == (quantity == "V" and unit == "%")


@pytest.mark.parametrize("name", ["D70Gy", "V2cc", "D95", "Dmedian", "X95%", "D-5%", "",
                                  "D95%%", "V70Gy2"])
def test_parse_dvh_metric_rejects_unknown_strings(name):
    with pytest.raises(ValueError, match="unsupported DVH metric"):
        parse_dvh_metric(name)


def test_evaluate_dvh_metric_strings():
    dose, masks = one_to_hundred()
    expected = {"D95%": 6.0, "D2%": 99.0, "D0.03cc": 98.0, "D0.1cc": 91.0, "V50Gy": 51.0,
                "Dmax": 100.0, "Dmin": 1.0, "Dmean": 50.5}
    for name, value in expected.items():
        result = evaluate_dvh_metric(dose, masks, name, spacing_mm=SPACING)
        assert result.shape == (2,) and math.isnan(result[1])
        assert result[0] == pytest.approx(value), name
    v = evaluate_dvh_metric(dose, masks, parse_dvh_metric("V50%"), prescription_gy=100.0)
    assert v[0] == pytest.approx(51.0)
    assert evaluate_dvh_metric(dose, masks, "D95%", method="openkbp")[0] == \
        pytest.approx(5.95)
    assert isinstance(parse_dvh_metric("D95%"), DVHMetric)


def test_dvh_metrics_keys_and_values():
    dose, masks = one_to_hundred()
    metrics = dvh_metrics(dose, masks, ["PTV70", "Cord"], SPACING, targets=["PTV70"])
    common = {"D98", "D95", "D50", "D2", "Dmean", "Dmax", "D0.1cc", "D2cc"}
    assert set(metrics["Cord"]) == common
    assert set(metrics["PTV70"]) == common | {"D99", "D1"}
    ptv = metrics["PTV70"]
    assert ptv["D95"] == 6.0 and ptv["D2"] == 99.0 and ptv["D98"] == 3.0
    assert ptv["D99"] == 2.0 and ptv["D1"] == 100.0 and ptv["D50"] == 51.0
    assert ptv["Dmean"] == pytest.approx(50.5) and ptv["Dmax"] == 100.0
    assert ptv["D0.1cc"] == 91.0 and math.isnan(ptv["D2cc"])  # 1 cc structure
    assert all(isinstance(v, float) for v in ptv.values())
    kbp = dvh_metrics(dose, masks, ["PTV70", "Cord"], SPACING, method="openkbp")
    assert kbp["PTV70"]["D0.1cc"] == pytest.approx(90.1)
    assert kbp["PTV70"]["D95"] == pytest.approx(5.95)
    extra = dvh_metrics(dose, masks, ["PTV70", "Cord"], SPACING, extra=["V95%", "V20Gy"],
                        prescriptions_gy={"PTV70": 70.0})
    assert extra["PTV70"]["V95%"] == pytest.approx(34.0)  # doses >= 66.5 Gy: 67..100
    assert extra["PTV70"]["V20Gy"] == pytest.approx(81.0)
    assert "V95%" not in extra["Cord"] and "V20Gy" in extra["Cord"]


def test_torch_in_torch_out_and_batched_shapes():
    dose, masks = one_to_hundred()
    dose_t, masks_t = torch.from_numpy(dose), torch.from_numpy(masks)
    result = dose_at_volume(dose_t, masks_t, [95, 50])
    assert isinstance(result, torch.Tensor) and result.shape == (2, 2)
    np.testing.assert_allclose(result.numpy(), dose_at_volume(dose, masks, [95, 50]),
                               equal_nan=True)
    assert dose_at_volume(dose, masks, 95).shape == (2,)
    assert isinstance(mean_dose(dose_t, masks_t), torch.Tensor)
    assert isinstance(evaluate_dvh_metric(dose_t, masks_t, "V50Gy"), torch.Tensor)
    bins, fraction = cumulative_dvh(dose_t, masks_t, 5.0)
    assert isinstance(bins, torch.Tensor) and fraction.shape == (2, bins.numel())
    single = dose_at_volume(dose, masks[0], 95)  # a (Z, Y, X) mask is one structure
    assert single.shape == (1,) and single[0] == 6.0


@pytest.mark.parametrize(
    ("call", "message"),
    [
        (lambda d, m: dose_at_volume(d, m[:, :2], 95), "masks must be"),
        (lambda d, m: dose_at_volume(d[0], m, 95), "dose must be"),
        (lambda d, m: dose_at_volume(d, m, 101), r"\[0, 100\]"),
        (lambda d, m: dose_at_volume(d * np.nan, m, 50), "non-finite"),
        (lambda d, m: dose_at_volume(d, m, 50, method="median"), "method"),
        (lambda d, m: dose_at_cc(d, m, 0.1, 0.0), "voxel_volume_cc"),
        (lambda d, m: dose_at_cc(d, m, 0.1), "spacing_mm or voxel_volume_cc"),
        (lambda d, m: dose_at_cc(d, m, 0.1, 0.01, spacing_mm=SPACING), "exactly one"),
        (lambda d, m: dose_at_cc(d, m, -1.0, 0.01), "cc must be positive"),
        (lambda d, m: volume_at_dose(d, m, 10.0, unit="cc"), "voxel_volume_cc"),
        (lambda d, m: volume_at_dose(d, m, 10.0, unit="litre"), "unit"),
        (lambda d, m: volume_at_relative_dose(d, m, 95.0, 0.0), "prescription_gy"),
        (lambda d, m: cumulative_dvh(d, m, bin_width_gy=0.0), "bin_width_gy"),
        (lambda d, m: evaluate_dvh_metric(d, m, "V95%"), "prescription_gy"),
        (lambda d, m: evaluate_dvh_metric(d, m, "D2cc"), "spacing_mm"),
        (lambda d, m: evaluate_dvh_metric(d, m, "D101%"), r"\[0, 100\]"),
        (lambda d, m: dvh_metrics(d, m, ["PTV"], (1, 1, 1)), "structure names"),
        (lambda d, m: dvh_metrics(d, m, ["A", "B"], (1, 1, 1), targets=["C"]), "targets"),
        (lambda d, m: dvh_metrics(d, m, ["A", "B"], (1, 0, 1)), "spacing_mm"),
        (lambda d, m: dvh_metrics(d, m, ["A", "B"], (1, 1, 1), extra=["D5Gy"]), "metric"),
    ],
)
def test_invalid_inputs_raise_value_error(call, message):
    dose, masks = one_to_hundred()
    with pytest.raises(ValueError, match=message):
        call(dose, masks)
