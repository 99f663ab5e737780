"""The pipeline split into stages gives the very samples of the one-function version.

The fingerprints below were computed with the pipeline as it was before
``vmatdose.data.pipeline`` existed (``build_transforms`` with 20 keyword arguments, commit
3a883aa), on the box cases of ``conftest.make_box_case``: same seed -> the same bytes, so
the steps, their dtypes and the order of their random draws are unchanged.
"""

import hashlib

import pytest
import torch

from vmatdose.data.case import save_case
from vmatdose.data.datamodule import DoseDataModule
from vmatdose.data.pipeline import InputSettings, SamplingSettings, build_transforms

from conftest import make_box_case

STRUCTURES = ["PTV70", "PTV56", "Rectum", "Femur_L", "Femur_R"]
AUGMENT = dict(flip_lr=0.5, flip_ap=0.5, flip_si=0.5, intensity_shift=0.1, intensity_prob=0.5)
DATA = dict(structures=STRUCTURES, targets=["PTV70", "PTV56"],
            prescriptions_gy={"PTV70": 70.0, "PTV56": 56.0}, dose_scale_gy=70.0,
            split={"val_fraction": 0.34, "test_fraction": 0.0},
            lr_pairs=[["Femur_L", "Femur_R"]], batch_size=2, augment=AUGMENT)
PRIOR = {"kind": "distance", "distance_mm": [0.0, 10.0, 30.0], "relative_dose": [1.0, 0.6, 0.1]}
CONFIGS = {
    "dose_patches": dict(patch_size=[8, 8, 8], patch_sampling="dose", dose_patch_fraction=0.5,
                         signed_distance=True, prior_dose=PRIOR, cache=False),
    "whole_compact": dict(compact=True, divisible_by=8, cache=False),
    "device_cache": dict(device_cache=True, patch_size=[8, 8, 8]),
}
#: sha256[:16] of the first training batch's tensors (seed 7), by the original pipeline.
EXPECTED_TRAIN = {
    "dose_patches": {"image": "d3f271bdbb9eeed3", "dose": "c40dd476a0f1def6",
                     "masks": "53e60d65984e4006", "body": "50146b5d405ecf55"},
    "whole_compact": {"image": "2f594d365ce2d576", "dose": "7ebad0cfaed7258e",
                      "masks": "8266be0cc244e890", "body": "322d046e35a1ef81"},
    # the image since the device cache shifts the CT's intensity as the loader does
    "device_cache": {"image": "c35914256fcd813f", "dose": "2d43aabfe21cea5c",
                     "masks": "6f22dc37527083c9", "body": "f3ef28fa8f54bd05"},
}
#: The validation sample (no randomness): dtypes and bytes of the cached and float forms.
EXPECTED_VAL = {
    "dose_patches": {"image": ("torch.float32", "37713300ef6f394c"),
                     "dose": ("torch.float32", "74750e32fc181de0")},
    "whole_compact": {"ct": ("torch.float16", "0f915cc27c7261de"),
                      "masks": ("torch.uint8", "80fc68ae5c723412"),
                      "body": ("torch.uint8", "29b396d84d14b1cf")},
}


def _sha(tensor: torch.Tensor) -> str:
    return hashlib.sha256(tensor.contiguous().numpy().tobytes()).hexdigest()[:16]


@pytest.fixture(scope="module")
def cases(tmp_path_factory):
    folder = tmp_path_factory.mktemp("cases")
    for i in range(3):
        save_case(make_box_case(case_id=f"c{i}"), folder / f"c{i}.npz")
    return folder


def _first_batches(cases, **config) -> tuple[dict, dict]:
    torch.manual_seed(7)
    dm = DoseDataModule(str(cases), **{**DATA, **config})
    dm.setup()
    train = dm.device_batches("cpu") if dm.device_cache else dm.train_dataloader()
    batch = dm.on_after_batch_transfer(next(iter(train)), 0)
    return batch, next(iter(dm.val_dataloader()))


@pytest.mark.parametrize("name", list(CONFIGS))
def test_same_seed_gives_the_batches_of_the_original_pipeline(cases, name):
    batch, val = _first_batches(cases, **CONFIGS[name])
    assert batch["case_id"] == ["c1", "c0"] and val["case_id"] == ["c2"]
    assert {k: _sha(batch[k]) for k in EXPECTED_TRAIN[name]} == EXPECTED_TRAIN[name]
    assert all(batch[k].dtype == torch.float32 for k in EXPECTED_TRAIN[name])
    expected_val = EXPECTED_VAL.get(name, {})
    assert {k: (str(val[k].dtype), _sha(val[k])) for k in expected_val} == expected_val


def test_pooled_rotated_patches_match_the_original_pipeline(cases):
    # Interpolated (rotation): sums, not bytes, so another CPU's rounding still passes.
    batch, _ = _first_batches(cases, compact=True, resolution_factor=2, patch_size=[4, 4, 4],
                              augment={**AUGMENT, "rotate_deg": 10, "rotate_prob": 0.5},
                              cache=False)
    sums = {k: float(batch[k].double().sum()) for k in ("image", "dose", "masks", "body")}
    assert sums == pytest.approx({"image": 62.47442, "dose": 31.302564, "masks": 24.375,
                                  "body": 104.0}, rel=1e-5)
    assert tuple(batch["image"].shape) == (2, 6, 4, 4, 4)
    torch.testing.assert_close(batch["spacing_mm"][0], torch.tensor([4.0, 5.0, 6.0]))


