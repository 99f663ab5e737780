"""DDIM and rectified-flow sampling (MONAI's inferer and schedulers, our Heun) against
oracles whose exact answer is known."""

from __future__ import annotations

import pytest
import torch
from monai.inferers import DiffusionInferer
from monai.networks.schedulers import DDIMScheduler, DDPMScheduler, RFlowScheduler

from vmatdose.models import diffusion, flow

SHAPE = (2, 1, 4, 5, 6)
T = 1000


def _clean() -> torch.Tensor:
    return torch.rand(SHAPE, generator=torch.Generator().manual_seed(1)) * 1.8 - 0.9


def _noise(seed: int = 2) -> torch.Tensor:
    return torch.randn(SHAPE, generator=torch.Generator().manual_seed(seed))


def _condition() -> torch.Tensor:
    return torch.full((SHAPE[0], 3, *SHAPE[2:]), 0.5)


class ConcatOracle:
    """A stand-in for DiffusionModelUNet under concatenation conditioning: checks that the
    input is ``[state, condition]`` and answers ``fn(state, timesteps)``."""

    def __init__(self, fn):
        self.fn, self.calls = fn, []

    def __call__(self, x: torch.Tensor, timesteps: torch.Tensor, context=None) -> torch.Tensor:
        assert context is None and x.shape[1] == 1 + _condition().shape[1]
        torch.testing.assert_close(x[:, 1:], _condition())
        self.calls.append(float(timesteps[0]))
        return self.fn(x[:, :1], timesteps.expand(x.shape[0]))


def sample(oracle: ConcatOracle, scheduler, noise: torch.Tensor) -> torch.Tensor:
    return DiffusionInferer(scheduler).sample(noise, oracle, scheduler=scheduler,
                                              conditioning=_condition(), mode="concat",
                                              verbose=False)


@pytest.mark.parametrize("kind", diffusion.PREDICTION_TYPES)
def test_predicted_clean_inverts_the_training_target(kind):
    scheduler = DDPMScheduler(T, prediction_type=kind)
    clean, noise = _clean(), _noise()
    t = torch.tensor([3, 870])
    noisy = scheduler.add_noise(clean, noise, t)
    target = diffusion.training_target(scheduler, clean, noise, t)
    recovered = diffusion.predicted_clean(scheduler, target, noisy, t)
    torch.testing.assert_close(recovered, clean, atol=2e-4, rtol=0)


@pytest.mark.parametrize("kind", diffusion.PREDICTION_TYPES)
@pytest.mark.parametrize("steps", [1, 7, 50])
def test_ddim_with_an_exact_denoiser_returns_the_data_point(kind, steps):
    """If the data distribution is one point x0, the exact network output at x_t is the
    training target for eps = (x_t - sqrt(abar) x0) / sqrt(1 - abar); DDIM (eta = 0) must
    then land on x0 from any noise and for any number of steps."""
    train = DDPMScheduler(T, prediction_type=kind)
    clean = _clean()

    def exact(noisy: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        t = t.long()
        abar = diffusion.alpha_bar(train, t, noisy)
        eps = (noisy - abar.sqrt() * clean) / (1 - abar).sqrt()
        return diffusion.training_target(train, clean, eps, t)

    sampler = DDIMScheduler(T, prediction_type=kind)
    sampler.set_timesteps(steps)
    oracle = ConcatOracle(exact)
    torch.testing.assert_close(sample(oracle, sampler, _noise()), clean, atol=1e-3, rtol=0)
    assert oracle.calls == sampler.timesteps.tolist() and len(oracle.calls) == steps
    assert oracle.calls[0] == 999 and (steps == 1 or oracle.calls[-1] == 0)


def test_flow_path_ends_and_one_step_estimate():
    scheduler = RFlowScheduler(T)
    noise, data = _noise(), _clean()
    x = scheduler.add_noise(data, noise, torch.tensor([0, T]))
    torch.testing.assert_close(x[0], data[0])
    torch.testing.assert_close(x[1], noise[1])
    t = torch.tensor([250, 600])
    x = scheduler.add_noise(data, noise, t)
    torch.testing.assert_close(flow.predicted_data(x, data - noise, t, T), data)


def straight_path_oracle(data: torch.Tensor) -> ConcatOracle:
    """The exact velocity toward one data point: (x1 - x_t) / (t / T), never asked at 0."""

    def velocity(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        assert float(t[0]) > 0, "the network is never queried at t = 0 (the data end)"
        return (data - x) / (t.float() / T).reshape(-1, 1, 1, 1, 1)

    return ConcatOracle(velocity)


@pytest.mark.parametrize("steps", [1, 3, 25])
def test_euler_and_heun_follow_the_exact_straight_path(steps):
    data = _clean()
    scheduler = RFlowScheduler(T)
    scheduler.set_timesteps(steps)
    euler = straight_path_oracle(data)
    torch.testing.assert_close(sample(euler, scheduler, _noise()), data, atol=1e-5, rtol=0)
    assert len(euler.calls) == flow.network_evaluations(steps, "euler")
    heun = straight_path_oracle(data)
    out = flow.heun_sample(lambda x, t: heun(torch.cat([x, _condition()], 1), t), scheduler,
                           _noise())
    torch.testing.assert_close(out, data, atol=1e-5, rtol=0)
    assert len(heun.calls) == flow.network_evaluations(steps, "heun")


@pytest.mark.parametrize("steps", [2, 4, 8])
def test_heun_is_second_order_and_euler_first_order(steps):
    """dx/ds = s in flow time s = 1 - t/T from x(0) = 0 gives x(1) = 1/2. Euler's error is
    1/(2N); Heun (whose last step is an Euler step) errs by 1/(2N^2)."""
    x0 = torch.zeros(SHAPE)
    scheduler = RFlowScheduler(T)
    scheduler.set_timesteps(steps)

    def velocity(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return torch.ones_like(x) * (1 - t.float() / T).reshape(-1, 1, 1, 1, 1)

    euler = float(sample(ConcatOracle(velocity), scheduler, x0)[0].mean())
    heun = float(flow.heun_sample(velocity, scheduler, x0)[0].mean())
    assert euler == pytest.approx(0.5 - 1 / (2 * steps), abs=1e-6)
    assert heun == pytest.approx(0.5 - 1 / (2 * steps ** 2), abs=1e-6)


def test_velocity_from_data_inverts_the_one_step_estimate():
    scheduler = RFlowScheduler(T)
    noise, data = _noise(), _clean()
    t = torch.tensor([1, 600])
    x = scheduler.add_noise(data, noise, t)
    v = flow.velocity_from_data(x, data, t, T)
    torch.testing.assert_close(v, data - noise, atol=1e-4, rtol=0)  # the path's velocity
    torch.testing.assert_close(flow.predicted_data(x, v, t, T), data)


@pytest.mark.parametrize("steps", [1, 4])
def test_a_data_predicting_network_lands_on_its_prediction(steps):
    """A network that always answers the data point: the velocity it implies carries any
    noise to that point in any number of Euler steps."""
    data = _clean()

    class DataOracle(torch.nn.Module):
        def forward(self, x, timesteps, context=None):
            assert x.shape[1] == 1 + _condition().shape[1]
            return data

    scheduler = RFlowScheduler(T)
    scheduler.set_timesteps(steps)
    net = flow.DataPredictionVelocity(DataOracle(), T)
    torch.testing.assert_close(sample(net, scheduler, _noise()), data, atol=1e-5, rtol=0)
