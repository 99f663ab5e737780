"""The predictor refuses cases that do not match its checkpoint, and resamples cases at
another voxel spacing onto the training spacing and back."""

from __future__ import annotations

import numpy as np
import pytest
from monai.transforms import Resize

from vmatdose.config_schema import ConfigValueError
from vmatdose.data.validation import CaseSetError, SpacingRange
from vmatdose.inference import Predictor

from case_variants import as_head_and_neck, first_case, upsampled, with_spacing, write
from conftest import last_line, run_main


@pytest.fixture(scope="module")
def phantom(trained_run):
    root, _, ckpt = trained_run
    return ckpt, first_case(root / "data" / "phantom_smoke")


def test_prostate_checkpoint_refuses_head_and_neck_cases(phantom, tmp_path):
    ckpt, case = phantom
    path = write(as_head_and_neck(case), tmp_path / "hn")
    result = run_main("vmatdose.predict", f"ckpt_path={ckpt}", f"cases_dir={tmp_path / 'hn'}",
                     f"output_dir={tmp_path / 'pred'}", "accelerator=cpu", cwd=tmp_path)
    assert result.returncode == 1
    line = last_line(result.stdout)
    assert line.startswith(f"error: 1 case file not matching the checkpoint: {path}: ")
    assert "case protocol 'head_neck' differs from 'prostate_sib'" in line
    assert "structures ['PTV63', 'SpinalCord', 'Brainstem', 'LeftParotid', 'RightParotid', " \
           "'Mandible'] are not among the prostate_sib channels" in line
    assert "missing required target PTV56" in line
    assert not (tmp_path / "pred").exists() or not list((tmp_path / "pred").iterdir())


def test_other_spacing_is_refused_by_choice(phantom, tmp_path):
    ckpt, case = phantom
    path = write(with_spacing(case, [2.5, 2.0, 1.75], "fine"), tmp_path)
    predictor = Predictor.from_checkpoint(ckpt, "cpu", spacing_mismatch="refuse")
    with pytest.raises(CaseSetError) as err:
        next(predictor.predict_all([path]))
    assert str(err.value) == (
        f"1 case file not matching the checkpoint: {path}: voxel spacing 2.5x2x1.75 mm "
        "differs by more than 10% from the training spacing 4x8x12 mm")


def test_other_spacing_is_resampled_and_the_dose_put_back_on_the_case_grid(phantom, tmp_path):
    ckpt, case = phantom
    predictor = Predictor.from_checkpoint(ckpt, "cpu", spacing_mismatch="resample")
    coarse = predictor.predict(write(case, tmp_path)).dose_gy
    fine_case = upsampled(case, 2)
    fine = predictor.predict(write(fine_case, tmp_path)).dose_gy
    assert fine.shape == fine_case.shape == tuple(2 * s for s in case.shape)
    # The same anatomy on a 2x finer grid: resampled to the training spacing it is the
    # training-spacing case again (repeated voxels averaged back, masks picked), so the
    # prediction is the coarse one, interpolated trilinearly onto the fine grid.
    expected = np.asarray(Resize(fine.shape, mode="trilinear")(coarse[None]))[0]
    np.testing.assert_allclose(fine, expected, atol=1e-3 * coarse.max())
    # Predicted at its own spacing (no resampling) the same model gives another dose.
    native = Predictor(predictor.module, predictor.contract)
    native.spacing = SpacingRange.of([fine_case.spacing_mm])
    unresampled = native.predict(tmp_path / f"{fine_case.case_id}.npz").dose_gy
    inside = fine_case.body > 0
    assert np.abs(unresampled - expected)[inside].mean() > 1.0  # Gy


