"""Every model config composes, predicts the right shape, and learns on a tiny batch."""

from __future__ import annotations

import warnings

import lightning as L
import pytest
import torch
from torch.utils.data import DataLoader

from vmatdose.training.generative import GenerativeDoseModule, dose_to_model

from model_testing import (
    GENERATIVE,
    MODEL_CONFIGS,
    N_CHANNELS,
    as_samples,
    build_model,
    synthetic_batch,
)

#: Trained parameter counts (millions) with the phantom's 8 input channels, as the configs
#: state (a generative model's moving average of the weights is not trained).
EXPECTED_PARAMS_M = {"unet": 1.19, "unet32": 4.75, "unet48": 10.67, "unet96": 42.65,
                     "unet_founding": 23.65, "attention_unet": 1.47, "dynunet": 5.69,
                     "ddpm": 1.19, "flow_matching": 1.19}
#: Few sampling steps keep the generative forward checks fast.
FAST_SAMPLING = ("model.sampling_steps=2", "model.ensemble_size=2")


def _overrides(name: str) -> tuple[str, ...]:
    return FAST_SAMPLING if name in GENERATIVE else ()


def test_the_new_model_configs_exist():
    assert {"unet32", "unet48", "unet96", "attention_unet", "dynunet", "ddpm",
            "flow_matching"} <= set(MODEL_CONFIGS)


@pytest.mark.parametrize("name", MODEL_CONFIGS)
def test_config_builds_and_predicts_a_whole_volume(name, tmp_path):
    torch.manual_seed(0)
    model, _ = build_model(name, tmp_path, *_overrides(name))
    n_params = sum(p.numel() for p in model.parameters() if p.requires_grad) / 1e6
    if name in EXPECTED_PARAMS_M:
        assert n_params == pytest.approx(EXPECTED_PARAMS_M[name], abs=0.01)
    model.eval()
    image = torch.rand(1, N_CHANNELS, 32, 32, 32)
    pred = model.predict_dose(image)
    assert pred.shape == (1, 1, 32, 32, 32)
    assert torch.isfinite(pred).all() and pred.min() >= 0
    mean, std = model.predict_with_uncertainty(image)
    assert mean.shape == (1, 1, 32, 32, 32)
    assert torch.allclose(mean, pred)
    if name in GENERATIVE:
        assert std.shape == mean.shape and std.mean() > 0
    else:
        assert std is None


@pytest.mark.parametrize("name", ["unet32", "attention_unet", "dynunet", *GENERATIVE])
def test_sizes_not_divisible_by_the_network_are_padded_and_cropped(name, tmp_path):
    model, _ = build_model(name, tmp_path, *_overrides(name))
    model.eval()
    pred = model.predict_dose(torch.rand(1, N_CHANNELS, 18, 20, 27))
    assert pred.shape == (1, 1, 18, 20, 27) and torch.isfinite(pred).all()


def _fixed_loss(model, batch: dict) -> float:
    """The training objective on ``batch`` with fixed noise (generative models) or the
    loss of the main output (regression models)."""
    with torch.no_grad():
        if isinstance(model, GenerativeDoseModule):
            generator = torch.Generator().manual_seed(123)
            clean = dose_to_model(batch["dose"], model.dose_max)
            return float(torch.stack([model.objective(clean, batch["image"], generator)[0]
                                      for _ in range(8)]).mean())
        return float(model.loss(model(batch["image"]), batch)[0])


#: (model, volume side, steps, required loss ratio after / before training)
TRAINING_CASES = [("unet", 16, 20, 0.4), ("unet32", 16, 20, 0.4),
                  ("attention_unet", 16, 20, 0.5), ("dynunet", 32, 15, 0.4),
                  ("ddpm", 16, 30, 0.4), ("flow_matching", 16, 30, 0.8)]


@pytest.mark.slow
@pytest.mark.parametrize(("name", "size", "steps", "ratio"), TRAINING_CASES)
def test_a_few_training_steps_lower_the_training_loss(name, size, steps, ratio, tmp_path):
    torch.manual_seed(0)
    model, _ = build_model(name, tmp_path, "model.val_gamma=null")
    batch = synthetic_batch(n_cases=2, size=size)
    before = _fixed_loss(model, batch)
    trainer = L.Trainer(accelerator="cpu", max_steps=steps, logger=False,
                        enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, limit_val_batches=0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer.fit(model, DataLoader(as_samples(batch) * steps, batch_size=2))
    after = _fixed_loss(model, batch)
    assert after < ratio * before, (before, after)
    assert float(trainer.callback_metrics["train/loss"]) > 0
