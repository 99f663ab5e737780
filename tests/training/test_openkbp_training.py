"""OpenKBP training: the sample trains a few steps with the challenge split and evaluates;
the inference hooks (flip TTA with paired channels swapped, zero outside the
possible-dose mask, half-resolution inference); the recipes compose and train; the
prediction -> submission -> re-read round trip (skips without the sample)."""

from __future__ import annotations

import json
import re
import shutil

import hydra
import numpy as np
import pytest
import torch
from torch import nn

from vmatdose.config import CONFIG_DIR
from vmatdose.data.input_spec import InputSpec
from vmatdose.inference.volume import flip_sets
from vmatdose.training.fit import fit
from vmatdose.training.module import DoseModule
from vmatdose.workflow import run_training as run

from conftest import OPENKBP_SAMPLE, REPO_ROOT, openkbp_patients

needs_sample = pytest.mark.skipif(not OPENKBP_SAMPLE.is_dir(),
                                  reason=f"OpenKBP sample not found at {OPENKBP_SAMPLE}")


class PickChannel(nn.Module):
    """A 'network' that returns one input channel times a learnable 1 (and an x ramp)."""

    def __init__(self, channel: int, ramp: float = 0.0):
        super().__init__()
        self.channel, self.ramp = channel, ramp
        self.scale = nn.Parameter(torch.ones(()))

    def forward(self, image):
        x = torch.linspace(0, 1, image.shape[-1]).expand_as(image[:, :1])
        return self.scale * image[:, self.channel:self.channel + 1] + self.ramp * x


def module(net, **kwargs) -> DoseModule:
    return DoseModule(net, None, torch.optim.SGD, max_relative_dose=None, **kwargs)


def test_flip_tta_swaps_paired_input_channels_and_unflips():
    image = torch.zeros(1, 3, 4, 4, 6)  # CT, Left, Right
    image[0, 1, :, :, 0] = 1.0  # the left structure at low x
    image[0, 2, :, :, 5] = 0.5
    plain = module(PickChannel(1))
    tta = module(PickChannel(1), tta="flips", tta_axes=[-1], lr_channel_permutation=[0, 2, 1])
    mean, std = tta.predict_with_uncertainty(image)
    assert std is None
    # flipped pass: the 'Left' channel holds the mirrored Right mask, flipped back
    expected = 0.5 * (image[:, 1:2] + image[:, 2:3])
    torch.testing.assert_close(mean, expected)
    assert not torch.allclose(plain.predict_with_uncertainty(image)[0], mean)
    wrong = module(PickChannel(1), tta="flips", tta_axes=[-1], lr_channel_permutation=[0, 1, 2])
    assert not torch.allclose(wrong.predict_with_uncertainty(image)[0], expected)


def test_flip_tta_averages_every_flip_combination():
    assert flip_sets([-1, -3]) == [(), (-3,), (-1,), (-3, -1)]
    image = torch.rand(1, 2, 16, 16, 16)  # no padding to divisible_by
    tta = module(PickChannel(0, ramp=1.0), tta="flips", tta_axes=[-3, -2],
                 lr_channel_permutation=[0, 1])
    ramp = torch.linspace(0, 1, 16).expand(1, 1, 16, 16, 16)
    # z/y flips leave an x ramp alone and un-flip the image channel exactly
    torch.testing.assert_close(tta.predict_with_uncertainty(image)[0], image[:, :1] + ramp)
    with pytest.raises(ValueError, match="model.tta"):
        module(PickChannel(0), tta="rotations")
    with pytest.raises(ValueError, match="lr_channel_permutation"):
        module(PickChannel(0), tta="flips").predict_with_uncertainty(image)


def test_zero_outside_body_and_half_resolution_inference():
    image = torch.rand(1, 2, 8, 8, 8)
    body = torch.zeros(1, 1, 8, 8, 8)
    body[..., 2:6, 2:6, 2:6] = 1
    kept = module(PickChannel(0)).predict_with_uncertainty(image, body=body)[0]
    zeroed = module(PickChannel(0), zero_outside_body=True).predict_with_uncertainty(
        image, body=body)[0]
    assert kept[body == 0].abs().sum() > 0 and zeroed[body == 0].abs().sum() == 0
    torch.testing.assert_close(zeroed[body > 0], kept[body > 0])
    half = module(PickChannel(0), resolution_factor=2, zero_outside_body=True)
    constant = torch.full((1, 2, 8, 8, 8), 0.7)
    out = half.predict_with_uncertainty(constant, body=body)[0]
    assert out.shape == (1, 1, 8, 8, 8)
    # a constant dose survives pooling + mask-normalised upsampling exactly in the body
    torch.testing.assert_close(out[body > 0], torch.full_like(out[body > 0], 0.7))
    assert out[body == 0].abs().sum() == 0


