"""The body's box (``model.body_crop_margin``): exact boxes, the same loss and the same
prediction inside the body as on whole volumes for a network that sees each voxel alone,
and the settings it needs refused without them."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from vmatdose.inference.body_crop import body_box, crop, crop_batch, place
from vmatdose.inference.volume import VolumeInference
from vmatdose.losses import CompositeLoss
from vmatdose.losses.voxel import VoxelLoss
from vmatdose.training.module import DoseModule


def body_at(shape, *boxes) -> torch.Tensor:
    """(B, 1, *shape) zeros with ones in each case's (z, y, x) slices."""
    body = torch.zeros(len(boxes), 1, *shape)
    for i, box in enumerate(boxes):
        body[(i, 0, *box)] = 1
    return body


def pointwise(channels: int) -> nn.Module:
    """A network that sees each voxel alone: cropping cannot change what it predicts."""
    net = nn.Conv3d(channels, 1, kernel_size=1)
    with torch.no_grad():  # positive, so no dose is clipped at zero
        net.weight.copy_(torch.linspace(0.2, 1.0, channels).view(1, channels, 1, 1, 1))
        net.bias.fill_(0.1)
    return net


def test_the_box_is_the_body_grown_rounded_up_centred_and_inside_the_grid():
    body = body_at((32, 32, 32), (slice(10, 14), slice(0, 3), slice(20, 32)))
    # z 10-13 +-2 -> 8..16 (8 wide); y 0-2 +-2 -> -2..5, 8 wide, shifted to 0;
    # x 20-31 +-2 -> 18..34, 16 wide, shifted to end at 32
    assert body_box(body, 2, 8) == (slice(8, 16), slice(0, 8), slice(16, 32))
    # odd extra: 7 wide z (10-14 +-1) -> 8, the extra voxel after
    assert body_box(body_at((32,) * 3, (slice(10, 15), slice(8, 9), slice(8, 9))), 1, 8) \
        == (slice(9, 17), slice(5, 13), slice(5, 13))


def test_the_box_holds_every_case_of_the_batch_and_whole_axes_stay_whole():
    body = body_at((30, 32, 32), (slice(0, 4), slice(4, 6), slice(4, 6)),
                   (slice(20, 30), slice(20, 22), slice(4, 6)))
    # z 0-29 needs 32 > 30: the whole axis; y 4..22 = 18 -> 24 wide, x 4..6 -> 8, centred
    assert body_box(body, 0, 8) == (slice(0, 30), slice(1, 25), slice(1, 9))
    assert body_box(torch.zeros(1, 1, 16, 16, 16), 2, 8) is None  # no body
    assert body_box(body_at((16,) * 3, (slice(1, 15),) * 3), 2, 8) is None  # the whole grid


def test_crop_keeps_the_memory_format_and_place_puts_back_into_zeros():
    volume = torch.rand(2, 3, 16, 16, 16).contiguous(memory_format=torch.channels_last_3d)
    box = (slice(0, 8), slice(4, 12), slice(8, 16))
    cut = crop(volume, box)
    assert cut.shape == (2, 3, 8, 8, 8) and cut.is_contiguous(
        memory_format=torch.channels_last_3d)
    assert crop(volume.contiguous(), box).is_contiguous()
    back = place(cut, box, (16, 16, 16))
    torch.testing.assert_close(back[(slice(None), slice(None), *box)], volume[..., 0:8, 4:12,
                                                                               8:16])
    assert float(back.sum()) == pytest.approx(float(cut.sum()))
    batch = {"image": volume, "body": volume[:, :1], "dose_scale_gy": torch.ones(2),
             "cond": torch.ones(2, 4), "case_id": ["a", "b"]}
    out = crop_batch(batch, box)
    assert out["image"].shape[2:] == out["body"].shape[2:] == (8, 8, 8)
    assert out["cond"] is batch["cond"] and out["case_id"] == ["a", "b"]


@pytest.mark.parametrize("factor", [1, 2])
def test_a_voxelwise_network_predicts_the_same_inside_the_body_cropped_or_whole(factor):
    image = torch.rand(1, 3, 32, 32, 32, generator=torch.Generator().manual_seed(1))
    body = body_at((32, 32, 32), (slice(6, 15), slice(9, 20), slice(3, 12)))
    net = pointwise(3)
    seen = []
    net.register_forward_hook(lambda _m, args, _o: seen.append(tuple(args[0].shape[2:])))
    settings = dict(divisible_by=4, resolution_factor=factor, zero_outside_body=True,
                    tta="flips", tta_axes=[-3], max_relative_dose=None)
    with torch.no_grad():
        whole, _ = VolumeInference(**settings).predict(image, body, lambda x: (net(x), None))
        cut, _ = VolumeInference(**settings, body_crop_margin=1).predict(
            image, body, lambda x: (net(x), None))
    torch.testing.assert_close(cut, whole)
    assert float(whole.abs().sum()) > 0
    grid = 32 // factor
    assert seen[:2] == [(grid,) * 3] * 2  # whole volumes, then boxes smaller on every axis
    assert all(s < grid for s in seen[2]) and len(seen) == 4


def l1_module(**kwargs) -> DoseModule:
    loss = CompositeLoss({"voxel": {"weight": 1.0, "term": VoxelLoss(kind="l1", in_body=True)}})
    module = DoseModule(pointwise(2), loss, torch.optim.SGD, loss_in_body=True,
                        zero_outside_body=True, divisible_by=8, **kwargs)
    module.log = lambda *a, **k: None
    return module


def test_the_training_loss_is_the_same_cropped_or_whole():
    gen = torch.Generator().manual_seed(2)
    body = body_at((32, 32, 32), (slice(4, 12), slice(10, 20), slice(0, 5)),
                   (slice(8, 14), slice(12, 22), slice(2, 9)))
    batch = {"image": torch.rand(2, 2, 32, 32, 32, generator=gen),
             "dose": torch.rand(2, 1, 32, 32, 32, generator=gen), "body": body}
    whole, cropped = l1_module(), l1_module(body_crop_margin=2)
    seen = []
    cropped.net.register_forward_hook(lambda _m, args, _o: seen.append(args[0].shape[2:]))
    torch.testing.assert_close(cropped.training_step(batch, 0), whole.training_step(batch, 0))
    # z 4..14 +-2 -> 16, y 10..22 +-2 -> 16, x 0..9 +-2 -> 16 (shifted to 0)
    assert seen == [(16, 16, 16)]


def test_a_crop_margin_needs_the_loss_and_the_dose_inside_the_body():
    with pytest.raises(ValueError, match="body_crop_margin=2: needs model.loss_in_body=true"):
        DoseModule(pointwise(1), None, torch.optim.SGD, body_crop_margin=2,
                   zero_outside_body=True)
    with pytest.raises(ValueError, match=r"body_crop_margin=-1: must be an integer >= 0"):
        VolumeInference(body_crop_margin=-1)
    with pytest.raises(ValueError, match="needs a body in every batch"):
        l1_module(body_crop_margin=1).training_step(
            {"image": torch.rand(1, 2, 8, 8, 8), "dose": torch.rand(1, 1, 8, 8, 8)}, 0)
