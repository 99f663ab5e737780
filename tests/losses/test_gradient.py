"""Gradient-magnitude loss: exact slopes in dose per mm on anisotropic grids."""

import math

import pytest
import torch

from vmatdose.losses import GradientLoss
from vmatdose.losses.gradient import derivative_kernels, spatial_gradient

from loss_testing import box_batch


def ramp_batch(slopes=(0.0, 0.0, 0.01), spacing=(3.0, 2.0, 2.0), size=16) -> dict:
    """Reference dose 0; prediction a linear ramp with the given per-voxel slopes
    (z, y, x); 'body' = the interior (no replicate-padded border voxels)."""
    axes = torch.meshgrid(*[torch.arange(size, dtype=torch.float32)] * 3, indexing="ij")
    ramp = sum(s * a for s, a in zip(slopes, axes))
    body = torch.zeros(size, size, size)
    body[1:-1, 1:-1, 1:-1] = 1
    return {"pred": ramp[None, None], "dose": torch.zeros(1, 1, size, size, size),
            "body": body[None, None], "spacing_mm": torch.tensor([spacing])}


@pytest.mark.parametrize("operator", ["sobel", "central"])
def test_ramp_gives_slope_per_mm_and_follows_spacing(operator):
    loss = GradientLoss(operator=operator, in_body=True)
    batch = ramp_batch(slopes=(0.0, 0.0, 0.01), spacing=(3.0, 2.0, 2.0))
    assert loss(batch["pred"], batch).item() == pytest.approx(0.01 / 2.0, rel=1e-5)
    doubled_x = ramp_batch(slopes=(0.0, 0.0, 0.01), spacing=(3.0, 2.0, 4.0))
    assert loss(doubled_x["pred"], doubled_x).item() == pytest.approx(0.01 / 4.0, rel=1e-5)
    doubled_z = ramp_batch(slopes=(0.0, 0.0, 0.01), spacing=(6.0, 2.0, 2.0))
    assert loss(doubled_z["pred"], doubled_z).item() == pytest.approx(0.01 / 2.0, rel=1e-5)


def test_oblique_ramp_magnitude_combines_axes_with_their_spacing():
    batch = ramp_batch(slopes=(0.03, 0.0, 0.02), spacing=(3.0, 2.0, 1.0))
    expected = math.hypot(0.03 / 3.0, 0.02 / 1.0)
    assert GradientLoss(in_body=True)(batch["pred"], batch).item() == pytest.approx(
        expected, rel=1e-5)
    per_cm = GradientLoss(in_body=True, length_mm=10.0)(batch["pred"], batch).item()
    assert per_cm == pytest.approx(10 * expected, rel=1e-5)


def test_sobel_kernels_are_separable_difference_times_smoothing():
    k = derivative_kernels("sobel")
    assert k.shape == (3, 1, 3, 3, 3)
    assert k[2, 0, 1, 1].tolist() == pytest.approx([-0.125, 0.0, 0.125])  # d/dx, centre row
    assert k.sum(dim=(1, 2, 3, 4)).abs().max() == 0  # no response to a constant
    assert k[0, 0, 2].sum() == pytest.approx(0.5)  # d/dz: +0.5 on the z+1 plane


def test_spatial_gradient_per_axis_and_case():
    batch = ramp_batch(slopes=(0.06, 0.04, 0.0), spacing=(3.0, 2.0, 1.0))
    pred = torch.cat([batch["pred"]] * 2)
    spacing = torch.tensor([[3.0, 2.0, 1.0], [6.0, 1.0, 1.0]])
    grad = spatial_gradient(pred, spacing, derivative_kernels("sobel"))[..., 5, 5, 5]
    assert grad[0].tolist() == pytest.approx([0.02, 0.02, 0.0], abs=1e-6)
    assert grad[1].tolist() == pytest.approx([0.01, 0.04, 0.0], abs=1e-6)


def test_zero_for_perfect_prediction_positive_otherwise_finite_gradients():
    batch = box_batch()
    loss = GradientLoss()
    assert loss(batch["dose"], batch).item() == 0.0
    # A flat prediction (|grad| = 0, where the norm has a kink) backpropagates finitely.
    flat = torch.full_like(batch["dose"], 0.5, requires_grad=True)
    value = loss(flat, batch)
    value.backward()
    assert value.item() > 0.001
    assert torch.isfinite(flat.grad).all()
    noisy = (batch["dose"] + 0.05 * torch.rand_like(batch["dose"])).requires_grad_()
    loss(noisy, batch).backward()
    assert torch.isfinite(noisy.grad).all() and noisy.grad.abs().sum() > 0


def test_in_body_ignores_differences_outside_the_body():
    batch = box_batch(size=20)
    body = torch.zeros_like(batch["body"])
    body[..., 4:-4, 4:-4, 4:-4] = 1
    batch["body"] = body
    pred = batch["dose"].clone()
    pred[..., :2, :, :] += 0.3  # a step two voxels away from the body edge
    assert GradientLoss(in_body=True)(pred, batch).item() == 0.0
    assert GradientLoss(in_body=False)(pred, batch).item() > 0.0


def test_unknown_operator_or_kind_is_rejected():
    with pytest.raises(ValueError, match="operator"):
        GradientLoss(operator="laplace")
    with pytest.raises(ValueError, match="kind"):
        GradientLoss(kind="l3")


def step_edge(position: int, size: int = 16) -> torch.Tensor:
    """(1, 1, Z, Y, X) dose 1 for x >= position, 0 below (a fall-off edge across x)."""
    dose = torch.zeros(1, 1, size, size, size)
    dose[..., position:] = 1.0
    return dose


def test_shifted_edge_costs_more_the_further_it_moves_until_the_edges_separate():
    # Central differences of a unit step: 0.5 per mm on the two voxels beside the edge
    # (spacing 1 mm). Shifting by one voxel leaves one of them in common: the magnitude
    # maps differ by 0.5 on 2 voxels per line; by two or more, on 4 voxels per line.
    size = 16
    batch = {"dose": step_edge(8, size), "spacing_mm": torch.tensor([[1.0, 1.0, 1.0]])}
    loss = GradientLoss(operator="central")
    values = [loss(step_edge(8 + shift, size), batch).item() for shift in range(4)]
    assert values[0] == 0.0
    assert values[1] == pytest.approx(2 * 0.5 / size, rel=1e-5)
    assert values[2] == pytest.approx(4 * 0.5 / size, rel=1e-5)
    assert values[3] == pytest.approx(values[2], rel=1e-5)
    # A blurred edge at the right place (a 4-voxel ramp) is penalised too, less than a
    # sharp edge two voxels off.
    blurred = step_edge(8, size)
    blurred[..., 6:10] = torch.tensor([0.125, 0.375, 0.625, 0.875])
    assert 0.0 < loss(blurred, batch).item() < values[2]