def test_prior_residual_adds_the_full_resolution_prior_back():
    prior = torch.zeros(1, 1, 8, 8, 8)
    prior[..., 3:5, 3:5, 3:5] = 1.0  # sharp at full resolution
    image = torch.cat([torch.zeros_like(prior), prior], dim=1)
    body = torch.ones_like(prior)
    # a network that outputs its (pooled) prior input: zero correction
    net = module(PickChannel(1), resolution_factor=2, prior_residual=True)
    with pytest.raises(ValueError, match="no input specification"):
        net.predict_with_uncertainty(image, body=body)
    net.contract = {"inputs": {"spec": InputSpec.build([], prior=True).to_dict()}}  # CT, prior
    torch.testing.assert_close(net.predict_with_uncertainty(image, body=body)[0], prior)

    # with gantry sectors after the prior, only the prior itself is added back
    sectors = torch.cat([image, 5.0 * torch.ones(1, 4, 8, 8, 8)], dim=1)
    net.contract = {"inputs": {"spec": InputSpec.build([], prior=True,
                                                       prior_sectors=4).to_dict()}}
    torch.testing.assert_close(net.predict_with_uncertainty(sectors, body=body)[0], prior)


@pytest.mark.parametrize("fraction", [0.0, -0.5, 1.5])
def test_a_target_dose_floor_outside_its_range_is_refused(fraction):
    with pytest.raises(ValueError, match="model.target_dose_floor must be a fraction"):
        module(PickChannel(0), target_dose_floor=fraction)
    assert module(PickChannel(0), target_dose_floor=0.97).target_dose_floor == 0.97


def test_loss_in_body_ignores_the_prediction_outside():
    from vmatdose.losses import CompositeLoss
    from vmatdose.losses.voxel import VoxelLoss

    loss = CompositeLoss({"voxel": {"weight": 1.0, "term": VoxelLoss(kind="l1")}})
    batch = {"image": torch.ones(1, 1, 4, 4, 4), "dose": torch.zeros(1, 1, 4, 4, 4),
             "body": torch.zeros(1, 1, 4, 4, 4)}
    batch["body"][..., :2] = 1
    outside_only = DoseModule(PickChannel(0), loss, torch.optim.SGD, loss_in_body=True)
    outside_only.log = lambda *a, **k: None
    torch.testing.assert_close(outside_only.training_step(batch, 0), torch.tensor(0.5))
    everywhere = DoseModule(PickChannel(0), loss, torch.optim.SGD)
    everywhere.log = lambda *a, **k: None
    torch.testing.assert_close(everywhere.training_step(batch, 0), torch.tensor(1.0))


def compose_train(tmp_path, *overrides):
    from hydra import compose, initialize_config_dir

    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        return compose("train", overrides=[f"paths.root_dir={tmp_path}",
                                           f"paths.output_dir={tmp_path / 'run'}", *overrides])


@pytest.mark.parametrize("recipe", ["openkbp_cpu", "openkbp_cpu+beam_sectors", "openkbp_gpu",
                                    "openkbp_flow"])
