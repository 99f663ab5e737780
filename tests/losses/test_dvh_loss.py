"""DVH losses: goal parsing, exact penalties, smooth percentiles, gradient descent to D95."""

import math

import numpy as np
import pytest
import torch

from vmatdose.losses import DVHLoss, DVHMatchLoss
from vmatdose.losses.dvh import Objective, constraint_objective
from vmatdose.losses.soft_dvh import smooth_percentile, soft_cumulative_dvh
from vmatdose.metrics.dvh import dose_at_volume

from loss_testing import PRESCRIPTIONS, SCALE_GY, STRUCTURES, box_batch

CONSTRAINTS = [
    {"structure": "PTV70", "metric": "V95%", "op": ">=", "limit": 95.0},
    {"structure": "Rectum", "metric": "V50Gy", "op": "<", "limit": 50.0},
    {"structure": "Bladder", "metric": "Dmean", "op": "<", "limit": 30.0},
    {"structure": "Femur_L", "metric": "Dmax", "op": "<", "limit": 50.0},
]


def dvh_loss(**kwargs) -> DVHLoss:
    return DVHLoss(STRUCTURES, PRESCRIPTIONS, SCALE_GY, constraints=CONSTRAINTS, **kwargs)


def with_dose_gy(batch: dict, dose_gy: torch.Tensor) -> torch.Tensor:
    return (dose_gy / SCALE_GY).expand_as(batch["dose"]).clone()


def test_constraints_become_objectives():
    rx = PRESCRIPTIONS
    assert constraint_objective({"structure": "Rectum", "metric": "V70Gy", "op": "<",
                                 "limit": 15.0}, rx) == Objective(
        "Rectum", "percentile", 85.0, 70.0, True, "Rectum V70Gy < 15")
    ptv = constraint_objective({"structure": "PTV56", "metric": "V95%", "op": ">=",
                                "limit": 95.0}, rx)
    assert (ptv.quantity, ptv.level, ptv.upper) == ("percentile", 5.0, False)
    assert ptv.limit == pytest.approx(53.2)
    vol = constraint_objective({"structure": "Rectum", "metric": "V65Gy", "op": "<",
                                "limit": 25.0}, rx, volume_as_dose=False)
    assert (vol.quantity, vol.level, vol.limit, vol.upper) == ("volume", 65.0, 0.25, True)
    dmax = constraint_objective({"structure": "Femur_L", "metric": "Dmax", "op": "<",
                                 "limit": 50.0}, rx)
    assert (dmax.quantity, dmax.level, dmax.limit) == ("percentile", 100.0, 50.0)
    d2 = constraint_objective({"structure": "Bowel", "metric": "D2%", "op": "<=",
                               "limit": 45.0}, rx)
    assert (d2.quantity, d2.level, d2.upper) == ("percentile", 98.0, True)
    with pytest.raises(ValueError, match="unsupported DVH metric"):
        constraint_objective({"structure": "Rectum", "metric": "D2cc", "op": "<",
                              "limit": 1.0}, rx)
    with pytest.raises(ValueError, match="needs a prescription"):
        constraint_objective({"structure": "Rectum", "metric": "V95%", "op": "<",
                              "limit": 1.0}, rx)
    with pytest.raises(ValueError, match="not in structures"):
        DVHLoss(["PTV70"], PRESCRIPTIONS, SCALE_GY)


def test_constraints_use_the_metric_grammar_of_the_evaluation():
    # one parser (vmatdose.metrics.dvh.parse_dvh_metric): spelling variants and Dmin too
    rx = PRESCRIPTIONS
    d95 = constraint_objective({"structure": "PTV70", "metric": "d_95 %", "op": ">=",
                                "limit": 66.5}, rx)
    assert (d95.quantity, d95.level, d95.upper) == ("percentile", 5.0, False)
    v70 = constraint_objective({"structure": "Rectum", "metric": "v70gy", "op": "<",
                                "limit": 15.0}, rx)
    assert (v70.level, v70.limit) == (85.0, 70.0)
    dmin = constraint_objective({"structure": "PTV56", "metric": "DMIN", "op": ">",
                                 "limit": 50.0}, rx)
    assert (dmin.quantity, dmin.level, dmin.limit, dmin.upper) == ("percentile", 0.0, 50.0,
                                                                    False)


