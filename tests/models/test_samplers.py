"""DDIM and rectified-flow samplers against oracles whose exact answer is known."""

from __future__ import annotations

import pytest
import torch
from monai.networks.schedulers import DDIMScheduler, DDPMScheduler

from vmatdose.models import diffusion, flow

SHAPE = (2, 1, 4, 5, 6)


def _clean() -> torch.Tensor:
    return torch.rand(SHAPE, generator=torch.Generator().manual_seed(1)) * 1.8 - 0.9


def _noise(seed: int = 2) -> torch.Tensor:
    return torch.randn(SHAPE, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("kind", diffusion.PREDICTION_TYPES)
def test_predicted_clean_inverts_the_training_target(kind):
    scheduler = DDPMScheduler(1000, prediction_type=kind)
    clean, noise = _clean(), _noise()
    t = torch.tensor([3, 870])
    noisy = scheduler.add_noise(clean, noise, t)
    target = diffusion.training_target(scheduler, clean, noise, t)
    recovered = diffusion.predicted_clean(scheduler, target, noisy, t)
    torch.testing.assert_close(recovered, clean, atol=2e-4, rtol=0)


def test_v_target_matches_monai_velocity():
    scheduler = DDPMScheduler(1000, prediction_type="v_prediction")
    clean, noise, t = _clean(), _noise(), torch.tensor([10, 500])
    torch.testing.assert_close(diffusion.training_target(scheduler, clean, noise, t),
                               scheduler.get_velocity(clean, noise, t))


@pytest.mark.parametrize("kind", diffusion.PREDICTION_TYPES)
@pytest.mark.parametrize("steps", [1, 7, 50])
def test_ddim_with_an_exact_denoiser_returns_the_data_point(kind, steps):
    """If the data distribution is one point x0, the exact network output at x_t is the
    training target for eps = (x_t - sqrt(abar) x0) / sqrt(1 - abar); DDIM (eta = 0) must
    then land on x0 from any noise and for any number of steps."""
    train = DDPMScheduler(1000, prediction_type=kind)
    clean = _clean()
    calls = []

    def oracle(noisy: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        calls.append(int(t[0]))
        abar = diffusion.alpha_bar(train, t, noisy)
        eps = (noisy - abar.sqrt() * clean) / (1 - abar).sqrt()
        return diffusion.training_target(train, clean, eps, t)

    sampler = DDIMScheduler(1000, prediction_type=kind)
    sample = diffusion.ddim_sample(oracle, sampler, _noise(), steps)
    torch.testing.assert_close(sample, clean, atol=1e-3, rtol=0)
    assert calls == sampler.timesteps.tolist() and len(calls) == steps
    assert calls[0] == 999 and (steps == 1 or calls[-1] == 0)


def test_ddim_is_a_function_of_the_noise_only():
    def net(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return 0.5 * x + t.reshape(-1, 1, 1, 1, 1) * 1e-4

    scheduler = DDIMScheduler(1000)
    a = diffusion.ddim_sample(net, scheduler, _noise(3), 10)
    b = diffusion.ddim_sample(net, scheduler, _noise(3), 10)
    c = diffusion.ddim_sample(net, scheduler, _noise(4), 10)
    assert torch.equal(a, b)
    assert (a - c).abs().mean() > 0.1


def test_flow_path_ends_and_one_step_estimate():
    noise, data = _noise(), _clean()
    t = torch.tensor([0.0, 1.0])
    x = flow.interpolate(noise, data, t)
    torch.testing.assert_close(x[0], noise[0])
    torch.testing.assert_close(x[1], data[1])
    t = torch.tensor([0.25, 0.6])
    x = flow.interpolate(noise, data, t)
    v = flow.target_velocity(noise, data)
    torch.testing.assert_close(flow.predicted_data(x, v, t), data)


@pytest.mark.parametrize("solver", flow.SOLVERS)
@pytest.mark.parametrize("steps", [1, 3, 25])
def test_flow_samplers_follow_the_exact_straight_path(solver, steps):
    """With the oracle velocity (x1 - x_t) / (1 - t) toward one data point both solvers
    reach it exactly, with the stated number of network calls."""
    data = _clean()
    calls = []

    def oracle(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        calls.append(float(t[0]))
        assert float(t[0]) < 1.0, "the network is never queried at t = 1"
        return (data - x) / (1 - t).reshape(-1, 1, 1, 1, 1)

    sample = flow.integrate(oracle, _noise(), steps, solver)
    torch.testing.assert_close(sample, data, atol=1e-5, rtol=0)
    assert len(calls) == flow.network_evaluations(steps, solver)


@pytest.mark.parametrize("steps", [2, 4, 8])
def test_heun_is_second_order_and_euler_first_order(steps):
    """dx/dt = t from x(0) = 0 gives x(1) = 1/2. Euler's error is 1/(2N); Heun (whose last
    step is an Euler step) errs by 1/(2N^2)."""
    x0 = torch.zeros(1, 1, 1, 1, 1)

    def velocity(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return torch.ones_like(x) * t.reshape(-1, 1, 1, 1, 1)

    euler = float(flow.integrate(velocity, x0, steps, "euler"))
    heun = float(flow.integrate(velocity, x0, steps, "heun"))
    assert euler == pytest.approx(0.5 - 1 / (2 * steps), abs=1e-6)
    assert heun == pytest.approx(0.5 - 1 / (2 * steps ** 2), abs=1e-6)


def test_integrate_rejects_bad_arguments():
    with pytest.raises(ValueError, match="solver"):
        flow.integrate(lambda x, t: x, _noise(), 3, "rk4")
    with pytest.raises(ValueError, match="steps"):
        flow.integrate(lambda x, t: x, _noise(), 0)
