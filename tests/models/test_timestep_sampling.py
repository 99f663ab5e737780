"""The law of the generative models' training timesteps."""

from __future__ import annotations

import math

import pytest
import torch
from hydra.errors import InstantiationException

from vmatdose.models.timestep_sampling import TimestepSampling

from model_testing import GENERATIVE, build_model

T = 1000


def _fractions(sampling: TimestepSampling, n: int = 20000) -> torch.Tensor:
    t = sampling.sample(n, T, torch.Generator().manual_seed(0))
    assert t.dtype == torch.long and int(t.min()) >= 0 and int(t.max()) <= T - 1
    return t.float() / T


def test_uniform_timesteps_cover_the_range_evenly():
    u = _fractions(TimestepSampling())
    assert float(u.mean()) == pytest.approx(0.5, abs=0.01)
    assert float((u > 0.9).float().mean()) == pytest.approx(0.1, abs=0.01)


def test_logit_normal_timesteps_have_the_known_median_and_high_noise_share():
    """loc 1, scale 1: median t / T = sigmoid(1) = 0.731; P(t > T / 2) = Phi(1) = 0.841."""
    u = _fractions(TimestepSampling("logit_normal", loc=1.0, scale=1.0))
    assert float(u.median()) == pytest.approx(1 / (1 + math.exp(-1)), abs=0.01)
    assert float((u > 0.5).float().mean()) == pytest.approx(0.8413, abs=0.01)
    centred = _fractions(TimestepSampling("logit_normal", loc=0.0, scale=1.0))
    assert float(centred.median()) == pytest.approx(0.5, abs=0.01)


def test_timesteps_repeat_for_a_seed():
    sampling = TimestepSampling("logit_normal", loc=0.5)
    a = sampling.sample(8, T, torch.Generator().manual_seed(3))
    b = sampling.sample(8, T, torch.Generator().manual_seed(3))
    assert torch.equal(a, b)


@pytest.mark.parametrize("bad, match", [({"distribution": "cosine"}, "distribution 'cosine'"),
                                        ({"distribution": "logit_normal", "scale": 0.0},
                                         "scale must be > 0")])
def test_bad_timestep_sampling_is_refused(bad, match):
    with pytest.raises(ValueError, match=match):
        TimestepSampling(**bad)


@pytest.mark.parametrize("name", GENERATIVE)
def test_training_objective_draws_the_configured_timesteps(name, tmp_path):
    """``model.timestep_sampling``: logit-normal with the configs' loc 1, scale 1 (median
    t / T 0.73; flow_matching's default) or uniform (median 0.5; ddpm's default)."""
    medians = {}
    for law in ("logit_normal", "uniform"):
        model, _ = build_model(name, tmp_path, "model.net.net.channels=[8,16,16,16]",
                               f"model.timestep_sampling.distribution={law}")
        seen = []

        def record(clean, net, noise, t, seen=seen, **kwargs):
            seen.append(t)
            return torch.zeros_like(clean)

        model.inferer = record
        clean = torch.zeros(4000, 1, 1, 1, 1)
        model.objective(clean, torch.zeros(4000, 1, 1, 1, 1), torch.Generator().manual_seed(1))
        medians[law] = float(seen[0].float().median()) / model.train_scheduler.num_train_timesteps
    assert medians["logit_normal"] == pytest.approx(0.731, abs=0.02)
    assert medians["uniform"] == pytest.approx(0.5, abs=0.03)


def test_model_refuses_an_unknown_timestep_law(tmp_path):
    with pytest.raises(InstantiationException, match="timestep_sampling.distribution"):
        build_model("ddpm", tmp_path, "model.timestep_sampling.distribution=beta")
