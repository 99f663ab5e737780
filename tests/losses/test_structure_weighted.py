"""Structure-weighted loss: the configured weight in every region, bands in mm."""

import itertools

import numpy as np
import pytest
import torch

from vmatdose.losses import StructureWeightedLoss
from vmatdose.losses.structure_weighted import distance_to_surface_mm, surface_voxels

from loss_testing import STRUCTURES, TARGETS, box_batch


def brute_force_band(masks: np.ndarray, spacing, band_mm: float) -> np.ndarray:
    """Voxels within band_mm (Euclidean, in mm) of a boundary voxel of any mask, where a
    boundary voxel is inside its mask with a 6-neighbour outside it (inside the grid)."""
    shape = masks.shape[1:]
    boundary = []
    for mask in masks:
        for idx in zip(*np.nonzero(mask)):
            for axis, step in itertools.product(range(3), (-1, 1)):
                n = list(idx)
                n[axis] += step
                if 0 <= n[axis] < shape[axis] and not mask[tuple(n)]:
                    boundary.append(idx)
                    break
    grid = np.stack(np.meshgrid(*[np.arange(s) for s in shape], indexing="ij"), -1)
    points = np.asarray(boundary, float) * spacing
    d = np.linalg.norm(grid[..., None, :] * spacing - points, axis=-1).min(-1)
    return d <= band_mm


def loss_with(**kwargs) -> StructureWeightedLoss:
    return StructureWeightedLoss(STRUCTURES, TARGETS, **kwargs)


@pytest.mark.parametrize("spacing, numbers", [
    ((3.0, 2.0, 2.0), (2.0, 1.5, 0.5, 0.0)),  # the numbers
    ((2.0, 2.0, 5.0), (2.0, 1.5, 0.5, 0.0)),
    ((3.0, 2.0, 2.0), (5.0, 3.0, 0.25, 0.1)),  # other numbers, outside the body included
])
def test_weights_equal_the_configured_numbers_in_each_region(spacing, numbers):
    target_w, band_w, body_w, outside_w = numbers
    batch = box_batch(n_cases=2, size=16, spacing=spacing)
    loss = loss_with(target_weight=target_w, band_weight=band_w, band_mm=4.0,
                     body_weight=body_w, outside_weight=outside_w)
    weights = loss.weight_map(batch)[0, 0].numpy()
    masks = batch["masks"][0].numpy() > 0
    body = batch["body"][0, 0].numpy() > 0
    target = masks[0] | masks[1]
    band = brute_force_band(masks[2:], np.asarray(spacing), 4.0)
    assert np.all(weights[~body] == np.float32(outside_w))
    assert np.all(weights[body & target] == np.float32(target_w))
    assert np.all(weights[body & ~target & band] == np.float32(band_w))
    assert np.all(weights[body & ~target & ~band] == np.float32(body_w))
    # each region is really there
    assert (body & ~target & band).sum() > 50 and (body & ~target & ~band).sum() > 50
    assert torch.equal(loss.weight_map(batch)[1], loss.weight_map(batch)[0])


def test_band_follows_anisotropic_spacing():
    mask = np.zeros((1, 9, 9, 21), bool)
    mask[0, 4, 4, 10] = True  # one voxel: it is its own surface
    wide = distance_to_surface_mm(mask, (1.0, 1.0, 1.0)) <= 3.0
    coarse_x = distance_to_surface_mm(mask, (1.0, 1.0, 2.0)) <= 3.0
    assert wide[4, 4].sum() == 7 and coarse_x[4, 4].sum() == 3  # x: +-3 voxels vs +-1
    assert wide[:, 4, 10].sum() == coarse_x[:, 4, 10].sum() == 7  # z unchanged
    assert surface_voxels(np.zeros((2, 4, 4, 4), bool)).sum() == 0
    assert np.isinf(distance_to_surface_mm(np.zeros((1, 4, 4, 4), bool), (1, 1, 1))).all()


def test_surface_ignores_the_volume_edge():
    mask = np.zeros((1, 6, 6, 6), bool)
    mask[0, :3] = True  # a slab touching the z = 0 edge of the grid
    surface = surface_voxels(mask)
    assert surface[2].all() and not surface[:2].any()


def test_loss_is_the_weighted_mean_error():
    batch = box_batch(n_cases=1)
    loss = loss_with(target_weight=2.0, band_weight=1.5, band_mm=4.0, body_weight=0.5)
    assert loss(batch["dose"], batch).item() == 0.0
    weights = loss.weight_map(batch)
    outside_only = batch["dose"] + 0.3 * (1 - batch["body"])
    assert loss(outside_only, batch).item() == 0.0
    target = batch["masks"][:, :2].sum(dim=1, keepdim=True)
    pred = (batch["dose"] + 0.1 * target).requires_grad_()
    value = loss(pred, batch)
    expected = (2.0 * 0.1 * target.sum() / weights.sum()).item()
    assert value.item() == pytest.approx(expected, rel=1e-5)
    value.backward()
    assert torch.isfinite(pred.grad).all()
    assert pred.grad[target.bool()].unique().tolist() == pytest.approx(
        [2.0 / weights.sum().item()])
    assert (pred.grad[batch["body"] == 0] == 0).all()


def test_mse_kind_and_validation():
    batch = box_batch(n_cases=1)
    pred = batch["dose"] + 0.2 * batch["body"]
    l1 = loss_with(kind="l1")(pred, batch).item()
    mse = loss_with(kind="mse")(pred, batch).item()
    assert l1 == pytest.approx(0.2, rel=1e-5) and mse == pytest.approx(0.04, rel=1e-5)
    with pytest.raises(ValueError, match="not in structures"):
        StructureWeightedLoss(STRUCTURES, ["CTV"])
    with pytest.raises(ValueError, match="non-negative"):
        loss_with(band_weight=-1.0)


def test_an_error_costs_by_the_region_it_falls_in():
    # The same 0.1 error on one voxel of each region: the loss is proportional to that
    # region's configured weight (target 2 : band 1.5 : rest of body 0.5 : outside 0).
    batch = box_batch(n_cases=1, size=16)
    loss = loss_with(target_weight=2.0, band_weight=1.5, band_mm=4.0, body_weight=0.5)
    weights = loss.weight_map(batch)
    values = {}
    for w in (2.0, 1.5, 0.5, 0.0):
        index = tuple(torch.nonzero(weights == w)[0].tolist())
        pred = batch["dose"].clone()
        pred[index] += 0.1
        values[w] = loss(pred, batch).item()
    total = weights.sum().item()
    assert values == pytest.approx({w: 0.1 * w / total for w in values}, rel=1e-5)