def test_zero_when_every_goal_is_met():
    batch = box_batch()
    loss = dvh_loss()
    assert len(loss.objectives) == 4 + len(CONSTRAINTS)
    assert loss(batch["dose"], batch).item() == 0.0


def test_penalties_are_exact_violations_over_the_highest_prescription():
    batch = box_batch()
    masks = batch["masks"][0]
    dose_gy = batch["dose"][0, 0] * SCALE_GY
    dose_gy = torch.where(masks[0] > 0, 63.0, dose_gy)  # PTV70 cold: 63 Gy
    dose_gy = torch.where(masks[3] > 0, 40.0, dose_gy)  # Bladder mean 40 Gy > 30
    pred = with_dose_gy(batch, dose_gy)
    loss = dvh_loss()
    penalties = loss.penalties(pred, batch)[0]
    expected = {
        "PTV70 D95% >= 70 Gy": 7.0 / 70, "PTV70 D2% <= 74.9 Gy": 0.0,
        "PTV56 D95% >= 56 Gy": 0.0, "PTV56 D2% <= 59.92 Gy": 0.0,
        "PTV70 V95% >= 95": 3.5 / 70, "Rectum V50Gy < 50": 0.0,
        "Bladder Dmean < 30": 10.0 / 70,
    }
    got = {o.label: p.item() for o, p in zip(loss.objectives, penalties)}
    assert math.isnan(got.pop("Femur_L Dmax < 50"))  # no femur in these cases
    assert got == pytest.approx(expected, abs=1e-5)
    assert loss(pred, batch).item() == pytest.approx(sum(expected.values()) / 7, abs=1e-6)


def test_volume_mode_counts_fractions():
    batch = box_batch(n_cases=1)
    rectum = batch["masks"][0, 2] > 0
    dose_gy = (batch["dose"][0, 0] * SCALE_GY).clone()
    hot = rectum.clone()
    hot[: hot.shape[0] // 2] = False  # the upper half of the bar (z >= 8) at 60 Gy
    dose_gy[hot] = 60.0
    fraction = hot.sum().item() / rectum.sum().item()
    rule = [{"structure": "Rectum", "metric": "V50Gy", "op": "<", "limit": 10.0}]
    loss = DVHLoss(STRUCTURES, {}, SCALE_GY, constraints=rule, volume_as_dose=False)
    value = loss(with_dose_gy(batch, dose_gy), batch).item()
    assert value == pytest.approx(fraction - 0.10, abs=1e-3)


def test_smooth_percentile_value_is_exact_and_gradient_is_a_local_average():
    torch.manual_seed(0)
    values = (torch.rand(500) * 40 + 30).requires_grad_()
    q = torch.tensor([5.0, 50.0, 98.0, 100.0])
    result = smooth_percentile(values, q, width=1.0)
    expected = np.percentile(values.detach().numpy(), [5, 50, 98, 100])
    assert result.tolist() == pytest.approx(expected.tolist(), abs=1e-4)
    result[0].backward()
    grad = values.grad
    assert grad.sum().item() == pytest.approx(1.0, abs=1e-5)  # a uniform shift moves D95 1:1
    near = (values.detach() - result[0].detach()).abs() < 3.0
    assert grad[near].sum() > 0.9 and grad[~near].abs().max() < 0.01
    assert (grad > 0).sum() > 10  # spread over many voxels, not one


def test_soft_cumulative_dvh_approaches_the_step_function():
    values = torch.tensor([10.0, 20.0, 30.0, 40.0])
    dvh = soft_cumulative_dvh(values, torch.tensor([0.0, 25.0, 50.0]), width=0.5)
    assert dvh.tolist() == pytest.approx([1.0, 0.5, 0.0], abs=1e-6)


def test_gradient_descent_on_a_dose_volume_brings_ptv_d95_to_the_prescription():
    torch.manual_seed(0)
    batch = box_batch(n_cases=1, size=16)
    ptv = batch["masks"][0, 0] > 0
    start_gy = torch.where(ptv, 45 + 15 * torch.rand(16, 16, 16), batch["dose"][0, 0] * 70)
    dose = torch.nn.Parameter((start_gy / SCALE_GY)[None, None].clone())
    loss = DVHLoss(STRUCTURES, PRESCRIPTIONS, SCALE_GY)
    optimizer = torch.optim.Adam([dose], lr=0.01)
    # Annealed, so Adam's momentum does not carry D95 far past the goal once it is met.
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=300)
    for _ in range(300):
        optimizer.zero_grad()
        loss(dose, batch).backward()
        optimizer.step()
        schedule.step()
    final_gy = dose.detach()[0, 0].numpy() * SCALE_GY
    d95 = float(dose_at_volume(final_gy, ptv.numpy()[None], 95.0)[0])
    before = float(dose_at_volume(start_gy.numpy(), ptv.numpy()[None], 95.0)[0])
    assert before < 50.0
    assert 70.0 - 1e-3 <= d95 < 71.0, d95  # the hinge stops at the goal
    assert float(np.percentile(final_gy[ptv.numpy()], 98)) <= 74.9 + 1.0