def test_settings_refuse_what_the_pipeline_cannot_do():
    with pytest.raises(ValueError, match="patch_sampling must be one of"):
        SamplingSettings(patch_sampling="random")
    with pytest.raises(ValueError, match="prior_dose needs prescriptions_gy"):
        InputSettings(STRUCTURES, 70.0, prior_dose=PRIOR)
    conditioned = InputSettings(STRUCTURES, 70.0, conditioning={"targets": ["PTV70"]})
    with pytest.raises(ValueError, match="model.conditioning needs data.compact=false"):
        build_transforms(conditioned, compact=True)
    sectors = InputSettings(STRUCTURES, 70.0, prior_dose={"kind": "beams", "beam_sectors": 4},
                            prescriptions_gy={"PTV70": 70.0})
    assert sectors.prior_lr_permutation == [0, 1, 4, 3, 2]
    for moves_beams in ({"flip_ap": 0.5}, {"rotate_deg": 10, "rotate_prob": 0.5}):
        with pytest.raises(ValueError, match=f"data.augment.{list(moves_beams)[-1]}="):
            build_transforms(sectors, SamplingSettings(augment=moves_beams))
    # a left/right or superior/inferior mirror keeps coplanar beams on their sectors
    build_transforms(sectors, SamplingSettings(augment={"flip_lr": 0.5, "flip_si": 0.5}))


def test_training_settings_decide_the_random_steps():
    inputs = InputSettings(STRUCTURES, 70.0)
    names = [type(t).__name__ for t in build_transforms(inputs).transforms]
    assert not any(n.startswith("Rand") or n.endswith("Pad") for n in names)
    train = build_transforms(inputs, SamplingSettings(patch_size=[8, 8, 8], lr_pairs=[
        ["Femur_L", "Femur_R"]], augment=AUGMENT, patch_sampling="dose"))
    names = [type(t).__name__ for t in train.transforms]
    assert names[names.index("ScaleIntensityRanged") + 1:names.index("EnsureTyped", 2)] == [
        "RandFlipLeftRightd", "RandFlipd", "RandFlipd", "RandShiftIntensityd", "SpatialPadd",
        "RandDoseCropd"]


def test_cases_pooled_on_two_grids_train_on_both_and_validate_on_the_first(cases):
    torch.manual_seed(7)
    one = DoseDataModule(str(cases), **{**DATA, "augment": {}, "device_cache": True,
                                         "resolution_factor": 2})
    one.setup()
    two = DoseDataModule(str(cases), **{**DATA, "augment": {"pool_grids": 2},
                                         "device_cache": True, "resolution_factor": 2})
    two.setup()
    plain, grids = one.device_batches("cpu"), two.device_batches("cpu")
    assert (plain.grids, grids.grids) == (1, 2)
    # grid 0 is the one pooling of validation and inference, to the byte
    for key in ("ct", "masks", "body", "dose"):
        assert torch.equal(grids.volumes[key][:, 0], plain.volumes[key][:, 0])
    # grid 1 starts one case voxel further along each axis: the same body, moved by a
    # fraction of a coarse voxel (its mean dose over the body stays the case's)
    assert not torch.equal(grids.volumes["body"][:, 1], grids.volumes["body"][:, 0])
    drawn = set()
    for _ in range(8):
        batch = next(iter(grids))
        for i, case in enumerate(batch["case_id"]):
            row = grids.case_ids.index(case)
            drawn |= {g for g in range(2)
                      if torch.equal(batch["body"][i], grids.volumes["body"][row, g])}
    assert drawn == {0, 1}
    assert two.dataset("val")[0]["ct"].ndim == 4  # validation samples keep one grid


def test_pool_grids_are_refused_where_they_cannot_be_built(tmp_path):
    for config, problem in (
            (dict(device_cache=True, resolution_factor=2, augment={"pool_grids": 9}),
             r"pool_grids=9: must be an integer from 1 to data.resolution_factor\^3 = 8"),
            (dict(device_cache=True, augment={"pool_grids": 2}), r"from 1 to .* = 1"),
            (dict(resolution_factor=2, augment={"pool_grids": 2}),
             "needs data.device_cache=true")):
        with pytest.raises(ValueError, match=problem):
            DoseDataModule(str(tmp_path), **{**DATA, **config})
    assert not any(tmp_path.iterdir())  # refused before anything was read or written


def test_a_device_cache_over_the_budget_is_refused_before_a_case_is_read(cases):
    config = {**DATA, "augment": {"pool_grids": 2}, "device_cache": True,
              "resolution_factor": 2}
    data = DoseDataModule(str(cases), **config)
    data.setup()
    # 2 training cases of 16 x 20 x 24 pooled to 8 x 10 x 12, on 2 grids, 2 bytes for
    # each of CT, dose, 5 mask and 1 body fractions
    assert data.device_cache_estimate_gb() == pytest.approx(2 * 960 * 2 * 16 / 1e9)
    tight = DoseDataModule(str(cases), **config, cache_budget_gb=5e-5)
    tight.setup()
    with pytest.raises(ValueError, match=r"about 6.14e-05 GB .*pool_grids=2\), over "
                                         r"data.cache_budget_gb=5e-05"):
        tight.device_batches("cpu")
    assert "train" not in tight._datasets  # nothing read
    DoseDataModule(str(cases), **config, cache_budget_gb=1e-4).device_batches("cpu")