def test_spacing_within_ten_percent_is_predicted_as_is(phantom, tmp_path):
    ckpt, case = phantom
    predictor = Predictor.from_checkpoint(ckpt, "cpu", spacing_mismatch="refuse")
    near = write(with_spacing(case, [4.3, 7.4, 13.0], "near"), tmp_path)
    original = write(case, tmp_path)
    np.testing.assert_array_equal(predictor.predict(near).dose_gy,
                                  predictor.predict(original).dose_gy)


def test_training_grid_policy_resamples_every_case_off_the_median(phantom, tmp_path):
    """``training_grid`` puts a case within 10 % of the training spacing on the training
    grid too (``resample`` predicts it as is), so a patient is predicted on one grid
    whatever spacing it comes at."""
    ckpt, case = phantom
    near = with_spacing(case, [4.3, 7.4, 13.0], "near")
    as_is = Predictor.from_checkpoint(ckpt, "cpu", spacing_mismatch="resample")
    assert as_is.on_training_grid(near) is near
    one_grid = Predictor(as_is.module, as_is.contract, spacing_mismatch="training_grid")
    moved = one_grid.on_training_grid(near)
    np.testing.assert_allclose(moved.spacing_mm, as_is.spacing.median_mm)
    assert one_grid.on_training_grid(case) is case
    path = write(near, tmp_path)
    assert one_grid.predict(path).dose_gy.shape == near.shape
    assert not np.array_equal(one_grid.predict(path).dose_gy, as_is.predict(path).dose_gy)


def _plain_and_bounded(phantom, tmp_path, **bound):
    """The phantom checkpoint's predictor (its bounds off), the case, its plain prediction
    and the prediction with ``bound`` (a ``Predictor.from_checkpoint`` override) set."""
    ckpt, case = phantom
    predictor = Predictor.from_checkpoint(ckpt, "cpu")
    (name, _), = bound.items()
    assert getattr(predictor.module, name) is None  # the phantom recipe: off
    path = write(case, tmp_path)
    # predict / evaluate <name>= replaces the checkpoint's (none here)
    bounded = Predictor.from_checkpoint(ckpt, "cpu", **bound).predict(path).dose_gy
    return predictor, case, predictor.predict(path).dose_gy, bounded


def _union(case, names) -> np.ndarray:
    return np.logical_or.reduce([case.mask(n) > 0 for n in names if n in case.structures])


def test_the_target_dose_floor_raises_only_the_cold_target_voxels(phantom, tmp_path):
    predictor, case, plain, floored = _plain_and_bounded(phantom, tmp_path,
                                                         target_dose_floor=0.97)
    prescriptions = predictor.protocol.prescriptions_gy
    for target, gy in prescriptions.items():
        assert floored[case.mask(target) > 0].min() >= np.float32(0.97 * gy)
    raised = floored != plain
    assert raised.any() and not raised[~_union(case, prescriptions)].any()  # targets only
    expected = np.maximum.reduce([np.where(case.mask(t) > 0, np.float32(0.97 * gy), 0)
                                  for t, gy in prescriptions.items()])
    np.testing.assert_array_equal(floored[raised], expected[raised])


def test_the_oar_dose_ceiling_lowers_only_the_hot_organ_voxels_outside_the_targets(
        phantom, tmp_path):
    # 0.1 x 50 Gy: low enough that the phantom's femurs hold dose above it
    predictor, case, plain, capped = _plain_and_bounded(phantom, tmp_path, oar_dose_ceiling=0.1)
    limits = predictor.protocol.max_dose_limits_gy
    assert limits == {"Femur_L": 50.0, "Femur_R": 50.0}  # prostate_sib's Dmax constraints
    organs = _union(case, limits) & ~_union(case, predictor.protocol.targets)
    assert capped[organs].max() <= np.float32(5.0)
    lowered = capped != plain
    assert lowered.any() and not lowered[~organs].any()  # nothing outside, targets kept
    np.testing.assert_array_equal(capped[lowered], np.float32(5.0))
    assert (plain[lowered] > 5.0).all()


