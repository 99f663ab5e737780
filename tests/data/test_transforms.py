import json

import numpy as np
import pytest
import torch

from vmatdose.data.case import save_case
from vmatdose.data.datamodule import DoseDataModule, make_split, read_split, train_on
from vmatdose.data.geometry import signed_distance_mm
from vmatdose.data.pipeline import InputSettings, SamplingSettings, build_transforms
from vmatdose.data.transforms import PoolGridsd, RandFlipLeftRightd, pool_grid_offsets

from conftest import make_box_case

STRUCTURES = ["PTV70", "PTV56", "Rectum", "Bladder"]


def test_signed_distance_is_negative_inside_positive_outside_in_mm():
    mask = np.zeros((9, 9, 21), np.uint8)
    mask[:, :, :10] = 1  # boundary between x=9 and x=10
    sdf = signed_distance_mm(mask, (1.0, 1.0, 2.0))
    assert sdf[4, 4, 9] == pytest.approx(-2.0)  # last inside voxel: 1 voxel (2 mm) to outside
    assert sdf[4, 4, 10] == pytest.approx(2.0)  # first outside voxel
    assert sdf[4, 4, 15] == pytest.approx(12.0)  # 6 voxels x 2 mm
    assert sdf[4, 4, 0] == pytest.approx(-20.0)


def test_sample_has_documented_keys_shapes_and_scaling(tmp_path, box_case):
    path = save_case(box_case, tmp_path / "box.npz")
    sample = build_transforms(InputSettings(STRUCTURES, 70.0, signed_distance=True))(
        {"path": str(path)})
    shape = box_case.shape
    assert sample["image"].shape == (1 + 4 + 4, *shape)
    assert sample["dose"].shape == (1, *shape) and sample["body"].shape == (1, *shape)
    assert float(sample["dose"].max()) == pytest.approx(1.0)  # 70 Gy / 70 Gy
    assert float(sample["image"][0].min()) >= 0 and float(sample["image"][0].max()) <= 1
    # Bladder is absent from the case: an all-zero mask channel, not a crash.
    assert float(sample["masks"][3].sum()) == 0
    torch.testing.assert_close(sample["masks"][2], torch.as_tensor(box_case.masks[2],
                                                                  dtype=torch.float32))
    assert sample["case_id"] == "box"


def test_training_transform_pads_whole_volumes_to_divisible(tmp_path, box_case):
    path = save_case(box_case, tmp_path / "box.npz")
    sample = build_transforms(InputSettings(STRUCTURES, 70.0), SamplingSettings(divisible_by=8))(
        {"path": str(path)})
    assert all(s % 8 == 0 for s in sample["image"].shape[1:])


def test_patches_have_the_configured_size(tmp_path, box_case):
    path = save_case(box_case, tmp_path / "box.npz")
    sample = build_transforms(InputSettings(STRUCTURES, 70.0),
                              SamplingSettings(patch_size=(8, 12, 16)))(
        {"path": str(path)})
    assert tuple(sample["image"].shape[1:]) == (8, 12, 16)


def test_left_right_flip_mirrors_x_and_swaps_paired_structures():
    structures = ["PTV70", "Femur_L", "Femur_R"]
    masks = torch.zeros(3, 2, 2, 6)
    masks[1, :, :, 0] = 1  # left femur at x=0
    flip = RandFlipLeftRightd(["masks", "dose"], structures, [["Femur_L", "Femur_R"]], prob=1.0)
    dose = torch.arange(6.0).expand(1, 2, 2, 6)
    out = flip({"masks": masks, "dose": dose})
    assert out["dose"][0, 0, 0, 0] == 5.0  # mirrored along x
    # The mirrored left femur now lies at x=5 and is labelled as the right femur.
    assert out["masks"][2, :, :, 5].sum() == 4 and out["masks"][1].sum() == 0


def test_split_is_seeded_disjoint_and_complete():
    ids = [f"c{i:02d}" for i in range(16)]
    split = make_split(ids, 0.125, 0.125, seed=3)
    assert split == make_split(ids, 0.125, 0.125, seed=3)
    assert split != make_split(ids, 0.125, 0.125, seed=4)
    assert (len(split["train"]), len(split["val"]), len(split["test"])) == (12, 2, 2)
    assert sorted(split["train"] + split["val"] + split["test"]) == ids


def test_datamodule_writes_split_and_reads_a_given_one(tmp_path):
    cases = tmp_path / "cases"
    for i in range(4):
        save_case(make_box_case(case_id=f"c{i}"), cases / f"c{i}.npz")
    kwargs = dict(structures=STRUCTURES, targets=["PTV70"], prescriptions_gy={"PTV70": 70.0},
                  dose_scale_gy=70.0, split={"val_fraction": 0.25, "test_fraction": 0.25})
    dm = DoseDataModule(str(cases), split_output=str(tmp_path / "split.json"), **kwargs)
    dm.setup()
    written = json.loads((tmp_path / "split.json").read_text())
    assert written == dm.split and len(written["test"]) == 1
    given = {"train": ["c0", "c1"], "val": ["c2"], "test": ["c3"]}
    (tmp_path / "given.json").write_text(json.dumps(given))
    dm2 = DoseDataModule(str(cases), **{**kwargs, "split": {"file": str(tmp_path / "given.json")}})
    assert [p.stem for p in dm2.paths_of("test")] == ["c3"]
    batch = next(iter(dm2.train_dataloader()))
    assert batch["image"].shape[0] == 2 and batch["dose"].ndim == 5