def test_recipes_compose_and_train_two_steps_on_tiny_volumes(tmp_path, recipe):
    """Every recipe builds its whole module on CPU and takes two optimiser steps on
    random 32^3 volumes (the GPU one with a tiny cascade, the flow with a tiny U-Net)."""
    recipe, _, sectors = recipe.partition("+")
    overrides = [f"experiment={recipe}", "trainer.accelerator=cpu", "trainer.precision=32",
                 *(["data.prior_dose.beam_sectors=9"] if sectors else [])]
    if recipe == "openkbp_gpu":
        overrides += ["model.net.channels=[4,8,8]", "model.net.strides=[2,2]"]
    if recipe == "openkbp_flow":
        overrides += ["model.net.net.channels=[4,8,8,8]"]
    cfg = compose_train(tmp_path, *overrides)
    assert cfg.model.tta == "flips" and cfg.model.zero_outside_body
    if recipe == "openkbp_cpu":
        assert cfg.model.target_dose_floor == 0.97
        assert cfg.model.body_crop_margin == 2 and cfg.model.divisible_by == 8
        assert cfg.data.augment.pool_grids == 8 and cfg.data.device_cache
        assert cfg.model.tta_pool_grids == 2 and cfg.model.resolution_factor == 2
        assert cfg.model.oar_dose_scale.LeftParotid == 0.94 and cfg.model.oar_dose_ceiling == 0.9
        assert set(cfg.model.oar_dose_scale) == set(cfg.protocol.oars)
        assert cfg.model.target_dose_stretch == 1.15
    if sectors:
        assert cfg.model.net.in_channels == 12 + 9  # CT, 10 structures, prior, 9 sectors
    model = hydra.utils.instantiate(cfg.model, loss=hydra.utils.instantiate(cfg.loss))
    model.log = lambda *a, **k: None
    seen = []
    if recipe == "openkbp_cpu":
        model.net.register_forward_hook(lambda _m, a, _o: seen.append(tuple(a[0].shape[2:])))
    channels = cfg.model.net.in_channels - (recipe == "openkbp_flow")  # less the dose
    gen = torch.Generator().manual_seed(0)
    batch = {"image": torch.rand(2, channels, 32, 32, 32, generator=gen),
             "dose": torch.rand(2, 1, 32, 32, 32, generator=gen),
             "body": torch.zeros(2, 1, 32, 32, 32), "masks": torch.zeros(2, 10, 32, 32, 32),
             "dose_scale_gy": torch.full((2,), 70.0), "spacing_mm": torch.ones(2, 3)}
    batch["body"][:, :, 6:18, 4:20, 2:30] = 1
    optimizer = model.optimizer_factory(params=model.parameters())
    losses = []
    for _ in range(2):
        model.train()
        loss = model.training_step(batch, 0)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(float(loss))
    assert all(np.isfinite(losses))
    if recipe == "openkbp_cpu":  # the body's box grown by 2: z 4..20, y 2..22 -> 24, x whole
        assert seen == [(16, 24, 32)] * 2
    model.eval()
    model.lr_channel_permutation = list(range(channels))
    # what training stores in the contract: where the prior channel is
    model.contract = {"inputs": {"spec": InputSpec.from_data_config(cfg.data).to_dict()}}
    mean, _ = model.predict_with_uncertainty(batch["image"][:1], body=batch["body"][:1] * 0)
    assert mean.shape == (1, 1, 32, 32, 32) and float(mean.abs().sum()) == 0.0


@pytest.mark.slow  # trains and evaluates on the OpenKBP sample (a minute and more)
@needs_sample
def test_openkbp_sample_trains_with_the_challenge_split_and_evaluates(tmp_path):
    run_dir = tmp_path / "run"
    cfg = compose_train(tmp_path, "data=openkbp", f"data.source_dir={OPENKBP_SAMPLE}",
                        "data.max_cases=3", "data.patch_size=[32,32,32]",
                        "trainer.max_epochs=1", "+trainer.limit_train_batches=2",
                        "evaluation=fast", "model.val_gamma=null", "model.tta=flips",
                        "model.tta_axes=[-1]", "model.zero_outside_body=true")
    run(cfg)
    cases = tmp_path / "data" / "openkbp" / "openkbp-sample"
    assert len(list(cases.glob("openkbp_pt_*.npz"))) == 21
    split = json.loads((run_dir / "split.json").read_text())
    assert split["val"] == ["openkbp_pt_201", "openkbp_pt_211", "openkbp_pt_221"]
    assert split["test"] == split["val"] and len(split["train"]) == 3
    assert not set(split["train"]) & set(split["val"])
    summary = json.loads((run_dir / "eval" / "summary.json").read_text())
    assert summary["n_cases"] == 3
    assert summary["openkbp"]["dose_score_gy"] > 0
    assert summary["openkbp"]["dvh_score_gy"] > 0
    # import -> predict -> export -> re-read in the challenge's layout, voxel for voxel
    from vmatdose.data.case import load_case
    from vmatdose.data.export.openkbp import read_submission
    from vmatdose.data.ingest.openkbp import read_sparse, to_canonical
    from vmatdose.inference.run import run_prediction

    case_path = cases / "openkbp_pt_201.npz"
    one = tmp_path / "one"
    one.mkdir()
    shutil.copy(case_path, one / case_path.name)
    case = load_case(case_path)
    out = tmp_path / "pred"
    run_prediction({"ckpt_path": str(run_dir / "checkpoints" / "last.ckpt"),
                    "cases_dir": str(one), "output_dir": str(out), "accelerator": "cpu",
                    "export_openkbp": True})
    with np.load(out / "openkbp_pt_201.npz") as data:
        pred = data["dose"]
    assert pred[case.body == 0].max() == 0.0 and pred.max() > 0
    original = read_submission(out / "pt_201.csv")
    np.testing.assert_array_equal(to_canonical(original), pred.astype(np.float32))
    mask = read_sparse(OPENKBP_SAMPLE / "validation-pats/pt_201/possible_dose_mask.csv")
    assert original[mask == 0].max() == 0.0  # on the original (row, column, slice) grid


