"""FiLM conditioning: the vector, its transport, and a model that learns two dose levels."""

import numpy as np
import pytest
import torch
from monai.networks.nets import UNet

from vmatdose.data.case import save_case
from vmatdose.data.conditioning import condition_vector
from vmatdose.data.phantom import generate_phantom_case
from vmatdose.data.pipeline import InputSettings, build_transforms
from vmatdose.models.film import FiLMNet, conditioned_network
from vmatdose.protocol import Protocol

PROTOCOL = Protocol.load("prostate_sib")
SPEC = {"targets": list(PROTOCOL.targets), "constraints": [dict(c) for c in PROTOCOL.constraints],
        "dose_scale_gy": PROTOCOL.dose_scale_gy}
D = len(PROTOCOL.targets) + len(PROTOCOL.constraints)
SHAPE, SPACING = (16, 24, 32), (7.5, 10.0, 12.0)
LEVELS = ({"PTV70": 70.0, "PTV56": 56.0}, {"PTV70": 60.0, "PTV56": 50.0})


def tiny_unet(in_channels: int) -> UNet:
    return UNet(spatial_dims=3, in_channels=in_channels, out_channels=1, channels=(4, 8),
                strides=(2,), num_res_units=1, norm="INSTANCE")


def _around_targets(sample: dict, size=(8, 12, 16)) -> dict:
    """The sample cropped to a box centred on PTV70 (fewer voxels: a fast test)."""
    centre = torch.nonzero(sample["masks"][0] > 0.5).float().mean(0).round().long()
    box = []
    for c, s, n in zip(centre.tolist(), size, sample["masks"].shape[1:]):
        start = min(max(c - s // 2, 0), n - s)
        box.append(slice(start, start + s))
    return {**sample, **{k: sample[k][(slice(None), *box)] for k in ("image", "dose", "masks")}}


def test_vector_holds_prescription_fractions_and_normalised_limits():
    v = condition_vector({"PTV70": 60.0}, SPEC["targets"], SPEC["constraints"], 70.0)
    assert v.shape == (D,)
    assert v[:2] == pytest.approx([60 / 70, 0.0])  # PTV56 absent: 0
    limits = dict(zip([f"{c['structure']} {c['metric']}" for c in SPEC["constraints"]], v[2:]))
    assert limits["Rectum V70Gy"] == pytest.approx(0.15)  # 15 % -> 0.15
    assert limits["Femur_L Dmax"] == pytest.approx(50 / 70)  # Gy / dose scale
    stricter = condition_vector({"PTV70": 70.0, "PTV56": 56.0}, SPEC["targets"],
                                SPEC["constraints"], 70.0,
                                [{"structure": "Rectum", "metric": "V70Gy", "limit": 10.0}])
    changed = np.flatnonzero(stricter != condition_vector(
        {"PTV70": 70.0, "PTV56": 56.0}, SPEC["targets"], SPEC["constraints"], 70.0))
    assert changed.tolist() == [2 + 2] and stricter[4] == pytest.approx(0.10)


def test_film_starts_as_the_plain_network_and_reads_the_vector_through_padding():
    torch.manual_seed(0)
    net = tiny_unet(8)
    film = FiLMNet(net, D, blocks=["ResidualUnit"], probe_size=8)
    image = torch.rand(2, 8, 8, 8, 8)
    condition = torch.rand(2, D)
    planes = condition[:, :, None, None, None].expand(-1, -1, 8, 8, 8)
    with torch.no_grad():
        torch.testing.assert_close(film(torch.cat([image, planes], 1)), net(image))
        padded = torch.nn.functional.pad(torch.cat([image, planes], 1), (2, 2, 0, 0, 1, 1))
        _, read = film.split(padded)
    torch.testing.assert_close(read, condition)
    with pytest.raises(ValueError, match="conditioning channels"):
        film(image[:, :5])
    with pytest.raises(ValueError, match="no block"):
        FiLMNet(tiny_unet(8), D, blocks=["Nothing"])
    assert conditioned_network(net, "none") is net
    with pytest.raises(ValueError, match="model.conditioning"):
        conditioned_network(net, "concat")


@pytest.fixture(scope="module")
def two_level_samples(tmp_path_factory):
    """Two anatomies, each planned at 70/56 and at 60/50 Gy: only the vector tells the
    two plans of one anatomy apart."""
    folder = tmp_path_factory.mktemp("two_levels")
    transform = build_transforms(InputSettings(list(PROTOCOL.structures),
                                               PROTOCOL.dose_scale_gy, conditioning=SPEC))
    samples = []
    for seed in (11, 12):
        for k, level in enumerate(LEVELS):
            case = generate_phantom_case(seed, SHAPE, SPACING, case_id=f"p{seed}_{k}",
                                         n_beams=12, prescriptions_gy=level)
            path = save_case(case, folder / f"{k}_{seed}.npz")
            samples.append(_around_targets(transform({"path": str(path)})))
    return samples


@pytest.fixture(scope="module")
def trained_film(two_level_samples):
    torch.manual_seed(0)
    channels = two_level_samples[0]["image"].shape[0] - D
    model = FiLMNet(tiny_unet(channels), D, blocks=["ResidualUnit"], hidden=32, probe_size=8)
    image = torch.stack([s["image"] for s in two_level_samples])
    dose = torch.stack([s["dose"] for s in two_level_samples])
    target = (torch.stack([s["masks"][:2] for s in two_level_samples]) > 0.5).any(1, True)
    optimizer = torch.optim.Adam(model.parameters(), lr=0.02)
    steps = 300
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, steps)
    for _ in range(steps):
        optimizer.zero_grad()
        error = (model(image) - dose).abs()
        loss = error.mean() + (error * target).sum() / target.sum()  # the targets count twice
        loss.backward()
        optimizer.step()
        schedule.step()
    return model.eval()


def _ptv70_mean_gy(dose: torch.Tensor, sample: dict) -> float:
    mask = sample["masks"][0] > 0.5
    return float(dose[0][mask].mean()) * PROTOCOL.dose_scale_gy


@pytest.mark.slow
def test_a_film_model_predicts_each_prescription_levels_ptv_dose(two_level_samples,
                                                                  trained_film):
    for sample in two_level_samples:
        with torch.no_grad():
            pred = trained_film(sample["image"][None])[0]
        ref = _ptv70_mean_gy(sample["dose"], sample)
        assert abs(_ptv70_mean_gy(pred, sample) - ref) < 3.0, (sample["case_id"], ref)


@pytest.mark.slow
def test_changing_one_prescription_changes_the_prediction_in_the_target(two_level_samples,
                                                                         trained_film):
    sample = two_level_samples[0]  # planned at 70 Gy
    lowered = sample["image"].clone()
    lowered[-D] = 60.0 / 70.0  # only the PTV70 slot
    with torch.no_grad():
        at_70 = trained_film(sample["image"][None])[0]
        at_60 = trained_film(lowered[None])[0]
    drop = _ptv70_mean_gy(at_70, sample) - _ptv70_mean_gy(at_60, sample)
    assert drop > 5.0, drop