def test_train_on_adds_the_named_splits_to_train_once_and_keeps_the_others():
    split = {"train": ["a", "b"], "val": ["c"], "test": ["c", "d"]}
    assert train_on(split, ["train"]) == split
    assert train_on(split, ["train", "val"]) == {"train": ["a", "b", "c"], "val": ["c"],
                                                 "test": ["c", "d"]}
    assert train_on(split, ["train", "val", "test"])["train"] == ["a", "b", "c", "d"]


def test_datamodule_trains_on_the_validation_cases_when_told_and_says_so(tmp_path, caplog):
    cases = tmp_path / "cases"
    for i in range(4):
        save_case(make_box_case(case_id=f"c{i}"), cases / f"c{i}.npz")
    given = {"train": ["c0", "c1"], "val": ["c2"], "test": ["c3"]}
    (tmp_path / "given.json").write_text(json.dumps(given))
    dm = DoseDataModule(str(cases), structures=STRUCTURES, targets=["PTV70"],
                        prescriptions_gy={"PTV70": 70.0}, dose_scale_gy=70.0,
                        split={"file": str(tmp_path / "given.json"), "train_on": ["train", "val"]},
                        split_output=str(tmp_path / "split.json"))
    with caplog.at_level("WARNING"):
        dm.setup()
    assert [p.stem for p in dm.paths_of("train")] == ["c0", "c1", "c2"]
    assert [p.stem for p in dm.paths_of("val")] == ["c2"]
    assert json.loads((tmp_path / "split.json").read_text())["train"] == ["c0", "c1", "c2"]
    assert "in-sample" in caplog.text
    assert len(dm.dataset("train")) == 3


def test_split_file_naming_unknown_cases_is_an_error(tmp_path):
    (tmp_path / "s.json").write_text(json.dumps({"train": ["x"], "val": [], "test": []}))
    with pytest.raises(ValueError, match=r"s\.json.*no case file"):
        read_split(tmp_path / "s.json", ["a", "b"])


def test_left_right_flip_swaps_the_priors_gantry_sectors():
    prior = torch.arange(5.0)[:, None, None, None] * torch.ones(5, 1, 1, 3)
    prior[:, :, :, 0] += 10.0  # x = 0 is marked
    flip = RandFlipLeftRightd(["prior"], [], [], prob=1.0, prior_permutation=[0, 1, 4, 3, 2])
    out = flip({"prior": prior})["prior"]
    # channel k now holds sector -k, mirrored: the mark lies at x = 2
    assert out[:, 0, 0, 2].tolist() == [10.0, 11.0, 14.0, 13.0, 12.0]
    assert out[:, 0, 0, 0].tolist() == [0.0, 1.0, 4.0, 3.0, 2.0]


def test_pool_grid_offsets_start_on_the_inference_grid_and_spread_over_the_axes():
    assert pool_grid_offsets(2, 8) == [(0, 0, 0), (1, 1, 1), (0, 0, 1), (1, 1, 0),
                                       (0, 1, 0), (1, 0, 1), (0, 1, 1), (1, 0, 0)]
    assert pool_grid_offsets(3, 2) == [(0, 0, 0), (1, 1, 1)]
    assert len(set(pool_grid_offsets(3, 27))) == 27
    with pytest.raises(ValueError, match="pooling by 2 has 8"):
        pool_grid_offsets(2, 9)


def test_pool_grids_move_a_slab_by_half_a_coarse_voxel():
    slab = torch.zeros(1, 8, 4, 4)
    slab[:, 2:4] = 1.0  # case voxels 2-3 along z: coarse voxel 1 on the first grid
    ramp = torch.arange(8.0).view(1, 1, 1, 8).expand(1, 4, 4, 8).clone()
    out = PoolGridsd(["masks", "ct"], factor=2, grids=2)({"masks": slab, "ct": ramp})
    assert tuple(out["masks"].shape) == (2, 1, 4, 2, 2)
    torch.testing.assert_close(out["masks"][0, 0, :, 0, 0], torch.tensor([0.0, 1.0, 0.0, 0.0]))
    # one case voxel further: half the slab in coarse voxel 0, half in 1
    torch.testing.assert_close(out["masks"][1, 0, :, 0, 0], torch.tensor([0.5, 0.5, 0.0, 0.0]))
    # x = 0..7 pooled in pairs: 0.5, 2.5, ... on the first grid; 1.5, ... on the second,
    # the last pair 6.5 -> 7 (the far border repeated)
    torch.testing.assert_close(out["ct"][0, 0, 0, 0], torch.tensor([0.5, 2.5, 4.5, 6.5]))
    torch.testing.assert_close(out["ct"][1, 0, 0, 0], torch.tensor([1.5, 3.5, 5.5, 7.0]))


def test_pool_grids_by_three_average_the_windows_one_voxel_on():
    ramp = torch.arange(9.0).view(1, 1, 1, 9).expand(1, 3, 3, 9).clone()
    out = PoolGridsd(["ct"], factor=3, grids=2)({"ct": ramp})["ct"]
    assert tuple(out.shape) == (2, 1, 1, 1, 3)
    torch.testing.assert_close(out[0].flatten(), torch.tensor([1.0, 4.0, 7.0]))
    torch.testing.assert_close(out[1].flatten(), torch.tensor([2.0, 5.0, 23.0 / 3.0]))