def load_bench():
    """benchmarks/bench_openkbp.py as a module (the benchmarks are scripts)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location(
        "bench_openkbp", REPO_ROOT / "benchmarks" / "bench_openkbp.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    return bench


@pytest.mark.slow  # trains the recipe's own network at 64^3 (about a minute)
@needs_sample
def test_openkbp_flow_trains_on_the_sample_and_predicts_inside_the_mask(tmp_path):
    """experiment=openkbp_flow as it is (64^3, the prior channel, 2.7 M network) takes
    three steps on two sample patients; the bench's prediction path (flip TTA over the
    ensemble, the prior added back at 128^3, zero outside the mask) and the official
    scores run on its checkpoint."""
    from vmatdose.evaluation.openkbp_scores import score_patients

    bench = load_bench()

    source = openkbp_patients(tmp_path / "source", {"train-pats": ("pt_1", "pt_13"),
                                                     "validation-pats": ("pt_201",)})
    run_dir = tmp_path / "run"
    cfg = compose_train(tmp_path, "experiment=openkbp_flow", f"data.source_dir={source}",
                        "data.import_workers=1", "trainer.max_steps=3",
                        "trainer.check_val_every_n_epoch=1")
    assert bench.compose_config(run_dir, [], "openkbp_flow").model.prior_channel == 11
    trainer, _ = fit(cfg, run_dir)
    assert trainer.global_step == 3
    cases = sorted((tmp_path / "data" / "openkbp" / "source").glob("openkbp_pt_201.npz"))
    (case, pred), = bench.predict_validation(run_dir / "checkpoints" / "last.ckpt", cases)
    assert pred.shape == case.dose.shape == (128, 128, 128)
    assert pred[case.body == 0].max() == 0.0 and pred[case.body > 0].max() > 0
    scores = score_patients([(case, pred)], list(cfg.data.targets))
    assert np.isfinite(scores["dose_score_gy"]) and scores["dose_score_gy"] > 0


def test_time_cosine_schedule_follows_the_wall_clock(monkeypatch):
    from vmatdose.training import schedules

    clock = [100.0]
    monkeypatch.setattr(schedules.time, "monotonic", lambda: clock[0])
    optimizer = torch.optim.SGD([nn.Parameter(torch.zeros(()))], lr=1.0)
    scheduler = schedules.TimeCosineLR(optimizer, budget_minutes="10", eta_min=0.0)
    assert optimizer.param_groups[0]["lr"] == pytest.approx(1.0)
    clock[0] += 300.0  # half the budget
    scheduler.step()
    assert optimizer.param_groups[0]["lr"] == pytest.approx(0.5)
    clock[0] += 600.0  # past the budget: stays at eta_min
    scheduler.step()
    assert optimizer.param_groups[0]["lr"] == pytest.approx(0.0)


def test_the_bench_table_says_when_the_validation_patients_were_trained_on(capsys):
    bench = load_bench()
    result = json.loads((REPO_ROOT / "benchmarks" / "results"
                         / "openkbp_cpu-recipe-stretch.json").read_text())
    score = re.escape(f"{result['val_dose_score_gy']:.3f}")
    bench.print_table(result)
    held_out = capsys.readouterr().out
    assert re.search(rf"validation, this recipe +{score}", held_out)
    assert "in-sample" not in held_out
    bench.print_table({**result, "train_on": ["train", "val"], "val_in_sample": True})
    in_sample = capsys.readouterr().out
    assert re.search(rf"validation \(in-sample\) +{score}", in_sample)
    assert "validation, this recipe" not in in_sample
    assert "the validation patients were trained on (data.split.train_on=['train', 'val'])" \
        in in_sample
