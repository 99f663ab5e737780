"""Rotations and intensity shifts of the device cache (flips: tests/data/test_openkbp.py)."""

import math

import pytest
import torch

from vmatdose.data.datamodule import DoseDataModule
from vmatdose.data.device_cache import DeviceBatches, rotate_about_z


def _disc(shape_yx, spacing_yx, radius_mm, centre_mm=(0.0, 0.0)) -> torch.Tensor:
    """(Y, X) float mask of a disc in patient mm around the grid's centre (+ centre_mm)."""
    ys = (torch.arange(shape_yx[0]) + 0.5 - shape_yx[0] / 2) * spacing_yx[0]
    xs = (torch.arange(shape_yx[1]) + 0.5 - shape_yx[1] / 2) * spacing_yx[1]
    y, x = torch.meshgrid(ys, xs, indexing="ij")
    return (((y - centre_mm[0]) ** 2 + (x - centre_mm[1]) ** 2) <= radius_mm ** 2).float()


def _dice(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(2 * (a * b).sum() / (a.sum() + b.sum()))


def test_a_quarter_turn_moves_every_voxel_exactly_and_zero_leaves_the_case_alone():
    volume = torch.rand(2, 3, 4, 6, 6)
    angles = torch.tensor([math.pi / 2, 0.0])
    out = rotate_about_z(volume, angles, torch.ones(2, 3), "bilinear")
    # a quarter turn maps voxel centres onto voxel centres: torch.rot90 in the (y, x) plane
    torch.testing.assert_close(out[0], torch.rot90(volume[0], 1, dims=(-2, -1)), atol=1e-5,
                               rtol=0)
    assert torch.equal(out[1], volume[1])
    masks = (volume > 0.5).to(torch.uint8)
    nearest = rotate_about_z(masks, angles, torch.ones(2, 3), "nearest")
    assert nearest.dtype == torch.uint8
    assert torch.equal(nearest[0], torch.rot90(masks[0], 1, dims=(-2, -1)))


def test_a_rotation_turns_patient_millimetres_on_anisotropic_grids():
    # 3 mm rows, 1 mm columns, a 60 x 40 mm field of view: an off-centre disc (6 mm radius,
    # 10 mm towards -x) turned by +90 degrees lands 10 mm towards +y, still a disc.
    spacing = torch.tensor([[2.0, 3.0, 1.0]])
    before = _disc((20, 40), (3.0, 1.0), 6.0, (0.0, -10.0))
    after = rotate_about_z(before[None, None, None], torch.tensor([math.pi / 2]), spacing,
                           "nearest")[0, 0, 0]
    expected = _disc((20, 40), (3.0, 1.0), 6.0, (10.0, 0.0))
    assert _dice(after, expected) > 0.85
    assert abs(float(after.sum() - before.sum())) <= 0.15 * float(before.sum())


def _sample(case_id: str) -> dict:
    disc = _disc((16, 16), (1.0, 1.0), 5.0, (0.0, 3.0))
    volume = disc[None, None].expand(1, 4, 16, 16)
    return {"ct": (0.5 * volume).half(), "masks": volume.to(torch.uint8).repeat(2, 1, 1, 1),
            "body": torch.ones(1, 4, 16, 16, dtype=torch.uint8), "dose": volume.half(),
            "prior": volume.half(), "spacing_mm": torch.tensor([2.0, 1.0, 1.0]),
            "dose_scale_gy": 70.0, "case_id": case_id}


def test_device_batches_rotate_every_volume_of_a_case_together():
    samples = [_sample("a"), _sample("b")]
    batches = DeviceBatches(samples, 2, "cpu", ["M1", "M2"],
                            augment={"rotate_deg": 90.0, "rotate_prob": 1.0}, seed=3)
    batch = next(iter(batches))
    for i in range(2):
        masks, dose, prior = batch["masks"][i], batch["dose"][i, 0], batch["prior"][i, 0]
        assert set(masks.unique().tolist()) <= {0, 1} and masks.dtype == torch.uint8
        # the disc moved off its place (angles up to 90 degrees, 3 mm off centre) ...
        assert _dice(masks[0, 0].float(), samples[i]["masks"][0, 0].float()) < 0.95
        # ... and the dose and the prior moved with the masks
        assert _dice((dose[0] > 0.5).float(), masks[0, 0].float()) > 0.9
        assert _dice((prior[0] > 0.5).float(), masks[0, 0].float()) > 0.9
    again = next(iter(DeviceBatches(samples, 2, "cpu", ["M1", "M2"],
                                    augment={"rotate_deg": 90.0, "rotate_prob": 1.0}, seed=3)))
    assert torch.equal(again["dose"], batch["dose"])
    still = next(iter(DeviceBatches(samples, 2, "cpu", ["M1", "M2"],
                                    augment={"rotate_deg": 90.0, "rotate_prob": 0.0})))
    assert torch.equal(still["masks"], torch.stack([s["masks"] for s in samples]))


def test_device_batches_shift_the_ct_by_at_most_the_offset():
    samples = [_sample(c) for c in "abcd"]
    batches = DeviceBatches(samples, 4, "cpu", ["M1", "M2"],
                            augment={"intensity_shift": 0.1, "intensity_prob": 1.0})
    ct = next(iter(batches))["ct"].float()
    offsets = (ct - samples[0]["ct"].float()).flatten(1)
    # one offset per case, within +-0.1, not all the same
    assert torch.allclose(offsets, offsets[:, :1].expand_as(offsets), atol=1e-3)
    assert offsets.abs().max() <= 0.1 + 1e-3 and offsets[:, 0].std() > 0


def test_rotated_patches_are_refused_before_the_cache_is_built(tmp_path):
    turn = {"rotate_deg": 10.0, "rotate_prob": 0.5}
    with pytest.raises(ValueError, match="rotates whole volumes only"):
        DeviceBatches([_sample("a")], 1, "cpu", ["M1", "M2"], augment=turn, patch_size=[2, 8, 8])
    with pytest.raises(ValueError, match=r"data.augment.rotate_prob=0.5 with data.patch_size"):
        DoseDataModule(str(tmp_path), structures=["M1"], targets=["M1"], device_cache=True,
                       prescriptions_gy={"M1": 60.0}, dose_scale_gy=60.0,
                       patch_size=[8, 8, 8], augment=turn)
    assert not any(tmp_path.iterdir())  # refused before anything was read or written
