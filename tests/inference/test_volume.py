"""Whole-volume inference runs in one place: a prediction reads its case file once, runs
each TTA view through the network once, zeroes outside the body once (also when the case
is resampled), and training's validation pass is the same code."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from vmatdose.data.transforms import PoolGridsd, pool_grid_offsets
from vmatdose.inference import Predictor
from vmatdose.inference.volume import VolumeInference, flip_sets, grid_padding, pad_to_multiple

from case_variants import first_case, upsampled, write


@pytest.fixture()
def recorded(trained_run, monkeypatch):
    """A predictor of the smoke checkpoint with left/right TTA and zeroing outside the
    body, and what it does: case files read, network inputs, zeroings."""
    root, _, ckpt = trained_run
    predictor = Predictor.from_checkpoint(ckpt, "cpu")
    module = predictor.module
    module.tta, module.tta_axes, module.zero_outside_body = "flips", [-1], True
    record = {"reads": [], "inputs": [], "zeroings": 0}
    real_load = np.load

    def load(path, *args, **kwargs):
        record["reads"].append(str(path))
        return real_load(path, *args, **kwargs)

    monkeypatch.setattr(np, "load", load)
    module.net.register_forward_hook(lambda _m, args, _o: record["inputs"].append(args[0]))
    real_zero = VolumeInference.zero_outside

    def zero_outside(self, *args):
        record["zeroings"] += 1
        return real_zero(self, *args)

    monkeypatch.setattr(VolumeInference, "zero_outside", zero_outside)
    return predictor, first_case(root / "data" / "phantom_smoke"), record


def test_a_prediction_reads_once_runs_each_view_once_and_zeroes_once(recorded, tmp_path):
    predictor, case, record = recorded
    path = write(case, tmp_path)
    record["reads"].clear()
    dose = predictor.predict(path).dose_gy
    assert record["reads"] == [str(path)]
    first, mirrored = record["inputs"]  # identity and the left/right mirror, nothing else
    inference = predictor.module.inference
    assert torch.equal(mirrored, inference.flip_input(first, (-1,)))
    assert record["zeroings"] == 1
    assert np.all(dose[case.body == 0] == 0) and dose[case.body > 0].max() > 0


def test_a_resampled_case_is_zeroed_once_on_its_own_grid(recorded, tmp_path):
    predictor, case, record = recorded
    fine = upsampled(case, 2)
    path = write(fine, tmp_path)
    record["reads"].clear()
    dose = predictor.predict(path).dose_gy
    assert record["reads"] == [str(path)]
    assert len(record["inputs"]) == 2 and record["zeroings"] == 1
    assert dose.shape == fine.shape
    assert np.all(dose[fine.body == 0] == 0)


class Recording(torch.nn.Module):
    """Returns channel 0 and records every input it sees."""

    def __init__(self):
        super().__init__()
        self.inputs: list[torch.Tensor] = []

    def forward(self, x):
        self.inputs.append(x)
        return x[:, :1]


def test_flip_tta_averages_every_view_unflipped():
    net = Recording()
    inference = VolumeInference(tta="flips", tta_axes=[-3, -1], lr_permutation=[0, 1],
                                divisible_by=1, max_relative_dose=None)
    image = torch.rand(1, 2, 4, 5, 6)
    mean, std = inference.predict(image, None, lambda x: (inference.network_pass(net, x), None))
    assert len(net.inputs) == len(flip_sets([-3, -1])) == 4
    torch.testing.assert_close(mean, image[:, :1])  # an equivariant net: TTA changes nothing
    assert std is None


def test_the_network_pass_pads_to_the_size_multiple_and_crops_back():
    net = Recording()
    image = torch.rand(1, 1, 5, 9, 17)
    out = VolumeInference(divisible_by=8, max_relative_dose=None).network_pass(net, image)
    assert net.inputs[0].shape[-3:] == (8, 16, 24)
    torch.testing.assert_close(out, image)
    padded, crop = pad_to_multiple(image, 8)
    torch.testing.assert_close(padded[crop], image)


def test_validation_runs_the_same_network_pass(trained_run, monkeypatch):
    _, _, ckpt = trained_run
    module = Predictor.from_checkpoint(ckpt, "cpu").module
    calls = []
    real = VolumeInference.network_pass

    def network_pass(self, net, image):
        calls.append(image.shape)
        return real(self, net, image)

    monkeypatch.setattr(VolumeInference, "network_pass", network_pass)
    n = len(module.inference.input_spec)
    image = torch.rand(1, n, 8, 8, 8)
    batch = {"image": image, "dose": torch.rand(1, 1, 8, 8, 8), "body": torch.ones(1, 1, 8, 8, 8),
             "dose_scale_gy": torch.tensor([70.0]), "spacing_mm": torch.tensor([[4.0, 4, 4]])}
    module.loss = lambda pred, b: ((pred - b["dose"]).abs().mean(), {})  # inference-only
    module.validation_step(batch, 0)
    assert calls == [image.shape]


def test_each_pooling_grid_sees_what_training_pooled_on_that_grid():
    net = Recording()
    inference = VolumeInference(resolution_factor=2, tta_pool_grids=8, divisible_by=1,
                                max_relative_dose=None)
    image = torch.rand(1, 2, 6, 6, 6)
    mean, _ = inference.run(image, None, lambda x: (inference.network_pass(net, x), None))
    trained = PoolGridsd(["image"], factor=2, grids=8)({"image": image[0]})["image"]
    assert len(net.inputs) == 8 and mean.shape == (1, 1, 6, 6, 6)
    for seen, grid, offset in zip(net.inputs, trained, pool_grid_offsets(2, 8)):
        first = [1 if o else 0 for o in offset]  # the padding's extra coarse voxel in front
        window = seen[0][(slice(None), *[slice(k, k + 3) for k in first])]
        torch.testing.assert_close(window, grid, rtol=0, atol=1e-6)


def test_grid_padding_crops_back_and_rounds_to_the_factor():
    pads, crop = grid_padding((5, 6, 7), 2, (1, 0, 1))
    assert pads == [1, 0, 0, 0, 1, 0]  # x: 1 before, 0 after (8); y: none (6); z: 1, 0 (6)
    image = torch.rand(1, 1, 5, 6, 7)
    padded = torch.nn.functional.pad(image, pads)
    assert padded.shape[-3:] == (6, 6, 8)
    torch.testing.assert_close(padded[crop], image)


def test_the_grids_mean_is_finer_than_one_grid():
    """A dose step inside a coarse voxel of grid 0 (between case voxels 6 and 7 along x):
    grid 0 pools it to 0.5 and upsampling smears it over case voxels 5-8 (errors 0.125,
    0.375, 0.375, 0.125); grid (1, 1, 1) has the step on a coarse border (0, 0.25, 0.25,
    0); their mean errs 0.0625, 0.3125, 0.3125, 0.0625: 0.75 per row against 1.0."""
    dose = torch.zeros(1, 1, 8, 8, 16)
    dose[..., 7:] = 1.0
    row_errors = []
    for grids in (1, 2):
        inference = VolumeInference(resolution_factor=2, tta_pool_grids=grids, divisible_by=1,
                                    max_relative_dose=None)
        mean, _ = inference.run(dose, None, lambda x: (x[:, :1], None))
        row_errors.append((mean - dose)[0, 0, 2:-2, 2:-2, 2:-2].abs().sum().item() / 16)
    assert row_errors == pytest.approx([1.0, 0.75], abs=1e-6)


@pytest.mark.parametrize("grids, factor, words", [
    (2, 1, "resolution_factor > 1"), (9, 2, "pooling by 2 has 8 grids"),
    (0, 2, "whole number"), (True, 2, "whole number"), (1.5, 2, "whole number")])
def test_bad_pooling_grids_are_refused_when_the_model_is_built(grids, factor, words):
    with pytest.raises(ValueError, match=rf"model\.tta_pool_grids={grids!r}: .*{words}"):
        VolumeInference(resolution_factor=factor, tta_pool_grids=grids)