def test_the_organ_scale_multiplies_only_the_organ_voxels_outside_the_targets(phantom, tmp_path):
    predictor, case, plain, scaled = _plain_and_bounded(phantom, tmp_path, oar_dose_scale=0.9)
    protocol = predictor.protocol
    organs = _union(case, protocol.oars) & ~_union(case, protocol.targets)
    assert organs.any() and (plain[organs] > 0).any()
    np.testing.assert_array_equal(scaled[organs], plain[organs] * np.float32(0.9))
    np.testing.assert_array_equal(scaled[~organs], plain[~organs])  # targets, body kept


def test_the_organ_scale_takes_one_factor_per_organ_and_keeps_the_organs_not_named(
        phantom, tmp_path):
    predictor, case, plain, scaled = _plain_and_bounded(
        phantom, tmp_path, oar_dose_scale={"Rectum": 0.8, "Bladder": 1.1})
    targets = _union(case, predictor.protocol.targets)
    rectum, bladder = (case.mask(o) > 0 for o in ("Rectum", "Bladder"))
    assert not (rectum & bladder).any() and (plain[rectum & ~targets] > 0).any()
    np.testing.assert_allclose(scaled[rectum & ~targets], plain[rectum & ~targets] * 0.8,
                               rtol=1e-6)
    np.testing.assert_allclose(scaled[bladder & ~targets], plain[bladder & ~targets] * 1.1,
                               rtol=1e-6)
    rest = ~((rectum | bladder) & ~targets)  # targets, femurs, bowel, body: as they were
    np.testing.assert_array_equal(scaled[rest], plain[rest])
    with pytest.raises(ConfigValueError, match="Rectun: not an organ at risk of the protocol"):
        Predictor.from_checkpoint(phantom[0], "cpu", oar_dose_scale={"Rectun": 0.9})


def test_the_target_stretch_moves_only_the_target_dose_above_its_prescription(
        phantom, tmp_path):
    predictor, case, plain, stretched = _plain_and_bounded(phantom, tmp_path,
                                                           target_dose_stretch=1.2)
    prescriptions = predictor.protocol.prescriptions_gy
    rx = np.maximum.reduce([np.where(case.mask(t) > 0, np.float32(gy), 0)
                            for t, gy in prescriptions.items()])
    hot = (rx > 0) & (plain > rx)
    assert hot.any() and (plain[rx > 0] <= rx[rx > 0]).any()  # both sides in the phantom
    np.testing.assert_allclose(stretched[hot], rx[hot] + 1.2 * (plain[hot] - rx[hot]),
                               rtol=1e-6)
    np.testing.assert_array_equal(stretched[~hot], plain[~hot])  # the rest as it was


def test_pooling_grids_are_refused_for_a_network_on_the_case_grid(phantom, tmp_path):
    ckpt, _ = phantom
    assert Predictor.from_checkpoint(ckpt, "cpu").module.resolution_factor == 1
    with pytest.raises(ValueError, match=r"tta_pool_grids=2 for .*: pooling grids need a "
                                         r"network at a coarser grid"):
        Predictor.from_checkpoint(ckpt, "cpu", tta_pool_grids=2)
    with pytest.raises(ValueError, match=r"tta_pool_grids=0: must be a whole number"):
        Predictor.from_checkpoint(tmp_path / "absent.ckpt", "cpu", tta_pool_grids=0)


def test_a_target_dose_floor_out_of_range_is_refused_before_the_checkpoint_is_read(tmp_path):
    with pytest.raises(ValueError, match=r"target_dose_floor must be a fraction .* got 1.5"):
        Predictor.from_checkpoint(tmp_path / "absent.ckpt", "cpu", target_dose_floor=1.5)
    with pytest.raises(ValueError, match=r"oar_dose_ceiling must be a fraction .* got 0"):
        Predictor.from_checkpoint(tmp_path / "absent.ckpt", "cpu", oar_dose_ceiling=0)
