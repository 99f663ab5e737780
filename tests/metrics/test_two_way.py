"""Two-way gamma (the validation gamma): noise fails it, agreement passes it."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from vmatdose.metrics.gamma import gamma_pass_rate, two_way_gamma
from vmatdose.training.module import DoseModule

# a clinical-like grid: 2.5 mm slices, 1.2 mm in-plane
SPACING = (2.5, 1.2, 1.2)
SHAPE = (12, 40, 40)
CRITERIA = {"dose_percent": 3.0, "distance_mm": 3.0, "lower_percent_dose_cutoff": 10.0}


def smooth_dose() -> np.ndarray:
    """70 Gy Gaussian field (sigma 12 mm) with a 40 Gy shoulder, Gy, float32 (Z, Y, X)."""
    grids = np.meshgrid(*[np.arange(n) * s for n, s in zip(SHAPE, SPACING)], indexing="ij")
    centre = [n * s / 2 for n, s in zip(SHAPE, SPACING)]
    r2 = sum((g - c) ** 2 for g, c in zip(grids, centre))
    shoulder = sum((g - c - 8.0) ** 2 for g, c in zip(grids, centre))
    return (70 * np.exp(-r2 / (2 * 12 ** 2)) + 40 * np.exp(-shoulder / (2 * 8 ** 2))
            ).astype(np.float32)


def checkerboard(dose: np.ndarray, amplitude_gy: float) -> np.ndarray:
    sign = np.where(np.indices(dose.shape).sum(axis=0) % 2 == 0, 1.0, -1.0)
    return np.clip(dose + amplitude_gy * sign, 0, None).astype(np.float32)


@pytest.mark.parametrize("backend", ["numba", "torch"])
def test_perfect_prediction_passes_every_evaluated_voxel(backend):
    ref = smooth_dose()
    result = two_way_gamma(ref, ref.copy(), SPACING, **CRITERIA, backend=backend)
    assert result.pass_percent == 100.0
    assert result.points == int((ref >= 0.1 * ref.max()).sum())


def test_checkerboard_noise_passes_the_reference_gamma_but_fails_the_two_way():
    ref = smooth_dose()
    noisy = checkerboard(ref, 33.0)
    # the interpolated one-way search finds the reference value between +33 and -33 Gy
    assert gamma_pass_rate(ref, noisy, SPACING, **CRITERIA) > 95.0
    result = two_way_gamma(ref, noisy, SPACING, **CRITERIA)
    assert result.forward_percent > 95.0
    assert result.pass_percent < 10.0
    assert result.pass_percent == pytest.approx(min(result.pass_percent,
                                                    result.reverse_percent))


def test_uniform_noise_fails_the_two_way_gamma():
    ref = smooth_dose()
    noise = np.random.default_rng(0).uniform(0, 80, SHAPE).astype(np.float32)
    assert gamma_pass_rate(ref, noise, SPACING, **CRITERIA) > 80.0
    assert two_way_gamma(ref, noise, SPACING, **CRITERIA).pass_percent < 30.0


def test_shift_of_one_voxel_below_the_distance_criterion_passes():
    ref = smooth_dose()
    shifted = np.roll(ref, 1, axis=2)  # 1.2 mm to the patient's left
    result = two_way_gamma(ref, shifted, SPACING, **CRITERIA)
    assert result.pass_percent > 99.0
    # ... but not one of 3 slices (7.5 mm, beyond 3 mm) in the steep part of the field
    assert two_way_gamma(ref, np.roll(ref, 3, axis=0), SPACING, **CRITERIA
                         ).pass_percent < 90.0


def test_zero_prediction_fails_and_an_empty_reference_has_no_points():
    ref = smooth_dose()
    assert two_way_gamma(ref, np.zeros_like(ref), SPACING, **CRITERIA).pass_percent == 0.0
    empty = two_way_gamma(np.zeros_like(ref), ref, SPACING, **CRITERIA)
    assert empty.points == 0 and np.isnan(empty.pass_percent)


def test_mask_limits_the_points_and_local_gamma_is_refused():
    ref = smooth_dose()
    mask = np.zeros(SHAPE, bool)
    mask[4:8] = True
    result = two_way_gamma(ref, ref, SPACING, **CRITERIA, mask=mask)
    assert result.points == int(((ref >= 0.1 * ref.max()) & mask).sum())
    with pytest.raises(ValueError, match="global only"):
        two_way_gamma(ref, ref, SPACING, **CRITERIA, local=True)


def test_validation_logs_the_two_way_rate_and_its_points():
    module = DoseModule(net=torch.nn.Identity(), loss=None, optimizer=None,
                        val_gamma=CRITERIA)
    ref = torch.from_numpy(smooth_dose())
    scale = 70.0
    batch = {"dose": torch.stack([ref, ref])[:, None] / scale,
             "dose_scale_gy": torch.tensor([scale, scale]),
             "spacing_mm": torch.tensor([SPACING, SPACING])}
    noisy = torch.from_numpy(checkerboard(ref.numpy(), 33.0))
    pred = torch.stack([ref, noisy])[:, None] / scale
    rate, points = module._gamma_pass(pred, batch)
    single = two_way_gamma(ref.numpy(), noisy.numpy(), SPACING, **CRITERIA)
    assert float(rate) == pytest.approx((100.0 + single.pass_percent) / 2, abs=1e-3)
    assert float(points) == single.points