def test_match_loss_is_zero_for_the_reference_and_measures_dvh_shift():
    batch = box_batch()
    loss = DVHMatchLoss(STRUCTURES, SCALE_GY, include=["PTV70"], bin_width_gy=1.0,
                        width_gy=0.1)
    assert loss.levels_gy.numel() == 85  # 0..84 Gy = 1.2 x 70
    assert loss(batch["dose"], batch).item() == pytest.approx(0.0, abs=1e-6)
    shifted = (batch["dose"] + 7.0 / SCALE_GY * batch["masks"][:, :1]).requires_grad_()
    value = loss(shifted, batch)
    value.backward()
    # A uniform 70 Gy structure moved to 77 Gy: the DVHs differ by 1 on 7 of 85 levels.
    assert value.item() == pytest.approx(7 / 85, abs=2e-3)
    assert torch.isfinite(shifted.grad).all()


def test_match_loss_skips_absent_structures_and_gradients_are_finite():
    batch = box_batch()
    everything = DVHMatchLoss(STRUCTURES, SCALE_GY)
    femur_only = DVHMatchLoss(STRUCTURES, SCALE_GY, include=["Femur_L"])
    pred = (batch["dose"] * 0.9).requires_grad_()
    assert femur_only(pred, batch).item() == 0.0  # no femur in these cases
    value = everything(pred, batch)
    value.backward()
    assert value.item() > 0 and torch.isfinite(pred.grad).all()
    outside = (pred.grad.abs() > 0) & ~(batch["masks"].any(dim=1, keepdim=True))
    assert not outside.any()  # only structure voxels receive gradient


def test_match_loss_decreases_as_the_predicted_dvh_moves_toward_the_reference():
    # PTV70 and Rectum doses moved 12 Gy off the reference, then back in 3 Gy steps: the
    # DVH difference shrinks with every step, in proportion to the remaining shift.
    batch = box_batch()
    loss = DVHMatchLoss(STRUCTURES, SCALE_GY, include=["PTV70", "Rectum"], width_gy=0.25)
    moved = batch["masks"][:, 0:1] - batch["masks"][:, 2:3]  # PTV70 up, Rectum down
    values = [loss(batch["dose"] + gy / SCALE_GY * moved, batch).item()
              for gy in (12.0, 9.0, 6.0, 3.0, 0.0)]
    assert all(a > b for a, b in zip(values, values[1:])), values
    assert values[0] == pytest.approx(12 / 85, abs=2e-3)  # 12 of 85 levels, both organs
    assert values[2] == pytest.approx(values[0] / 2, abs=2e-3)
    assert values[-1] == pytest.approx(0.0, abs=1e-6)


def test_goal_penalty_decreases_linearly_as_d95_rises_to_the_prescription():
    batch = box_batch(n_cases=1)
    ptv = batch["masks"][:, :1] > 0
    loss = DVHLoss(STRUCTURES, {"PTV70": 70.0}, SCALE_GY)
    values = [loss(torch.where(ptv, d95 / SCALE_GY, batch["dose"]), batch).item()
              for d95 in (56.0, 63.0, 70.0, 72.0)]
    # Two goals (D95 >= 70, D2 <= 74.9): the mean is half of the D95 violation.
    assert values == pytest.approx([14 / 70 / 2, 7 / 70 / 2, 0.0, 0.0], abs=1e-5)
